"""Catalog: the SQLite index of recorded episodes, operator labels, preferences and training runs.

`data_dir/catalog.sqlite` in WAL mode with a busy timeout, so an episode node and `rko episodes`
can use it at once. Every write is one `BEGIN IMMEDIATE` transaction. Labels and preferences are
append-only: undo appends a row that cancels an earlier one, so the history stays auditable.
The schema version lives in `PRAGMA user_version`; `MIGRATIONS[i]` upgrades version i to i+1.
Imports the standard library only: no rclpy, no torch.
"""
import json
import os
import socket
import sqlite3
import threading
import time
from pathlib import Path

from rko_ros.errors import EpisodeError

CATALOG_FILE = 'catalog.sqlite'
EPISODES_DIR = 'episodes'
BUSY_TIMEOUT_MS = 30000

MIGRATIONS = (
    # 0 -> 1
    """
    CREATE TABLE episodes(
      id TEXT PRIMARY KEY,
      seq INTEGER NOT NULL UNIQUE,
      bag_path TEXT NOT NULL,
      model_version TEXT,
      status TEXT NOT NULL CHECK (status IN ('recording', 'complete', 'incomplete')),
      started_at REAL NOT NULL,
      ended_at REAL,
      duration_s REAL,
      outcome TEXT,
      meta TEXT,
      recorder_host TEXT,
      recorder_pid INTEGER,
      note TEXT
    );
    CREATE TABLE labels(
      id INTEGER PRIMARY KEY AUTOINCREMENT,
      episode_id TEXT NOT NULL REFERENCES episodes(id),
      desirable INTEGER,
      source TEXT NOT NULL,
      created_at REAL NOT NULL,
      undoes_label INTEGER REFERENCES labels(id),
      undoes_preference INTEGER REFERENCES preferences(id)
    );
    CREATE TABLE preferences(
      id INTEGER PRIMARY KEY AUTOINCREMENT,
      winner_id TEXT NOT NULL REFERENCES episodes(id),
      loser_id TEXT NOT NULL REFERENCES episodes(id),
      source TEXT NOT NULL,
      created_at REAL NOT NULL
    );
    CREATE TABLE training_runs(
      id INTEGER PRIMARY KEY AUTOINCREMENT,
      method TEXT NOT NULL,
      parent_version TEXT,
      new_version TEXT,
      status TEXT NOT NULL,
      started_at REAL NOT NULL,
      ended_at REAL,
      episodes TEXT,
      config TEXT,
      metrics TEXT,
      error TEXT
    );
    CREATE INDEX labels_episode ON labels(episode_id);
    """,
)


def _json(value):
    return None if value is None else json.dumps(value, sort_keys=True, default=str)


def _unjson(text):
    return None if text is None else json.loads(text)


