"""The ROS-free control core: scheduling, latency compensation, safety gate, a real-model loop."""
import time

import numpy as np
import pytest

from rko_ros.policy.runtime import PolicyRuntime
from rko_ros.policy.store import ModelStore
from rko_ros.ros.control import (ActionScheduler, ObservationBuffer, PolicyController, SafetyGate,
                                 TickStats, TickThread)
from ros_testing import add_version


def test_scheduler_skips_the_actions_inside_the_inference_latency():
    scheduler = ActionScheduler(n_action_steps=8, horizon=16, rate_hz=10.0)
    chunk = np.arange(16 * 2, dtype=np.float32).reshape(16, 2)
    assert scheduler.needs_request(tick=10)
    # Observation of tick 10, inference took 0.25 s: the chunk is taken at tick 13.
    scheduler.set_latency(0.25)
    assert scheduler.latency_ticks == 3
    scheduler.accept(chunk, obs_tick=10, tick_now=13)
    action, remaining = scheduler.action(13)
    np.testing.assert_array_equal(action, chunk[3])
    assert remaining.shape == (13, 2) and scheduler.skipped_actions == 3
    # 8 executed per chunk, 3 ticks of latency + 1 of margin: ask for the next at tick 14.
    assert not scheduler.needs_request(13)
    assert scheduler.needs_request(14)
    # A late chunk: keep following the plan to the end of the horizon, then stop.
    np.testing.assert_array_equal(scheduler.action(25)[0], chunk[15])
    assert scheduler.action(26) == (None, None)


def test_latency_under_one_tick_still_counts_one():
    scheduler = ActionScheduler(n_action_steps=8, horizon=16, rate_hz=30.0)
    scheduler.set_latency(0.004)
    assert scheduler.latency_ticks == 1
    scheduler.set_latency(1 / 30)
    assert scheduler.latency_ticks == 1


def test_safety_gate_reasons_are_counted_and_logged_once_per_episode():
    gate = SafetyGate(action_limits=[(-0.3, 0.3), (-0.3, 0.3), (0.0, 1.0)])
    assert gate.check_action(np.array([0.1, -0.2, 1.0])) is None
    reason, message = gate.check_action(np.array([0.1, 0.5, 0.0]))
    assert reason == 'out_of_limits'
    assert message == 'action[1] = 0.5000 outside action_limits [-0.3, 0.3]'
    assert gate.check_action(np.array([np.nan, 0, 0]))[0] == 'nan_output'
    assert [gate.refuse('nan_output', 'x') for _ in range(3)] == [True, False, False]
    assert gate.counts['nan_output'] == 3
    gate.new_episode()
    assert gate.refuse('nan_output', 'x') is True


def test_observation_buffer_staleness_and_padding():
    obs = ObservationBuffer(['left', 'right'], n_obs_steps=2)
    assert obs.check(0.0, 0.5) == ('no_observation', "no image from camera 'left' yet")
    image = np.zeros((3, 4, 4), np.uint8)
    obs.set_image(0, image, 1.0)
    obs.set_image(1, image + 1, 1.0)
    assert obs.check(1.0, 0.5) == ('no_observation', 'no joint state yet')
    obs.set_state([0.0, 1.0, 2.0], 1.1)
    assert obs.check(1.2, 0.5) is None
    reason, message = obs.check(1.6, 0.5)
    assert reason == 'stale_camera' and message.startswith("camera 'left' last image 0.600 s ago")
    obs.set_image_error(1, "camera 'right' sent 8x8 mono8", 1.6)
    obs.set_image(0, image, 1.6)
    assert obs.check(1.6, 0.5) == ('bad_input', "camera 'right' sent 8x8 mono8")
    obs.set_image(1, image + 1, 1.6)
    obs.snapshot()
    images, state, newest_s = obs.stacked()
    assert images.shape == (2, 2, 3, 4, 4) and state.shape == (2, 3) and newest_s == 1.6
    np.testing.assert_array_equal(images[0], images[1])  # first step repeated until filled


