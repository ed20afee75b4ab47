"""The `rko` entry point: every subcommand answers --help, errors become one clean line."""
import subprocess
import sys

import pytest

from rko_ros import cli


def _all_commands():
    parser = cli.build_parser()
    commands = []
    for action in parser._subparsers._group_actions:
        for name, sub in action.choices.items():
            if name == 'bench':
                for bench_action in sub._subparsers._group_actions:
                    commands += [['bench', b] for b in bench_action.choices]
            else:
                commands.append([name])
    return commands


def test_top_level_help_lists_bench():
    out = subprocess.run([sys.executable, '-m', 'rko_ros.cli', '--help'],
                         capture_output=True, text=True, check=True).stdout
    assert 'bench' in out


@pytest.mark.parametrize('command', _all_commands(), ids=lambda c: ' '.join(c))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(command + ['--help'])
    assert exc.value.code == 0
    assert 'usage: rko' in capsys.readouterr().out
