"""Stopping a run cleanly when the machine is about to be taken away (SIGTERM; JAX's preemption sync point
with several processes)."""
from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class Preemption:
    """SIGTERM (what TPU VMs and SLURM send before preemption) asks the loop to stop after the current step.
    With several processes JAX's preemption notice decides, so that every host stops at the same step."""

    def __init__(self):
        self.requested = False
        self._old = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            try:
                return bool(multihost_utils.reached_preemption_sync_point(step))
            except RuntimeError:  # no preemption sync manager (not started through jax.distributed)
                return False
        return self.requested

    def close(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
