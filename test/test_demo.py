"""`rko demo --quick`: the whole loop through the real nodes, as CI can afford it."""
import json
import os
import subprocess
import sys

from rko_ros.episodes.catalog import Catalog
from rko_ros.policy.store import ModelStore


def test_quick_demo_runs_the_loop_end_to_end(tmp_path):
    out = tmp_path / 'demo'
    result = subprocess.run([sys.executable, '-m', 'rko_ros.cli', 'demo', '--quick', '--out', str(out),
                             '--json'], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert 'preferred-style success' in result.stdout
    assert summary['labelled_episodes'] == 4 and summary['after']['episodes'] == 2
    assert summary['pretrain']['demonstration_success'] >= 0.8
    # Every episode, scripted or run through the policy node, is a complete bag in the catalog.
    with Catalog(str(out)) as catalog:
        episodes = catalog.list()
        labels = catalog.labelled_episodes()
        bags = [catalog.bag_path(e['id']) for e in episodes]
    assert len(episodes) == 6 + 4 + 2
    assert all(e['status'] == 'complete' for e in episodes)
    assert len(labels) == 4                      # labelled through feedback/label_last
    assert all(os.path.isfile(os.path.join(bag, 'metadata.yaml')) for bag in bags)
    store = ModelStore(str(out))
    assert store.versions()[0] == summary['pretrained_version']
    if summary['finetune_skipped']:
        assert summary['aligned_version'] == summary['pretrained_version']
    else:
        assert summary['aligned_version'] in store.versions() and summary['rollback_ok']
    report = os.listdir(summary['report_dir'])
    assert 'before_after.png' in report and 'summary.json' in report
    assert any(name.startswith('after_episode') for name in report)
