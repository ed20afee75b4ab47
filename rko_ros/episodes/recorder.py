"""EpisodeRecorder: one rosbag2 bag per episode, written from already-serialized CDR bytes.

ROS callbacks call `write()`, which only puts the bytes on a bounded queue and returns; a worker
thread owns the rosbags Writer. A full queue drops the message, counts it and warns (at most once
every few seconds): the callbacks never block. The worker flushes every `flush_interval_s` (closes
the pending mcap chunk or commits the SQLite transaction), so a recorder killed with SIGKILL loses
at most that much; `bag.repair_bag` makes such a bag open again. A storage error (disk full, file
size limit) stops this episode cleanly: the bag is closed if possible, later messages are counted
as dropped, and `close()` reports the error.
Imports rosbags and the standard library only: no rclpy, no torch.
"""
import errno
import logging
import queue
import sqlite3
import threading
import time
from pathlib import Path

from rosbags.rosbag2 import Writer
from rosbags.rosbag2.errors import WriterError

from rko_ros.episodes.bag import BAG_VERSION, STORAGES, qos_profiles, typestore
from rko_ros.errors import EpisodeError

log = logging.getLogger(__name__)

WARN_INTERVAL_S = 5.0
_STOP = object()
# What a full disk or a size limit raises: OSError from files, sqlite3.Error from SQLite storage.
STORAGE_ERRORS = (OSError, WriterError, sqlite3.Error)


def _empty_counts():
    return {'recorded': 0, 'bytes': 0, 'per_topic': {}}


