"""Directories written atomically, and the disk-full and stderr handling around such writes.

`atomic_output_dir`: ``out`` is at every moment absent, the old directory whole, or the new one whole (a
temporary sibling, swapped in with one ``renameat2(RENAME_EXCHANGE)`` where the filesystem has it).
`is_disk_full` finds ENOSPC in an exception chain; `held_stderr` holds back the tracebacks orbax and tensorstore
print from background threads when a write fails.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from .config_file import CheckpointError

_RENAME_EXCHANGE = 2  # linux/fs.h
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _renameat2 = _libc.renameat2
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
except (OSError, AttributeError):  # not glibc / not Linux
    _renameat2 = None
_AT_FDCWD = -100


def exchange_paths(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2 RENAME_EXCHANGE). False where unsupported."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # filesystem without the flag
        return False
    raise OSError(err, os.strerror(err), str(a))


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC anywhere in an exception's chain (tensorstore / orbax report it in the message text)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


@contextlib.contextmanager
def held_stderr(drop_if=lambda e: False):
    """Hold back what is written to file descriptor 2 (orbax and tensorstore print hundreds of lines of
    background-thread tracebacks when a write or read fails). It is written out when the block ends, unless
    the block raised an exception for which ``drop_if(exc)`` is true: that one is reported as one clear line."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        drop = False
        try:
            yield
        except BaseException as e:
            drop = isinstance(e, Exception) and bool(drop_if(e))
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if not drop:
                held.seek(0)
                data = held.read()
                if data:
                    os.write(2, data)


def unique_token(collective: bool = True) -> str:
    """``<pid>-<random>``; with ``collective`` the same on every process of a multi-process job."""
    tok = np.array([os.getpid(), secrets.randbits(31)], np.int64)
    if collective and jax.process_count() > 1:
        tok = np.asarray(multihost_utils.broadcast_one_to_all(tok))
    return f"{int(tok[0])}-{int(tok[1]):08x}"


@contextlib.contextmanager
def atomic_output_dir(out, *, overwrite: bool = False, collective: bool = True):
    """Write a directory so that ``out`` is at every moment absent, the old directory whole, or the new one
    whole. Yields a fresh temporary sibling ``<out>.tmp-<pid>-<random>`` (never a name the user could own);
    when the body finishes it takes ``out``'s place: renamed in, or, over an existing ``out`` (only with
    ``overwrite``), swapped with it in one atomic exchange and the old one removed afterwards. On any failure
    the temporary directory, and only it, is removed and ``out`` is left as it was; a full disk becomes one
    `CheckpointError` line. ``collective``: every process of a multi-process job enters (they write one
    directory, process 0 does the renames); otherwise only the calling process writes."""
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True / --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    sync = collective and jax.process_count() > 1
    tmp = out.with_name(f"{out.name}.tmp-{unique_token(collective)}")
    main = jax.process_index() == 0 or not collective
    if main:
        tmp.mkdir(parents=True)  # exclusive: fails rather than reuse anything that exists
    if sync:
        multihost_utils.sync_global_devices(f"atomic_output_dir {tmp.name}")
    try:
        yield tmp
        if sync:
            multihost_utils.sync_global_devices(f"atomic_output_dir done {tmp.name}")
        if main:
            if out.exists():
                if not exchange_paths(tmp, out):  # fallback: two renames, the old one kept until the second
                    old = out.with_name(f"{out.name}.old-{tmp.name.rsplit('.tmp-', 1)[1]}")
                    os.replace(out, old)
                    os.replace(tmp, out)
                    tmp = old
                shutil.rmtree(tmp, ignore_errors=True)  # now the old directory
            else:
                os.replace(tmp, out)
    except BaseException as e:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and is_disk_full(e):
            raise CheckpointError(f"Disk full while writing {out}; nothing was changed there (the partial "
                                  f"output was removed{', the previous one kept' if out.exists() else ''})") from None
        raise
