"""Training windows from real episode bags: shapes, stamp alignment, padding, decoding, labels."""
import numpy as np
import pytest

from rko_ros.episodes import synthetic
from rko_ros.episodes.bag import typestore
from rko_ros.episodes.catalog import Catalog
from rko_ros.episodes.dataset import (CACHE_PREFIX, WindowSpec, decode_image, load_labelled,
                                      load_windows)
from rko_ros.episodes.recorder import EpisodeRecorder
from rko_ros.errors import EpisodeError

NAMES = ('gripper_x', 'gripper_y', 'gripper_closed')
T = 12


def _arrays(ticks=T):
    """Tick k is visible in every array: camera 0 all k*10, camera 1 (R, G, B) = (k, 100, 200),
    state (k, 10k, -k), action (k + 0.5, 2k, 1)."""
    k = np.arange(ticks)
    cam0 = np.broadcast_to((k * 10).astype(np.uint8)[:, None, None, None], (ticks, 16, 24, 3))
    cam1 = np.zeros((ticks, 16, 24, 3), np.uint8)
    cam1[..., 0], cam1[..., 1], cam1[..., 2] = k[:, None, None], 100, 200
    state = np.stack([k, 10 * k, -k], 1).astype(np.float64)
    action = np.stack([k + 0.5, 2 * k, np.ones(ticks)], 1)
    return cam0, cam1, state, action


def _spec(**kw):
    base = dict(camera_topics=('cam0/image_raw', 'cam1/image_raw'), camera_names=('c0', 'c1'),
                image_size_px=(8, 12), n_obs_steps=3, horizon=5, rate_hz=10.0)
    base.update(kw)
    return WindowSpec(**base)


def _record(catalog, **kw):
    cam0, cam1, state, action = _arrays()
    eid = catalog.start_episode('v1')
    with EpisodeRecorder(catalog.bag_path(eid)) as rec:
        synthetic.write_episode(rec, [cam0, cam1], state, action, 10.0, NAMES,
                                camera_topic=['cam0/image_raw', 'cam1/image_raw'], **kw)
    catalog.finish_episode(eid)
    return eid


def _check_windows(w, ticks=T, spec=None):
    spec = spec or _spec()
    assert len(w) == ticks
    assert w.images.shape == (ticks, 3, 2, 3, 8, 12) and w.images.dtype == np.uint8
    assert w.state.shape == (ticks, 3, 3) and w.state.dtype == np.float32
    assert w.action.shape == (ticks, 5, 3) and w.action.dtype == np.float32
    for i, tick in enumerate(w.tick):
        hist = np.maximum(tick + np.arange(-2, 1), 0)       # history repeats tick 0
        future = np.minimum(tick + np.arange(5), ticks - 1)  # chunk repeats the last action
        assert np.all(w.images[i, :, 0] == (hist * 10)[:, None, None, None])
        assert np.all(w.images[i, :, 1, 0] == hist[:, None, None])  # red stays red
        assert np.all(w.images[i, :, 1, 1] == 100) and np.all(w.images[i, :, 1, 2] == 200)
        np.testing.assert_array_equal(w.state[i, :, 0], hist)
        np.testing.assert_array_equal(w.action[i, :, 0], future + 0.5)
        np.testing.assert_array_equal(w.action[i, :, 1], 2 * future)
    item = w[3]
    assert set(item) == {'images', 'state', 'action'} and item['action'].shape == (5, 3)


@pytest.mark.parametrize('image_format,action_type', [('rgb8', 'trajectory'),
                                                      ('bgr8', 'float64'),
                                                      ('png', 'trajectory')])
def test_windows_shapes_alignment_and_padding(tmp_path, image_format, action_type):
    with Catalog(tmp_path) as catalog:
        eid = _record(catalog, image_format=image_format, action_type=action_type)
    w = load_windows(tmp_path, [eid], _spec(), progress=False)
    _check_windows(w)
    assert w.episode_ids == [eid] and np.all(w.episode_index == 0)
    np.testing.assert_array_equal(w.tick, np.arange(T))
    sub = w.subset([0, 5])
    assert len(sub) == 2 and sub.tick.tolist() == [0, 5]


