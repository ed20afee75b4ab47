"""Shared pieces of the ROS tests: a tiny real model in a real ModelStore, node processes, a client.

Not a test module itself (no `test_` prefix); the test_ros_*.py files import it.
"""
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {'obs': {'image_size_px': [32, 32]},
        'model': {'encoder_channels': [8, 16], 'feature_dim': 8, 'down_dims': [16, 32],
                  'diffusion_step_embed_dim': 16},
        'diffusion': {'num_inference_steps': 4},
        'train': {'steps': 10, 'batch_size': 8, 'num_threads': 1}}


def tiny_policy(seed=0, nan_output=False):
    import torch
    from rko_ros.policy.config import PolicyConfig
    from rko_ros.policy.model import DiffusionPolicy
    torch.manual_seed(seed)
    policy = DiffusionPolicy(PolicyConfig.from_dict({k: dict(v) for k, v in TINY.items()})).eval()
    rng = np.random.default_rng(seed)
    policy.fit_normalizer(rng.uniform(-0.2, 0.2, (64, 3)), rng.uniform(-0.2, 0.2, (64, 3)))
    if nan_output:
        # A broken training run: the action range is NaN, so every unnormalized action is NaN.
        with torch.no_grad():
            policy.action_normalizer.hi.fill_(float('nan'))
    return policy


def add_version(data_dir, method='pretrain', parent=None, seed=0, nan_output=False,
                activate=True):
    import torch
    from rko_ros.policy.store import ModelStore
    torch.set_num_threads(1)
    store = ModelStore(data_dir)
    return store.write_version(tiny_policy(seed, nan_output), parent=parent, method=method,
                               activate=activate)


def ros_args(params):
    out = ['--ros-args']
    for name, value in params.items():
        if isinstance(value, (list, tuple)):
            text = '[' + ','.join(f"'{v}'" if isinstance(v, str) else repr(float(v))
                                  for v in value) + ']'
        elif isinstance(value, bool):
            text = 'true' if value else 'false'
        else:
            text = str(value)
        out += ['-p', f'{name}:={text}']
    return out


class NodeProcess:
    """A node (or `rko up`) in its own process; output kept in a log file for failure messages."""

    def __init__(self, argv, log_path, env=None):
        self.log_path = str(log_path)
        self._log = open(self.log_path, 'w')
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, 'PYTHONUNBUFFERED': '1',
                                          'RCUTILS_LOGGING_BUFFERED_STREAM': '0',
                                          **(env or {})})

    @classmethod
    def module(cls, module, params, log_path, namespace=None):
        argv = [sys.executable, '-m', module] + ros_args(params)
        if namespace:
            argv += ['-r', f'__ns:=/{namespace}']
        return cls(argv, log_path)

    def output(self):
        with open(self.log_path) as f:
            return f.read()

    def stop(self, timeout_s=10.0):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


class Client:
    """An independent rclpy node in the test process, spun on a background thread."""

    def __init__(self, name='rko_test_client'):
        import rclpy
        from rko_ros.ros.executor import ServiceThreadsExecutor
        if not rclpy.ok():
            rclpy.init()
        self.node = rclpy.create_node(name)
        # Callbacks inline: rclpy's MultiThreadedExecutor would burn most of a core of the
        # 2-core runner that the nodes under test need.
        self.executor = ServiceThreadsExecutor(1)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self.executor.spin, daemon=True)
        self._thread.start()
        self.received = {}
        self._lock = threading.Lock()

    def subscribe(self, msg_type, topic, qos=10):
        self.received[topic] = []

        def keep(msg):
            with self._lock:
                self.received[topic].append((time.monotonic(), msg))
        self.node.create_subscription(msg_type, topic, keep, qos)

    def messages(self, topic, since_s=0.0):
        with self._lock:
            return [(t, m) for t, m in self.received[topic] if t >= since_s]

    def call(self, srv_type, name, request=None, timeout_s=20.0):
        client = self.node.create_client(srv_type, name)
        try:
            if not client.wait_for_service(timeout_sec=timeout_s):
                raise TimeoutError(f'service {name} did not appear in {timeout_s} s')
            future = client.call_async(request if request is not None else srv_type.Request())
            deadline = time.monotonic() + timeout_s
            while not future.done():
                if time.monotonic() > deadline:
                    raise TimeoutError(f'service {name} did not answer in {timeout_s} s')
                time.sleep(0.01)
            return future.result()
        finally:
            self.node.destroy_client(client)

    def wait_for(self, predicate, timeout_s, what):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.02)
        raise AssertionError(f'timed out after {timeout_s} s waiting for {what}')

    def close(self):
        import rclpy
        self.executor.shutdown()
        self.node.destroy_node()
        self._thread.join(timeout=5)
        if rclpy.ok():
            rclpy.shutdown()


def status_values(msg):
    return {kv.key: kv.value for kv in msg.values}
