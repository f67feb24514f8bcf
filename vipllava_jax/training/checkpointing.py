"""Run checkpoints: orbax CheckpointManager under ``RUN_DIR/checkpoints``, saved asynchronously and atomically.

Each step directory holds ``state`` (the TrainState: trainable params, optimizer state, step and counters),
``data`` (the data iterator's state, JSON) and ``run`` (the run's settings, fingerprint and where it stood,
JSON). Frozen parameters are not saved: they are the model the run started from.

`RunCheckpoints.restore_newest` resumes from the newest checkpoint that reads back whole: newer ones that do not
(a data file truncated or deleted, a metadata file damaged) are moved aside to ``RUN_DIR/damaged_checkpoints/``
and reported, orbax's tracebacks about them held back.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import re
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from ..checkpoints.atomic import held_stderr
from .step import TrainState

DAMAGED_DIR = "damaged_checkpoints"  # beside the checkpoints directory


def damage_reason(e: BaseException, step_dir: Path | None = None) -> str:
    """A short reason for a checkpoint that does not read back: the file or array orbax names, else a metadata
    file of ``step_dir`` that is not JSON, else the first line of the error."""
    chain, seen = [], set()
    while e is not None and id(e) not in seen:  # the tensorstore error that names the file is often the cause
        seen.add(id(e))
        chain.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    text = "\n".join(chain)
    base = f"{step_dir}/" if step_dir is not None else None
    m = re.search(r'local file "([^"]*[^/"])"', text)
    if m and base and m.group(1).startswith(base):
        return f"{m.group(1)[len(base):]} is damaged"
    m = re.search(r'Error reading "([^"]+)"', text)
    if m:
        return f"state/{m.group(1).rsplit('/', 1)[0]} cannot be read (a file under state/ is missing or truncated)"
    if step_dir is not None and "JSONDecodeError" in text:
        for f in sorted(step_dir.rglob("*")):
            if f.is_file() and (f.name in ("_METADATA", "_CHECKPOINT_METADATA", "metadata")):
                try:
                    json.loads(f.read_bytes())
                except (OSError, ValueError):
                    return f"{f.relative_to(step_dir)} is not valid JSON"
    first = text.strip().splitlines()[0] if text.strip() else "unreadable"
    return first[:200]


def _all_agree(ok: bool) -> bool:
    """True on every process when ``ok`` is true on every process (a collective where several run)."""
    if jax.process_count() == 1:
        return ok
    got = multihost_utils.process_allgather(np.array([int(ok)], np.int32))
    return bool(np.asarray(got).min())


class RunCheckpoints:
    def __init__(self, directory, *, keep: int = 3, best_metric: str | None = None):
        """keep: the newest checkpoints kept; with ``best_metric`` (lower is better, e.g. eval loss) the
        ``keep`` best of the checkpoints saved with that metric are kept too."""
        self.directory = Path(directory).absolute()
        # Keep the newest `keep` (resume needs the last) and, where eval runs, also the `keep` best by it.
        policies = [checkpoint_managers.LatestN(keep)]
        if best_metric:
            policies.append(checkpoint_managers.BestN(get_metric_fn=lambda m: m[best_metric], reverse=True, n=keep,
                                                      keep_checkpoints_without_metrics=False))
        opts = ocp.CheckpointManagerOptions(
            create=True, enable_async_checkpointing=True, cleanup_tmp_directories=True,
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies))
        self.manager = ocp.CheckpointManager(self.directory, options=opts)
        # orbax starts cleaning temporary directories in a background thread; a run that fails early would exit
        # while it runs ("cannot schedule new futures after interpreter shutdown"): let it finish now (a listing)
        wait_cleanup = getattr(self.manager, "_maybe_await_cleanup_tmp_directory", None)
        if wait_cleanup is not None:
            wait_cleanup()

    def latest_step(self) -> int | None:
        """The newest whole checkpoint (orbax writes into a temporary directory and renames it when done, so
        an interrupted save is never listed)."""
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, data_state: dict, run: dict, *, metrics: dict | None = None,
             force: bool = True) -> bool:
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), run=ocp.args.JsonSave(run)),
            metrics=metrics, force=force)

    def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict, dict]:
        """abstract_state: ShapeDtypeStructs with the shardings to restore onto."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(), run=ocp.args.JsonRestore()))
        return out["state"], out["data"], out["run"]

    def read_run(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))["run"]

    def _try(self, fn, step):
        """(value, None) or (None, reason): ``fn(step)`` with orbax's stderr held back (dropped on failure) and
        its failed reads' leftover coroutines finalized here, while held, not at some later collection."""
        out, why = None, None
        with contextlib.suppress(_Failed), held_stderr(drop_if=lambda e: True):
            try:
                out = fn(step)
            except Exception as e:  # noqa: BLE001 - tensorstore/orbax raise many kinds for damaged files
                why = damage_reason(e, self.directory / str(step))
            if why is not None:  # outside the except block: the error and its frames are garbage now
                out = None
                gc.collect()
                raise _Failed()
        return (out, why) if _all_agree(why is None) else (None, why or "damaged on another process")

    def read_newest_run(self) -> tuple[int | None, dict | None, list[tuple[int, str]]]:
        """(step, run JSON) of the newest checkpoint whose ``run`` reads back, and [(step, reason)] of newer
        ones whose does not; (None, None, damaged) when none does (or there is no checkpoint)."""
        damaged = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            run, why = self._try(self.read_run, step)
            if why is None:
                return step, run, damaged
            damaged.append((step, why))
        return None, None, damaged

    def restore_newest(self, abstract_state: TrainState):
        """(step, state, data_state, run, damaged) from the newest checkpoint that restores whole; damaged:
        [(step, reason)] of the newer ones that did not, now moved to ``RUN_DIR/damaged_checkpoints/<step>``
        (so that this run can save those steps again). step None when no checkpoint restores."""
        damaged = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            out, why = self._try(lambda s: self.restore(s, abstract_state), step)
            if why is None:
                self.move_aside([s for s, _ in damaged])
                return (step, *out, damaged)
            damaged.append((step, why))
        return None, None, None, None, damaged

    def move_aside(self, steps) -> None:
        """Move checkpoints out of the manager's directory into ``RUN_DIR/damaged_checkpoints/``."""
        if not steps:
            return
        if jax.process_index() == 0:
            dest = self.directory.parent / DAMAGED_DIR
            dest.mkdir(exist_ok=True)
            for s in steps:
                to, i = dest / str(s), 1
                while to.exists():
                    to, i = dest / f"{s}.{i}", i + 1
                os.replace(self.directory / str(s), to)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"RunCheckpoints.move_aside {steps}")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Wait for the last save and close the manager (again: nothing)."""
        if getattr(self, "_closed", False):
            return
        self.manager.wait_until_finished()
        self._closed = True
        self.manager.close()


class _Failed(Exception):
    pass


def abstract_like(tree, shardings):
    """ShapeDtypeStructs of tree's leaves carrying the given shardings (orbax restore targets)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
