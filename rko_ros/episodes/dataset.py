"""Training windows from episode bags: what pretraining and fine-tuning read.

An episode is sampled on a grid of control ticks at `spec.rate_hz`, starting at its first action
stamp. At tick k the observation is the newest camera frame and joint state stamped at or before
the tick (older than `tolerance_s` -> the tick is skipped); the commanded action of tick k is the
newest action stamped at or before the tick plus half a period. A window at tick k holds the
observations of ticks k-To+1..k (the first tick repeated before the start) and the commanded
actions of ticks k..k+H-1 (the last action repeated after the end).

Decoded per-tick arrays of an episode are cached as `.npz` in its bag folder, keyed by a hash of
the spec and the storage file's size and mtime, so a second load skips decoding.
Imports numpy, cv2 and rosbags only: no rclpy, no torch.
"""
import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from rko_ros.episodes.bag import bag_topics, read_messages, storage_file, typestore
from rko_ros.episodes.catalog import Catalog
from rko_ros.errors import EpisodeError

log = logging.getLogger(__name__)
CACHE_PREFIX = 'windows-cache-'
CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class WindowSpec:
    camera_topics: tuple = ('camera/image_raw',)
    camera_names: tuple = ('camera',)
    image_size_px: tuple = (64, 64)            # (H, W) after resizing
    n_obs_steps: int = 2
    horizon: int = 16
    rate_hz: float = 10.0
    joint_state_topic: str = 'joint_states'
    joint_names: tuple = ('gripper_x', 'gripper_y', 'gripper_closed')
    action_topic: str = 'action'
    action_names: tuple = ('gripper_x', 'gripper_y', 'gripper_closed')
    tolerance_s: float = 0.05

    def __post_init__(self):
        for name in ('camera_topics', 'camera_names', 'joint_names', 'action_names'):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        object.__setattr__(self, 'image_size_px', tuple(int(x) for x in self.image_size_px))
        if len(self.camera_topics) != len(self.camera_names):
            raise EpisodeError(f'{len(self.camera_topics)} camera_topics {self.camera_topics} '
                               f'for {len(self.camera_names)} camera_names {self.camera_names}; '
                               f'give one topic per camera, in camera order')
        if self.n_obs_steps < 1 or self.horizon < 1 or self.rate_hz <= 0 or self.tolerance_s < 0:
            raise EpisodeError(f'bad window spec: n_obs_steps={self.n_obs_steps}, horizon='
                               f'{self.horizon}, rate_hz={self.rate_hz}, tolerance_s='
                               f'{self.tolerance_s} (need >= 1, >= 1, > 0, >= 0)')

    @classmethod
    def from_config(cls, cfg, topics=None):
        """From a PolicyConfig and a topic map {'camera_topics' (or 'cameras'): [..], 'a,b' or
        {name: topic}, 'joint_state_topic', 'action_topic', 'tolerance_s'} (all optional)."""
        topics = dict(topics or {})
        names = list(cfg.obs.camera_names)
        cams = topics.get('camera_topics', topics.get('cameras'))  # 'cameras': accepted alias
        if isinstance(cams, str):
            cams = [c.strip() for c in cams.split(',') if c.strip()]
        if not cams:
            cams = ['camera/image_raw'] if len(names) == 1 else [f'{n}/image_raw' for n in names]
        elif isinstance(cams, dict):
            missing = [n for n in names if n not in cams]
            if missing:
                raise EpisodeError(f'camera_topics has no topic for cameras {missing}; '
                                   f'map every camera name {names} to a topic')
            cams = [cams[n] for n in names]
        elif len(cams) != len(names):
            raise EpisodeError(f'{len(cams)} camera topics {list(cams)} for cameras {names}; '
                               f'give one topic per camera, in camera order')
        return cls(camera_topics=tuple(cams), camera_names=tuple(names),
                   image_size_px=tuple(cfg.obs.image_size_px), n_obs_steps=cfg.obs.n_obs_steps,
                   horizon=cfg.action.horizon, rate_hz=cfg.action.control_rate_hz,
                   joint_state_topic=topics.get('joint_state_topic', 'joint_states'),
                   joint_names=tuple(cfg.obs.joint_names),
                   action_topic=topics.get('action_topic', 'action'),
                   action_names=tuple(cfg.action.action_names),
                   # The policy acts on the newest frame it has, up to a camera period old; a window may
                   # do the same, up to 1.5 control ticks (0.15 s at 10 Hz).
                   tolerance_s=float(topics.get('tolerance_s',
                                                max(0.05, 1.5 / cfg.action.control_rate_hz))))

    def key(self):
        text = json.dumps([CACHE_VERSION, dataclasses.asdict(self)], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class Windows:
    """Training windows: images (M,To,N,3,H,W) uint8, state (M,To,S) float32, action (M,H,A)
    float32, episode_index (M,) into episode_ids, tick (M,), and optional label (M,) int8."""

    def __init__(self, images, state, action, episode_index, tick, episode_ids, label=None):
        self.images, self.state, self.action = images, state, action
        self.episode_index, self.tick = episode_index, tick
        self.episode_ids = list(episode_ids)
        self.label = label

    def __len__(self):
        return len(self.action)

    def __getitem__(self, i):
        item = {'images': self.images[i], 'state': self.state[i], 'action': self.action[i]}
        if self.label is not None:
            item['label'] = self.label[i]
        return item

    def subset(self, indices):
        idx = np.asarray(indices)
        return Windows(self.images[idx], self.state[idx], self.action[idx],
                       self.episode_index[idx], self.tick[idx], self.episode_ids,
                       None if self.label is None else self.label[idx])

    def of_episode(self, episode_id):
        """Indices of the windows cut from one episode."""
        return np.flatnonzero(self.episode_index == self.episode_ids.index(episode_id))


@dataclasses.dataclass
class LabelledData:
    """What fine-tuning reads: windows of every labelled or compared episode, `windows.label`
    +1 (desirable) / -1 (undesirable) / 0 (no label, only in preferences), and the active
    preferences as (winner_id, loser_id) pairs."""
    windows: Windows
    preferences: list


# ---------------------------------------------------------------------------------------------
# decoding

def decode_image(msg, msgtype, size_px):
    """(3, H, W) uint8 RGB from a sensor_msgs Image or CompressedImage, resized to size_px."""
    import cv2

    if msgtype.endswith('CompressedImage'):
        pixels = cv2.imdecode(np.frombuffer(bytes(msg.data), np.uint8), cv2.IMREAD_COLOR)
        if pixels is None:
            raise EpisodeError(f'CompressedImage (format {msg.format!r}) cannot be decoded by cv2')
        rgb = pixels[..., ::-1]
    else:
        channels = {'rgb8': 3, 'bgr8': 3, 'rgba8': 4, 'bgra8': 4, 'mono8': 1}.get(msg.encoding)
        if channels is None:
            raise EpisodeError(f'image encoding {msg.encoding!r} is not supported; record rgb8, '
                               f'bgr8, rgba8, bgra8, mono8 or a CompressedImage')
        data = np.asarray(msg.data, np.uint8)
        rows = data[:msg.height * msg.step].reshape(msg.height, msg.step)
        pixels = rows[:, :msg.width * channels].reshape(msg.height, msg.width, channels)
        if channels == 1:
            rgb = np.repeat(pixels, 3, axis=2)
        elif msg.encoding.startswith('bgr'):
            rgb = pixels[..., 2::-1]
        else:
            rgb = pixels[..., :3]
    height, width = size_px
    if rgb.shape[:2] != (height, width):
        rgb = cv2.resize(np.ascontiguousarray(rgb), (width, height), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))