def test_trajectory_reordered_by_joint_names_and_time_from_start(tmp_path):
    """Joint order in the message differs from the spec; the point applies 50 ms after its
    header stamp, and ticks start at the first action stamp."""
    _, _, _, action = _arrays()
    catalog = Catalog(tmp_path)
    eid = catalog.start_episode('v1')
    start = 5 * 10**9
    with EpisodeRecorder(catalog.bag_path(eid)) as rec:
        rec.add_topic('/robot/cam0/image_raw', synthetic.IMAGE)  # namespaced by the robot
        rec.add_topic('joint_states', synthetic.JOINT_STATE)
        rec.add_topic('action', synthetic.TRAJECTORY)
        for k in range(T):
            stamp = start + k * 100_000_000
            rec.write('/robot/cam0/image_raw', stamp, synthetic.image_cdr(
                np.full((4, 4, 3), k, np.uint8), stamp))
            rec.write('joint_states', stamp, synthetic.joint_state_cdr(
                NAMES[::-1], [0.0, 10.0 * k, float(k)], stamp))
            # Sent 50 ms before it applies: stamp + time_from_start lands on the next frame time.
            rec.write('action', stamp, synthetic.trajectory_cdr(
                NAMES[::-1], action[k][::-1], stamp - 50_000_000, 50_000_000))
    catalog.finish_episode(eid)
    spec = _spec(camera_topics=('cam0/image_raw',), camera_names=('c0',), n_obs_steps=1)
    w = load_windows(tmp_path, [eid], spec, progress=False)
    assert len(w) == T
    np.testing.assert_array_equal(w.state[:, 0, 0], np.arange(T))  # reordered back
    np.testing.assert_array_equal(w.state[:, 0, 1], 10 * np.arange(T))
    np.testing.assert_array_equal(w.action[:, 0, 0], np.arange(T) + 0.5)
    np.testing.assert_array_equal(w.images[:, 0, 0, 0, 0, 0], np.arange(T))


def test_ticks_without_a_recent_frame_are_skipped(tmp_path):
    cam0, _, state, action = _arrays()
    catalog = Catalog(tmp_path)
    eid = catalog.start_episode('v1')
    with EpisodeRecorder(catalog.bag_path(eid)) as rec:
        stamps = synthetic.write_episode(rec, cam0, state, action, 10.0, NAMES,
                                         camera_topic='cam0/image_raw')
    catalog.finish_episode(eid)
    spec = _spec(camera_topics=('cam0/image_raw',), camera_names=('c0',), n_obs_steps=2,
                 rate_hz=20.0, tolerance_s=0.02)
    w = load_windows(tmp_path, [eid], spec, progress=False)
    # At 20 Hz every odd tick is 50 ms after the last frame (> 20 ms tolerance): skipped, and so
    # is every even tick whose history needs an odd one; only tick 0 (history repeats it) stays.
    assert w.tick.tolist() == [0]
    loose = load_windows(tmp_path, [eid], spec.__class__(**{**spec.__dict__,
                                                           'tolerance_s': 0.06}),
                         progress=False)
    assert len(loose) == 2 * (len(stamps) - 1) + 1
    np.testing.assert_array_equal(loose.images[:4, -1, 0, 0, 0, 0], [0, 0, 10, 10])


def test_missing_topic_names_the_topic_and_what_is_there(tmp_path):
    with Catalog(tmp_path) as catalog:
        eid = _record(catalog)
    with pytest.raises(EpisodeError, match=r"camera topic 'wrist/image_raw'.*cam0/image_raw"):
        load_windows(tmp_path, [eid], _spec(camera_topics=('wrist/image_raw', 'cam1/image_raw')),
                     progress=False)
    with pytest.raises(EpisodeError, match=r"lacks joints \['elbow'\]"):
        load_windows(tmp_path, [eid], _spec(joint_names=('elbow',)), progress=False)
    with pytest.raises(EpisodeError, match='ep000099'):
        load_windows(tmp_path, ['ep000099'], _spec(), progress=False)


