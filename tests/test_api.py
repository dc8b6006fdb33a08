"""The public API (kdlib/__init__.py) and the CLI as the README describes them."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest

import kdlib

REPO = Path(__file__).resolve().parents[1]


def test_every_public_name_resolves_and_is_documented():
    for name in kdlib.__all__:
        value = getattr(kdlib, name)
        if callable(value) and not isinstance(value, type) or isinstance(value, type):
            assert (value.__doc__ or "").strip(), f"kdlib.{name} has no docstring"
    assert kdlib.train.train.__doc__ and kdlib.precompute.precompute.__doc__  # the commands, as their modules


def test_import_kdlib_is_cheap():
    code = "import sys, kdlib; print(sorted(m for m in ('torch', 'zarr', 'accelerate') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr  # heavy dependencies load with the first name used


def _readme_commands() -> list[list[str]]:
    """Every `kdlib <command> ...` line inside the README's code blocks, as words."""
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
    lines = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            at = line.find("kdlib ")
            if at >= 0 and not line[at:].startswith("kdlib.") and "import" not in line:
                lines.append(shlex.split(line[at:])[1:])
    return [w for w in lines if w and not w[0].startswith("-")]


def test_readme_commands_use_flags_the_cli_has():
    from kdlib.cli import cli

    found = _readme_commands()
    assert len(found) >= 10
    for words in found:
        command = cli.commands.get(words[0])
        assert command is not None, f"README names `kdlib {words[0]}`, which does not exist"
        flags = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
        for w in words[1:]:
            if w.startswith("--"):
                assert w.split("=")[0] in flags, f"README: `kdlib {words[0]}` has no flag {w}"


@pytest.mark.parametrize("command", ["precompute", "train", "verify", "eval", "heads"])
def test_commands_that_run_a_model_take_cpu_and_limit(command):
    from kdlib.cli import cli

    opts = {o for p in cli.commands[command].params for o in p.opts}
    assert {"--cpu", "--limit"} <= opts
    assert isinstance(cli.commands[command], click.Command)
