"""Output folders that are never half-written, never written over their input, never mixed with stale files.

    check_output(out, [src], replace=args.replace)      # before anything heavy: one-line refusals
    with staged_folder(out) as tmp:                      # build everything in tmp ...
        write(tmp)
    # ... then tmp is renamed into place whole: a crash at any point leaves out as it was

The staging folder is a sibling of the destination (`.NAME.staging-PID`, same file system, so the
rename is atomic). An existing destination is swapped with the staging folder in one
renameat2(RENAME_EXCHANGE) where the kernel has it, else moved aside then replaced (two renames).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import socket
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cmoe_base.commands import InputError

RENAME_EXCHANGE = 2
AT_FDCWD = -100


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output(out: str | Path, inputs: Iterable[str | Path | None] = (), replace: bool = False,
                 option: str = "--out", whole: bool = True) -> Path:
    """Refuse (InputError, one line) an output that is an input or lies inside one, a file, or a folder
    whose parent cannot be written. For an output written `whole` (staged, then renamed over the
    destination) also one that holds an input, or is a non-empty folder unless `replace`; a
    results folder (eval, inspect) is only added to."""
    out = Path(out)
    real = out.resolve()
    for src in inputs:
        if src is None:
            continue
        src_real = Path(src).resolve()
        if _inside(real, src_real) or (whole and _inside(src_real, real)):
            where = "is" if real == src_real else "is inside" if _inside(real, src_real) else "holds"
            raise InputError(f"{option} {out} {where} the input {src}: write to another folder")
    if out.exists() and not out.is_dir():
        raise InputError(f"{option} {out} is a file, not a folder")
    if whole and out.is_dir() and any(out.iterdir()) and not replace:
        raise InputError(f"{option} {out} is not empty: choose a new folder, or pass --replace to replace it")
    parent = real.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{option} {out}: {parent} is not writable")
    return out


def staging_path(out: Path) -> Path:
    return out.parent / f".{out.name}.staging-{os.getpid()}"


@contextmanager
def staged_folder(out: str | Path) -> Iterator[Path]:
    """A fresh staging folder next to `out`; on success it replaces `out` whole, on error it is removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the call is unavailable."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    ok = libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0
    return ok


def publish(tmp: Path, out: Path) -> None:
    """Put the finished folder `tmp` at `out`, replacing what was there; the old contents end in `tmp`
    (removed by the caller) or are removed here."""
    if not out.exists():
        os.replace(tmp, out)
        return
    if _exchange(tmp, out):
        return
    aside = out.parent / f".{out.name}.old-{os.getpid()}"
    os.replace(out, aside)
    os.replace(tmp, out)
    shutil.rmtree(aside, ignore_errors=True)


class FolderLock:
    """An exclusive lock on a folder while a process owns it (`FOLDER/.lock`: flock, so the kernel
    drops it when the holder dies and a stale file is simply taken over). The file names the holder
    (pid, host, start time) for the refusal message."""

    NAME = ".lock"

    def __init__(self, folder: str | Path, what: str = "folder"):
        import fcntl

        self.path = Path(folder) / self.NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self.fd, 200).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            raise InputError(f"{what} {folder} is in use by {holder}: wait for it to end, or choose another "
                             f"{what}") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"pid {os.getpid()} on host {socket.gethostname()} (since "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode())

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = -1

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *_) -> None:
        self.release()
