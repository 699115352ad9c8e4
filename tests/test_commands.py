"""Console commands of pyproject.toml: each names a function that parses its arguments; every option
has a description; the commands that promise it parse before torch is imported (fast --help)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python >= 3.11")

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
FAST = {"cmoe-train", "cmoe-eval", "cmoe-shards", "cmoe-lm-eval"}  # parse before importing torch
OWN_PARSER = set(COMMANDS) - {"cmoe-lm-eval"}  # cmoe-lm-eval is lm-eval's command line

# Imports the command's function, calls it, and stops it at its first parse_args: reports the
# options without a help text and whether torch had been imported by then.
PROBE = """
import argparse, importlib, json, sys
module, func = sys.argv[1].split(":")
def stop(self, *args, **kwargs):
    undocumented = [a.option_strings or a.dest for a in self._actions if not a.help]
    print(json.dumps({"undocumented": undocumented, "torch": "torch" in sys.modules}))
    raise SystemExit(0)
argparse.ArgumentParser.parse_args = argparse.ArgumentParser.parse_intermixed_args = stop
sys.argv = [sys.argv[1], "--help"]
getattr(importlib.import_module(module), func)()
"""


def test_expected_commands_are_declared():
    assert {"cmoe-train", "cmoe-eval", "cmoe-convert", "cmoe-shards", "cmoe-flops", "cmoe-lm-eval", "cmoe-hf-import",
            "cmoe-hf-export"} <= set(COMMANDS)
    assert FAST <= set(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_command_parses_with_every_option_described(command):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", PROBE, COMMANDS[command]], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if command in OWN_PARSER:
        assert report["undocumented"] == [], f"{command}: options without help: {report['undocumented']}"
    if command in FAST:
        assert not report["torch"], f"{command} imports torch before parsing its arguments"