def _stamp_ns(stamp):
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def _match_topic(wanted, present, bag_dir, what):
    """The bag topic for `wanted`: exact, or the one namespaced topic ending in '/wanted'."""
    if wanted in present:
        return wanted
    bare = wanted.lstrip('/')
    hits = [t for t in present if t.lstrip('/') == bare or t.endswith('/' + bare)]
    if len(hits) == 1:
        return hits[0]
    raise EpisodeError(f'bag {bag_dir} has no {what} topic {wanted!r}'
                       + (f' (ambiguous: {hits})' if hits else '')
                       + f'; topics present: {sorted(present)}. Fix the topic map or the spec')


def _reorder(names, values, wanted, what, bag_dir):
    index = {n: i for i, n in enumerate(names)}
    missing = [n for n in wanted if n not in index]
    if missing:
        raise EpisodeError(f'bag {bag_dir}: {what} lacks joints {missing} (has {list(names)}); '
                           f'fix joint_names/action_names')
    return np.array([values[index[n]] for n in wanted], np.float32)


def decode_episode(bag_dir, spec):
    """Per-tick arrays of one episode: images (K,N,3,H,W) uint8, state (K,S), action (K,A)
    float32, valid (K,) bool (observation within tolerance)."""
    bag_dir = Path(bag_dir)
    present = bag_topics(bag_dir)
    cam_topics = [_match_topic(t, present, bag_dir, 'camera') for t in spec.camera_topics]
    joint_topic = _match_topic(spec.joint_state_topic, present, bag_dir, 'joint state')
    action_topic = _match_topic(spec.action_topic, present, bag_dir, 'action')
    store = typestore()
    frames = {t: [] for t in cam_topics}    # topic -> [(stamp_ns, msgtype, raw)]
    joints, actions = [], []                # [(stamp_ns, vector)]
    for topic, msgtype, bag_ns, raw in read_messages(bag_dir, set(cam_topics + [joint_topic,
                                                                                 action_topic])):
        if topic in frames:
            # Only the header is needed now; pixels are decoded for the chosen frames only.
            header = store.deserialize_cdr(raw, msgtype).header
            frames[topic].append((_stamp_ns(header.stamp), msgtype, raw))
        elif topic == joint_topic:
            msg = store.deserialize_cdr(raw, msgtype)
            joints.append((_stamp_ns(msg.header.stamp),
                           _reorder(msg.name, msg.position, spec.joint_names, 'JointState',
                                    bag_dir)))
        if topic == action_topic:
            msg = store.deserialize_cdr(raw, msgtype)
            if msgtype == 'trajectory_msgs/msg/JointTrajectory':
                if not msg.points:
                    continue
                point = msg.points[0]
                stamp = _stamp_ns(msg.header.stamp) + _stamp_ns(point.time_from_start)
                actions.append((stamp, _reorder(msg.joint_names, point.positions,
                                                spec.action_names, 'JointTrajectory', bag_dir)))
            elif msgtype == 'std_msgs/msg/Float64MultiArray':
                if len(msg.data) != len(spec.action_names):
                    raise EpisodeError(f'bag {bag_dir}: Float64MultiArray action has '
                                       f'{len(msg.data)} values, spec has {len(spec.action_names)}'
                                       f' action_names {list(spec.action_names)}')
                actions.append((bag_ns, np.asarray(msg.data, np.float32)))
            else:
                raise EpisodeError(f'bag {bag_dir}: action topic {topic} has type {msgtype}; '
                                   f'expected JointTrajectory or Float64MultiArray')
    for what, items in [('action', actions), ('joint state', joints)] + \
            [(f'camera {t}', v) for t, v in frames.items()]:
        if not items:
            raise EpisodeError(f'bag {bag_dir}: {what} topic holds no messages; topics present: '
                               f'{ {t: c for t, (_, c) in present.items()} }')

    period_ns = int(round(1e9 / spec.rate_hz))
    tolerance_ns = int(round(spec.tolerance_s * 1e9))
    actions.sort(key=lambda a: a[0])
    act_ns = np.array([a[0] for a in actions], np.int64)
    count = int((act_ns[-1] - act_ns[0]) // period_ns) + 1
    ticks_ns = act_ns[0] + np.arange(count, dtype=np.int64) * period_ns

    def latest(stamps, limit_ns):
        return np.searchsorted(stamps, limit_ns, side='right') - 1  # -1: none yet

    act_idx = latest(act_ns, ticks_ns + period_ns // 2)
    action = np.stack([actions[i][1] for i in act_idx])
    valid = np.ones(count, bool)

    joints.sort(key=lambda j: j[0])
    joint_ns = np.array([j[0] for j in joints], np.int64)
    j_idx = latest(joint_ns, ticks_ns)
    valid &= (j_idx >= 0) & (ticks_ns - joint_ns[np.maximum(j_idx, 0)] <= tolerance_ns)
    state = np.stack([joints[max(i, 0)][1] for i in j_idx])

    cam_idx = []
    for topic in cam_topics:
        frames[topic].sort(key=lambda f: f[0])
        f_ns = np.array([f[0] for f in frames[topic]], np.int64)
        idx = latest(f_ns, ticks_ns)
        valid &= (idx >= 0) & (ticks_ns - f_ns[np.maximum(idx, 0)] <= tolerance_ns)
        cam_idx.append(idx)
    height, width = spec.image_size_px
    images = np.zeros((count, len(cam_topics), 3, height, width), np.uint8)
    for c, topic in enumerate(cam_topics):
        decoded = {}
        for k in np.flatnonzero(valid):
            i = int(cam_idx[c][k])
            if i not in decoded:
                _, msgtype, raw = frames[topic][i]
                decoded[i] = decode_image(store.deserialize_cdr(raw, msgtype), msgtype,
                                          spec.image_size_px)
            images[k, c] = decoded[i]
    skipped = int((~valid).sum())
    if skipped:
        log.info('bag %s: %d of %d ticks skipped (no observation within %.3f s)', bag_dir,
                 skipped, count, spec.tolerance_s)
    return {'images': images, 'state': state, 'action': action, 'valid': valid,
            'ticks_ns': ticks_ns}


def _cached_episode(bag_dir, spec):
    bag_dir = Path(bag_dir)
    storage = storage_file(bag_dir)
    if storage is None:
        raise EpisodeError(f'bag {bag_dir} holds no storage file; the episode cannot be read')
    info = storage.stat()
    key = hashlib.sha256(f'{spec.key()}:{info.st_size}:{info.st_mtime_ns}'.encode()).hexdigest()
    cache = bag_dir / f'{CACHE_PREFIX}{key[:16]}.npz'
    if cache.exists():
        try:
            with np.load(cache) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError, KeyError) as exc:
            log.warning('ignoring unreadable cache %s (%s)', cache, exc)
    arrays = decode_episode(bag_dir, spec)
    tmp = cache.with_name(f'.{cache.name}.{os.getpid()}.tmp')
    try:
        with open(tmp, 'wb') as out:
            np.savez(out, **arrays)
        os.replace(tmp, cache)
    except OSError as exc:  # a read-only data folder still trains, only slower next time
        log.info('cannot write cache %s (%s)', cache, exc)
        tmp.unlink(missing_ok=True)
    return arrays


def _windows_from(arrays, spec):
    """(images, state, action, tick) of every valid tick of one decoded episode."""
    valid = arrays['valid']
    count = len(valid)
    ticks = np.flatnonzero(valid)
    # A window needs every tick of its observation history; history before the start repeats 0.
    hist = np.clip(ticks[:, None] + np.arange(-spec.n_obs_steps + 1, 1)[None, :], 0, None)
    ticks = ticks[valid[hist].all(axis=1)]
    hist = np.clip(ticks[:, None] + np.arange(-spec.n_obs_steps + 1, 1)[None, :], 0, None)
    future = np.clip(ticks[:, None] + np.arange(spec.horizon)[None, :], None, count - 1)
    return (arrays['images'][hist], arrays['state'][hist].astype(np.float32),
            arrays['action'][future].astype(np.float32), ticks)


def _bag_dirs(data_dir, episode_ids):
    with Catalog(data_dir) as catalog:
        return [(catalog.get(e)['id'], catalog.bag_path(e)) for e in episode_ids]


def load_windows(data_dir, episode_ids, spec, progress=True):
    """Windows of the given episodes (catalog ids), in the order given."""
    from tqdm import tqdm

    episodes = _bag_dirs(data_dir, episode_ids)
    parts, ids = [], []
    for index, (eid, bag_dir) in enumerate(tqdm(episodes, desc='episodes', unit='ep',
                                                 disable=not progress)):
        images, state, action, tick = _windows_from(_cached_episode(bag_dir, spec), spec)
        if not len(tick):
            log.warning('episode %s gives no window (no tick with all observations)', eid)
        parts.append((images, state, action, np.full(len(tick), index, np.int64), tick))
        ids.append(eid)
    if not parts:
        raise EpisodeError('no episodes given; record or list some with `rko episodes list`')
    return Windows(*(np.concatenate(col) for col in zip(*parts)), ids)


def load_labelled(data_dir, spec, progress=True):
    """LabelledData of every complete episode with a current label or in an active preference."""
    with Catalog(data_dir) as catalog:
        labels = catalog.labelled_episodes()
        prefs = [(p['winner_id'], p['loser_id']) for p in catalog.preferences()]
        complete = {e['id'] for e in catalog.list(status='complete')}
    order = list(labels)
    for pair in prefs:
        order += [e for e in pair if e not in order and e in complete]
    if not order:
        raise EpisodeError(f'no labelled episodes in {data_dir}; label some with '
                           f'`rko episodes label ID good|bad` or the feedback services')
    windows = load_windows(data_dir, order, spec, progress=progress)
    per_episode = np.array([{True: 1, False: -1}.get(labels.get(e), 0) for e in order], np.int8)
    windows.label = per_episode[windows.episode_index]
    return LabelledData(windows, [p for p in prefs if p[0] in complete and p[1] in complete])