class Catalog:
    """The episode catalog of one data_dir (created on first use)."""

    def __init__(self, data_dir):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.data_dir / CATALOG_FILE
        # One connection may serve several executor threads of a node: one transaction at a time.
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000,
                                       isolation_level=None, check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self._db.execute(f'PRAGMA busy_timeout={BUSY_TIMEOUT_MS}')
            self._db.execute('PRAGMA journal_mode=WAL')
            self._db.execute('PRAGMA foreign_keys=ON')
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise EpisodeError(f'catalog {self.path} cannot be opened ({exc}); move the broken '
                               f'file aside, episodes stay under {self.data_dir / EPISODES_DIR}') \
                from None

    def close(self):
        self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # -- plumbing --------------------------------------------------------------------------------

    def _tx(self):
        return _Transaction(self._db, self._lock)

    def _migrate(self):
        with self._tx():
            version = self._db.execute('PRAGMA user_version').fetchone()[0]
            if version > len(MIGRATIONS):
                raise EpisodeError(f'catalog {self.path} has schema version {version}, newer than '
                                   f'this rko_ros ({len(MIGRATIONS)}); upgrade rko_ros')
            for target in range(version, len(MIGRATIONS)):
                # executescript() would COMMIT the open transaction: run statement by statement.
                for statement in MIGRATIONS[target].split(';'):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f'PRAGMA user_version={target + 1}')

    def _row(self, episode_id):
        row = self._db.execute('SELECT * FROM episodes WHERE id=?', (str(episode_id),)).fetchone()
        if row is None:
            # Accept the bare number an operator types: `rko episodes label 12 good`.
            text = str(episode_id).strip()
            if text.isdigit():
                row = self._db.execute('SELECT * FROM episodes WHERE seq=?',
                                       (int(text),)).fetchone()
        if row is None:
            known = [r[0] for r in self._db.execute(
                'SELECT id FROM episodes ORDER BY seq DESC LIMIT 5')]
            raise EpisodeError(f'episode {episode_id!r} is not in the catalog {self.path} '
                               f'(latest: {", ".join(known) or "none"}); see `rko episodes list`')
        return row

    def _episode(self, row):
        out = {k: row[k] for k in row.keys() if k not in ('outcome', 'meta', 'seq')}
        out['outcome'] = _unjson(row['outcome'])
        out['meta'] = _unjson(row['meta']) or {}
        out['complete'] = row['status'] == 'complete'
        out['bag_path'] = str(self.bag_path_of(row['bag_path']))
        out['label'] = self._current_label(row['id'])
        return out

    def bag_path_of(self, stored):
        path = Path(stored)
        return path if path.is_absolute() else self.data_dir / path

    # -- episodes --------------------------------------------------------------------------------

    def start_episode(self, model_version, bag_path=None, meta=None):
        """Register a new episode as 'recording'; returns its id (e.g. 'ep000012').

        bag_path defaults to data_dir/episodes/<id>; paths under data_dir are stored relative so
        the data folder can move.
        """
        with self._tx():
            seq = self._db.execute('SELECT COALESCE(MAX(seq), 0) + 1 FROM episodes').fetchone()[0]
            episode_id = f'ep{seq:06d}'
            path = Path(bag_path) if bag_path is not None else \
                Path(EPISODES_DIR) / episode_id
            if path.is_absolute():
                try:
                    path = path.relative_to(self.data_dir.resolve())
                except ValueError:
                    pass
            self._db.execute(
                'INSERT INTO episodes(id, seq, bag_path, model_version, status, started_at, meta, '
                'recorder_host, recorder_pid) VALUES (?,?,?,?,?,?,?,?,?)',
                (episode_id, seq, str(path), model_version, 'recording', time.time(), _json(meta),
                 socket.gethostname(), os.getpid()))
        return episode_id

    def bag_path(self, episode_id):
        return self.bag_path_of(self._row(episode_id)['bag_path'])

    def finish_episode(self, episode_id, outcome=None, complete=True, note=None):
        row = self._row(episode_id)
        now = time.time()
        with self._tx():
            self._db.execute(
                'UPDATE episodes SET status=?, ended_at=?, duration_s=?, outcome=?, '
                'note=COALESCE(?, note) WHERE id=?',
                ('complete' if complete else 'incomplete', now, now - row['started_at'],
                 _json(outcome), note, row['id']))
        return self.get(row['id'])

    def get(self, episode_id):
        return self._episode(self._row(episode_id))

    def list(self, status=None, model_version=None, labelled=None, limit=None):
        """Episodes oldest first; filters: status ('complete'|'incomplete'|'recording'),
        model_version, labelled (True: has a current label, False: has none)."""
        sql, args = 'SELECT * FROM episodes WHERE 1=1', []
        if status is not None:
            sql += ' AND status=?'
            args.append(status)
        if model_version is not None:
            sql += ' AND model_version=?'
            args.append(model_version)
        sql += ' ORDER BY seq'
        rows = [self._episode(r) for r in self._db.execute(sql, args)]
        if labelled is not None:
            rows = [r for r in rows if (r['label'] is not None) == bool(labelled)]
        return rows[-limit:] if limit else rows

    def repair_incomplete(self):
        """Mark episodes whose recorder died as incomplete and make their bags open again
        (also the bags of incomplete episodes whose recorder hit a storage error).

        An episode still 'recording' by a live process on this host is left alone. Returns a
        list of {id, bag_path, messages_kept | error}.
        """
        from rko_ros.episodes.bag import repair_bag

        host = socket.gethostname()
        report = []
        from rko_ros.episodes.bag import is_readable

        rows = self._db.execute("SELECT * FROM episodes WHERE status IN ('recording', "
                                "'incomplete') ORDER BY seq").fetchall()
        for row in rows:
            bag_dir = self.bag_path_of(row['bag_path'])
            if row['status'] == 'recording' and row['recorder_host'] == host and \
                    _alive(row['recorder_pid']):
                continue
            if row['status'] == 'incomplete' and (is_readable(bag_dir) or not bag_dir.exists()):
                continue
            entry = {'id': row['id'], 'bag_path': str(bag_dir)}
            try:
                entry['messages_kept'] = repair_bag(bag_dir)
                note = f'recorder stopped without closing; bag repaired, ' \
                       f'{entry["messages_kept"]} messages kept'
            except EpisodeError as exc:
                entry['error'] = str(exc)
                note = f'recorder stopped without closing; repair failed: {exc}'
            with self._tx():
                self._db.execute("UPDATE episodes SET status='incomplete', note=? WHERE id=?",
                                 (note, row['id']))
            report.append(entry)
        return report

    def repair_episode(self, episode_id):
        """Repair one episode's bag (e.g. a complete episode whose file was damaged later).
        A bag that needed repair may miss messages, so its episode becomes incomplete."""
        from rko_ros.episodes.bag import is_readable, repair_bag

        row = self._row(episode_id)
        bag_dir = self.bag_path_of(row['bag_path'])
        if is_readable(bag_dir):
            return {'id': row['id'], 'bag_path': str(bag_dir), 'messages_kept': None,
                    'note': 'bag opens, nothing to repair'}
        kept = repair_bag(bag_dir)
        with self._tx():
            self._db.execute("UPDATE episodes SET status='incomplete', note=? WHERE id=?",
                             (f'bag repaired, {kept} messages kept', row['id']))
        return {'id': row['id'], 'bag_path': str(bag_dir), 'messages_kept': kept}

    # -- labels and preferences ------------------------------------------------------------------

    def label(self, episode_id, desirable, source='operator'):
        row = self._row(episode_id)
        if row['status'] != 'complete':
            raise EpisodeError(f'episode {row["id"]} is {row["status"]}; only complete episodes '
                               f'can be labelled (its bag may miss the end of the episode)')
        with self._tx():
            cur = self._db.execute(
                'INSERT INTO labels(episode_id, desirable, source, created_at) VALUES (?,?,?,?)',
                (row['id'], 1 if desirable else 0, source, time.time()))
        return cur.lastrowid

    def _current_label(self, episode_id):
        row = self._db.execute(
            'SELECT desirable FROM labels l WHERE episode_id=? AND desirable IS NOT NULL AND NOT '
            'EXISTS (SELECT 1 FROM labels u WHERE u.undoes_label=l.id) ORDER BY id DESC LIMIT 1',
            (episode_id,)).fetchone()
        return None if row is None else bool(row[0])

    def current_label(self, episode_id):
        """True (desirable), False (undesirable) or None (unlabelled or undone)."""
        return self._current_label(self._row(episode_id)['id'])

    def prefer(self, winner_id, loser_id, source='operator'):
        winner, loser = self._row(winner_id), self._row(loser_id)
        if winner['id'] == loser['id']:
            raise EpisodeError(f'cannot prefer episode {winner["id"]} over itself; name two '
                               f'different episodes')
        for row in (winner, loser):
            if row['status'] != 'complete':
                raise EpisodeError(f'episode {row["id"]} is {row["status"]}; preferences need '
                                   f'complete episodes')
        with self._tx():
            cur = self._db.execute(
                'INSERT INTO preferences(winner_id, loser_id, source, created_at) '
                'VALUES (?,?,?,?)', (winner['id'], loser['id'], source, time.time()))
        return cur.lastrowid

    def undo_last_label(self, source=None):
        """Cancel the newest active label or preference (of `source`, if given) by appending an
        undo row. Returns {kind, id, episode_id(s)} of what was undone, or None."""
        src_sql = '' if source is None else ' AND source=?'
        args = () if source is None else (source,)
        with self._tx():
            label = self._db.execute(
                'SELECT id, episode_id, desirable, created_at FROM labels l WHERE desirable IS '
                'NOT NULL AND NOT EXISTS (SELECT 1 FROM labels u WHERE u.undoes_label=l.id)'
                + src_sql + ' ORDER BY id DESC LIMIT 1', args).fetchone()
            pref = self._db.execute(
                'SELECT id, winner_id, loser_id, created_at FROM preferences p WHERE NOT EXISTS '
                '(SELECT 1 FROM labels u WHERE u.undoes_preference=p.id)' + src_sql
                + ' ORDER BY id DESC LIMIT 1', args).fetchone()
            now = time.time()
            if label is not None and (pref is None or label['created_at'] >= pref['created_at']):
                self._db.execute(
                    'INSERT INTO labels(episode_id, desirable, source, created_at, undoes_label) '
                    'VALUES (?,NULL,?,?,?)', (label['episode_id'], source or 'undo', now,
                                              label['id']))
                return {'kind': 'label', 'id': label['id'], 'episode_id': label['episode_id'],
                        'desirable': bool(label['desirable'])}
            if pref is not None:
                self._db.execute(
                    'INSERT INTO labels(episode_id, desirable, source, created_at, '
                    'undoes_preference) VALUES (?,NULL,?,?,?)',
                    (pref['winner_id'], source or 'undo', now, pref['id']))
                return {'kind': 'preference', 'id': pref['id'], 'winner_id': pref['winner_id'],
                        'loser_id': pref['loser_id']}
        return None

    def preferences(self):
        """Active (not undone) preferences, oldest first: [{id, winner_id, loser_id, source,
        created_at}]."""
        rows = self._db.execute(
            'SELECT * FROM preferences p WHERE NOT EXISTS (SELECT 1 FROM labels u WHERE '
            'u.undoes_preference=p.id) ORDER BY id').fetchall()
        return [dict(r) for r in rows]

    def labelled_episodes(self):
        """{episode_id: True|False} for complete episodes with a current label, oldest first."""
        out = {}
        for row in self._db.execute("SELECT id FROM episodes WHERE status='complete' "
                                    "ORDER BY seq"):
            value = self._current_label(row[0])
            if value is not None:
                out[row[0]] = value
        return out

    def label_history(self, episode_id):
        eid = self._row(episode_id)['id']
        return [dict(r) for r in self._db.execute(
            'SELECT * FROM labels WHERE episode_id=? ORDER BY id', (eid,))]

    # -- training runs ---------------------------------------------------------------------------

    def start_run(self, method, parent_version=None, episodes=None, config=None):
        with self._tx():
            cur = self._db.execute(
                'INSERT INTO training_runs(method, parent_version, status, started_at, episodes, '
                'config) VALUES (?,?,?,?,?,?)',
                (method, parent_version, 'running', time.time(), _json(episodes), _json(config)))
        return cur.lastrowid

    def finish_run(self, run_id, new_version=None, metrics=None, status='done', error=None):
        with self._tx():
            cur = self._db.execute(
                'UPDATE training_runs SET new_version=?, metrics=?, status=?, error=?, ended_at=? '
                'WHERE id=?', (new_version, _json(metrics), status, error, time.time(), run_id))
        if cur.rowcount == 0:
            raise EpisodeError(f'training run {run_id} is not in the catalog {self.path}')

    def runs(self):
        out = []
        for row in self._db.execute('SELECT * FROM training_runs ORDER BY id'):
            item = dict(row)
            for key in ('episodes', 'config', 'metrics'):
                item[key] = _unjson(item[key])
            out.append(item)
        return out


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT: takes the write lock up front so two processes never deadlock
    upgrading read locks; SQLite's busy timeout makes the second one wait."""

    def __init__(self, db, lock):
        self.db, self.lock = db, lock

    def __enter__(self):
        self.lock.acquire()
        try:
            self.db.execute('BEGIN IMMEDIATE')
        except BaseException:
            self.lock.release()
            raise
        return self.db

    def __exit__(self, exc_type, *exc):
        try:
            self.db.execute('COMMIT' if exc_type is None else 'ROLLBACK')
        finally:
            self.lock.release()
        return False


def _alive(pid):
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
