"""sensor_msgs Image / CompressedImage <-> numpy, and camera frames -> the model's input layout.

Uses the real `cv_bridge` when it is importable (a robot with ROS installed from apt) and otherwise
our own converter with the same results: `image_to_array` is `imgmsg_to_cv2(msg, 'passthrough')`,
`compressed_to_array` is `compressed_imgmsg_to_cv2` (BGR or mono8), `array_to_image` is
`cv2_to_imgmsg`. `to_model_input` turns any supported frame into uint8 RGB channels-first at the
card's size, or raises PolicyInputError naming the camera, what it sent, what the model expects and
the fix. Imports numpy, cv2 and message classes only: no rclpy node machinery.
"""
import array
import sys

import numpy as np

from rko_ros.errors import PolicyInputError

try:  # pragma: no cover - only on machines with ROS from apt
    from cv_bridge import CvBridge
    _BRIDGE = CvBridge()
except ImportError:
    _BRIDGE = None

# encoding -> (numpy dtype, channels)
ENCODINGS = {
    'rgb8': (np.uint8, 3), 'bgr8': (np.uint8, 3), 'rgba8': (np.uint8, 4), 'bgra8': (np.uint8, 4),
    'mono8': (np.uint8, 1), '8UC1': (np.uint8, 1), '8UC3': (np.uint8, 3),
    'mono16': (np.uint16, 1), '16UC1': (np.uint16, 1), '32FC1': (np.float32, 1),
}
COLOR_ENCODINGS = ('rgb8', 'bgr8', 'rgba8', 'bgra8', '8UC3')


def _unsupported(encoding, camera=''):
    where = f"camera '{camera}' " if camera else ''
    return PolicyInputError(f'{where}sent encoding {encoding!r}, which rko_ros cannot convert; '
                            f'configure the driver for one of {", ".join(ENCODINGS)} or '
                            f'compressed jpeg/png')


def image_to_array(msg, camera=''):
    """sensor_msgs/Image -> (H, W) or (H, W, C) array in the message's own encoding and dtype."""
    if msg.encoding not in ENCODINGS:
        raise _unsupported(msg.encoding, camera)
    if _BRIDGE is not None:  # pragma: no cover
        return _BRIDGE.imgmsg_to_cv2(msg, desired_encoding='passthrough')
    dtype, channels = ENCODINGS[msg.encoding]
    dtype = np.dtype(dtype).newbyteorder('>' if msg.is_bigendian else '<')
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    row_bytes = width * channels * dtype.itemsize
    data = msg.data
    buffer = np.frombuffer(data if isinstance(data, (bytes, bytearray, memoryview))
                           else memoryview(data), dtype=np.uint8)
    if step < row_bytes or buffer.size < step * (height - 1) + row_bytes:
        where = f"camera '{camera}': " if camera else ''
        raise PolicyInputError(
            f'{where}{msg.encoding} image {width}x{height} with step {step} needs at least '
            f'{row_bytes} bytes per row and {step * (height - 1) + row_bytes} bytes, got '
            f'{buffer.size}; the driver fills the Image message wrongly')
    # Rows may carry padding after the pixels: cut each row to its pixel bytes.
    rows = np.lib.stride_tricks.as_strided(buffer, shape=(height, row_bytes),
                                           strides=(step, 1))
    pixels = np.ascontiguousarray(rows).view(dtype).astype(dtype.newbyteorder('='), copy=False)
    shape = (height, width) if channels == 1 else (height, width, channels)
    return pixels.reshape(shape)


def compressed_to_array(msg, camera=''):
    """sensor_msgs/CompressedImage (jpeg/png) -> (H, W, 3) BGR uint8, or (H, W) for grey images."""
    if _BRIDGE is not None:  # pragma: no cover
        return _BRIDGE.compressed_imgmsg_to_cv2(msg, desired_encoding='passthrough')
    import cv2
    buffer = np.frombuffer(bytes(msg.data), dtype=np.uint8)
    image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED) if buffer.size else None
    if image is None:
        where = f"camera '{camera}' " if camera else ''
        raise PolicyInputError(f'{where}sent a CompressedImage (format {msg.format!r}, '
                               f'{buffer.size} bytes) that OpenCV cannot decode; send jpeg or png')
    return image


def compressed_encoding(image):
    """The encoding of what `compressed_to_array` returned."""
    if image.ndim == 2:
        return 'mono16' if image.dtype == np.uint16 else 'mono8'
    return 'bgra8' if image.shape[2] == 4 else 'bgr8'


def array_to_image(image, encoding, stamp=None, frame_id=''):
    """numpy (H, W[, C]) -> sensor_msgs/Image in `encoding` (little-endian, no row padding)."""
    from sensor_msgs.msg import Image
    if encoding not in ENCODINGS:
        raise _unsupported(encoding)
    dtype, channels = ENCODINGS[encoding]
    image = np.asarray(image)
    got_channels = 1 if image.ndim == 2 else image.shape[2]
    if image.dtype != dtype or got_channels != channels or image.ndim not in (2, 3):
        raise PolicyInputError(f'array {image.shape} {image.dtype} does not fit encoding '
                               f'{encoding!r} ({channels} channel(s) of {np.dtype(dtype).name})')
    msg = Image()
    if stamp is not None:
        msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    msg.height, msg.width = int(image.shape[0]), int(image.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = int(sys.byteorder == 'big')
    msg.step = int(image.shape[1] * channels * np.dtype(dtype).itemsize)
    # array('B') takes rclpy's fast path; a bytes object is range-checked element by element.
    msg.data = array.array('B', np.ascontiguousarray(image).tobytes())
    return msg


def to_rgb8(image, encoding):
    """(H, W, 3) uint8 RGB from an array in a colour encoding."""
    if encoding in ('rgb8', '8UC3'):
        return image
    if encoding == 'bgr8':
        return image[..., ::-1]
    if encoding == 'rgba8':
        return image[..., :3]
    if encoding == 'bgra8':
        return image[..., 2::-1]
    raise _unsupported(encoding)


def decode(msg, camera=''):
    """Image or CompressedImage -> (array, encoding, label for messages)."""
    if hasattr(msg, 'encoding'):
        return image_to_array(msg, camera), msg.encoding, msg.encoding
    image = compressed_to_array(msg, camera)
    return image, compressed_encoding(image), f'{msg.format or "compressed"}'


def to_model_input(msg, expected_hw, resize=False, camera=''):
    """A camera message -> (3, H, W) uint8 RGB for the policy, at the card's image size.

    Colour frames only: a mono or depth image fed to an RGB policy is a wiring error, not
    something to paper over by copying one channel three times.
    """
    image, encoding, label = decode(msg, camera)
    height, width = int(expected_hw[0]), int(expected_hw[1])
    got_h, got_w = image.shape[:2]
    if encoding not in COLOR_ENCODINGS:
        raise PolicyInputError(
            f"camera '{camera}' sent {got_w}x{got_h} {label}, model expects {width}x{height} rgb8 "
            f'(card.yaml); point camera_topics at a colour stream (rgb8/bgr8/rgba8/bgra8 or '
            f'jpeg/png)')
    rgb = to_rgb8(image, encoding)
    if (got_h, got_w) != (height, width):
        if not resize:
            raise PolicyInputError(
                f"camera '{camera}' sent {got_w}x{got_h} {label}, model expects {width}x{height} "
                f'rgb8 (card.yaml); set image_resize: true or re-export')
        import cv2
        rgb = cv2.resize(np.ascontiguousarray(rgb), (width, height), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))
