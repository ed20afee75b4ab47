"""Image conversion: every encoding, row padding, byte order, compressed frames, input errors."""
import array

import cv2
import numpy as np
import pytest
from sensor_msgs.msg import CompressedImage, Image

from rko_ros.errors import PolicyInputError
from rko_ros.ros import image_conversion as ic

RNG = np.random.default_rng(0)


def _sample(encoding, h=5, w=7):
    dtype, channels = ic.ENCODINGS[encoding]
    shape = (h, w) if channels == 1 else (h, w, channels)
    if dtype == np.float32:
        return RNG.random(shape, dtype=np.float32)
    return RNG.integers(0, np.iinfo(dtype).max, shape, dtype=dtype)


def _padded_message(image, encoding, pad_bytes, big_endian):
    """An Image whose rows carry `pad_bytes` of junk after the pixels, in the given byte order."""
    dtype = image.dtype.newbyteorder('>' if big_endian else '<')
    rows = image.astype(dtype).reshape(image.shape[0], -1).view(np.uint8)
    padded = np.concatenate([rows, np.full((rows.shape[0], pad_bytes), 0xAB, np.uint8)], axis=1)
    msg = Image(height=image.shape[0], width=image.shape[1], encoding=encoding,
                is_bigendian=int(big_endian), step=padded.shape[1])
    msg.data = array.array('B', padded.tobytes())
    return msg


@pytest.mark.parametrize('encoding', ['rgb8', 'bgr8', 'rgba8', 'bgra8', 'mono8', 'mono16',
                                      '16UC1', '32FC1'])
def test_round_trip_every_encoding(encoding):
    image = _sample(encoding)
    msg = ic.array_to_image(image, encoding, frame_id='cam')
    assert msg.step == image.shape[1] * image.itemsize * (1 if image.ndim == 2 else image.shape[2])
    out = ic.image_to_array(msg)
    assert out.dtype == image.dtype and out.shape == image.shape
    np.testing.assert_array_equal(out, image)


@pytest.mark.parametrize('encoding', ['rgb8', 'bgra8', 'mono16', '16UC1', '32FC1'])
@pytest.mark.parametrize('big_endian', [False, True])
def test_row_padding_and_byte_order(encoding, big_endian):
    image = _sample(encoding)
    out = ic.image_to_array(_padded_message(image, encoding, pad_bytes=6, big_endian=big_endian))
    assert out.dtype.byteorder in ('=', '|') or out.dtype.isnative
    np.testing.assert_array_equal(out, image)


def test_short_buffer_is_refused_with_sizes():
    msg = ic.array_to_image(_sample('rgb8'), 'rgb8')
    msg.data = msg.data[:-10]
    with pytest.raises(PolicyInputError, match='needs at least 21 bytes per row'):
        ic.image_to_array(msg, camera='/cam/left')


def test_colour_encodings_give_the_same_rgb_input():
    rgb = RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    alpha = np.full((8, 8, 1), 255, np.uint8)
    variants = {'rgb8': rgb, 'bgr8': rgb[..., ::-1].copy(),
                'rgba8': np.concatenate([rgb, alpha], 2),
                'bgra8': np.concatenate([rgb[..., ::-1], alpha], 2)}
    expected = rgb.transpose(2, 0, 1)
    for encoding, image in variants.items():
        chw = ic.to_model_input(ic.array_to_image(image, encoding), (8, 8), camera='c')
        assert chw.dtype == np.uint8 and chw.flags.c_contiguous, encoding
        np.testing.assert_array_equal(chw, expected, err_msg=encoding)


@pytest.mark.parametrize('fmt,ext', [('jpeg', '.jpg'), ('png', '.png')])
def test_compressed_frames(fmt, ext):
    rgb = np.zeros((16, 24, 3), np.uint8)
    rgb[:, :12] = (200, 30, 10)  # left half red, right half black
    ok, data = cv2.imencode(ext, rgb[..., ::-1])
    assert ok
    msg = CompressedImage(format=fmt)
    msg.data = array.array('B', data.tobytes())
    bgr = ic.compressed_to_array(msg)
    assert bgr.shape == (16, 24, 3)
    chw = ic.to_model_input(msg, (16, 24))
    tolerance = 0 if fmt == 'png' else 12
    assert np.abs(chw[:, 4, 4].astype(int) - [200, 30, 10]).max() <= tolerance
    assert chw[:, 4, 20].max() <= tolerance


def test_garbage_compressed_frame_names_camera():
    msg = CompressedImage(format='jpeg')
    msg.data = array.array('B', b'not a jpeg at all')
    with pytest.raises(PolicyInputError, match="camera '/cam/left' sent a CompressedImage"):
        ic.to_model_input(msg, (16, 16), camera='/cam/left')


def test_size_mismatch_names_camera_size_and_fix():
    msg = ic.array_to_image(np.zeros((480, 640, 3), np.uint8), 'bgr8')
    with pytest.raises(PolicyInputError) as info:
        ic.to_model_input(msg, (96, 96), resize=False, camera='/cam/left')
    assert str(info.value) == ("camera '/cam/left' sent 640x480 bgr8, model expects 96x96 rgb8 "
                               '(card.yaml); set image_resize: true or re-export')


def test_resize_when_allowed():
    image = np.zeros((48, 64, 3), np.uint8)
    image[:, 32:] = 255
    chw = ic.to_model_input(ic.array_to_image(image, 'rgb8'), (24, 32), resize=True)
    assert chw.shape == (3, 24, 32)
    assert chw[:, :, :15].max() == 0 and chw[:, :, 17:].min() == 255


@pytest.mark.parametrize('encoding', ['mono8', 'mono16', '16UC1', '32FC1'])
def test_non_colour_stream_is_a_wrong_encoding(encoding):
    msg = ic.array_to_image(_sample(encoding, 32, 32), encoding)
    with pytest.raises(PolicyInputError, match=f"camera 'wrist' sent 32x32 {encoding}, model "
                                               'expects 32x32 rgb8'):
        ic.to_model_input(msg, (32, 32), camera='wrist')


def test_unknown_encoding():
    msg = Image(height=2, width=2, encoding='yuv422', step=4)
    msg.data = array.array('B', bytes(8))
    with pytest.raises(PolicyInputError, match="encoding 'yuv422'"):
        ic.to_model_input(msg, (2, 2), camera='c')
