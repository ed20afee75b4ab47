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


@pytest.mark.skipif(__import__('torch').cuda.is_available(), reason='needs a machine without a GPU')
@pytest.mark.parametrize('command', [['train', '--synthetic', '--steps', '2'],
                                     ['demo', '--quick'], ['finetune'],
                                     ['bench', 'alignment', '--quick']])
def test_device_cuda_without_a_gpu_is_one_clean_error_before_any_work(command, tmp_path, capsys):
    args = command + ['--device', 'cuda']
    if command[0] == 'train':
        args += ['--out', str(tmp_path / 'c.pt')]
    elif command[0] == 'finetune':
        args += ['--data-dir', str(tmp_path)]
    else:
        args += ['--out', str(tmp_path / 'out')]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "device 'cuda' asked for" in err and '--device cpu' in err
    assert list(tmp_path.iterdir()) == []          # nothing written


def test_device_that_is_not_a_torch_device_is_named_in_the_error(tmp_path, capsys):
    assert cli.main(['train', '--synthetic', '--device', 'gpu0', '--out', str(tmp_path / 'c.pt')]) == 2
    assert "device 'gpu0' is not a torch device" in capsys.readouterr().err
