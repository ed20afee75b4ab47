"""`rko episodes ...` (inspect, label, compare, export, repair recorded episodes) and
`rko bench recorder` (cameras + joint states through real ROS 2 into the recorder).

Handlers import their heavy modules lazily; rclpy is imported only by the bench, inside
`bench_recorder`. Nothing here imports torch.
"""
import json
import os
import shutil
from pathlib import Path

from rko_ros.errors import EpisodeError


def _data_dir_arg(parser):
    parser.add_argument('--data-dir', default=os.environ.get('RKO_DATA_DIR', 'data'),
                        help='data folder holding catalog.sqlite and episodes/ '
                             '(default: $RKO_DATA_DIR or ./data; now %(default)s)')
    parser.add_argument('--json', action='store_true', help='print JSON instead of a table')


def register(subparsers):
    eps = subparsers.add_parser(
        'episodes', help='list, show, label, compare, export and repair recorded episodes',
        description='The episode catalog (data_dir/catalog.sqlite) and its rosbag2 bags. Labels '
                    'and preferences are append-only; undo appends a row that cancels the newest '
                    'one.')
    sub = eps.add_subparsers(dest='episodes_command', metavar='EPISODES_COMMAND', required=True)

    p = sub.add_parser('list', help='one line per episode',
                       description='Episodes oldest first with status, model, duration, label.')
    p.add_argument('--status', choices=('complete', 'incomplete', 'recording'),
                   help='only episodes with this status')
    p.add_argument('--limit', type=int, default=None, help='only the newest N')
    _data_dir_arg(p)
    p.set_defaults(func=_list)

    p = sub.add_parser('show', help='one episode: catalog entry, label history, bag topics',
                       description='Everything the catalog knows about one episode, and the '
                                   'topics and message counts of its bag.')
    p.add_argument('episode_id', help="episode id (e.g. ep000012, or just 12)")
    _data_dir_arg(p)
    p.set_defaults(func=_show)

    p = sub.add_parser('label', help='label an episode good (desirable) or bad',
                       description='Appends a label; the newest label of an episode counts.')
    p.add_argument('episode_id', help='episode id')
    p.add_argument('value', choices=('good', 'bad'), help='good = desirable, bad = undesirable')
    p.add_argument('--source', default='cli', help='who labels (default %(default)s)')
    _data_dir_arg(p)
    p.set_defaults(func=_label)

    p = sub.add_parser('undo', help='cancel the newest label or preference',
                       description='Appends an undo row cancelling the newest active label or '
                                   'preference (of --source, if given).')
    p.add_argument('--source', default=None, help='only undo feedback from this source')
    _data_dir_arg(p)
    p.set_defaults(func=_undo)

    p = sub.add_parser('prefer', help='record that episode A is preferred over episode B',
                       description='Appends a pairwise preference (winner A, loser B).')
    p.add_argument('winner_id', help='preferred episode')
    p.add_argument('loser_id', help='the other episode')
    p.add_argument('--source', default='cli', help='who compares (default %(default)s)')
    _data_dir_arg(p)
    p.set_defaults(func=_prefer)

    p = sub.add_parser('export', help='copy an episode bag and its catalog entry to a folder',
                       description='Copies the bag to OUT/<id>/ and writes OUT/<id>.json with '
                                   'the catalog entry and label history.')
    p.add_argument('episode_id', help='episode id')
    p.add_argument('--out', required=True, help='destination folder')
    _data_dir_arg(p)
    p.set_defaults(func=_export)

    p = sub.add_parser('suggest', help='which episodes to label or compare next',
                       description='The mixed query sampler (alignment/sampler.py): from the '
                                   'implied rewards of the model version against its parent, '
                                   'proposes unlabelled episodes to label (or pairs to compare) '
                                   'where the feedback teaches the most; half of the mass is '
                                   'uniform so every episode can be asked. A pretrained model '
                                   '(no parent) gives uniform suggestions. Needs torch.')
    p.add_argument('--n', type=int, default=5, help='how many suggestions (default %(default)s)')
    p.add_argument('--kind', choices=('label', 'compare'), default='label',
                   help='label single episodes or compare pairs (default %(default)s)')
    p.add_argument('--version', default=None, help='model version (default: the active one)')
    p.add_argument('--mix', type=float, default=0.5,
                   help='uniform share of the sampler, 0..1 (default %(default)s)')
    p.add_argument('--seed', type=int, default=0, help='random seed (default %(default)s)')
    _data_dir_arg(p)
    p.set_defaults(func=_suggest)

    p = sub.add_parser('repair', help='mark episodes of killed recorders incomplete, fix bags',
                       description='Episodes left "recording" by a dead recorder become '
                                   'incomplete and their bags are rebuilt so they open (like '
                                   '`ros2 bag reindex`); the original file is kept as '
                                   '*.unrepaired. With IDs, repairs those episodes\' bags '
                                   '(a repaired episode becomes incomplete).')
    p.add_argument('episode_ids', nargs='*', help='episodes to repair (default: all left open)')
    _data_dir_arg(p)
    p.set_defaults(func=_repair)


