"""Console commands of pyproject.toml: each names a function that parses its arguments; every option
has a description; every command parses before torch is imported (fast --help)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python >= 3.11")

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
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


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_command_parses_with_every_option_described(command):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", PROBE, COMMANDS[command]], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if command in OWN_PARSER:
        assert report["undocumented"] == [], f"{command}: options without help: {report['undocumented']}"
    assert not report["torch"], f"{command} imports torch before parsing its arguments"


def test_direct_commands_get_the_runtime_defaults_before_torch():
    """OMP_WAIT_POLICY and DS_ACCELERATOR used to come only from the Makefile: a direct command
    (python train_vlm.py, python -m cmoe_vlm.eval, a console command) spin-waited. Importing any of
    our packages sets them, before anything has loaded torch (whose OpenMP reads them once)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "DS_ACCELERATOR")}
    env["PYTHONPATH"] = str(ROOT)
    probe = ("import os, sys; import {}; print(os.environ.get('OMP_WAIT_POLICY'), "
             "os.environ.get('DS_ACCELERATOR') in ('cpu', 'cuda'), 'torch' in sys.modules)")
    for package in ("cmoe_vlm", "data_pipelines", "cmoe_base"):
        proc = subprocess.run([sys.executable, "-c", probe.format(package)], env=env, capture_output=True, text=True,
                              timeout=120)
        assert proc.stdout.split() == ["PASSIVE", "True", "False"], (package, proc.stdout, proc.stderr[-1000:])
    proc = subprocess.run([sys.executable, "-c", probe.format("cmoe_vlm")], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.split()[0] == "ACTIVE"  # a value the user set wins
