"""Write a recorded-looking episode (camera, joint states, commanded actions) into a recorder.

Used by the tests and the demo to turn a simulated demonstration (`sim.task.rollout`'s arrays)
into a real episode bag, with the messages a robot and `policy_node` would have published: one
camera frame, one JointState and one command per control tick, stamped at the tick.
Imports numpy and rosbags (through `episodes.bag`) only: no rclpy, no torch.
"""
import numpy as np

from rko_ros.episodes.bag import typestore
from rko_ros.errors import EpisodeError

IMAGE = 'sensor_msgs/msg/Image'
COMPRESSED = 'sensor_msgs/msg/CompressedImage'
JOINT_STATE = 'sensor_msgs/msg/JointState'
TRAJECTORY = 'trajectory_msgs/msg/JointTrajectory'
FLOAT_ARRAY = 'std_msgs/msg/Float64MultiArray'


def _header(stamp_ns, frame_id=''):
    types = typestore().types
    stamp = types['builtin_interfaces/msg/Time'](sec=int(stamp_ns // 1_000_000_000),
                                                 nanosec=int(stamp_ns % 1_000_000_000))
    return types['std_msgs/msg/Header'](stamp=stamp, frame_id=frame_id)


def serialize(msg, msgtype):
    return bytes(typestore().serialize_cdr(msg, msgtype))


def image_cdr(image_rgb, stamp_ns, frame_id='camera', encoding='rgb8'):
    """CDR bytes of a sensor_msgs/Image from an (H, W, 3) uint8 RGB array ('rgb8' or 'bgr8')."""
    image_rgb = np.ascontiguousarray(image_rgb, dtype=np.uint8)
    height, width = image_rgb.shape[:2]
    pixels = image_rgb[..., ::-1] if encoding == 'bgr8' else image_rgb
    msg = typestore().types[IMAGE](
        header=_header(stamp_ns, frame_id), height=height, width=width, encoding=encoding,
        is_bigendian=0, step=width * 3, data=np.ascontiguousarray(pixels).reshape(-1))
    return serialize(msg, IMAGE)


def compressed_image_cdr(image_rgb, stamp_ns, frame_id='camera', fmt='png'):
    import cv2
    ok, data = cv2.imencode(f'.{fmt}', np.ascontiguousarray(image_rgb[..., ::-1]))
    if not ok:
        raise EpisodeError(f'cv2 could not encode an image as {fmt}')
    msg = typestore().types[COMPRESSED](header=_header(stamp_ns, frame_id), format=fmt,
                                        data=data.reshape(-1))
    return serialize(msg, COMPRESSED)


def joint_state_cdr(names, positions, stamp_ns, frame_id=''):
    msg = typestore().types[JOINT_STATE](
        header=_header(stamp_ns, frame_id), name=list(names),
        position=np.ascontiguousarray(positions, np.float64), velocity=np.zeros(0, np.float64),
        effort=np.zeros(0, np.float64))
    return serialize(msg, JOINT_STATE)


def trajectory_cdr(names, positions, stamp_ns, time_from_start_ns=0, frame_id=''):
    types = typestore().types
    point = types['trajectory_msgs/msg/JointTrajectoryPoint'](
        positions=np.ascontiguousarray(positions, np.float64), velocities=np.zeros(0, np.float64),
        accelerations=np.zeros(0, np.float64), effort=np.zeros(0, np.float64),
        time_from_start=types['builtin_interfaces/msg/Duration'](
            sec=int(time_from_start_ns // 1_000_000_000),
            nanosec=int(time_from_start_ns % 1_000_000_000)))
    msg = types[TRAJECTORY](header=_header(stamp_ns, frame_id), joint_names=list(names),
                            points=[point])
    return serialize(msg, TRAJECTORY)


def float_array_cdr(values):
    types = typestore().types
    layout = types['std_msgs/msg/MultiArrayLayout'](dim=[], data_offset=0)
    msg = types[FLOAT_ARRAY](layout=layout, data=np.ascontiguousarray(values, np.float64))
    return serialize(msg, FLOAT_ARRAY)


def write_episode(recorder, images, states, actions, rate_hz, joint_names, action_names=None,
                  camera_topic='camera/image_raw', joint_state_topic='joint_states',
                  action_topic='action', action_type='trajectory', start_ns=1_700_000_000 * 10**9,
                  image_format='rgb8'):
    """Write T control ticks: images (T,H,W,3) uint8 RGB (or a list of such arrays, one per
    camera, with `camera_topic` a list), states (T,S), actions (T,A), tick k stamped
    start_ns + k/rate_hz. action_type 'trajectory' (JointTrajectory) or 'float64'
    (Float64MultiArray); image_format 'rgb8', 'bgr8', 'png' or 'jpg'. Returns the tick stamps."""
    cameras = list(images) if isinstance(camera_topic, (list, tuple)) else [images]
    topics = list(camera_topic) if isinstance(camera_topic, (list, tuple)) else [camera_topic]
    if len(cameras) != len(topics):
        raise EpisodeError(f'{len(cameras)} image streams for {len(topics)} camera topics')
    states = np.asarray(states, np.float64)
    actions = np.asarray(actions, np.float64)
    ticks = len(states)
    if len(actions) != ticks or any(len(c) != ticks for c in cameras):
        raise EpisodeError(f'images, states and actions need the same tick count; got '
                           f'{[len(c) for c in cameras]}, {len(states)}, {len(actions)}')
    action_names = list(action_names or joint_names)
    compressed = image_format in ('png', 'jpg', 'jpeg')
    for topic in topics:
        recorder.add_topic(topic, COMPRESSED if compressed else IMAGE)
    recorder.add_topic(joint_state_topic, JOINT_STATE)
    recorder.add_topic(action_topic, TRAJECTORY if action_type == 'trajectory' else FLOAT_ARRAY)
    stamps = start_ns + np.round(np.arange(ticks) * 1e9 / rate_hz).astype(np.int64)
    for k, stamp in enumerate(int(s) for s in stamps):
        for topic, frames in zip(topics, cameras):
            raw = compressed_image_cdr(frames[k], stamp, fmt=image_format) if compressed \
                else image_cdr(frames[k], stamp, encoding=image_format)
            recorder.write(topic, stamp, raw, block=True)
        recorder.write(joint_state_topic, stamp, joint_state_cdr(joint_names, states[k], stamp),
                       block=True)
        raw = trajectory_cdr(action_names, actions[k], stamp) if action_type == 'trajectory' \
            else float_array_cdr(actions[k])
        recorder.write(action_topic, stamp, raw, block=True)
    return stamps