def test_cache_is_written_reused_and_keyed_by_spec(tmp_path):
    with Catalog(tmp_path) as catalog:
        eid = _record(catalog)
        bag_dir = catalog.bag_path(eid)
    first = load_windows(tmp_path, [eid], _spec(), progress=False)
    caches = sorted(bag_dir.glob(f'{CACHE_PREFIX}*.npz'))
    assert len(caches) == 1
    again = load_windows(tmp_path, [eid], _spec(), progress=False)
    np.testing.assert_array_equal(first.images, again.images)
    load_windows(tmp_path, [eid], _spec(image_size_px=(4, 6)), progress=False)
    assert len(list(bag_dir.glob(f'{CACHE_PREFIX}*.npz'))) == 2


def test_load_labelled_gives_labels_and_pairs(tmp_path):
    with Catalog(tmp_path) as catalog:
        good, bad, compared, unlabelled = (_record(catalog) for _ in range(4))
        catalog.label(good, True)
        catalog.label(bad, False)
        catalog.prefer(compared, bad)
    data = load_labelled(tmp_path, _spec(), progress=False)
    w = data.windows
    assert w.episode_ids == [good, bad, compared]
    assert data.preferences == [(compared, bad)]
    for eid, label in ((good, 1), (bad, -1), (compared, 0)):
        idx = w.of_episode(eid)
        assert len(idx) == T and np.all(w.label[idx] == label)
    assert w[0]['label'] == 1
    assert unlabelled not in w.episode_ids


def test_decode_image_encodings():
    store = typestore()
    Image = store.types[synthetic.IMAGE]
    header = synthetic._header(0)
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 7, 255
    msg = Image(header=header, height=2, width=3, encoding='rgba8', is_bigendian=0, step=12,
                data=rgba.reshape(-1))
    out = decode_image(msg, synthetic.IMAGE, (2, 3))
    assert out.shape == (3, 2, 3) and np.all(out[0] == 7) and np.all(out[1:] == 0)
    # mono8 with row padding (step > width).
    mono = np.zeros((2, 4), np.uint8)
    mono[:, :3] = 9
    msg = Image(header=header, height=2, width=3, encoding='mono8', is_bigendian=0, step=4,
                data=mono.reshape(-1))
    assert np.all(decode_image(msg, synthetic.IMAGE, (2, 3)) == 9)
    msg = Image(header=header, height=1, width=1, encoding='16UC1', is_bigendian=0, step=2,
                data=np.zeros(2, np.uint8))
    with pytest.raises(EpisodeError, match="'16UC1' is not supported"):
        decode_image(msg, synthetic.IMAGE, (1, 1))


def test_spec_from_policy_config():
    from rko_ros.policy.config import PolicyConfig

    cfg = PolicyConfig.preset('small')
    spec = WindowSpec.from_config(cfg, {'cameras': None})
    assert spec.camera_names == tuple(cfg.obs.camera_names)
    assert spec.horizon == cfg.action.horizon and spec.rate_hz == cfg.action.control_rate_hz
    assert spec.image_size_px == tuple(cfg.obs.image_size_px)
    assert spec.joint_names == tuple(cfg.obs.joint_names)
    names = list(cfg.obs.camera_names)
    mapped = WindowSpec.from_config(cfg, {'camera_topics': {n: f'/x/{n}' for n in names}})
    assert mapped.camera_topics == tuple(f'/x/{n}' for n in names)
    with pytest.raises(EpisodeError, match='one topic per camera'):
        WindowSpec.from_config(cfg, {'cameras': names + ['extra']})
