import argparse
import subprocess
import sys

import pytest

from llava_circuits.cli import build_parser, main


def subcommand_paths(parser: argparse.ArgumentParser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield prefix + (name,)
                yield from subcommand_paths(sub, prefix + (name,))


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "llava_circuits.cli", "--help"], capture_output=True, text=True, check=True)
    assert "usage: llava-circuits" in out.stdout


@pytest.mark.parametrize("path", list(subcommand_paths(build_parser())), ids=" ".join)
def test_every_subcommand_has_help(path, capsys):
    with pytest.raises(SystemExit) as exit:
        main([*path, "--help"])
    assert exit.value.code == 0
    # LightningCLI's parsers (transcoders fit|validate) write "[options]" between the group and the command
    usage = capsys.readouterr().out.replace(" [options]", "")
    assert "usage: llava-circuits " + " ".join(path) in usage


def test_errors_are_one_line(capsys):
    assert main(["bench", "no-such-bench"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llava-circuits: error:") and "no-such-bench" in err and "\n" not in err
