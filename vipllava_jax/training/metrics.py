"""The run's metrics: ``RUN_DIR/metrics.jsonl`` (one JSON line per logged step) and TensorBoard events in
``RUN_DIR/tb/``, both written synchronously by process 0."""
from __future__ import annotations

import json
import socket
import struct
import time
from pathlib import Path

import jax


def _tensorboardx():
    """tensorboardX's protos and helpers, imported on first use: tensorboardX imports torch (about a second),
    which no other command than a training run needs."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog
    from tensorboardX.record_writer import masked_crc32c
    from tensorboardX.summary import scalar
    return Event, SessionLog, masked_crc32c, scalar


class EventFile:
    """A TensorBoard event file written in the caller's thread (TFRecord framing of ``Event`` protos).

    tensorboardX's SummaryWriter writes from a background thread: on a full disk that thread dies and the
    writer is left open, flushing again at interpreter exit. Here every write fails where it is made and
    ``close`` always releases the file."""

    def __init__(self, directory: Path, first_step: int):
        Event, SessionLog, self._crc, _ = _tensorboardx()
        directory.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{time.time_ns() % 10**9}"
        self._f = open(directory / name, "ab")
        self.write(Event(wall_time=time.time(), file_version="brain.Event:2"))
        # TensorBoard hides events at or past this step written by an earlier (resumed-from) run
        self.write(Event(wall_time=time.time(), step=first_step, session_log=SessionLog(status=SessionLog.START)))
        self.flush()

    def write(self, event) -> None:
        """event: a tensorboardX ``Event`` proto."""
        data = event.SerializeToString()
        head = struct.pack("<Q", len(data))
        crc = self._crc
        self._f.write(head + struct.pack("<I", crc(head)) + data + struct.pack("<I", crc(data)))

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.close()  # closes the file even when its last flush fails (then re-raises)


class MetricsWriter:
    """``metrics.jsonl`` and TensorBoard events; process 0 only. On resume, lines past the checkpoint's step
    are dropped first (they are written again), so the file reads as one uninterrupted run."""

    def __init__(self, run_dir: Path, resume_step: int):
        self.on = jax.process_index() == 0
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not self.on:
            return
        if self.path.exists():
            self.path.write_text("".join(ln + "\n" for ln in self.path.read_text().splitlines()
                                         if _line_step(ln) is not None and _line_step(ln) <= resume_step))
        self.tb = EventFile(run_dir / "tb", first_step=resume_step + 1)

    def write(self, row: dict) -> None:
        if not self.on:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        Event, _, _, scalar_summary = _tensorboardx()
        now = time.time()
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.write(Event(wall_time=now, step=row["step"], summary=scalar_summary(k, v)))
        self.tb.flush()

    def close(self) -> None:
        tb, self.tb = self.tb, None
        if tb is not None:
            tb.close()


def _line_step(line: str) -> int | None:
    """The step of a metrics.jsonl line; None for a line cut short (a crash or a full disk mid-write)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None
