"""`rko up` (the nodes in one process, for machines without `ros2 launch`) and
`rko bench control-loop`. rclpy and the nodes are imported inside the handlers."""
import os
import signal
import subprocess
import sys
import tempfile
import time

from rko_ros.errors import ConfigError

NODES = ('policy', 'episode', 'trainer')


def _default_data_dir():
    return os.environ.get('RKO_DATA_DIR', 'data')


def default_config_path():
    """config/rko.yaml from the installed share directory, else from the source tree."""
    try:
        from ament_index_python.packages import get_package_share_directory
        path = os.path.join(get_package_share_directory('rko_ros'), 'config', 'rko.yaml')
        if os.path.isfile(path):
            return path
    except Exception:  # noqa: BLE001 - no ament index here: fall back to the source tree
        pass
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), 'config', 'rko.yaml')


def register(subparsers):
    p = subparsers.add_parser(
        'up', help='run policy_node, episode_node and trainer_node in one process',
        description='Start the rko_ros nodes in one process, with parameters from '
                    'config/rko.yaml: what `ros2 launch rko_ros rko.launch.py` does, for machines '
                    'without ros2 launch. Callbacks run on one thread, service requests on '
                    '--threads more (rko_ros.ros.executor), policy_node\'s control tick on its '
                    'own. Ctrl-C stops them.')
    p.add_argument('--data-dir', default=_default_data_dir(),
                   help='data folder (models/, episodes/, catalog.sqlite) (default $RKO_DATA_DIR '
                        'or ./data)')
    p.add_argument('--config', default=None,
                   help='parameter YAML (ros__parameters per node; default config/rko.yaml)')
    p.add_argument('--namespace', default='rko', help='namespace of every node (default rko)')
    p.add_argument('--sim', action='store_true', help='also run sim_node (the simulated cloth)')
    p.add_argument('--sim-process', action='store_true',
                   help='with --sim: run sim_node in a process of its own (same --config and '
                        'namespace, stopped with this one), as a robot\'s camera and controller '
                        'drivers run apart from the policy; default: in this process')
    p.add_argument('--nodes', nargs='+', default=list(NODES), choices=NODES,
                   help='which nodes to run (default: all three)')
    p.add_argument('--threads', type=int, default=2,
                   help='threads that answer service requests, so that a slow one (a model '
                        'load) never holds up camera callbacks (default 2)')
    p.add_argument('ros_args', nargs='*',
                   help='after `--`: more ROS arguments for every node in the process, e.g. '
                        '-- --ros-args -p max_obs_age_s:=0.3 (per-node values: --config)')
    p.set_defaults(func=_up)


def register_bench(bench_subparsers):
    p = bench_subparsers.add_parser(
        'control-loop', help='policy_node tick timing with a camera stream running',
        description='Runs policy_node with a small (untrained) model at --rate-hz against '
                    'sim_node in a separate process (camera and joint states at 30 Hz) and '
                    'reports tick count, missed ticks, tick jitter, inference latency and '
                    'observation-to-action latency. Target (DESIGN.md 8): missed 0, p99 jitter '
                    '< 2 ms at 10 Hz.')
    p.add_argument('--rate-hz', type=float, default=10.0, help='control rate (default 10)')
    p.add_argument('--seconds', type=float, default=30.0, help='measured duration (default 30)')
    p.add_argument('--preset', default='small', choices=['small', 'default'],
                   help='model size (default small)')
    p.add_argument('--camera-rate-hz', type=float, default=30.0,
                   help='rate of the camera and joint state stream (default 30)')
    p.add_argument('--sim-nice', type=int, default=10,
                   help='nice value added to the sim_node process, which stands in for camera and '
                        'robot hardware that on a real robot do not share this CPU (default 10; '
                        '0 measures the worst case of a simulator competing for the same cores)')
    p.add_argument('--json', action='store_true', help='print one JSON line')
    p.set_defaults(func=_bench_control_loop)


def _init_args(config, namespace, extra):
    args = ['rko', '--ros-args']
    if config:
        if not os.path.isfile(config):
            raise ConfigError(f'parameter file {config} does not exist; give --config PATH')
        args += ['--params-file', config]
    if namespace:
        args += ['-r', f'__ns:=/{namespace.strip("/")}']
    extra = [a for a in extra if a != '--ros-args']
    return args + (['--ros-args'] + extra if extra else [])


def _die_with_parent():
    """In the child: receive SIGTERM when the parent dies, even by SIGKILL (Linux)."""
    try:
        import ctypes
        ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _start_sim_process(config, namespace, extra):
    """sim_node as a child process with this process's parameters and namespace."""
    args = _init_args(config, namespace, extra)[1:]     # drop the program name
    return subprocess.Popen([sys.executable, '-m', 'rko_ros.ros.sim_node'] + args,
                            preexec_fn=_die_with_parent if sys.platform.startswith('linux') else None)


def build_nodes(data_dir, which=NODES, sim=False):
    from rclpy.parameter import Parameter
    overrides = [Parameter('data_dir', Parameter.Type.STRING, os.path.abspath(data_dir))]
    nodes = []
    if sim:
        from rko_ros.ros.sim_node import SimNode
        nodes.append(SimNode())
    if 'policy' in which:
        from rko_ros.ros.policy_node import PolicyNode
        nodes.append(PolicyNode(parameter_overrides=overrides))
    if 'episode' in which:
        from rko_ros.ros.episode_node import EpisodeNode
        nodes.append(EpisodeNode(parameter_overrides=overrides))
    if 'trainer' in which:
        from rko_ros.ros.trainer_node import TrainerNode
        nodes.append(TrainerNode(parameter_overrides=overrides))
    return nodes


