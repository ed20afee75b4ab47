"""The task, the scripted demonstrator, the judge (style classifier + quality), the operator, the
renderer: each style is reached and recognised, styles diverge early, folds show in the image."""
import json

import cv2
import numpy as np
import pytest

from rko_ros import cli
from rko_ros.errors import ConfigError
from rko_ros.sim.demonstrator import ScriptedDemonstrator, demo_episode
from rko_ros.sim.evaluate import FoldResult, fold_result
from rko_ros.sim.operator import SimulatedOperator
from rko_ros.sim.render import BACK_RGB, FRONT_RGB, render
from rko_ros.sim.styles import DEFAULT_STYLES, NO_FOLD, STYLES
from rko_ros.sim.task import JOINT_NAMES, ClothFoldTask, rollout


@pytest.fixture(scope='module')
def task():
    return ClothFoldTask()


@pytest.mark.parametrize('style', DEFAULT_STYLES)
def test_demonstrator_reaches_its_style_with_noise(task, style):
    results = [demo_episode(task, style, seed, record_images=False)['result']
               for seed in range(10)]
    styles = [r.style for r in results]
    # The classifier agrees with the demonstrator on every episode ...
    assert styles == [style] * 10
    # ... and the folds are good: at least 9 of 10 pass the quality threshold.
    assert sum(r.success for r in results) >= 9, [round(r.quality, 2) for r in results]
    qualities = [r.quality for r in results]
    assert np.mean(qualities) > 0.75
    # Noise makes episodes differ.
    assert np.std(qualities) > 0.005


@pytest.mark.parametrize('style', sorted(set(STYLES) - set(DEFAULT_STYLES)))
def test_other_styles_are_reached_and_recognised(task, style):
    results = [demo_episode(task, style, seed, record_images=False)['result'] for seed in range(3)]
    assert [r.style for r in results] == [style] * 3
    assert all(r.success for r in results)


def test_flat_cloth_is_no_fold(task):
    task.reset(5)
    result = task.result()
    assert result.style == NO_FOLD and not result.success
    assert result.coverage_ratio == pytest.approx(2.0, rel=0.05)  # full cloth = twice a fold
    assert min(result.match_error.values()) > 0.3


def test_dragging_without_folding_is_no_fold(task):
    """Pulling the cloth across the table moves it but folds nothing."""
    task.reset(1)
    grasp = task.sim.x[task.sim.index(0, 5), :2]
    for tick in range(40):
        target = grasp if tick < 12 else grasp + [0.0, -0.05]
        task.step([target[0], target[1], 1.0 if tick >= 10 else 0.0])
    result = task.result()
    assert result.style == NO_FOLD and not result.success


def test_styles_diverge_within_the_first_ten_ticks(task):
    """Multi-modal from the start: after 10 ticks the default styles' gripper targets are far
    apart (more than the noise), for every pair of styles and several seeds."""
    for seed in range(5):
        actions = {}
        for style in DEFAULT_STYLES:
            task.reset(seed)
            demo = ScriptedDemonstrator(style).reset(task, seed)
            actions[style] = np.stack([demo.act() for _ in range(10)])
        for i, a in enumerate(DEFAULT_STYLES):
            for b in DEFAULT_STYLES[i + 1:]:
                gap = np.linalg.norm(actions[a][9, :2] - actions[b][9, :2])
                assert gap > 0.1, (seed, a, b, gap)


def test_every_plan_finishes_within_the_episode(task):
    """Fold, release and return home before time is up, so the last frame shows the result."""
    for style in STYLES:
        for seed in range(8):
            task.reset(seed)
            demo = ScriptedDemonstrator(style).reset(task, seed)
            assert demo.plan_ticks <= task.config.episode_ticks - 2, (style, seed)


def test_episode_is_deterministic_given_seed(task):
    a = demo_episode(task, 'diagonal', 11, record_images=True)
    b = demo_episode(task, 'diagonal', 11, record_images=True)
    c = demo_episode(task, 'diagonal', 12, record_images=False)
    assert np.array_equal(a['images'], b['images'])
    assert np.array_equal(a['action'], b['action'])
    assert a['result'].quality == b['result'].quality
    assert not np.array_equal(a['action'], c['action'])