def register_bench(bench_subparsers):
    p = bench_subparsers.add_parser(
        'recorder', help='cameras + joint states through real ROS 2 into the recorder: losses',
        description='A child process publishes --cameras rgb8 images and joint states with '
                    'sequence numbers in header.frame_id; this process subscribes raw and feeds '
                    'EpisodeRecorder. Prints sent, received, recorded, lost, mb_per_s, '
                    'queue_max.')
    p.add_argument('--seconds', type=float, default=60.0, help='publishing time (default 60)')
    p.add_argument('--cameras', type=int, default=3, help='camera topics (default 3)')
    p.add_argument('--width', type=int, default=640, help='image width px (default 640)')
    p.add_argument('--height', type=int, default=480, help='image height px (default 480)')
    p.add_argument('--rate-hz', type=float, default=30.0, help='camera rate (default 30)')
    p.add_argument('--joint-rate-hz', type=float, default=100.0,
                   help='joint state rate (default 100)')
    p.add_argument('--storage', choices=('mcap', 'sqlite3'), default='mcap',
                   help='bag storage (default mcap)')
    p.add_argument('--queue-size', type=int, default=1024, help='recorder queue (default 1024)')
    p.add_argument('--out', default=None, help='keep the bag in this folder (default: deleted)')
    p.add_argument('--json', action='store_true', help='print one JSON line')
    p.set_defaults(func=_bench)


# -- handlers --------------------------------------------------------------------------------


def _catalog(args):
    from rko_ros.episodes.catalog import Catalog
    return Catalog(args.data_dir)


def _print(args, payload, table=None):
    if args.json or table is None:
        print(json.dumps(payload, default=str, sort_keys=True))
    else:
        print(table)


def _label_text(value):
    return {True: 'good', False: 'bad', None: '-'}[value]


def _suggest(args):
    from rko_ros.alignment.sampler import suggest_from_store

    if args.n < 1:
        raise EpisodeError(f'--n {args.n}: ask for at least one suggestion')
    if not 0.0 <= args.mix <= 1.0:
        raise EpisodeError(f'--mix {args.mix}: must lie in [0, 1]')
    got = suggest_from_store(args.data_dir, n=args.n, kind=args.kind, version=args.version,
                             mix=args.mix, seed=args.seed)
    if args.kind == 'label':
        lines = [f'{"episode":<10} {"implied g":>10} {"p":>7}  command']
        lines += [f'{d["episode_id"]:<10} {d["g"]:>10.4f} {d["p"]:>7.3f}  '
                  f'rko episodes label {d["episode_id"]} good|bad' for d in got]
    else:
        lines = [f'{"a":<10} {"b":<10} {"g_a":>9} {"g_b":>9} {"p":>7}  command']
        lines += [f'{d["a"]:<10} {d["b"]:<10} {d["g_a"]:>9.4f} {d["g_b"]:>9.4f} {d["p"]:>7.3f}  '
                  f'rko episodes prefer {d["a"]} {d["b"]}  (or {d["b"]} {d["a"]})' for d in got]
    if not got:
        lines.append('(nothing left to ask)')
    _print(args, got, '\n'.join(lines))
    return 0


def _list(args):
    with _catalog(args) as catalog:
        rows = catalog.list(status=args.status, limit=args.limit)
    lines = [f'{"id":<10} {"status":<10} {"model":<16} {"duration_s":>10} {"label":<5} outcome']
    for r in rows:
        duration = '-' if r['duration_s'] is None else f'{r["duration_s"]:.1f}'
        outcome = '' if r['outcome'] is None else json.dumps(r['outcome'], sort_keys=True)[:60]
        lines.append(f'{r["id"]:<10} {r["status"]:<10} {str(r["model_version"] or "-"):<16} '
                     f'{duration:>10} {_label_text(r["label"]):<5} {outcome}')
    if not rows:
        lines.append(f'(no episodes in {args.data_dir})')
    _print(args, rows, '\n'.join(lines))
    return 0


