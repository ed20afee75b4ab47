"""The policy node's control core, free of ROS: observations in, one checked action per tick out.

- `ObservationBuffer` keeps the newest frame per camera and joint state with their arrival times,
  and the last `n_obs_steps` tick snapshots the model sees as one window.
- `ActionScheduler` holds the current chunk and hands out one action per tick. The next chunk is
  requested early enough (measured inference latency + one tick of margin) that it never runs dry;
  a chunk that arrives after L ticks of inference starts at action L (latency compensation: those
  actions belong to instants already past). With `chunk_candidates` above 1 the worker samples
  that many chunks in one batched call and keeps the one closest to what the chunk in hand plans
  from the new observation's tick on (coherent chunks, `PolicyRuntime.predict_coherent`).
- `SafetyGate` refuses to act on stale, missing or bad inputs and on NaN or out-of-limit outputs;
  each reason is counted and logged once per episode.
- `PolicyController` ties them to a `PolicyRuntime` and a worker thread: ONNX Runtime releases the
  GIL, so inference runs beside the tick without delaying it; `swap_runtime` hot-swaps models
  between two ticks.
- `TickThread` calls the tick at the control rate on a thread of its own (steady-clock deadlines).

Imports numpy and the standard library only (the runtime is passed in): no rclpy, no torch.
"""
import collections
import math
import os
import threading
import time

import numpy as np

from rko_ros.errors import PolicyInputError

REASONS = ('disabled', 'no_model', 'no_observation', 'stale_camera', 'stale_joint_state',
           'bad_input', 'inference_error', 'nan_output', 'out_of_limits', 'no_chunk')


class ObservationBuffer:
    def __init__(self, camera_names, n_obs_steps, age_basis=''):
        self.camera_names = list(camera_names)
        self.n_obs_steps = int(n_obs_steps)
        self.age_basis = age_basis   # appended to stale messages: how the age is measured
        self._lock = threading.Lock()
        self.images = [None] * len(self.camera_names)   # (3, H, W) uint8
        self.image_times_s = [None] * len(self.camera_names)
        self.image_errors = [None] * len(self.camera_names)
        self.state = None
        self.state_time_s = None
        self.state_error = None
        self.window = collections.deque(maxlen=self.n_obs_steps)
        # Inputs taken before this time (policy/enable: the start of an episode) are not used:
        # the newest frame at that instant can show the scene before the reset (the last
        # episode's folded cloth), fresh by max_obs_age_s and wrong all the same. None: any.
        self.not_before_s = None

    def set_image(self, index, chw, now_s):
        with self._lock:
            self.images[index], self.image_times_s[index] = chw, now_s
            self.image_errors[index] = None

    def set_image_error(self, index, message, now_s):
        """A frame arrived but cannot be used: the camera is alive, its data is wrong."""
        with self._lock:
            self.images[index], self.image_times_s[index] = None, now_s
            self.image_errors[index] = message

    def set_state(self, state, now_s, error=None):
        with self._lock:
            self.state = None if error else np.asarray(state, np.float32)
            self.state_time_s, self.state_error = now_s, error

    def check(self, now_s, max_obs_age_s):
        """None when every input is present and fresh, else (reason, message)."""
        with self._lock:
            for name, t, error, image in zip(self.camera_names, self.image_times_s,
                                             self.image_errors, self.images):
                if t is None:
                    return 'no_observation', f"no image from camera '{name}' yet"
                if now_s - t > max_obs_age_s:
                    return 'stale_camera', (f"camera '{name}' last image {now_s - t:.3f} s ago "
                                            f'> max_obs_age_s {max_obs_age_s}{self.age_basis}')
                if error:
                    return 'bad_input', error
            if self.state_time_s is None:
                return 'no_observation', 'no joint state yet'
            if now_s - self.state_time_s > max_obs_age_s:
                return 'stale_joint_state', (f'joint state {now_s - self.state_time_s:.3f} s old '
                                             f'> max_obs_age_s {max_obs_age_s}{self.age_basis}')
            if self.state_error:
                return 'bad_input', self.state_error
        return None

    def waiting_since_enable(self):
        """None when every input was taken at or after `not_before_s`, else what is awaited.
        Expected for a tick or two at each enable, so the controller does not log it."""
        with self._lock:
            if self.not_before_s is None:
                return None
            for name, t in zip(self.camera_names, self.image_times_s):
                if t is not None and t < self.not_before_s:
                    return (f"no image from camera '{name}' taken since policy/enable yet (the "
                            f'newest is {self.not_before_s - t:.3f} s older)')
            if self.state_time_s is not None and self.state_time_s < self.not_before_s:
                return ('no joint state taken since policy/enable yet (the newest is '
                        f'{self.not_before_s - self.state_time_s:.3f} s older)')
        return None

    def snapshot(self):
        """Append the newest inputs as one observation step (call once per tick)."""
        with self._lock:
            step = (np.stack(self.images), self.state,
                    max(self.image_times_s + [self.state_time_s]))
        self.window.append(step)

    def stacked(self):
        """(To, N, 3, H, W) uint8, (To, S) float32, newest input time; the first step repeats
        until the window has filled (as at the start of a training episode)."""
        steps = list(self.window)
        steps = [steps[0]] * (self.n_obs_steps - len(steps)) + steps
        return (np.stack([s[0] for s in steps]), np.stack([s[1] for s in steps]), steps[-1][2])

    def clear_window(self):
        self.window.clear()