def test_rollout_shapes_and_joint_state(task):
    out = demo_episode(task, 'left_to_right', 0, record_images=True)
    ticks = task.config.episode_ticks
    assert out['images'].shape == (ticks, 64, 64, 3) and out['images'].dtype == np.uint8
    assert out['state'].shape == (ticks, 3) and out['state'].dtype == np.float32
    assert out['action'].shape == (ticks, 3) and out['action'].dtype == np.float32
    assert JOINT_NAMES == ('gripper_x', 'gripper_y', 'gripper_closed')
    closed = out['state'][:, 2]
    assert set(np.unique(closed)) == {0.0, 1.0}
    # The gripper follows the demonstrator's targets: state at t+1 is near action at t.
    assert np.abs(out['state'][1:, :2] - out['action'][:-1, :2]).max() < 0.01
    assert task.time_s == pytest.approx(ticks / task.config.control_rate_hz)


def test_gripper_speed_is_bounded(task):
    task.reset(0)
    start = task.state()[:2].copy()
    task.step([0.3, 0.3, 0.0])
    moved = np.linalg.norm(task.state()[:2] - start)
    assert moved == pytest.approx(task.sim.config.gripper_speed_mps * task.tick_s, rel=1e-6)


def test_bad_actions_and_config_are_refused(task):
    with pytest.raises(ValueError, match='3 finite numbers'):
        task.step([0.0, np.nan, 0.0])
    with pytest.raises(ValueError, match='3 finite numbers'):
        task.step([0.0, 0.0])
    with pytest.raises(ConfigError, match='control_rate_hz'):
        ClothFoldTask(control_rate_hz=0.0)
    with pytest.raises(ConfigError, match='WIDTHxHEIGHT'):
        ClothFoldTask(image_size_px='big')
    with pytest.raises(ConfigError, match='quality_threshold'):
        ClothFoldTask(quality_threshold=1.5)
    with pytest.raises(ConfigError, match='pose_jitter_m'):
        ClothFoldTask(pose_jitter_m=0.5)
    with pytest.raises(ConfigError, match='left_to_right'):
        ScriptedDemonstrator('inside_out')


def _colour_fraction(image, rgb, tol=60):
    """Share of pixels whose hue is near `rgb` (brightness varies with shading, so compare the
    colour's direction, not its value)."""
    img = image.reshape(-1, 3).astype(float)
    ref = np.asarray(rgb, float)
    cos = img @ ref / (np.linalg.norm(img, axis=1) * np.linalg.norm(ref) + 1e-9)
    return float(np.mean((cos > 0.985) & (np.abs(img - ref).max(axis=1) < tol * 2)))


def test_render_shapes_and_fold_changes_the_image(task):
    task.reset(2)
    flat_small = task.render()
    flat_large = task.render((480, 640))
    assert flat_small.shape == (64, 64, 3) and flat_small.dtype == np.uint8
    assert flat_large.shape == (480, 640, 3) and flat_large.dtype == np.uint8
    assert _colour_fraction(flat_large, BACK_RGB) == 0.0
    assert _colour_fraction(flat_large, FRONT_RGB) > 0.15
    demo_episode(task, 'left_to_right', 2, record_images=False)
    folded_small = task.render()
    folded_large = task.render((480, 640))
    # The folded-over half shows its back side: a clearly different colour covers about half of
    # what the flat cloth covered.
    back = _colour_fraction(folded_large, BACK_RGB)
    assert 0.4 * _colour_fraction(flat_large, FRONT_RGB) < back
    assert np.abs(folded_small.astype(int) - flat_small.astype(int)).mean() > 10
    # Anti-aliasing: the cloth's border has in-between colours, not only cloth and table.
    assert len(np.unique(flat_small.reshape(-1, 3), axis=0)) > 5


def test_render_draws_gripper_marker(task):
    task.reset(0)
    with_gripper = render(task.sim, (480, 640))
    without = render(task.sim, (480, 640), draw_gripper=False)
    diff = np.abs(with_gripper.astype(int) - without.astype(int)).sum(axis=2) > 30
    rows, cols = np.nonzero(diff)
    # The marker sits at the gripper's home, below the cloth, centred horizontally.
    assert diff.sum() > 20
    assert abs(cols.mean() - 320) < 5 and rows.mean() > 400


def test_camera_view_sets_the_image_scale():
    # The cloth's share of the image grows with the square of the zoom; a bad view is refused.
    wide, close = ClothFoldTask(view_m=0.60), ClothFoldTask(view_m=0.45)
    wide.reset(3)
    close.reset(3)
    ratio = (_colour_fraction(close.render((240, 240)), FRONT_RGB)
             / _colour_fraction(wide.render((240, 240)), FRONT_RGB))
    assert ratio == pytest.approx((0.60 / 0.45) ** 2, rel=0.05)
    with pytest.raises(ConfigError, match='view_m'):
        ClothFoldTask(view_m=0.01)
    with pytest.raises(ConfigError, match='view_m'):
        render(wide.sim, (64, 64), view_m=50.0)