def _show(args):
    from rko_ros.episodes.bag import bag_topics

    with _catalog(args) as catalog:
        episode = catalog.get(args.episode_id)
        episode['label_history'] = catalog.label_history(episode['id'])
    try:
        episode['topics'] = {t: {'type': ty, 'messages': n}
                             for t, (ty, n) in bag_topics(episode['bag_path']).items()}
    except EpisodeError as exc:
        episode['topics'] = None
        episode['bag_error'] = str(exc)
    lines = [f'{k}: {episode[k]}' for k in ('id', 'status', 'model_version', 'bag_path',
                                            'duration_s', 'outcome', 'meta', 'note')]
    lines.append(f'label: {_label_text(episode["label"])} ({len(episode["label_history"])} '
                 f'label rows)')
    if episode['topics'] is None:
        lines.append(f'bag: {episode["bag_error"]}')
    else:
        lines += [f'  {t}  {v["type"]}  {v["messages"]} messages'
                  for t, v in sorted(episode['topics'].items())]
    _print(args, episode, '\n'.join(lines))
    return 0


def _label(args):
    with _catalog(args) as catalog:
        catalog.label(args.episode_id, args.value == 'good', source=args.source)
        episode = catalog.get(args.episode_id)
    _print(args, {'id': episode['id'], 'label': args.value},
           f'{episode["id"]}: labelled {args.value}')
    return 0


def _undo(args):
    with _catalog(args) as catalog:
        undone = catalog.undo_last_label(source=args.source)
    if undone is None:
        text = 'nothing to undo'
    elif undone['kind'] == 'label':
        text = f'undid label {_label_text(undone["desirable"])} of {undone["episode_id"]}'
    else:
        text = f'undid preference {undone["winner_id"]} over {undone["loser_id"]}'
    _print(args, {'undone': undone}, text)
    return 0


def _prefer(args):
    with _catalog(args) as catalog:
        pref_id = catalog.prefer(args.winner_id, args.loser_id, source=args.source)
        winner, loser = catalog.get(args.winner_id)['id'], catalog.get(args.loser_id)['id']
    _print(args, {'preference': pref_id, 'winner_id': winner, 'loser_id': loser},
           f'{winner} preferred over {loser}')
    return 0


def _export(args):
    with _catalog(args) as catalog:
        episode = catalog.get(args.episode_id)
        episode['label_history'] = catalog.label_history(episode['id'])
    src = Path(episode['bag_path'])
    if not src.is_dir():
        raise EpisodeError(f'episode {episode["id"]}: bag {src} is missing; nothing to export')
    out = Path(args.out)
    dst = out / episode['id']
    if dst.exists():
        raise EpisodeError(f'{dst} exists already; choose another --out or remove it')
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns('windows-cache-*', '.*'))
    (out / f'{episode["id"]}.json').write_text(json.dumps(episode, default=str, indent=1,
                                                          sort_keys=True))
    _print(args, {'id': episode['id'], 'bag': str(dst)}, f'{episode["id"]} -> {dst}')
    return 0


def _repair(args):
    with _catalog(args) as catalog:
        if args.episode_ids:
            report = [catalog.repair_episode(e) for e in args.episode_ids]
        else:
            report = catalog.repair_incomplete()
    lines = [f'{r["id"]}: ' + (r.get('error') or r.get('note') or
                               f'{r["messages_kept"]} messages kept') for r in report]
    lines = lines or ['nothing to repair']
    _print(args, report, '\n'.join(lines))
    return 0


def _bench(args):
    from rko_ros.episodes.bench_recorder import run_bench

    result = run_bench(seconds=args.seconds, cameras=args.cameras,
                       size_px=(args.height, args.width), rate_hz=args.rate_hz,
                       joint_rate_hz=args.joint_rate_hz, storage=args.storage,
                       queue_size=args.queue_size, out=args.out)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        for key, value in result.items():
            print(f'{key}: {value}')
    return 0 if result['lost'] == 0 else 1

