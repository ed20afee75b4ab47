"""The trainer's child process: progress parsing, success, cancel and an externally killed child.

`FinetuneJob` is run with real child processes (a short Python program standing in for the
command line, so these tests do not depend on how long fine-tuning takes); the end-to-end run
through `trainer/start` and the real `rko finetune` is in test_ros_loop.py.
"""
import os
import signal
import sys
import textwrap
import time

from rko_ros.policy.store import ModelStore
from rko_ros.ros.trainer_node import FinetuneJob, train_threads
from ros_testing import ROOT, add_version


def _child(code):
    return [sys.executable, '-c', textwrap.dedent(code)]


def _wait(job, timeout_s=60):
    deadline = time.monotonic() + timeout_s
    while job.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not job.running, 'child still running'


def test_progress_and_new_version_are_reported(tmp_path):
    parent = add_version(tmp_path)
    store = ModelStore(tmp_path)
    exits = []
    job = FinetuneJob(_child(f"""
        import json, sys
        sys.path.insert(0, {os.path.join(ROOT, 'test')!r})
        for step in range(1, 4):
            print(json.dumps({{'step': step, 'steps': 3, 'loss': 1.0 / step}}), flush=True)
            sys.stderr.write(f'finetune: {{step * 33}}%|###   | {{step}}/3 [00:01<00:02]\\r')
        from ros_testing import add_version
        version = add_version({str(tmp_path)!r}, method='rko', parent={parent!r}, activate=False)
        print(json.dumps({{'version': version}}))
        """), store, on_exit=exits.append)
    _wait(job)
    progress = job.progress()
    assert progress['state'] == 'done' and progress['new_version'] == 'v0002-rko'
    assert progress['step'] == 3 and progress['steps'] == 3
    assert progress['loss'] == 1.0 / 3
    assert exits == [job]


def test_cancel_kills_the_child_and_leaves_no_half_version(tmp_path):
    add_version(tmp_path)
    store = ModelStore(tmp_path)
    job = FinetuneJob(_child(f"""
        import os, tempfile, time
        tmp = tempfile.mkdtemp(prefix='.incoming-', dir={str(tmp_path / 'models')!r})
        open(os.path.join(tmp, 'checkpoint.pt'), 'wb').write(b'half')
        print('{{"step": 1, "steps": 1000}}', flush=True)
        time.sleep(60)
        """), store)
    deadline = time.monotonic() + 20
    while job.step != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.cancel()
    assert job.progress()['state'] == 'cancelled'
    assert job.proc.returncode == -signal.SIGTERM
    assert sorted(os.listdir(tmp_path / 'models')) == ['active', 'v0001-pretrain']
    assert not job.cancel()  # a second cancel finds nothing to stop


def test_a_child_killed_from_outside_is_a_clear_failure(tmp_path):
    store = ModelStore(tmp_path)
    job = FinetuneJob(_child("""
        import time
        print('loading episodes', flush=True)
        time.sleep(60)
        """), store)
    deadline = time.monotonic() + 20
    while not job.tail and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(job.proc.pid, signal.SIGKILL)
    _wait(job)
    assert job.state == 'failed'
    assert job.error == 'rko finetune failed (killed by signal 9): loading episodes'
    assert store.versions() == []


def test_a_failing_child_reports_its_last_lines(tmp_path):
    job = FinetuneJob(_child("""
        import sys
        sys.stderr.write('rko finetune: error: no labelled episodes in the catalog\\n')
        sys.exit(2)
        """), ModelStore(tmp_path))
    _wait(job)
    assert job.state == 'failed'
    assert job.error == ('rko finetune failed (exit code 2): rko finetune: error: no labelled '
                         'episodes in the catalog')


def test_training_threads_leave_a_core_to_the_nodes():
    # 0: one per core but one (at least one); a number is taken as given.
    assert [train_threads(0, cores=c) for c in (1, 2, 16)] == [1, 1, 15]
    assert train_threads(3, cores=2) == 3
    assert train_threads(0) == max(1, len(os.sched_getaffinity(0)) - 1)
    import pytest
    from rko_ros.alignment.trainer import FinetuneConfig
    from rko_ros.errors import TrainingError
    with pytest.raises(TrainingError, match='num_threads=-1 must be >= 0'):
        FinetuneConfig(num_threads=-1)
    from rko_ros.cli import build_parser
    assert build_parser().parse_args(['finetune', '--threads', '1']).threads == 1