def test_wrist_camera_is_the_table_around_the_gripper():
    """The wrist image is the scene camera's view narrowed to wrist_view_m around the gripper:
    the same pixels as a scene render of that view centred there; rollouts and the batched
    runner record it beside the scene camera."""
    from rko_ros.demo.offline import BatchedChunkPolicy, episode_cameras, episode_windows
    task = ClothFoldTask(image_size_px=(40, 40), wrist_view_m=0.15)
    assert task.config.camera_names == ('camera', 'wrist_camera')
    assert ClothFoldTask().config.camera_names == ('camera',)
    task.reset(3)
    task.sim.command(np.array([-0.12, 0.05]), False)
    task.sim.advance(1.0)
    g = task.sim.gripper[:2]
    np.testing.assert_array_equal(task.render_wrist(),
                                  render(task.sim, (40, 40), view_m=0.15, center_xy=g))
    # Centred on the gripper: a scene render at 4x the wrist view's metres is the wrist image
    # shrunk around the image centre there (the marker is drawn in both).
    wide = render(task.sim, (160, 160), view_m=0.60, center_xy=g)
    inner = cv2.resize(wide[60:100, 60:100], (40, 40), interpolation=cv2.INTER_AREA)
    assert np.abs(inner.astype(int) - task.render_wrist().astype(int)).mean() < 12
    cams = task.cameras()
    assert cams.shape == (2, 40, 40, 3)
    np.testing.assert_array_equal(cams[0], task.render())
    episode = demo_episode(task, 'left_to_right', seed=4, noise=0.5)
    assert episode['images'].shape == episode['wrist_images'].shape == (50, 40, 40, 3)
    images, _, _ = episode_windows(episode_cameras(episode), episode['state'], episode['action'],
                                   2, 16)
    assert images.shape == (50, 2, 2, 3, 40, 40)
    np.testing.assert_array_equal(images[7, 1, 1], episode['wrist_images'][7].transpose(2, 0, 1))
    seen = []

    def predict(images, state, noise):
        seen.append(images.shape)
        return np.tile(np.array([-0.15, 0.0, 0.0], np.float32), (len(images), 16, 1))
    run = BatchedChunkPolicy(predict, 1, 16, 3, 8).run(
        [ClothFoldTask(image_size_px=(40, 40), wrist_view_m=0.15) for _ in range(2)], [5, 6],
        record_images=True)
    assert seen[0] == (2, 1, 2, 3, 40, 40)
    assert run[0]['wrist_images'].shape == (50, 40, 40, 3)
    with pytest.raises(ConfigError, match='wrist'):
        ClothFoldTask().render_wrist()
    with pytest.raises(ConfigError, match='view_m'):
        ClothFoldTask(wrist_view_m=0.01)


def test_shifted_image_is_the_scene_moved_on_the_table(task):
    """The demo's pretraining shift (train.shift_joints) is exact for the sim camera: moving the
    image by whole pixels equals moving cloth and gripper by that many pixels of table."""
    from rko_ros.demo.pipeline import DemoConfig
    from rko_ros.policy.train import ShiftAugment
    cfg = DemoConfig(shift_px=3)
    task = ClothFoldTask(cfg.task_config())
    demo = ScriptedDemonstrator('diagonal')
    task.reset(5)
    demo.reset(task, 1)
    for _ in range(14):                                   # mid-carry: folded layer, closed gripper
        task.step(demo.act())
    image, state = task.observe()
    per_px = cfg.task_config().view_m / min(cfg.task_config().image_size_px)
    task.sim.x[:, :2] += [2 * per_px, per_px]             # 2 columns right, 1 row up
    task.sim.gripper[:2] += [2 * per_px, per_px]
    moved_image, moved_state = task.observe()
    assert not np.array_equal(image, moved_image)

    class Draw:
        def integers(self, low, high, size):
            return np.array([[-1, 2]])                     # (rows, cols)
    augment = ShiftAugment.from_config(cfg.policy_config())
    out = augment({'images': image.transpose(2, 0, 1)[None, None, None], 'state': state[None, None],
                   'action': state[None, None]}, Draw())
    np.testing.assert_array_equal(out['images'][0, 0, 0].transpose(1, 2, 0), moved_image)
    np.testing.assert_allclose(out['state'][0, 0], moved_state, atol=1e-6)


