"""One run per run directory: an exclusive ``flock`` on ``RUN_DIR/.lock``, held for the whole run.

The lock belongs to the open file, so the OS drops it when the process ends however it ends (SIGKILL, a crash):
a lock file left by a dead run is simply taken over. The holder writes its host, pid and start time into the
file, and a second run refuses at once naming them. (On NFS, Linux emulates ``flock`` with POSIX locks, which
the server arbitrates across hosts.)
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".lock"


class RunInUse(RuntimeError):
    """Another live process holds the run directory's lock (the message names its host and pid)."""


def _holder(fd: int) -> dict:
    """What the holder wrote; it writes right after taking the lock, so wait a moment for an empty file."""
    for _ in range(20):
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"null")
        except ValueError:
            info = None
        if isinstance(info, dict):
            return info
        time.sleep(0.01)
    return {}


class RunLock:
    """``RunLock(run_dir)``: the lock, taken (``RunInUse`` if another process holds it). ``release()`` (or
    leaving its ``with`` block) gives it back; the file stays, emptied."""

    def __init__(self, run_dir):
        self.path = Path(run_dir) / LOCK_NAME
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _holder(fd)
            os.close(fd)
            who = (f"host {info.get('host', '?')}, pid {info.get('pid', '?')}"
                   + (f", since {info['started']}" if info.get("started") else "")) if info else "holder unknown"
            raise RunInUse(f"{Path(run_dir)} is in use by another run ({who}); wait for it to end, or use "
                           f"another --output") from None
        except BaseException:
            os.close(fd)
            raise
        self.fd: int | None = fd
        info = {"host": socket.gethostname(), "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the file drops the flock

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
