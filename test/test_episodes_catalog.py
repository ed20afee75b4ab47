"""Catalog: episodes, append-only labels with undo, preferences, training runs, several processes,
and recovery after a recorder killed with SIGKILL."""
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from rko_ros.episodes import bag
from rko_ros.episodes.catalog import MIGRATIONS, Catalog
from rko_ros.episodes.recorder import EpisodeRecorder
from rko_ros.episodes.synthetic import write_episode
from rko_ros.errors import EpisodeError

NAMES = ('gripper_x', 'gripper_y', 'gripper_closed')


def _episode(catalog, ticks=5, complete=True, seed=0):
    rng = np.random.default_rng(seed)
    eid = catalog.start_episode('v0001-pretrain', meta={'seed': seed})
    with EpisodeRecorder(catalog.bag_path(eid)) as rec:
        write_episode(rec, rng.integers(0, 255, (ticks, 8, 8, 3), dtype=np.uint8),
                      rng.normal(size=(ticks, 3)), rng.normal(size=(ticks, 3)), 10.0, NAMES)
    catalog.finish_episode(eid, outcome={'success': True}, complete=complete)
    return eid


def test_episode_lifecycle_and_schema(tmp_path):
    with Catalog(tmp_path) as catalog:
        eid = catalog.start_episode('v0001-pretrain', meta={'style': 'diagonal'})
        entry = catalog.get(eid)
        assert entry['status'] == 'recording' and not entry['complete']
        assert entry['bag_path'] == str(tmp_path / 'episodes' / eid)
        catalog.finish_episode(eid, outcome={'quality': 0.8})
        entry = catalog.get(eid)
        assert entry['complete'] and entry['outcome'] == {'quality': 0.8}
        assert entry['meta'] == {'style': 'diagonal'} and entry['duration_s'] >= 0
        assert catalog.get(eid[2:].lstrip('0')) == entry  # the bare number an operator types
    db = sqlite3.connect(tmp_path / 'catalog.sqlite')
    assert db.execute('PRAGMA journal_mode').fetchone()[0] == 'wal'
    assert db.execute('PRAGMA user_version').fetchone()[0] == len(MIGRATIONS)
    # A newer schema than this code knows is refused with the fix.
    db.execute(f'PRAGMA user_version={len(MIGRATIONS) + 1}')
    db.close()
    with pytest.raises(EpisodeError, match='upgrade rko_ros'):
        Catalog(tmp_path)


def test_labels_are_append_only_and_undo_is_a_row(tmp_path):
    with Catalog(tmp_path) as catalog:
        a, b = catalog.start_episode('v1'), catalog.start_episode('v1')
        for eid in (a, b):
            catalog.finish_episode(eid)
        assert catalog.current_label(a) is None
        catalog.label(a, True, source='operator')
        catalog.label(a, False, source='operator')
        assert catalog.current_label(a) is False
        catalog.prefer(a, b, source='operator')
        assert [(p['winner_id'], p['loser_id']) for p in catalog.preferences()] == [(a, b)]
        assert catalog.undo_last_label()['kind'] == 'preference'
        assert catalog.preferences() == []
        assert catalog.undo_last_label() == {'kind': 'label', 'id': 2, 'episode_id': a,
                                             'desirable': False}
        assert catalog.current_label(a) is True
        catalog.label(b, False, source='sim')
        assert catalog.labelled_episodes() == {a: True, b: False}
        assert catalog.undo_last_label(source='operator')['episode_id'] == a
        assert catalog.labelled_episodes() == {b: False}
        assert catalog.undo_last_label(source='operator') is None
        history = catalog.label_history(a)
        # Two labels, their two undo rows and the preference's undo row: nothing deleted.
        assert [h['desirable'] for h in history] == [1, 0, None, None, None]
        assert [e['label'] for e in catalog.list()] == [None, False]


def test_bad_ids_and_incomplete_episodes(tmp_path):
    with Catalog(tmp_path) as catalog:
        done = catalog.start_episode('v1')
        catalog.finish_episode(done)
        with pytest.raises(EpisodeError, match="'ep999999' is not in the catalog.*ep000001"):
            catalog.label('ep999999', True)
        with pytest.raises(EpisodeError, match='nope'):
            catalog.get('nope')
        broken = catalog.start_episode('v1')
        with pytest.raises(EpisodeError, match=f'{broken} is recording'):
            catalog.label(broken, True)
        catalog.finish_episode(broken, complete=False)
        with pytest.raises(EpisodeError, match=f'{broken} is incomplete'):
            catalog.label(broken, True)
        with pytest.raises(EpisodeError, match='incomplete'):
            catalog.prefer(done, broken)
        with pytest.raises(EpisodeError, match='over itself'):
            catalog.prefer(done, done)
        with pytest.raises(EpisodeError, match='training run 7'):
            catalog.finish_run(7)
        assert catalog.current_label(done) is None  # nothing half-written by the failures


