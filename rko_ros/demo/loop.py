"""The ROS half of the cloth demo: the real nodes in a child process (`rko up --sim`), driven only
through their topics and services by a simulated operator, exactly as a person would drive them.

Per episode: sim/reset -> episode/start -> policy/enable true -> wait for the sim's episode to end
-> policy/enable false -> episode/stop -> sim/evaluate -> (optionally) feedback/label_last.
Fine-tuning: trainer/start, then trainer/status until the new version is written and the policy node
has reloaded it (auto_reload), read back from policy/status.
"""
import json
import os
import signal
import subprocess
import sys
import time

import yaml

from rko_ros.errors import GuardRejected, RkoError


def write_demo_params(path, cfg, base_config):
    """config/rko.yaml with the demo's sizes: the sim renders what the policy was trained on."""
    with open(base_config) as f:
        params = yaml.safe_load(f) or {}
    h, w = cfg.image_size_px
    sim = params.setdefault('/**/sim_node', {}).setdefault('ros__parameters', {})
    task = cfg.task_config()
    sim.update({'image_width_px': int(w), 'image_height_px': int(h), 'seed': int(cfg.seed) + 200_000,
                'episode_ticks': int(task.episode_ticks), 'camera_view_m': float(task.view_m),
                'wrist_view_m': float(task.wrist_view_m)})
    # Joint states at the control rate, not the sim's 30 Hz: the policy reads one per tick, and
    # each message costs the nodes' process CPU (idle `rko up --sim` on rclpy's
    # MultiThreadedExecutor: 40% of a core at 30 Hz, 25% at 10 Hz on the 2-core development CPU;
    # 15% at 10 Hz on ServiceThreadsExecutor).
    sim.setdefault('joint_state_rate_hz', float(task.control_rate_hz))
    policy = params.setdefault('/**/policy_node', {}).setdefault('ros__parameters', {})
    policy.update({'enabled': False, 'noise_scale': float(cfg.noise_scale),
                   'chunk_candidates': int(cfg.chunk_candidates),
                   'camera_topics': cfg.camera_topics(), 'camera_names': list(task.camera_names)})
    episode = params.setdefault('/**/episode_node', {}).setdefault('ros__parameters', {})
    episode['camera_topics'] = cfg.camera_topics()
    trainer = params.setdefault('/**/trainer_node', {}).setdefault('ros__parameters', {})
    share = cfg.finetune_undesirable_share(cfg.method)
    from rko_ros.ros.trainer_node import cpu_cores
    trainer.update({'method': cfg.method, 'steps': int(cfg.finetune_steps), 'auto_reload': True,
                    'train_threads': int(cfg.finetune_threads) or cpu_cores(),
                    'extra_args': ['--batch-size', str(cfg.batch_size // 2),
                                   '--seed', str(cfg.seed), '--lr', repr(cfg.finetune_lr),
                                   '--lambda-sft', repr(cfg.lambda_sft),
                                   '--lambda-u', repr(cfg.lambda_u),
                                   '--lambda-d', repr(cfg.lambda_d),
                                   '--patience', str(cfg.finetune_patience),
                                   '--select', cfg.finetune_select,
                                   '--ema-decay', repr(cfg.finetune_ema_decay),
                                   '--device', cfg.device] +
                   (['--freeze-encoder'] if cfg.freeze_encoder else []) +
                   (['--lambda-retrieved', repr(cfg.lambda_retrieved)] if cfg.lambda_retrieved else []) +
                   (['--retrieved-undesirable-share', repr(share)] if share else []) +
                   (['--preference-min-timestep', str(cfg.preference_min_timestep)]
                    if cfg.preference_min_timestep else []) +
                   (['--no-guard'] if cfg.guard_tolerance is None else
                    ['--guard-tolerance', repr(cfg.guard_tolerance)])})
    with open(path, 'w') as f:
        yaml.safe_dump(params, f, sort_keys=False)
    return path


class RosLoop:
    """Starts `rko up --sim` and offers the operator's calls as plain methods."""

    def __init__(self, data_dir, params_path, namespace='rko', log_path=None, sim_process=False):
        self.data_dir = data_dir
        self.namespace = namespace
        log = open(log_path or os.path.join(data_dir, 'rko_up.log'), 'w')
        self.proc = subprocess.Popen(
            [sys.executable, '-m', 'rko_ros.cli', 'up', '--data-dir', data_dir, '--sim',
             '--config', params_path, '--namespace', namespace] +
            (['--sim-process'] if sim_process else []),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        import rclpy
        from rclpy.node import Node
        self.rclpy = rclpy
        self._context_owner = not rclpy.ok()
        if self._context_owner:
            rclpy.init()
        self.node = Node('demo_operator', namespace=namespace)
        self.trainer_status = {}
        self.policy_status = {}
        from diagnostic_msgs.msg import DiagnosticStatus
        self.node.create_subscription(DiagnosticStatus, 'trainer/status',
                                      lambda m: self._status(self.trainer_status, m), 10)
        self.node.create_subscription(DiagnosticStatus, 'policy/status',
                                      lambda m: self._status(self.policy_status, m), 10)
        self._clients = {}

    @staticmethod
    def _status(target, msg):
        target.clear()
        target.update({kv.key: kv.value for kv in msg.values})
        target['_message'] = msg.message
        target['_level'] = int.from_bytes(msg.level, 'little') if isinstance(msg.level, bytes) else msg.level

    def _client(self, name, srv_type):
        if name not in self._clients:
            self._clients[name] = self.node.create_client(srv_type, name)
        return self._clients[name]

    def call(self, name, data=None, timeout_s=30.0):
        from std_srvs.srv import SetBool, Trigger
        srv_type = Trigger if data is None else SetBool
        client = self._client(name, srv_type)
        deadline = time.monotonic() + timeout_s
        while not client.wait_for_service(timeout_sec=0.5):
            self._check_alive()
            if time.monotonic() > deadline:
                raise RkoError(f'service /{self.namespace}/{name} did not appear within {timeout_s} s; '
                               f'see {self.data_dir}/rko_up.log')
        request = srv_type.Request()
        if data is not None:
            request.data = bool(data)
        future = client.call_async(request)
        self.rclpy.spin_until_future_complete(self.node, future, timeout_sec=timeout_s)
        if not future.done():
            raise RkoError(f'/{self.namespace}/{name} did not answer within {timeout_s} s')
        response = future.result()
        return response.success, response.message

    def spin_for(self, seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.rclpy.spin_once(self.node, timeout_sec=min(0.05, max(0.0, end - time.monotonic())))

    def _check_alive(self):
        if self.proc.poll() is not None:
            raise RkoError(f'`rko up` exited with code {self.proc.returncode}; see '
                           f'{self.data_dir}/rko_up.log')

    def wait_ready(self, timeout_s=120.0):
        """Wait until every service the operator uses is offered (calls none of them)."""
        from std_srvs.srv import SetBool, Trigger
        names = {'sim/reset': Trigger, 'sim/evaluate': Trigger, 'episode/start': Trigger,
                 'episode/stop': Trigger, 'policy/enable': SetBool, 'feedback/label_last': SetBool,
                 'trainer/start': Trigger, 'policy/reload': Trigger}
        deadline = time.monotonic() + timeout_s
        for name, srv_type in names.items():
            client = self._client(name, srv_type)
            while not client.wait_for_service(timeout_sec=0.5):
                self._check_alive()
                if time.monotonic() > deadline:
                    raise RkoError(f'service /{self.namespace}/{name} did not appear within '
                                   f'{timeout_s} s; see {self.data_dir}/rko_up.log')

    def run_episode(self, label_fn=None, timeout_s=60.0):
        """One episode through the real loop; returns (episode_id, result dict, label or None)."""
        self.call('policy/enable', False)
        ok, seed = self.call('sim/reset')
        if not ok:
            raise RkoError(f'sim/reset failed: {seed}')
        ok, episode_id = self.call('episode/start')
        if not ok:
            raise RkoError(f'episode/start failed: {episode_id}')
        self.call('policy/enable', True)
        deadline = time.monotonic() + timeout_s
        result = {}
        while time.monotonic() < deadline:
            self.spin_for(0.1)   # the cell holds at the end; stop recording soon after
            ok, text = self.call('sim/evaluate')
            result = json.loads(text) if ok else {}
            if result.get('done'):
                break
        else:
            # The sim's clock starts with the first action: a policy that refuses to act (no
            # model, stale camera) leaves the episode unfinished. It is scored as it stands.
            print(f'\nepisode not finished within {timeout_s:.0f} s (sim tick {result.get("tick")} '
                  f'of {result.get("episode_ticks")}): the policy stopped acting; see '
                  f'{self.data_dir}/rko_up.log', file=sys.stderr)
        self.call('policy/enable', False)
        ok, message = self.call('episode/stop')
        if not ok:
            raise RkoError(f'episode/stop failed: {message}')
        label = None
        if label_fn is not None:
            label = bool(label_fn(result))
            ok, message = self.call('feedback/label_last', label)
            if not ok:
                raise RkoError(f'feedback/label_last failed: {message}')
        return episode_id.strip(), result, label

    def finetune_and_reload(self, timeout_s=3600.0, on_progress=None):
        """trainer/start, wait for the new version, check that the policy node now runs it."""
        # The status of an earlier run (its 'done' may still be in flight) must not end this one:
        # this run's status counts its elapsed time from its own start, after this call.
        self.trainer_status.clear()
        called = time.monotonic()
        ok, message = self.call('trainer/start')
        if not ok:
            raise RkoError(f'trainer/start refused: {message}')
        deadline = time.monotonic() + timeout_s
        state = ''
        while time.monotonic() < deadline:
            self.spin_for(1.0)
            self._check_alive()
            elapsed_s = float(self.trainer_status.get('elapsed_s') or 'inf')
            if elapsed_s > time.monotonic() - called + 1.0:
                continue
            state = self.trainer_status.get('state', '')
            if on_progress is not None:
                on_progress(dict(self.trainer_status))
            if state in ('done', 'failed', 'cancelled'):
                break
        error = self.trainer_status.get('error') or ''
        if state == 'failed' and GuardRejected.MARK in error:
            raise GuardRejected(error)
        if state != 'done':
            raise RkoError(f"fine-tuning ended in state '{state}': "
                           f"{self.trainer_status.get('error') or self.trainer_status.get('_message')}")
        new_version = self.trainer_status.get('new_version', '')
        # auto_reload: the trainer asked the policy node to reload; wait until it reports the version.
        for _ in range(60):
            self.spin_for(0.5)
            if self.policy_status.get('model_version') == new_version:
                break
        else:
            ok, message = self.call('policy/reload')
            if not ok:
                raise RkoError(f'policy/reload after fine-tuning failed: {message}')
        return new_version

    def close(self):
        try:
            self.node.destroy_node()
            if self._context_owner:
                self.rclpy.shutdown()
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGINT)
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(5)
