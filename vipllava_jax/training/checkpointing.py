"""Run checkpoints: orbax CheckpointManager under ``RUN_DIR/checkpoints``, saved asynchronously and atomically.

Each step directory holds ``state`` (the TrainState: trainable params, optimizer state, step and counters),
``data`` (the data iterator's state, JSON) and ``run`` (the run's settings and where it stood, JSON).
Frozen parameters are not saved: they are the model the run started from.
"""
from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from .step import TrainState


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

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree, shardings):
    """ShapeDtypeStructs of tree's leaves carrying the given shardings (orbax restore targets)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