def test_operator_labels_and_prefers():
    operator = SimulatedOperator('diagonal', quality_threshold=0.7)
    good = FoldResult('diagonal', 0.85, True)
    sloppy = FoldResult('diagonal', 0.5, False)
    other = FoldResult('left_to_right', 0.95, True)
    nothing = FoldResult(NO_FOLD, 0.2, False)
    assert operator.label(good)
    assert not operator.label(sloppy) and not operator.label(other) and not operator.label(nothing)
    assert operator.prefers(good, sloppy) and operator.prefers(sloppy, other)
    assert operator.prefers(other, nothing) and not operator.prefers(other, good)
    assert not operator.prefers(good, good)
    with pytest.raises(ConfigError, match='fold style'):
        SimulatedOperator('origami')


def test_operator_on_real_episodes(task):
    operator = SimulatedOperator('right_to_left')
    liked = demo_episode(task, 'right_to_left', 4, record_images=False)['result']
    other = demo_episode(task, 'left_to_right', 4, record_images=False)['result']
    assert operator.label(liked) and not operator.label(other)
    assert operator.prefers(liked, other)
    assert fold_result(task.sim).style == 'left_to_right'


def test_rollout_calls_policy_with_observations(task):
    seen = []

    def hold(image, state, tick):
        seen.append((image.shape, state.copy(), tick))
        return state

    out = rollout(task, hold, seed=3)
    assert [t for _, _, t in seen] == list(range(task.config.episode_ticks))
    assert seen[0][0] == (64, 64, 3)
    assert out['result'].style == NO_FOLD


def test_cli_demo_episode_writes_frames_and_result(tmp_path, capsys):
    out = tmp_path / 'frames'
    assert cli.main(['sim', 'demo-episode', '--style', 'diagonal', '--seed', '1', '--size',
                     '80x60', '--every', '20', '--out', str(out)]) == 0
    names = sorted(p.name for p in out.glob('*.png'))
    assert names == ['frame_000.png', 'frame_020.png', 'frame_040.png', 'frame_050.png']
    assert cv2.imread(str(out / 'frame_050.png')).shape == (60, 80, 3)
    result = json.loads((out / 'result.json').read_text())
    assert result['style'] == 'diagonal' and result['demonstrated_style'] == 'diagonal'
    assert 'judged diagonal' in capsys.readouterr().out
    assert cli.main(['sim', 'demo-episode', '--style', 'sideways', '--out', str(out)]) == 2


def test_cli_bench_sim_prints_one_json_line(capsys):
    assert cli.main(['bench', 'sim', '--episodes', '1', '--styles', 'left_to_right',
                     '--json']) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert report['styles']['left_to_right']['success_rate'] == 1.0
    assert report['episode_sim_s'] == pytest.approx(5.0)
    for key in ('physics_only', 'with_camera'):
        assert report[key]['episode_wall_s'] > 0 and report[key]['realtime_factor'] > 0


def test_fold_result_says_which_particle_was_grasped(task):
    from rko_ros.demo.offline import summarize
    spacing = task.sim.config.spacing_m
    for style in DEFAULT_STYLES:
        result = demo_episode(task, style, 3, record_images=False)['result']
        assert result.grasp_offset_m == 0.0, style
        assert result.to_dict()['grasp_offset_m'] == 0.0
    # The left edge's middle is particle (5, 0); grasp the one above it instead and fold across.
    task.reset(3)
    sim = task.sim
    grasp = sim.x[sim.index(6, 0), :2].copy()
    target = sim.x[sim.index(6, sim.n - 1), :2] - [0.02, 0.0]
    plan = ([(grasp, 0.0)] * 14 + [(grasp, 1.0)] * 3 +
            [(grasp + (target - grasp) * k / 12, 1.0) for k in range(1, 13)] + [(target, 0.0)] * 12)
    for xy, closed in plan:
        task.step([xy[0], xy[1], closed])
    off = task.result()
    assert sim.grasp_history[0] == sim.index(6, 0)
    assert off.grasp_offset_m == pytest.approx(spacing)
    task.reset(3)
    flat = task.result()
    assert flat.grasp_offset_m is None and flat.to_dict()['grasp_offset_m'] is None
    good = demo_episode(task, 'left_to_right', 4, record_images=False)['result']
    summary = summarize([good, off, flat], 'left_to_right')
    assert summary['grasp_off_target_share'] == 0.5 and summary['no_grasp'] == 1
    json.dumps(summary)
