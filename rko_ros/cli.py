"""`rko`: the offline command line (train, export, fine-tune, episodes, benchmarks, demo).

Each area registers its own subcommands from a `commands` module, so this file only wires them:
  rko_ros.<area>.commands.register(subparsers)          -> top-level commands (`rko train`, ...)
  rko_ros.<area>.commands.register_bench(bench_parsers) -> `rko bench <name>`
Command modules import torch, rclpy etc. inside their handlers so `rko --help` stays fast.
"""
import argparse
import importlib
import sys

from rko_ros.errors import RkoError

COMMAND_MODULES = (
    'rko_ros.policy.commands',
    'rko_ros.episodes.commands',
    'rko_ros.alignment.commands',
    'rko_ros.sim.commands',
    'rko_ros.ros.commands',
    'rko_ros.demo.commands',
)


def _command_modules():
    modules = []
    for name in COMMAND_MODULES:
        try:
            modules.append(importlib.import_module(name))
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a real missing dependency inside the module: say so
                raise
    return modules


def build_parser():
    parser = argparse.ArgumentParser(
        prog='rko',
        description='rko_ros: train, export, align (RKO/DPO/RPO/KTO/FKPD/SFT), record and '
                    'benchmark visuomotor diffusion policies for ROS 2 robots.',
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='Run `rko COMMAND --help` for the options of each command.')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)
    bench = sub.add_parser(
        'bench', help='benchmarks, each printing one JSON line with --json',
        description='Benchmarks behind the performance targets of DESIGN.md section 8.')
    bench_sub = bench.add_subparsers(dest='bench', metavar='BENCH', required=True)
    for module in _command_modules():
        if hasattr(module, 'register'):
            module.register(sub)
        if hasattr(module, 'register_bench'):
            module.register_bench(bench_sub)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except RkoError as exc:
        print(f'rko {args.command}: error: {exc}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