def test_tick_stats_count_missed_ticks_and_jitter():
    stats = TickStats(rate_hz=10.0)
    for t in (0.0, 0.1, 0.2015, 0.3, 0.6, 0.7):
        stats.tick(t)
    summary = stats.summary()
    assert summary['ticks'] == 6 and summary['missed'] == 2
    assert summary['jitter_p50_ms'] == pytest.approx(1.5, abs=1e-6)


@pytest.fixture(scope='module')
def runtime(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp('control')
    version = add_version(data_dir)
    return PolicyRuntime(ModelStore(data_dir).version_dir(version), intra_op_threads=1)


def _feed(controller, now_s, card):
    h, w = card['image_size_px']
    controller.obs.set_image(0, np.full((3, h, w), 128, np.uint8), now_s)
    controller.obs.set_state([0.0, -0.2, 0.0], now_s)


def _run(controller, card, ticks, start_s=0.0, feed=True):
    out = []
    for i in range(ticks):
        now_s = start_s + i * controller.scheduler.period_s
        if feed:
            _feed(controller, now_s, card)
        out.append(controller.tick(now_s))
        # Real inference on the worker thread must finish within the chunk's spare actions
        # (10 ticks): 50 ms a tick gives it half a second (10 ms ran dry once on a loaded CI).
        time.sleep(0.05)
    return out


def test_controller_never_runs_dry_with_a_real_model(runtime):
    card = runtime.card
    controller = PolicyController(runtime, ['camera'], card['n_obs_steps'],
                                  card['n_action_steps'], card['horizon'], 10.0,
                                  max_obs_age_s=0.3)
    try:
        results = _run(controller, card, 60)
        assert results[0] == (None, 'no_chunk')
        refused = [(i, r) for i, (a, r) in enumerate(results[1:], 1) if a is None]
        assert not refused, f'ticks without an action: {refused}'
        acted = [a for a, _ in results[1:]]
        assert all(a.shape == (3,) and np.isfinite(a).all() for a in acted)
        status = controller.status()
        assert status['acted'] == 59 and status['missed'] == 0
        # ~60 ticks / (8 - 2 per chunk) chunks, each skipping the tick(s) of its latency: one on
        # a quiet machine, sometimes two when another process delays the worker thread.
        chunks = len(controller.stats.inference_ms)
        assert 7 <= chunks <= 12
        assert chunks <= status['skipped_actions'] <= 2 * chunks
        # Inputs stop: refused after max_obs_age_s, and the stale plan is dropped.
        results = _run(controller, card, 6, start_s=6.5, feed=False)
        assert [r for _, r in results] == ['stale_camera'] * 6
        assert controller.scheduler.chunk is None
    finally:
        controller.close()


def test_controller_refuses_actions_outside_the_limits(runtime):
    card = runtime.card
    logged = []
    controller = PolicyController(runtime, ['camera'], card['n_obs_steps'],
                                  card['n_action_steps'], card['horizon'], 10.0,
                                  max_obs_age_s=0.3, action_limits=[(-1e-4, 1e-4)] * 3,
                                  log=lambda level, text: logged.append(text))
    try:
        # Each refused chunk is dropped and a new one asked for: refusals alternate with waits.
        # How many ticks a chunk takes depends on the machine's load, so run until five refusals
        # (a quiet machine needs about 10 ticks) or 200 ticks.
        results = []
        while len(results) < 200 and [r for _, r in results].count('out_of_limits') < 5:
            results += _run(controller, card, 10, start_s=len(results) * controller.scheduler.period_s)
        assert all(a is None for a, _ in results)
        reasons = [r for _, r in results]
        assert set(reasons) == {'no_chunk', 'out_of_limits'} and reasons.count('out_of_limits') >= 5
        assert len(logged) == 1 and 'outside action_limits' in logged[0]
    finally:
        controller.close()


def test_controller_samples_at_its_noise_scale(runtime):
    from rko_ros.errors import ConfigError
    card = runtime.card
    for scale in (0.0, 1.0):
        controller = PolicyController(runtime, ['camera'], card['n_obs_steps'],
                                      card['n_action_steps'], card['horizon'], 10.0,
                                      max_obs_age_s=0.3, noise_scale=scale)
        try:
            acted = [a for a, _ in _run(controller, card, 30) if a is not None]
            images, state, _ = controller.obs.stacked()   # the same frame every tick
            assert controller.status()['noise_scale'] == scale
        finally:
            controller.close()
        # Scale 0: every chunk is the one deterministic chunk for this observation.
        reference = runtime.predict(images, state, np.zeros((card['horizon'], 3), np.float32))
        in_reference = [np.abs(reference - a).max(axis=1).min() < 1e-5 for a in acted]
        assert len(acted) >= 20
        assert all(in_reference) if scale == 0.0 else not any(in_reference)
    with pytest.raises(ConfigError, match='noise_scale=3.0 must be 0..2'):
        PolicyController(runtime, ['camera'], 1, 8, 16, 10.0, 0.3, noise_scale=3.0)


class _Recording:
    """The real runtime, noting what each coherent call was given and chose."""

    def __init__(self, runtime):
        self.runtime, self.calls = runtime, []
        self.card, self.version = runtime.card, runtime.version

    def predict_coherent(self, images, state, previous, candidates, noise_scale=1.0):
        actions, index = self.runtime.predict_coherent(images, state, previous, candidates,
                                                       noise_scale=noise_scale)
        self.calls.append((None if previous is None else previous.copy(), candidates, actions))
        return actions, index


def test_controller_with_chunk_candidates_continues_the_plan_in_hand(runtime):
    from rko_ros.errors import ConfigError
    card = runtime.card
    recording = _Recording(runtime)
    controller = PolicyController(recording, ['camera'], card['n_obs_steps'],
                                  card['n_action_steps'], card['horizon'], 10.0,
                                  max_obs_age_s=0.3, chunk_candidates=4)
    try:
        acted = [a for a, _ in _run(controller, card, 30)]
        assert controller.status()['chunk_candidates'] == 4
    finally:
        controller.close()
    assert len(recording.calls) >= 3 and all(c[1] == 4 for c in recording.calls)
    assert recording.calls[0][0] is None                  # the first chunk: nothing to continue
    for (_, _, before), (plan, _, _) in zip(recording.calls, recording.calls[1:]):
        # Each later call got what the chunk before it planned from its observation's tick on.
        offset = len(before) - len(plan)
        assert 0 < offset < card['n_action_steps']
        np.testing.assert_array_equal(plan, before[offset:])
    chunk_actions = np.concatenate([c[2] for c in recording.calls])
    assert sum(a is not None for a in acted) >= 20
    assert all(np.abs(chunk_actions - a).max(axis=1).min() == 0 for a in acted if a is not None)
    with pytest.raises(ConfigError, match='chunk_candidates=0 must be an integer 1..32'):
        PolicyController(runtime, ['camera'], 1, 8, 16, 10.0, 0.3, chunk_candidates=0)


def test_tick_thread_keeps_deadlines_on_the_grid_and_skips_what_it_missed():
    ticker = TickThread(10.0, tick=lambda: None)
    # On time, or late by less than a period: the next deadline is one period on, not from now.
    assert ticker.next_deadline(1.0, now_s=1.001) == pytest.approx(1.1)
    assert ticker.next_deadline(1.0, now_s=1.15) == pytest.approx(1.1)
    assert ticker.skipped == 0
    # Starved for 0.35 s past the deadline it just served: 1.1 and 1.2 are gone, the next is 1.3.
    assert ticker.next_deadline(1.0, now_s=1.35) == pytest.approx(1.3)
    assert ticker.skipped == 2


def test_tick_thread_ticks_at_its_rate_survives_a_failing_tick_and_stops():
    times, errors = [], []

    def tick():
        times.append(time.monotonic())
        if len(times) == 3:
            raise RuntimeError('bad tick')

    ticker = TickThread(50.0, tick, on_error=errors.append).start()
    time.sleep(0.6)
    ticker.stop()
    n = len(times)
    time.sleep(0.1)
    assert not ticker.running and len(times) == n        # nothing after stop()
    assert [str(e) for e in errors] == ['bad tick']      # reported, and the ticks went on
    # 0.6 s at 50 Hz is 30 deadlines: never more (no bursts), and a loaded CI runner still gets
    # most of them.
    assert 12 <= n <= 31, n
    intervals = np.diff(times)
    assert intervals.min() > 0.0
    assert np.median(intervals) == pytest.approx(0.02, abs=0.005)


class _Marked:
    """A runtime whose every action is the first joint of the newest state it was given, after
    `delay_s` of 'inference': which observation a chunk came from can be read off its actions."""

    def __init__(self, card, delay_s=0.0):
        self.card, self.version, self.delay_s, self.calls = card, 'marked', delay_s, []

    def predict(self, images, state, noise_scale=1.0):
        self.calls.append(float(state[-1, 0]))
        time.sleep(self.delay_s)
        return np.full((self.card['horizon'], 3), state[-1, 0], np.float32)


def test_after_enable_only_inputs_taken_since_then_are_acted_on(runtime):
    """At the start of an episode (policy/enable) the newest frame can be the last episode's
    final scene, still fresh by max_obs_age_s: it must not plan the first chunk, and a chunk
    asked for before the enable must not be acted on when it arrives."""
    card = runtime.card
    h, w = card['image_size_px']
    now = [10.0]
    marked = _Marked(card, delay_s=0.3)
    logged = []
    controller = PolicyController(marked, ['camera'], card['n_obs_steps'], card['n_action_steps'],
                                  card['horizon'], 10.0, max_obs_age_s=0.5, clock=lambda: now[0],
                                  log=lambda level, text: logged.append(text))

    def feed(t, marker):
        controller.obs.set_image(0, np.full((3, h, w), 128, np.uint8), t)
        controller.obs.set_state([marker, -0.2, 0.0], t)

    try:
        # Episode 1's last observation (marker 1) is asked about; the chunk is still being
        # computed when the episode ends and the next one starts.
        feed(10.0, 1.0)
        assert controller.tick(10.0) == (None, 'no_chunk')
        deadline = time.monotonic() + 5
        while not marked.calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert marked.calls == [1.0]
        controller.set_enabled(False)
        now[0] = 10.05
        controller.set_enabled(True)                   # episode 2 starts at 10.05
        time.sleep(0.4)                                # the old chunk arrives meanwhile
        # The newest inputs (10.0) are 0.1 s old, fresh by max_obs_age_s, but from before.
        assert controller.tick(10.1) == (None, 'no_observation')
        assert 'since policy/enable' in controller.status()['last_refusal']
        assert controller.scheduler.chunk is None and marked.calls == [1.0]
        # A frame of the new episode but the joint state still from before: not yet.
        controller.obs.set_image(0, np.full((3, h, w), 128, np.uint8), 10.12)
        assert controller.tick(10.15) == (None, 'no_observation')
        assert 'no joint state taken since policy/enable' in controller.status()['last_refusal']
        acted = []
        for i in range(12):                            # episode 2's inputs (marker 2)
            t = 10.2 + 0.1 * i
            feed(t, 2.0)
            action, _ = controller.tick(t)
            if action is not None:
                acted.append(float(action[0]))
            time.sleep(0.35)
        assert acted and set(acted) == {2.0}           # never an action of episode 1's chunk
        assert marked.calls[0] == 1.0 and set(marked.calls[1:]) == {2.0}
        assert logged == []            # a tick or two of waiting at each enable is not a fault
        assert controller.status()['refused']['no_observation'] == 2
    finally:
        controller.close()
    # Without an enable (a controller that starts enabled) any fresh input is used, as before.
    obs = ObservationBuffer(['camera'], 1)
    obs.set_image(0, np.zeros((3, 2, 2), np.uint8), 1.0)
    obs.set_state([0.0], 1.0)
    assert obs.not_before_s is None and obs.check(1.1, 0.5) is None
    assert obs.waiting_since_enable() is None
    obs.not_before_s = 1.05
    assert obs.check(1.1, 0.5) is None and obs.waiting_since_enable().startswith(
        "no image from camera 'camera' taken since policy/enable yet (the newest is 0.050 s")
    # A stale camera is still refused as stale (and logged), whatever the enable time.
    assert obs.check(1.6, 0.5)[0] == 'stale_camera'
