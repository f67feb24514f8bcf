"""Stopping a run cleanly: when the machine is about to be taken away (SIGTERM; JAX's preemption sync point with
several processes) or when the user presses Ctrl-C (SIGINT)."""
from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class Preemption:
    """SIGTERM (what TPU VMs and SLURM send before preemption) or SIGINT (Ctrl-C) asks the loop to stop after the
    current step; the loop then saves and returns. A second Ctrl-C interrupts at once (KeyboardInterrupt: the
    default handler is back after the first). With several processes JAX's preemption notice decides, so that
    every host stops at the same step; Ctrl-C then keeps its default (it cannot reach every host)."""

    def __init__(self):
        self.requested = False
        self.reason: str | None = None  # "SIGTERM" or "SIGINT" once one arrived
        self._old: dict = {}
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True
        self.reason = signal.Signals(signum).name
        if signum == signal.SIGINT:  # the next Ctrl-C is not asked nicely
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            try:
                stop = bool(multihost_utils.reached_preemption_sync_point(step))
            except RuntimeError:  # no preemption sync manager (not started through jax.distributed)
                return False
            if stop:
                self.reason = self.reason or "preemption"
            return stop
        return self.requested

    def close(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._old = {}
