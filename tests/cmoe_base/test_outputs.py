"""Output folders (cmoe_base.outputs): refused over their input or over a non-empty folder, built in a
staging folder and renamed into place whole; a folder lock that names its holder and dies with it."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cmoe_base.commands import InputError
from cmoe_base.outputs import FolderLock, check_output, staged_folder

ROOT = Path(__file__).resolve().parents[2]


def test_outputs_over_their_input_or_a_full_folder_are_refused(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (tmp_path / "a_file").write_text("")
    for out, named in ((src, "is the input"), (src / "sub", "is inside the input"), (tmp_path, "holds the input"),
                       (tmp_path / "a_file", "is a file")):
        with pytest.raises(InputError, match=named):
            check_output(out, [src])
    with pytest.raises(InputError, match="not empty: .*--replace"):
        check_output(src, [])
    assert check_output(src, [], replace=True) == src
    assert check_output(tmp_path / "new" / "deeper", [src]) == tmp_path / "new" / "deeper"


def test_a_staged_folder_replaces_the_old_one_whole_or_not_at_all(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old_tokenizer.json").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_folder(out) as tmp:
            (tmp / "model.safetensors").write_text("half")
            raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging left behind
    assert sorted(p.name for p in out.iterdir()) == ["old_tokenizer.json"]
    with staged_folder(out) as tmp:
        (tmp / "model.safetensors").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]  # no stale file from before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_locked_folder_names_its_holder_and_a_dead_holders_lock_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from cmoe_base.outputs import FolderLock; "
                               f"FolderLock({str(tmp_path)!r}); print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(InputError, match=rf"train.out_dir {tmp_path} is in use by pid {holder.pid} on host"):
            FolderLock(tmp_path, "train.out_dir")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with FolderLock(tmp_path, "train.out_dir") as lock:  # the kernel dropped the dead process's lock
        assert f"pid {os.getpid()}" in lock.path.read_text()
