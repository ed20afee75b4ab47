"""rosbag2 bag helpers shared by the recorder, the catalog and the dataset: the message typestore,
QoS profiles, reading a bag's messages, and repairing a bag whose recorder was killed.

A killed recorder leaves a bag without metadata.yaml (and, for mcap, without the summary and
footer). `repair_bag` does what `ros2 bag reindex` does: it recovers every readable message and
writes metadata.yaml so any rosbag2 reader opens the bag again. The original storage file is kept
beside the repaired one (`*.unrepaired`) because nothing recorded may be lost.
Imports rosbags, mcap and the standard library only: no rclpy, no torch.
"""
import functools
import logging
import os
import shutil
import sqlite3
from pathlib import Path

from rosbags.interfaces import (Qos, QosDurability, QosHistory, QosLiveliness, QosReliability,
                                QosTime)
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.rosbag2.errors import ReaderError
from rosbags.rosbag2.metadata import parse_qos
from rosbags.typesys import Stores, get_typestore

from rko_ros.errors import EpisodeError

log = logging.getLogger(__name__)

STORAGES = {'mcap': StoragePlugin.MCAP, 'sqlite3': StoragePlugin.SQLITE3}
STORAGE_SUFFIX = {'mcap': '.mcap', 'sqlite3': '.db3'}
UNREPAIRED_SUFFIX = '.unrepaired'
BAG_VERSION = 9


@functools.lru_cache(maxsize=1)
def typestore():
    """The ROS 2 Kilted message definitions (cached: building the store takes ~0.1 s)."""
    return get_typestore(Stores.ROS2_KILTED)


def default_qos():
    """Reliable, volatile, keep-last 10: what `ros2 bag play` offers when a topic names nothing."""
    zero = QosTime(0, 0)
    return Qos(QosHistory.KEEP_LAST, 10, QosReliability.RELIABLE, QosDurability.VOLATILE,
               zero, zero, QosLiveliness.AUTOMATIC, zero, False)


def qos_profiles(qos_yaml):
    """Offered QoS profiles from rosbag2's YAML text (None -> the default profile)."""
    if not qos_yaml:
        return [default_qos()]
    try:
        profiles = parse_qos(qos_yaml)
    except ReaderError as exc:
        raise EpisodeError(f'qos_yaml {qos_yaml!r} is not rosbag2 offered_qos_profiles YAML '
                           f'({exc}); pass a list of profiles or None') from None
    return profiles or [default_qos()]


def storage_file(bag_dir):
    """The storage file of a bag folder (one file per episode bag), or None when there is none."""
    bag_dir = Path(bag_dir)
    for suffix in STORAGE_SUFFIX.values():
        path = bag_dir / f'{bag_dir.name}{suffix}'
        if path.exists():
            return path
    return None


def open_reader(bag_dir):
    """An open rosbags Reader for `bag_dir`; EpisodeError naming the bag and the fix otherwise."""
    bag_dir = Path(bag_dir)
    if not bag_dir.is_dir():
        raise EpisodeError(f'bag {bag_dir} does not exist; check the episode\'s bag_path '
                           f'(`rko episodes show ID`)')
    try:
        reader = Reader(bag_dir)
        reader.open()
    except (FileNotFoundError, ReaderError, OSError, ValueError, KeyError) as exc:
        raise EpisodeError(f'bag {bag_dir} cannot be opened ({exc}); if its recorder was killed '
                           f'run `rko episodes repair`') from None
    return reader


def read_messages(bag_dir, topics=None):
    """(topic, msgtype, timestamp_ns, raw bytes) of every message in storage order."""
    reader = open_reader(bag_dir)
    try:
        conns = [c for c in reader.connections if topics is None or c.topic in topics]
        try:
            for conn, stamp_ns, raw in reader.messages(connections=conns):
                yield conn.topic, conn.msgtype, stamp_ns, raw
        except (ReaderError, OSError, ValueError, KeyError, IndexError) as exc:
            raise EpisodeError(f'bag {bag_dir} is corrupt or truncated ({exc}); run '
                               f'`rko episodes repair` or drop the episode') from None
    finally:
        reader.close()


def bag_topics(bag_dir):
    """{topic: (msgtype, message_count)} from the bag's metadata."""
    reader = open_reader(bag_dir)
    try:
        return {c.topic: (c.msgtype, c.msgcount) for c in reader.connections}
    finally:
        reader.close()


def is_readable(bag_dir):
    try:
        reader = open_reader(bag_dir)
    except EpisodeError:
        return False
    reader.close()
    return True


# ---------------------------------------------------------------------------------------------
# repair

def _recover_mcap(path):
    """Connections and messages readable from an mcap file that may lack its summary and footer.

    Returns (channels {id: (topic, msgtype, msgdef, encoding, qos_yaml)}, [(channel_id, stamp_ns,
    data)]). Stops at the first damaged or truncated record: everything before it is kept.
    """
    from mcap.records import Channel, Message, Schema
    from mcap.stream_reader import StreamReader

    schemas, channels, messages = {}, {}, []
    with open(path, 'rb') as stream:
        try:
            for record in StreamReader(stream, skip_magic=False, emit_chunks=False).records:
                if isinstance(record, Schema):
                    schemas[record.id] = record
                elif isinstance(record, Channel):
                    schema = schemas.get(record.schema_id)
                    qos_yaml = record.metadata.get('offered_qos_profiles', '')
                    channels[record.id] = (
                        record.topic, schema.name if schema else '',
                        schema.data.decode() if schema else '', schema.encoding if schema else '',
                        qos_yaml)
                elif isinstance(record, Message):
                    messages.append((record.channel_id, record.log_time, record.data))
        except Exception as exc:  # the mcap library raises several types at a truncated end
            log.info('mcap %s: recovered up to a damaged or truncated record (%s: %s)', path,
                     type(exc).__name__, exc)
    return channels, messages