class ActionScheduler:
    """One action per tick from the current chunk, with the next chunk requested in time."""

    def __init__(self, n_action_steps, horizon, rate_hz):
        self.n_action_steps = int(n_action_steps)
        self.horizon = int(horizon)
        self.period_s = 1.0 / float(rate_hz)
        self.chunk = None          # (H, A)
        self.chunk_tick = None     # tick whose observation produced the chunk: action 0 is for it
        self.latency_ticks = 1
        self.skipped_actions = 0

    def set_latency(self, latency_s):
        self.latency_ticks = max(1, math.ceil(latency_s / self.period_s - 1e-9))

    def accept(self, chunk, obs_tick, tick_now):
        """A new chunk from the observation of `obs_tick`, arriving before tick `tick_now`."""
        self.skipped_actions += max(0, tick_now - obs_tick)
        self.chunk, self.chunk_tick = np.asarray(chunk), int(obs_tick)

    def action(self, tick):
        """(action (A,), remaining (K, A)) for this tick, or (None, None) when the chunk is spent.

        Past `n_action_steps` the rest of the horizon is still a valid plan: use it rather than
        stop when inference is late, up to the end of the chunk.
        """
        if self.chunk is None:
            return None, None
        index = tick - self.chunk_tick
        if index < 0 or index >= self.horizon:
            return None, None
        return self.chunk[index], self.chunk[index:]

    def needs_request(self, tick):
        """True when the next chunk must start now to arrive before this one's actions run out."""
        if self.chunk is None:
            return True
        left = self.n_action_steps - (tick - self.chunk_tick)
        return left <= self.latency_ticks + 1

    def clear(self):
        self.chunk = self.chunk_tick = None


class SafetyGate:
    """Counts every refused tick by reason and says which reasons are new in this episode."""

    def __init__(self, action_limits=None):
        self.action_limits = None if action_limits is None else np.asarray(action_limits, float)
        self.counts = dict.fromkeys(REASONS, 0)
        self.last_reason = None
        self.last_message = ''
        self._logged = set()

    def check_action(self, action):
        if not np.all(np.isfinite(action)):
            return 'nan_output', f'action {np.asarray(action).tolist()} holds NaN/inf'
        if self.action_limits is not None:
            low, high = self.action_limits[:, 0], self.action_limits[:, 1]
            outside = np.nonzero((action < low) | (action > high))[0]
            if outside.size:
                i = int(outside[0])
                return 'out_of_limits', (f'action[{i}] = {float(action[i]):.4f} outside '
                                         f'action_limits [{low[i]}, {high[i]}]')
        return None

    def refuse(self, reason, message):
        """Count a refusal; True when this reason was not yet logged in this episode."""
        self.counts[reason] += 1
        self.last_reason, self.last_message = reason, message
        if reason in self._logged:
            return False
        self._logged.add(reason)
        return True

    def new_episode(self):
        self._logged.clear()


