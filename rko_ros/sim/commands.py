"""`rko sim ...` (look at the simulated task) and `rko bench sim` (how fast it runs)."""
import json
import os
import time

from rko_ros.errors import ConfigError


def register(subparsers):
    sim = subparsers.add_parser(
        'sim', help='the simulated cloth-folding task: render demonstration episodes',
        description='Tools for the embedded simulated task (a cloth on a table, a point gripper, '
                    'a top-down camera).')
    sim_sub = sim.add_subparsers(dest='sim_command', metavar='SIM_COMMAND', required=True)
    demo = sim_sub.add_parser(
        'demo-episode', help='run one scripted demonstration and write its frames as PNG files',
        description='Runs the scripted demonstrator for one fold style and writes every '
                    '--every-th frame (and the last) as PNG, plus result.json with the judged '
                    'style, quality and success.')
    demo.add_argument('--style', default='left_to_right', help='fold style (default %(default)s)')
    demo.add_argument('--seed', type=int, default=0, help='episode seed (default %(default)s)')
    demo.add_argument('--noise', type=float, default=1.0,
                      help='demonstrator noise scale, 0 = none (default %(default)s)')
    demo.add_argument('--size', default='640x480',
                      help='frame size WIDTHxHEIGHT (default %(default)s)')
    demo.add_argument('--every', type=int, default=5,
                      help='write every Nth frame (default %(default)s)')
    demo.add_argument('--out', default='sim_frames', help='output folder (default %(default)s)')
    demo.set_defaults(func=_demo_episode)


def register_bench(bench_subparsers):
    bench = bench_subparsers.add_parser(
        'sim', help='simulated episode wall time against simulated time, demonstrator success',
        description='Runs scripted demonstrations of each style (no rendering, then with the '
                    'policy-sized camera) and reports wall time per episode, the real-time factor '
                    'and the share of episodes judged a success in their own style.')
    bench.add_argument('--episodes', type=int, default=5,
                       help='episodes per style (default %(default)s)')
    bench.add_argument('--styles', default=None,
                       help='comma-separated styles (default: all)')
    bench.add_argument('--json', action='store_true', help='print one JSON line')
    bench.set_defaults(func=_bench_sim)


def _demo_episode(args):
    import cv2

    from rko_ros.sim.demonstrator import demo_episode
    from rko_ros.sim.render import parse_size
    from rko_ros.sim.styles import get_style
    from rko_ros.sim.task import ClothFoldTask

    get_style(args.style)
    size = parse_size(args.size)
    if args.every < 1:
        raise ConfigError(f'--every {args.every} must be >= 1')
    task = ClothFoldTask()
    out = demo_episode(task, args.style, args.seed, noise=args.noise, record_images=False,
                       extra_sizes=[size])
    frames = out['frames'][size]
    os.makedirs(args.out, exist_ok=True)
    written = 0
    for i, frame in enumerate(frames):
        if i % args.every == 0 or i == len(frames) - 1:
            path = os.path.join(args.out, f'frame_{i:03d}.png')
            if not cv2.imwrite(path, frame[:, :, ::-1]):
                raise ConfigError(f'could not write {path}; check that --out is writable')
            written += 1
    result = out['result'].to_dict()
    result.update(seed=out['seed'], demonstrated_style=args.style)
    with open(os.path.join(args.out, 'result.json'), 'w') as f:
        json.dump(result, f, indent=2)
    print(f'{written} frames in {args.out}/; judged {result["style"]}, quality '
          f'{result["quality"]:.2f}, success {result["success"]}')
    return 0


def _bench_sim(args):
    import numpy as np

    from rko_ros.sim.demonstrator import demo_episode
    from rko_ros.sim.styles import STYLES, get_style
    from rko_ros.sim.task import ClothFoldTask

    styles = args.styles.split(',') if args.styles else list(STYLES)
    for s in styles:
        get_style(s)
    if args.episodes < 1:
        raise ConfigError(f'--episodes {args.episodes} must be >= 1')
    task = ClothFoldTask()
    report = {'bench': 'sim', 'episode_ticks': task.config.episode_ticks,
              'control_rate_hz': task.config.control_rate_hz,
              'episode_sim_s': task.config.episode_ticks / task.config.control_rate_hz,
              'grid_n': task.sim.n, 'substeps': task.sim.config.substeps, 'styles': {}}
    walls = {False: [], True: []}
    for style in styles:
        ok, quality = [], []
        for seed in range(args.episodes):
            for with_images in (False, True):
                t0 = time.perf_counter()
                out = demo_episode(task, style, seed, record_images=with_images)
                walls[with_images].append(time.perf_counter() - t0)
            ok.append(out['result'].success and out['result'].style == style)
            quality.append(out['result'].quality)
        report['styles'][style] = {'success_rate': float(np.mean(ok)),
                                   'mean_quality': round(float(np.mean(quality)), 3)}
    for key, with_images in (('physics_only', False), ('with_camera', True)):
        wall = float(np.median(walls[with_images]))
        report[key] = {'episode_wall_s': round(wall, 4),
                       'realtime_factor': round(report['episode_sim_s'] / wall, 2)}
    if args.json:
        print(json.dumps(report))
    else:
        for key in ('physics_only', 'with_camera'):
            r = report[key]
            print(f'{key:13s} {r["episode_wall_s"]:.3f} s per {report["episode_sim_s"]:.1f} s '
                  f'episode ({r["realtime_factor"]:.1f}x real time)')
        for style, r in report['styles'].items():
            print(f'{style:14s} success {r["success_rate"]:.2f}  quality {r["mean_quality"]:.3f}')
    return 0
