"""trainer_node: fine-tuning on request, in a child process, with progress on a topic.

`trainer/start` (Trigger) launches `python -m rko_ros.cli finetune ...` as a child process (never in
the executor: the control loop in the same machine must not feel it), with method and
hyperparameters from this node's parameters. A reader thread parses the child's output (JSON lines
on stdout, tqdm's `n/total` on stderr) into `trainer/status` (DiagnosticStatus). On success, with
`auto_reload`, it calls `policy/reload` so the policy node hot-swaps to the new version.
`trainer/cancel` (Trigger) kills the child's process group and removes its temporary folder: the
model store only ever holds complete versions. `FinetuneJob` is the ROS-free part.
"""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

from diagnostic_msgs.msg import DiagnosticStatus, KeyValue
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.exceptions import ParameterUninitializedException
from rclpy.node import Node
from rclpy.parameter import Parameter
from std_srvs.srv import Trigger

from rko_ros.alignment.methods import METHODS
from rko_ros.ros.params import Param, declare_all, default_data_dir, guarded_service, run_node

_TQDM_RE = re.compile(r'(\d+)/(\d+)')

PARAMETERS = {
    'data_dir': Param('', 'data folder (models/, episodes/, catalog.sqlite); empty: $RKO_DATA_DIR '
                      'or ./data'),
    'method': Param('rko', 'alignment method', choices=METHODS, read_only=False),
    'from_version': Param('', 'version to fine-tune (empty: the active one)', read_only=False),
    'steps': Param(0, 'fine-tuning steps (0: the method default)', range=(0, 10_000_000),
                   read_only=False),
    'beta': Param(0.0, 'beta of the loss (0: the method default)', range=(0.0, 1e6),
                  read_only=False),
    'extra_args': Param(Parameter.Type.STRING_ARRAY,
                        'more `rko finetune` arguments, one token per item (e.g. --tau, 0.15)',
                        read_only=False),
    'train_threads': Param(0, 'torch threads of the fine-tuning process (0: one per CPU core but '
                           'one, which stays with the nodes on the same machine; N: exactly N)',
                           range=(0, 4096), read_only=False),
    'auto_reload': Param(True, 'call policy/reload when a new version is written'),
    'reload_service': Param('policy/reload', 'the policy node reload service'),
    'status_rate_hz': Param(1.0, 'rate of trainer/status messages', range=(0.1, 100.0)),
}