def _repair_mcap(bag_dir, path):
    original = path.with_name(path.name + UNREPAIRED_SUFFIX)
    if not original.exists():  # a repair interrupted earlier already moved it aside
        path.rename(original)
    channels, messages = _recover_mcap(original)
    tmp_dir = bag_dir.parent / f'.{bag_dir.name}.repairing'
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_bag = tmp_dir / bag_dir.name
    tmp_dir.mkdir(parents=True)
    store = typestore()
    with Writer(tmp_bag, version=BAG_VERSION, storage_plugin=StoragePlugin.MCAP) as writer:
        conns = {}
        for cid, (topic, msgtype, msgdef, _encoding, qos_yaml) in sorted(channels.items()):
            if msgtype not in store.types:
                log.warning('bag %s: topic %s has type %s unknown to the typestore; its messages '
                            'stay only in %s', bag_dir, topic, msgtype, original.name)
                continue
            conns[cid] = writer.add_connection(topic, msgtype, typestore=store,
                                               offered_qos_profiles=qos_profiles(qos_yaml))
        for cid, stamp_ns, data in sorted(messages, key=lambda m: m[1]):
            if cid in conns:
                writer.write(conns[cid], stamp_ns, data)
    os.replace(tmp_bag / path.name, path)
    os.replace(tmp_bag / 'metadata.yaml', bag_dir / 'metadata.yaml')  # the commit point
    shutil.rmtree(tmp_dir, ignore_errors=True)
    return len(messages)


def _repair_sqlite3(bag_dir, path):
    """Commit what SQLite kept (its journal makes the file consistent) and rebuild metadata."""
    from io import StringIO

    from ruamel.yaml import YAML

    db = sqlite3.connect(f'file:{path}', uri=True)
    try:
        topics = db.execute('SELECT id, name, type, serialization_format, offered_qos_profiles, '
                            'type_description_hash FROM topics ORDER BY id').fetchall()
        counts = dict(db.execute('SELECT topic_id, COUNT(*) FROM messages GROUP BY topic_id'))
        first_ns, last_ns, total = db.execute(
            'SELECT MIN(timestamp), MAX(timestamp), COUNT(*) FROM messages').fetchone()
    except sqlite3.DatabaseError as exc:
        raise EpisodeError(f'bag {bag_dir}: {path.name} is not a readable SQLite bag ({exc}); '
                           f'the episode cannot be repaired') from None
    finally:
        db.close()
    first_ns = first_ns or 0
    duration_ns = (last_ns or 0) - first_ns
    from rosbags.rosbag2.metadata import dump_qos_v9
    meta = {'rosbag2_bagfile_information': {
        'version': BAG_VERSION, 'storage_identifier': 'sqlite3',
        'relative_file_paths': [path.name],
        'duration': {'nanoseconds': duration_ns},
        'starting_time': {'nanoseconds_since_epoch': first_ns},
        'message_count': total,
        'topics_with_message_count': [
            {'topic_metadata': {'name': name, 'type': msgtype, 'serialization_format': fmt,
                                'offered_qos_profiles': dump_qos_v9(qos_profiles(qos)),
                                'type_description_hash': digest},
             'message_count': counts.get(tid, 0)}
            for tid, name, msgtype, fmt, qos, digest in topics],
        'compression_format': '', 'compression_mode': '',
        'files': [{'path': path.name, 'starting_time': {'nanoseconds_since_epoch': first_ns},
                   'duration': {'nanoseconds': duration_ns}, 'message_count': total}],
        'custom_data': {'repaired': 'true'}, 'ros_distro': 'rosbags'}}
    text = StringIO()
    yaml = YAML(typ='safe')
    yaml.default_flow_style = False
    yaml.dump(meta, text)
    tmp = bag_dir / 'metadata.yaml.tmp'
    tmp.write_text(text.getvalue())
    os.replace(tmp, bag_dir / 'metadata.yaml')
    return total


def repair_bag(bag_dir):
    """Make a bag left by a killed recorder open again; returns the number of messages kept.

    A bag that already opens is left untouched. Raises EpisodeError when nothing is recoverable.
    """
    bag_dir = Path(bag_dir)
    if is_readable(bag_dir):
        return sum(count for _, count in bag_topics(bag_dir).values())
    path = storage_file(bag_dir)
    if path is None:
        unrepaired = sorted(bag_dir.glob(f'*{UNREPAIRED_SUFFIX}')) if bag_dir.is_dir() else []
        if not unrepaired:
            raise EpisodeError(f'bag {bag_dir} holds no storage file (.mcap or .db3); nothing to '
                               f'repair, the episode stays incomplete')
        path = unrepaired[0].with_name(unrepaired[0].name[:-len(UNREPAIRED_SUFFIX)])
    (bag_dir / 'metadata.yaml').unlink(missing_ok=True)  # a broken one would hide the repair
    if path.suffix == '.db3':
        kept = _repair_sqlite3(bag_dir, path)
    else:
        kept = _repair_mcap(bag_dir, path)
    log.warning('repaired bag %s: %d messages kept', bag_dir, kept)
    return kept