class TickStats:
    """Tick timing against the ideal period: jitter and missed ticks."""

    def __init__(self, rate_hz, keep=100000):
        self.period_s = 1.0 / float(rate_hz)
        self.ticks = 0
        self.missed = 0
        self.acted = 0
        self.jitter_ms = collections.deque(maxlen=keep)
        self.inference_ms = collections.deque(maxlen=keep)
        self.obs_to_action_ms = collections.deque(maxlen=keep)
        self._last_s = None

    def tick(self, now_s):
        self.ticks += 1
        if self._last_s is not None:
            interval = now_s - self._last_s
            self.jitter_ms.append(abs(interval - self.period_s) * 1e3)
            self.missed += max(0, int(round(interval / self.period_s)) - 1)
        self._last_s = now_s

    def summary(self):
        def pct(values, q):
            return round(float(np.percentile(list(values), q)), 3) if values else None
        return {'ticks': self.ticks, 'missed': self.missed, 'acted': self.acted,
                'jitter_p50_ms': pct(self.jitter_ms, 50), 'jitter_p99_ms': pct(self.jitter_ms, 99),
                'inference_ms_p50': pct(self.inference_ms, 50),
                'obs_to_action_ms_p50': pct(self.obs_to_action_ms, 50)}


class TickThread:
    """Calls `tick()` `rate_hz` times a second on a thread of its own, at steady-clock deadlines.

    policy_node's control tick runs here rather than on a ROS timer: a timer callback waits for
    the executor's thread to notice it, build a wait set and dispatch it, and in rclpy that Python
    work put 8-14 ms of delay on a 10 Hz tick at the median (see `executor`). Here only the GIL
    (policy_node sets a 0.5 ms switch interval) and the CPU's other work stand between the
    deadline and the tick: on the 2-core development machine a simulator on the same cores put
    p99 at 3-17 ms, at 0.6-0.8 ms when it left them alone.

    Deadlines stay on the grid start + k / rate_hz: a tick that starts late does not shift the
    ticks after it; a thread more than one period behind (the process was stopped, the machine
    starved it) skips the deadlines it missed instead of firing them back to back, and `TickStats`
    counts them as missed. An exception from `tick` goes to `on_error` and the next tick runs.
    """

    def __init__(self, rate_hz, tick, on_error=None, name='policy-tick',
                 clock=time.monotonic):
        self.period_s = 1.0 / float(rate_hz)
        self.tick = tick
        self.on_error = on_error or (lambda exc: None)
        self.clock = clock
        self.skipped = 0            # deadlines skipped because the thread was a period behind
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def next_deadline(self, deadline_s, now_s):
        """The deadline after `deadline_s` (just served), skipping those already a period past."""
        deadline_s += self.period_s
        behind = now_s - deadline_s
        if behind > self.period_s:
            missed = int(behind // self.period_s)
            self.skipped += missed
            deadline_s += missed * self.period_s
        return deadline_s

    def _run(self):
        deadline_s = self.clock() + self.period_s
        while True:
            delay = deadline_s - self.clock()
            if self._stop.wait(delay) if delay > 0 else self._stop.is_set():
                return
            try:
                self.tick()
            except Exception as exc:  # noqa: BLE001 - one bad tick must not stop the loop
                self.on_error(exc)
            deadline_s = self.next_deadline(deadline_s, self.clock())

    def stop(self, timeout_s=5.0):
        """Stop ticking; returns once the tick in progress (if any) has finished."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    @property
    def running(self):
        return self._thread.is_alive()


class PolicyController:
    """The control loop without ROS: feed observations, call `tick(now_s)` at the control rate."""

    def __init__(self, runtime, camera_names, n_obs_steps, n_action_steps, horizon, rate_hz,
                 max_obs_age_s, action_limits=None, clock=time.monotonic, log=None,
                 worker_nice=10, noise_scale=1.0, chunk_candidates=1):
        from rko_ros.policy.runtime import check_chunk_candidates, check_noise_scale
        self.runtime = runtime
        self.noise_scale = check_noise_scale(noise_scale)   # of each chunk's diffusion noise
        # > 1: each chunk is the most coherent of this many draws with the plan in hand
        self.chunk_candidates = check_chunk_candidates(chunk_candidates)
        self.rate_hz = float(rate_hz)
        self.max_obs_age_s = float(max_obs_age_s)
        self.clock = clock
        self.worker_nice = int(worker_nice)
        self.log = log or (lambda level, text: None)
        self.obs = ObservationBuffer(camera_names, n_obs_steps)
        self.scheduler = ActionScheduler(n_action_steps, horizon, rate_hz)
        self.gate = SafetyGate(action_limits)
        self.stats = TickStats(rate_hz)
        self.enabled = True
        self.tick_index = 0
        # Held through a whole tick: enable/disable and swaps from service threads wait for it.
        self._tick_lock = threading.Lock()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._request = None      # (images, state, obs_time_s, obs_tick, previous plan or None,
        #                            epoch)
        self._result = None       # (chunk or exception, obs_time_s, obs_tick, latency_s, epoch)
        self._busy = False
        self._closing = False
        self._first_action_of_chunk = False
        # Bumped by every enable / disable: a chunk asked for before it (from an observation of
        # the last episode) is dropped when it arrives, never acted on.
        self._epoch = 0
        self._worker = threading.Thread(target=self._infer_loop, name='policy-inference',
                                        daemon=True)
        self._worker.start()

    # --- control -----------------------------------------------------------------------------
    def set_enabled(self, enabled):
        """Enable: act again, from observations taken from now on only (an episode starts)."""
        with self._tick_lock:
            self.enabled = bool(enabled)
            if enabled:
                self.gate.new_episode()
                self.obs.not_before_s = self.clock()
            self.scheduler.clear()
            self.obs.clear_window()
            with self._lock:
                self._epoch += 1
                self._request = None          # not yet started: drop it; a running one is
                self._result = None           # dropped by its epoch when it ends

    def reshape(self, n_obs_steps, n_action_steps, horizon):
        """New window and chunk sizes (before the first model; a swap keeps them)."""
        with self._tick_lock:
            self.obs = ObservationBuffer(self.obs.camera_names, n_obs_steps, self.obs.age_basis)
            self.scheduler = ActionScheduler(n_action_steps, horizon, self.rate_hz)

    def swap_runtime(self, runtime):
        """Use `runtime` for the next chunk; the chunk in hand keeps running (no missed tick)."""
        with self._lock:
            old, self.runtime = self.runtime, runtime
            self.gate.new_episode()
        return old

    def tick(self, now_s=None):
        """One control tick. Returns (action (A,), remaining chunk (K, A)) or (None, reason)."""
        with self._tick_lock:
            return self._tick(self.clock() if now_s is None else now_s)

    def _tick(self, now_s):
        self.stats.tick(now_s)
        self.tick_index += 1
        tick = self.tick_index
        self._take_result(tick)
        if not self.enabled:
            return self._refuse('disabled', 'policy disabled (policy/enable false)', log=False)
        if self.runtime is None:
            return self._refuse('no_model', 'no model loaded; train one or call policy/reload')
        problem = self.obs.check(now_s, self.max_obs_age_s)
        if problem:
            # A stale or bad observation also invalidates the plan made before it went bad.
            self.scheduler.clear()
            self.obs.clear_window()
            return self._refuse(*problem)
        waiting = self.obs.waiting_since_enable()
        if waiting:
            return self._refuse('no_observation', waiting, log=False)
        self.obs.snapshot()
        if self.scheduler.needs_request(tick):
            self._submit(tick)
        action, remaining = self.scheduler.action(tick)
        if action is None:
            return self._refuse('no_chunk', 'waiting for the first chunk of inference',
                                log=False)
        problem = self.gate.check_action(action)
        if problem:
            self.scheduler.clear()
            return self._refuse(*problem)
        if self._first_action_of_chunk:
            self._first_action_of_chunk = False
            self.stats.obs_to_action_ms.append((now_s - self._chunk_obs_time_s) * 1e3)
        self.stats.acted += 1
        return action, remaining

    def _refuse(self, reason, message, log=True):
        if self.gate.refuse(reason, message) and log:
            self.log('warn', f'not acting ({reason}): {message}')
        return None, reason

    # --- inference worker --------------------------------------------------------------------
    def _submit(self, tick):
        with self._lock:
            if self._busy or self._request is not None:
                return
            images, state, obs_time_s = self.obs.stacked()
            self._request = (images, state, obs_time_s, tick, self._plan_from(tick), self._epoch)
            self._wake.notify()

    def _plan_from(self, tick):
        """What the chunk in hand plans from `tick` on (the instants the next chunk starts at),
        or None: no chunk, or one sample per chunk."""
        chunk, start = self.scheduler.chunk, self.scheduler.chunk_tick
        if self.chunk_candidates == 1 or chunk is None or not 0 <= tick - start < len(chunk):
            return None
        return chunk[tick - start:].copy()

    def _take_result(self, tick):
        with self._lock:
            result, self._result = self._result, None
            if result is not None and result[4] != self._epoch:
                result = None     # asked for before the last enable / disable: not this episode
        if result is None:
            return
        chunk, obs_time_s, obs_tick, latency_s, _ = result
        if isinstance(chunk, Exception):
            reason = 'nan_output' if 'produced NaN' in str(chunk) else (
                'bad_input' if isinstance(chunk, PolicyInputError) else 'inference_error')
            self.scheduler.clear()
            self._refuse(reason, str(chunk))
            return
        self.stats.inference_ms.append(latency_s * 1e3)
        self.scheduler.set_latency(latency_s)
        self.scheduler.accept(chunk, obs_tick, tick)
        self._chunk_obs_time_s = obs_time_s
        self._first_action_of_chunk = True

    def _lower_worker_priority(self):
        # On a small CPU a busy inference thread delays the tick thread's wake-up by whole
        # scheduler slices; a higher nice value on this thread only (Linux threads are tasks)
        # lets ticks preempt it. Inference is still done long before its chunk is needed.
        if self.worker_nice and hasattr(os, 'setpriority'):
            try:
                tid = threading.get_native_id()
                os.setpriority(os.PRIO_PROCESS, tid,
                               min(19, os.getpriority(os.PRIO_PROCESS, tid) + self.worker_nice))
            except OSError:
                pass

    def _infer_loop(self):
        self._lower_worker_priority()
        while True:
            with self._lock:
                while self._request is None and not self._closing:
                    self._wake.wait()
                if self._closing:
                    return
                request, self._request = self._request, None
                runtime, noise_scale = self.runtime, self.noise_scale
                self._busy = True
            images, state, obs_time_s, obs_tick, previous, epoch = request
            start = time.perf_counter()
            try:
                if self.chunk_candidates > 1:
                    chunk, _ = runtime.predict_coherent(images, state, previous,
                                                        self.chunk_candidates,
                                                        noise_scale=noise_scale)
                else:
                    chunk = runtime.predict(images, state, noise_scale=noise_scale)
            except Exception as exc:  # noqa: BLE001 - every failure must reach the gate
                chunk = exc
            latency_s = time.perf_counter() - start
            with self._lock:
                self._result = (chunk, obs_time_s, obs_tick, latency_s, epoch)
                self._busy = False

    def close(self):
        with self._lock:
            self._closing = True
            self._wake.notify()
        self._worker.join(timeout=5.0)

    def status(self):
        out = self.stats.summary()
        out.update(enabled=self.enabled, skipped_actions=self.scheduler.skipped_actions,
                   latency_ticks=self.scheduler.latency_ticks,
                   model_version=getattr(self.runtime, 'version', None),
                   provider=getattr(self.runtime, 'provider', None),
                   cuda_graph=getattr(self.runtime, 'cuda_graph', False),
                   noise_scale=self.noise_scale, chunk_candidates=self.chunk_candidates,
                   refused={k: v for k, v in self.gate.counts.items() if v},
                   last_refusal=self.gate.last_message)
        return out