def _up(args):
    import rclpy
    from rclpy.executors import ExternalShutdownException
    from rko_ros.ros.executor import ServiceThreadsExecutor
    from rko_ros.ros.params import spin
    if args.threads < 1:
        raise ConfigError(f'--threads {args.threads}: give at least 1')
    config = args.config or default_config_path()
    nodes = []
    sim = _start_sim_process(config, args.namespace, args.ros_args) \
        if args.sim and args.sim_process else None
    try:
        with rclpy.init(args=_init_args(config, args.namespace, args.ros_args)):
            nodes = build_nodes(args.data_dir, args.nodes, args.sim and sim is None)
            executor = ServiceThreadsExecutor(args.threads)
            for node in nodes:
                executor.add_node(node)
            print(f'rko up: {", ".join(n.get_fully_qualified_name() for n in nodes)} running '
                  f'(data {os.path.abspath(args.data_dir)}); Ctrl-C stops', file=sys.stderr,
                  flush=True)
            try:
                spin(executor)
            finally:
                for node in nodes:
                    if hasattr(node, 'close'):
                        node.close()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if sim is not None:
            sim.terminate()
            try:
                sim.wait(10)
            except subprocess.TimeoutExpired:
                sim.kill()
    return 0


def _bench_control_loop(args):
    import numpy as np
    import rclpy
    from rclpy.parameter import Parameter
    import threading
    import torch
    from rko_ros.policy.config import PolicyConfig
    from rko_ros.policy.model import DiffusionPolicy
    from rko_ros.policy.store import ModelStore
    from rko_ros.ros.executor import ServiceThreadsExecutor
    from rko_ros.ros.policy_node import PolicyNode

    torch.manual_seed(0)
    config = PolicyConfig.preset(args.preset, action={'control_rate_hz': args.rate_hz})
    policy = DiffusionPolicy(config).eval()
    rng = np.random.default_rng(0)
    policy.fit_normalizer(rng.uniform(-0.2, 0.2, (64, config.obs.state_dim)),
                          rng.uniform(-0.2, 0.2, (64, config.action.action_dim)))
    h, w = config.obs.image_size_px
    with tempfile.TemporaryDirectory(prefix='rko-bench-') as data_dir:
        version = ModelStore(data_dir).write_version(policy, method='bench', activate=True)
        env = dict(os.environ)
        env.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
        env.setdefault('ROS_DOMAIN_ID', str(101 + os.getpid() % 100))
        os.environ.update({k: env[k] for k in ('ROS_AUTOMATIC_DISCOVERY_RANGE', 'ROS_DOMAIN_ID')})
        sim = subprocess.Popen(
            [sys.executable, '-m', 'rko_ros.ros.sim_node', '--ros-args',
             '-p', f'image_width_px:={w}', '-p', f'image_height_px:={h}',
             '-p', f'camera_rate_hz:={args.camera_rate_hz}',
             '-p', f'joint_state_rate_hz:={args.camera_rate_hz}',
             '-p', f'control_rate_hz:={args.rate_hz}'],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=(lambda: os.nice(args.sim_nice)) if args.sim_nice else None)
        try:
            with rclpy.init(args=['rko']):
                node = PolicyNode(parameter_overrides=[
                    Parameter('data_dir', Parameter.Type.STRING, data_dir),
                    Parameter('control_rate_hz', Parameter.Type.DOUBLE, float(args.rate_hz)),
                    Parameter('camera_names', Parameter.Type.STRING_ARRAY,
                              list(config.obs.camera_names)),
                    Parameter('status_rate_hz', Parameter.Type.DOUBLE, 0.5)])
                executor = ServiceThreadsExecutor()
                executor.add_node(node)
                spinner = threading.Thread(target=executor.spin, daemon=True)
                spinner.start()
                controller = node.controller
                deadline = time.monotonic() + 60.0
                while controller.stats.acted < 5:
                    if time.monotonic() > deadline or sim.poll() is not None:
                        raise ConfigError('control-loop bench: no action within 60 s; is the '
                                          'sim_node camera stream reaching policy_node?')
                    time.sleep(0.05)
                from rko_ros.ros.control import TickStats
                controller.stats = TickStats(args.rate_hz)  # measure from a warm loop only
                refused_before = dict(controller.gate.counts)
                time.sleep(args.seconds)
                result = controller.stats.summary()
                node.close()
                executor.shutdown()
                node.destroy_node()
        finally:
            sim.terminate()
            sim.wait(10)
    refused = {k: v - refused_before.get(k, 0) for k, v in controller.gate.counts.items()
               if v - refused_before.get(k, 0)}
    result = {'bench': 'control-loop', 'rate_hz': args.rate_hz, 'seconds': args.seconds,
              'preset': args.preset, 'model_version': version, **result,
              'skipped_actions': controller.scheduler.skipped_actions,
              'refused': refused, 'sim_nice': args.sim_nice, 'cpu_count': os.cpu_count(),
              'load_avg_1m': round(os.getloadavg()[0], 2)}
    from rko_ros.policy.commands import print_result
    return print_result(result, args.json)
