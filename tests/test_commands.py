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


def _bad_inputs(tmp_path: Path) -> dict[str, Path]:
    broken = tmp_path / "broken_export"  # a folder whose config.json is not JSON
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (tmp_path / "broken.yaml").write_text("tasks: [1]\nmodel: {dim: [\n")
    (tmp_path / "suite.yaml").write_text("tasks:\n  - {name: t, type: perplexity, data: ../outside.jsonl}\n")
    return {"export": broken, "yaml": tmp_path / "broken.yaml", "suite": tmp_path / "suite.yaml"}


# command -> (a bad option, what its message names), (a bad input file, what its message names);
# {export}, {yaml}, {suite}, {out} are filled in from _bad_inputs and tmp_path.
USER_ERRORS = {
    "cmoe-train": ((["configs/tiny.yaml", "train.lr=-1"], "train.lr"), (["{yaml}"], "broken.yaml")),
    "cmoe-eval": ((["--model", "{export}", "--out", "{out}", "--batch-size", "-1"], "--batch-size"),
                  (["--model", "{export}", "--out", "{out}", "--suite", "{suite}"], "outside.jsonl")),
    "cmoe-convert": ((["--baseline", "{export}", "--out", "{out}", "--target-ratio", "nan"], "--target-ratio"),
                     (["--baseline", "{export}", "--out", "{out}"], "broken_export/config.json")),
    "cmoe-hf-import": ((["{export}", "--out", "{export}"], "is the input"),
                       (["{export}", "--out", "{out}"], "broken_export/config.json")),
    "cmoe-hf-export": ((["{export}", "--out", "{export}/sub"], "is inside the input"),
                       (["{export}", "--out", "{out}"], "broken_export/config.json")),
    "cmoe-shards": ((["text", "{yaml}", "--out", "{out}", "--maxcount", "0"], "--maxcount"),
                    (["text", "{export}/missing.jsonl", "--out", "{out}"], "missing.jsonl")),
    "cmoe-flops": ((["{yaml}", "--ratio", "nan"], "--ratio"), (["{yaml}"], "broken.yaml")),
    "cmoe-inspect": ((["--model", "{export}", "--data", "builtin", "--out", "{out}", "--repeat-tolerance", "nan"],
                      "--repeat-tolerance"),
                     (["--model", "{export}", "--data", "builtin", "--out", "{out}"], "broken_export/config.json")),
    "cmoe-lm-eval": ((["--model", "cmoe-vlm", "--model_args", "pretrained={export},max_batch_size=-1", "--tasks",
                       "arc_easy"], "max_batch_size"),
                     (["--model", "cmoe-vlm", "--model_args", "pretrained={export}", "--tasks", "arc_easy"],
                      "broken_export/config.json")),
}


def test_every_command_has_a_user_error_case():
    assert set(USER_ERRORS) == set(COMMANDS)


@pytest.mark.parametrize("case", ["option", "input"])
@pytest.mark.parametrize("command", sorted(USER_ERRORS))
def test_user_errors_are_one_line_with_exit_status_2(command, case, tmp_path, capfd, monkeypatch):
    """Every console command: a bad option and a bad input file give one line naming it and status 2
    (no traceback), before anything heavy runs. Called in-process (argv; lm-eval's through sys.argv)."""
    import importlib

    monkeypatch.chdir(ROOT)
    argv, named = USER_ERRORS[command][case == "input"]
    fill = {**{k: str(v) for k, v in _bad_inputs(tmp_path).items()}, "out": str(tmp_path / "out")}
    argv = [a.format(**fill) for a in argv]
    module, func = COMMANDS[command].split(":")
    main = getattr(importlib.import_module(module), func)
    if command == "cmoe-lm-eval":  # lm-eval's own command line reads sys.argv
        monkeypatch.setattr(sys, "argv", [command, *argv])
        monkeypatch.setattr(sys, "stderr", sys.__stderr__)  # its log handler outlives the test's capture stream
        status = main()
    else:
        status = main(argv)
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in err if f"{command}: error:" in line or line.startswith("config error:")]
    assert status == 2 and len(errors) == 1 and named in errors[0], err
    assert "Traceback" not in "\n".join(err)
    if command != "cmoe-lm-eval":  # lm-eval logs its own progress lines on stderr
        assert len(err) == 1, err