def cpu_cores():
    """CPU cores this process may run on (its affinity mask where the OS has one), at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    return max(1, int(cores or 1))


def train_threads(requested, cores=None):
    """torch threads for a fine-tuning beside the running nodes: `requested`, or with 0 one per
    core but one, so the control loop and the recorder keep a core while the robot's computer
    trains. On the 2-core development CPU this costs the demo nothing: its RKO steps took a
    median 322 / 276 ms with one thread (rounds 1 / 2) against 317 / 324 ms with both cores
    (seed 3, the same pretrained model); alone, with no nodes running, 265 against 216 ms."""
    if requested:
        return int(requested)
    if cores is None:
        cores = cpu_cores()
    return max(1, int(cores or 1) - 1)


class FinetuneJob:
    """One `rko finetune` child process and what its output says about its progress."""

    def __init__(self, argv, store, on_exit=None):
        self.argv = list(argv)
        self.store = store
        self.on_exit = on_exit
        self.versions_before = set(store.versions())
        self.state = 'running'
        self.step = self.total = 0
        self.metrics = {}
        self.new_version = None
        self.error = ''
        self.tail = []
        self.started_s = time.monotonic()
        self.cancelled = False
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, bufsize=1, start_new_session=True)
        self._threads = [threading.Thread(target=self._read, args=(stream,), daemon=True)
                         for stream in (self.proc.stdout, self.proc.stderr)]
        for t in self._threads:
            t.start()
        self._waiter = threading.Thread(target=self._wait, daemon=True)
        self._waiter.start()

    def _read(self, stream):
        # tqdm redraws with \r: split on it too so progress shows while a line is being drawn.
        buffer = ''
        while True:
            chunk = stream.read(1)
            if not chunk:
                break
            if chunk in '\r\n':
                self._parse(buffer)
                buffer = ''
            else:
                buffer += chunk

    def _parse(self, line):
        line = line.strip()
        if not line:
            return
        self.tail = (self.tail + [line])[-20:]
        if line.startswith('{'):
            try:
                data = json.loads(line)
            except ValueError:
                return
            self.step = int(data.get('step', self.step))
            self.total = int(data.get('steps', data.get('total', self.total)))
            self.new_version = data.get('version', data.get('new_version', self.new_version))
            self.metrics.update({k: v for k, v in data.items()
                                 if isinstance(v, (int, float)) and k not in ('step', 'steps')})
            return
        match = _TQDM_RE.search(line)
        if match and '|' in line:
            self.step, self.total = int(match.group(1)), int(match.group(2))

    def _wait(self):
        code = self.proc.wait()
        for t in self._threads:
            t.join(timeout=5)
        new = sorted(set(self.store.versions()) - self.versions_before)
        if self.cancelled:
            self.state, self.error = 'cancelled', 'cancelled by trainer/cancel'
        elif code == 0 and (self.new_version in new or new):
            self.new_version = self.new_version if self.new_version in new else new[-1]
            self.state = 'done'
        else:
            self.state = 'failed'
            why = f'killed by signal {-code}' if code < 0 else f'exit code {code}'
            self.error = (f'rko finetune failed ({why}): ' + ' | '.join(self.tail[-3:])) \
                if code else 'rko finetune exited 0 but wrote no new version'
        # A killed writer may leave a temporary folder; never a complete version.
        self.store.clean_incoming()
        if self.on_exit:
            self.on_exit(self)

    def cancel(self, grace_s=3.0):
        if self.proc.poll() is not None:
            return False
        self.cancelled = True
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(grace_s)
                break
            except subprocess.TimeoutExpired:
                continue
        self._waiter.join(timeout=10)
        return True

    @property
    def running(self):
        return self.state == 'running'

    def progress(self):
        return {'state': self.state, 'step': self.step, 'steps': self.total,
                'elapsed_s': round(time.monotonic() - self.started_s, 1),
                'new_version': self.new_version or '', 'error': self.error, **self.metrics}


class TrainerNode(Node):
    def __init__(self, **kwargs):
        super().__init__('trainer_node', **kwargs)
        self.params = declare_all(self, PARAMETERS)
        from rko_ros.policy.store import ModelStore
        self.data_dir = self.params['data_dir'] or default_data_dir()
        self.store = ModelStore(self.data_dir)
        self.job = None
        group = MutuallyExclusiveCallbackGroup()
        guarded_service(self, Trigger, 'trainer/start', self._on_start, callback_group=group)
        guarded_service(self, Trigger, 'trainer/cancel', self._on_cancel, callback_group=group)
        self.status_pub = self.create_publisher(DiagnosticStatus, 'trainer/status', 10)
        self.reload_client = self.create_client(Trigger, self.params['reload_service'],
                                                callback_group=MutuallyExclusiveCallbackGroup())
        self.create_timer(1.0 / self.params['status_rate_hz'], self._publish_status,
                          callback_group=group)
        self.reload_result = ''

    def _current(self, name):
        """The value now (method and hyperparameters may be changed with `ros2 param set`)."""
        try:
            return self.get_parameter(name).value
        except ParameterUninitializedException:
            return None

    def finetune_argv(self):
        p = {name: self._current(name) for name in PARAMETERS}
        # --json: the last stdout line names the new version.
        argv = [sys.executable, '-m', 'rko_ros.cli', 'finetune', '--data-dir', self.data_dir,
                '--method', p['method'], '--json']
        if p['from_version']:
            argv += ['--from', p['from_version']]
        if p['steps']:
            argv += ['--steps', str(p['steps'])]
        if p['beta']:
            argv += ['--beta', repr(p['beta'])]
        argv += ['--threads', str(train_threads(p['train_threads']))]
        argv += [a for a in (p['extra_args'] or []) if a]
        return argv

    def _on_start(self, request, response):
        if self.job is not None and self.job.running:
            response.success, response.message = False, (
                f'fine-tuning is already running (pid {self.job.proc.pid}, step {self.job.step}/'
                f'{self.job.total}); wait for it or call trainer/cancel')
            return response
        argv = self.finetune_argv()
        self.job = FinetuneJob(argv, self.store, on_exit=self._on_job_exit)
        response.success = True
        response.message = f'started pid {self.job.proc.pid}: {" ".join(argv[2:])}'
        self.get_logger().info(f'trainer/start: {response.message}')
        return response

    def _on_cancel(self, request, response):
        if self.job is None or not self.job.running:
            response.success, response.message = False, 'no fine-tuning is running'
            return response
        self.job.cancel()
        response.success = True
        response.message = f'cancelled pid {self.job.proc.pid}; no new version written'
        self.get_logger().info(f'trainer/cancel: {response.message}')
        return response

    def _on_job_exit(self, job):
        if job.state == 'done':
            self.get_logger().info(f'fine-tuning wrote {job.new_version}')
            if self.params['auto_reload']:
                self._request_reload()
        elif job.state == 'failed':
            self.get_logger().error(job.error)

    def _request_reload(self):
        if not self.reload_client.service_is_ready():
            self.reload_result = f'{self.params["reload_service"]} not available; reload by hand'
            self.get_logger().warning(self.reload_result)
            return
        future = self.reload_client.call_async(Trigger.Request())

        def done(f):
            result = f.result()
            self.reload_result = result.message if result else 'reload call failed'
            self.get_logger().info(f'policy reload: {self.reload_result}')
        future.add_done_callback(done)

    def _publish_status(self):
        msg = DiagnosticStatus(name='rko/trainer')
        if self.job is None:
            msg.level, msg.message, values = DiagnosticStatus.OK, 'idle', {'state': 'idle'}
        else:
            values = self.job.progress()
            values['reload'] = self.reload_result
            msg.level = DiagnosticStatus.ERROR if values['state'] == 'failed' else \
                DiagnosticStatus.OK
            msg.message = values['error'] or f'{values["state"]} {values["step"]}/' \
                f'{values["steps"]}'
        msg.values = [KeyValue(key=k, value=str(v)) for k, v in values.items()]
        self.status_pub.publish(msg)

    def close(self):
        if self.job is not None and self.job.running:
            self.job.cancel()


def main(args=None):
    return run_node(TrainerNode, args=args)


if __name__ == '__main__':
    sys.exit(main())