class EpisodeRecorder:
    """Records one episode into `bag_dir` (created; an existing path is never overwritten)."""

    def __init__(self, bag_dir, storage='mcap', queue_size=1024, flush_interval_s=0.5):
        if storage not in STORAGES:
            raise EpisodeError(f'storage {storage!r} is not supported; use one of '
                               f'{sorted(STORAGES)}')
        if int(queue_size) < 1:
            raise EpisodeError(f'queue_size={queue_size} must be >= 1')
        self.bag_dir = Path(bag_dir)
        if self.bag_dir.exists():
            raise EpisodeError(f'bag {self.bag_dir} exists already; recorded episodes are never '
                               f'overwritten, choose a new episode folder')
        self.storage = storage
        self.flush_interval_s = float(flush_interval_s)
        self.bag_dir.parent.mkdir(parents=True, exist_ok=True)
        self._writer = Writer(self.bag_dir, version=BAG_VERSION, storage_plugin=STORAGES[storage])
        self._queue = queue.Queue(maxsize=int(queue_size))
        self._topics = {}        # topic -> msgtype, as registered by callers
        self._connections = {}   # topic -> rosbags Connection, touched by the worker only
        self._lock = threading.Lock()
        self._accepting = True
        self._error = None
        self._closed_stats = None
        self._pending = _empty_counts()  # written to the storage, not yet flushed
        self._last_warn_s = 0.0
        self.stats_counts = {'recorded': 0, 'dropped': 0, 'queue_max': 0, 'bytes': 0,
                             'per_topic': {}}
        self._worker = threading.Thread(target=self._run, name=f'recorder:{self.bag_dir.name}',
                                        daemon=True)
        self._opened = threading.Event()
        self._open_error = None
        self._worker.start()
        self._opened.wait()
        if self._open_error is not None:
            raise EpisodeError(f'cannot create bag {self.bag_dir}: {self._open_error}')

    # -- caller side -----------------------------------------------------------------------------

    def add_topic(self, topic, msgtype, qos_yaml=None):
        """Register a topic before its first `write`; msgtype like 'sensor_msgs/msg/Image'."""
        if msgtype not in typestore().types:
            raise EpisodeError(f'topic {topic}: message type {msgtype!r} is unknown to the ROS 2 '
                               f'Kilted typestore; use a standard type like '
                               f"'sensor_msgs/msg/Image'")
        profiles = qos_profiles(qos_yaml)
        with self._lock:
            known = self._topics.get(topic)
            if known is not None:
                if known != msgtype:
                    raise EpisodeError(f'topic {topic} is already recorded as {known}, not '
                                       f'{msgtype}; one type per topic')
                return
            self._topics[topic] = msgtype
        # Through the queue, blocking: registration must not be dropped and must precede writes.
        self._queue.put(('topic', topic, msgtype, profiles))

    def write(self, topic, timestamp_ns, cdr_bytes, block=False):
        """Queue one serialized message; never blocks (unless `block`: offline writers that must
        not drop). Returns False when it was dropped."""
        if topic not in self._topics:
            raise EpisodeError(f'topic {topic} was not added to the recorder of {self.bag_dir}; '
                               f'call add_topic(topic, msgtype) first')
        if not self._accepting:
            self._count_drop('recorder stopped' if self._error is None else self._error)
            return False
        try:
            self._queue.put(('msg', topic, int(timestamp_ns), cdr_bytes), block=block)
        except queue.Full:
            self._count_drop(f'queue full ({self._queue.maxsize} messages)')
            return False
        depth = self._queue.qsize()
        if depth > self.stats_counts['queue_max']:
            self.stats_counts['queue_max'] = depth
        return True

    def _count_drop(self, why):
        with self._lock:
            self.stats_counts['dropped'] += 1
            dropped = self.stats_counts['dropped']
            now = time.monotonic()
            warn = now - self._last_warn_s >= WARN_INTERVAL_S
            if warn:
                self._last_warn_s = now
        if warn:
            log.warning('recorder %s dropped a message (%s); %d dropped so far. Raise queue_size '
                        'or use faster storage', self.bag_dir, why, dropped)

    @property
    def error(self):
        return self._error

    def stats(self):
        """Live counters (a copy)."""
        with self._lock:
            out = dict(self.stats_counts, per_topic=dict(self.stats_counts['per_topic']))
        out['queue_size'] = self._queue.qsize()
        out['error'] = self._error
        return out

    def close(self, timeout_s=None):
        """Write what is queued, close the bag, return stats (recorded, dropped, queue_max,
        bytes, per_topic, error, bag_dir, storage, complete)."""
        if self._closed_stats is not None:
            return self._closed_stats
        self._accepting = False
        self._queue.put(_STOP)
        self._worker.join(timeout_s)
        stats = self.stats()
        stats.pop('queue_size')
        stats.update(bag_dir=str(self.bag_dir), storage=self.storage,
                     complete=self._error is None and not self._worker.is_alive())
        self._closed_stats = stats
        return stats

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # -- worker side -----------------------------------------------------------------------------

    def _run(self):
        # The worker opens the writer: SQLite connections belong to the thread that made them.
        try:
            self._writer.open()
        except STORAGE_ERRORS as exc:
            self._open_error = exc
            return
        finally:
            self._opened.set()
        last_flush_s = time.monotonic()
        dirty = False
        while True:
            try:
                item = self._queue.get(timeout=self.flush_interval_s)
            except queue.Empty:
                item = None
            if item is _STOP:
                break
            if item is not None and self._error is None:
                try:
                    self._handle(item)
                    dirty = True
                except STORAGE_ERRORS as exc:
                    self._fail(exc)
            now = time.monotonic()
            if dirty and self._error is None and now - last_flush_s >= self.flush_interval_s:
                try:
                    self._flush()
                    self._commit_pending()
                except STORAGE_ERRORS as exc:
                    self._fail(exc)
                dirty = False
                last_flush_s = now
        self._finish()

    def _handle(self, item):
        kind, topic = item[0], item[1]
        if kind == 'topic':
            _, _, msgtype, profiles = item
            self._connections[topic] = self._writer.add_connection(
                topic, msgtype, typestore=typestore(), offered_qos_profiles=profiles)
            return
        _, _, stamp_ns, data = item
        self._writer.write(self._connections[topic], stamp_ns, data)
        pending = self._pending
        pending['recorded'] += 1
        pending['bytes'] += len(data)
        pending['per_topic'][topic] = pending['per_topic'].get(topic, 0) + 1

    def _commit_pending(self):
        """Messages count as recorded once a flush or close made them durable."""
        pending, self._pending = self._pending, _empty_counts()
        with self._lock:
            counts = self.stats_counts
            counts['recorded'] += pending['recorded']
            counts['bytes'] += pending['bytes']
            for topic, n in pending['per_topic'].items():
                counts['per_topic'][topic] = counts['per_topic'].get(topic, 0) + n

    def _flush(self):
        """Make everything written so far survive a SIGKILL of this process."""
        storage = self._writer.storage
        if storage is None:
            return
        if self.storage == 'mcap':
            # rosbags buffers the current chunk in memory; closing it writes a complete,
            # self-describing chunk that a repair can recover.
            if storage.chunk.msgs:
                storage.close_chunk()
            storage.bio.flush()
        else:
            storage.conn.commit()

    def _fail(self, exc):
        self._accepting = False
        if isinstance(exc, sqlite3.Error) and 'full' in str(exc):
            exc = OSError(errno.ENOSPC, str(exc))
        reason = {errno.ENOSPC: 'disk full', errno.EFBIG: 'file size limit reached',
                  errno.EDQUOT: 'disk quota exceeded'}.get(getattr(exc, 'errno', None),
                                                           'storage error')
        self._error = (f'{reason} while writing bag {self.bag_dir} ({exc}); the episode stopped '
                       f'here and is incomplete, free space and run `rko episodes repair`')
        log.error('%s', self._error)
        # Messages written since the last flush are not durable: the repair drops a partial chunk
        # and SQLite rolls back the open transaction.
        pending, self._pending = self._pending, _empty_counts()
        with self._lock:
            self.stats_counts['dropped'] += pending['recorded']
        # Nothing more will be written: count what is still queued as dropped.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                self._queue.put(_STOP)
                break
            if item[0] == 'msg':
                with self._lock:
                    self.stats_counts['dropped'] += 1

    def _finish(self):
        if self._error is None:
            try:
                self._writer.close()
                self._commit_pending()
                return
            except STORAGE_ERRORS as exc:
                self._fail(exc)
        # After a storage error the file's tail is unknown: close the handles and leave the bag
        # to `repair_bag`, which keeps every complete record.
        try:
            self._writer.abort()
        except STORAGE_ERRORS:
            pass