def test_training_runs(tmp_path):
    with Catalog(tmp_path) as catalog:
        run = catalog.start_run('rko', parent_version='v0001-pretrain', episodes=['ep000001'],
                                config={'beta': 12})
        catalog.finish_run(run, new_version='v0002-rko', metrics={'margin': 0.4})
        (entry,) = catalog.runs()
        assert entry['status'] == 'done' and entry['new_version'] == 'v0002-rko'
        assert entry['episodes'] == ['ep000001'] and entry['metrics'] == {'margin': 0.4}


def _worker(data_dir, count, source):
    catalog = Catalog(data_dir)
    for _ in range(count):
        eid = catalog.start_episode('v1')
        catalog.finish_episode(eid)
        catalog.label(eid, source == 'a', source=source)
    catalog.close()


def test_two_processes_share_the_catalog(tmp_path):
    Catalog(tmp_path).close()
    ctx = multiprocessing.get_context('spawn')
    procs = [ctx.Process(target=_worker, args=(str(tmp_path), 25, s)) for s in 'ab']
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with Catalog(tmp_path) as catalog:
        episodes = catalog.list()
        assert len(episodes) == 50 and len({e['id'] for e in episodes}) == 50
        labels = catalog.labelled_episodes()
        assert sorted(labels.values()).count(True) == 25 and len(labels) == 50


KILLED_RECORDER = textwrap.dedent('''
    import sys, time
    import numpy as np
    from rko_ros.episodes.catalog import Catalog
    from rko_ros.episodes.recorder import EpisodeRecorder
    from rko_ros.episodes.synthetic import write_episode
    catalog = Catalog(sys.argv[1])
    eid = catalog.start_episode('v1')
    rec = EpisodeRecorder(catalog.bag_path(eid), flush_interval_s=0.05)
    rng = np.random.default_rng(0)
    write_episode(rec, rng.integers(0, 255, (20, 8, 8, 3), dtype=np.uint8),
                  rng.normal(size=(20, 3)), rng.normal(size=(20, 3)), 10.0,
                  ('gripper_x', 'gripper_y', 'gripper_closed'))
    while rec.stats()['recorded'] < 60:
        time.sleep(0.01)
    print(eid, flush=True)
    time.sleep(60)
''')


def test_sigkill_recorder_then_repair_keeps_catalog_consistent(tmp_path):
    with Catalog(tmp_path) as catalog:
        good = _episode(catalog)
        catalog.label(good, True)
    proc = subprocess.Popen([sys.executable, '-c', KILLED_RECORDER, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    killed = proc.stdout.readline().strip()
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    with Catalog(tmp_path) as catalog:
        assert catalog.get(killed)['status'] == 'recording'
        report = catalog.repair_incomplete()
        assert report == [{'id': killed, 'bag_path': str(tmp_path / 'episodes' / killed),
                           'messages_kept': 60}]
        entry = catalog.get(killed)
        assert entry['status'] == 'incomplete' and '60 messages kept' in entry['note']
        with pytest.raises(EpisodeError, match='incomplete'):
            catalog.label(killed, True)
        assert catalog.repair_incomplete() == []  # nothing left to do
        assert catalog.labelled_episodes() == {good: True}  # the other episode is untouched
    assert len(list(bag.read_messages(tmp_path / 'episodes' / killed))) == 60
    assert (tmp_path / 'episodes' / killed / f'{killed}.mcap.unrepaired').exists()


def test_live_recorder_is_not_repaired(tmp_path):
    with Catalog(tmp_path) as catalog:
        eid = catalog.start_episode('v1')  # recorded by this (live) process
        assert catalog.repair_incomplete() == []
        assert catalog.get(eid)['status'] == 'recording'


def test_truncated_bag_is_reported_and_other_episodes_survive(tmp_path):
    with Catalog(tmp_path) as catalog:
        first, second = _episode(catalog, seed=1), _episode(catalog, seed=2)
        catalog.label(first, True)
        storage = bag.storage_file(catalog.bag_path(second))
        data = storage.read_bytes()
        storage.write_bytes(data[:len(data) // 2])
        with pytest.raises(EpisodeError, match=f'{second}.*(corrupt|cannot be opened)'):
            list(bag.read_messages(catalog.bag_path(second)))
        assert len(list(bag.read_messages(catalog.bag_path(first)))) == 15
        assert catalog.labelled_episodes() == {first: True}
        # Repair keeps what is readable; the repaired episode no longer counts as complete.
        assert catalog.repair_episode(first)['messages_kept'] is None  # opens: untouched
        report = catalog.repair_episode(second)
        assert 0 <= report['messages_kept'] < 15 and catalog.get(second)['status'] == 'incomplete'
        assert len(list(bag.read_messages(catalog.bag_path(second)))) == report['messages_kept']
        assert catalog.get(first)['status'] == 'complete'
        # A bag with no storage file at all cannot be repaired, and says so.
        storage.unlink()
        for leftover in catalog.bag_path(second).glob('*.unrepaired'):
            leftover.unlink()
        (catalog.bag_path(second) / 'metadata.yaml').unlink()
        with pytest.raises(EpisodeError, match='no storage file'):
            bag.repair_bag(catalog.bag_path(second))
    assert os.path.exists(tmp_path / 'catalog.sqlite')
