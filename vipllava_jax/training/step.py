"""The jitted, sharded train and eval steps.

A step takes ``A`` micro-batches stacked on a leading axis ([A, b, T], images [A, I, 3, H, W]) and
accumulates their gradients in a ``lax.scan``. Every micro-batch's loss is divided by the supervised-token
count of the whole global batch, so the accumulated loss and gradient equal those of one big batch.

Einsum letters: A micro-batches, b rows per micro-batch, T length, I images per micro-batch.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P

from ..checkpoints.adapter import merge_lora
from ..parallel.jit import jit_sharded
from ..parallel.mesh import batch_divisor
from ..parallel.rules import LOGICAL_AXIS_RULES, rule_axes
from ..parallel.shardings import logical_to_sharding
from .lora import LoraConfig, lora_collection
from .loss import loss_fn, num_supervised
from .optim import merge_params

Array = jax.Array

BATCH_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values", "image_valid")


@struct.dataclass
class TrainState:
    """Everything the step updates. ``trainable`` is ``{"params": ..., "lora": ...}`` (either may be empty)."""
    step: Array  # [] int32, optimizer updates applied
    trainable: dict
    opt_state: Any
    nonfinite_run: Array  # [] int32, consecutive non-finite steps skipped so far
    skipped_total: Array  # [] int32


@dataclasses.dataclass(frozen=True)
class StepConfig:
    lora: LoraConfig | None = None
    skip_nonfinite: bool = False


def init_state(trainable: dict, tx: optax.GradientTransformation) -> TrainState:
    z = lambda: jnp.zeros((), jnp.int32)  # noqa: E731 - distinct buffers: the state is donated leaf by leaf
    return TrainState(step=z(), trainable=trainable, opt_state=tx.init(trainable), nonfinite_run=z(),
                      skipped_total=z())


def compute_params(trainable: dict, frozen: dict, lora_cfg: LoraConfig | None, quant=None) -> dict:
    """The full parameter tree of the trained model with LoRA merged in (what export writes): W + (alpha/r) A B,
    a quantized W (``quant``, the model's `QuantConfig`) dequantized first."""
    params = merge_params(trainable.get("params", {}), frozen)
    if lora_cfg is not None and trainable.get("lora"):
        params = merge_lora(params, trainable["lora"], lora_cfg.scale, quant)
    return params


def model_inputs(trainable: dict, frozen: dict, lora_cfg: LoraConfig | None) -> tuple[dict, dict | None]:
    """What the step runs the model with: (params, the "lora" collection or None). The adapters stay unmerged
    (``x W + (alpha/r) (x A) B``), so differentiating with respect to ``trainable`` never touches a frozen W."""
    params = merge_params(trainable.get("params", {}), frozen)
    lora = trainable.get("lora")
    return params, (lora_collection(lora, lora_cfg) if lora_cfg is not None and lora else None)


def _micro(batch: dict, i) -> dict:
    return {k: v[i] for k, v in batch.items()}


def make_train_step(module, tx: optax.GradientTransformation, cfg: StepConfig = StepConfig()) -> Callable:
    """``step(state, frozen, batch) -> (state, metrics)``, not yet jitted (see `jit_train_step`)."""

    def micro_loss(trainable, frozen, mb, total):
        params, lora = model_inputs(trainable, frozen, cfg.lora)
        return loss_fn(module, params, mb, num_tokens=total, lora=lora)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step(state: TrainState, frozen: dict, batch: dict):
        total = num_supervised(batch["labels"])  # over every micro-batch: the global normaliser
        zeros = jax.tree.map(jnp.zeros_like, state.trainable)

        def body(carry, mb):
            g_acc, l_acc = carry
            (loss, _), g = grad_fn(state.trainable, frozen, mb, total)
            return (jax.tree.map(jnp.add, g_acc, g), l_acc + loss), None

        (grads, loss), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)), batch)
        gnorm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        new = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state,
                            nonfinite_run=jnp.zeros((), jnp.int32))
        finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        if cfg.skip_nonfinite:  # keep params and optimizer state bitwise as they were
            skipped = state.replace(nonfinite_run=state.nonfinite_run + 1, skipped_total=state.skipped_total + 1)
            new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, skipped)
        metrics = {"loss": loss, "grad_norm": gnorm, "num_tokens": total, "finite": finite,
                   "nonfinite_run": new.nonfinite_run, "skipped_total": new.skipped_total}
        return new, metrics

    return step


def make_eval_step(module, cfg: StepConfig = StepConfig()) -> Callable:
    """``eval(state, frozen, batch) -> {"nll_sum", "num_tokens"}`` summed over the micro-batch axis."""

    def ev(state: TrainState, frozen: dict, batch: dict):
        params, lora = model_inputs(state.trainable, frozen, cfg.lora)

        def body(acc, mb):
            _, m = loss_fn(module, params, mb, lora=lora)
            return (acc[0] + m["nll_sum"], acc[1] + m["num_tokens"]), None

        (s, n), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)), batch)
        return {"nll_sum": s, "num_tokens": n}

    return ev


# --- shardings -------------------------------------------------------------------------------------------------
def batch_shardings(batch_shapes: dict, mesh, rules=LOGICAL_AXIS_RULES) -> dict:
    """Rows and images split over the mesh's batch axes (data x fsdp); the leading axis A (micro-batches) is
    never split. ``batch_shapes`` are this process's; every process holds the same number of rows and
    images, and the global counts must divide by the batch axes (see `host_batch_multiple`)."""
    axes = rule_axes("batch", rules)
    row = axes[0] if len(axes) == 1 else tuple(axes) if axes else None
    n = batch_divisor(mesh, rules)
    out = {}
    for k, shape in batch_shapes.items():
        if shape[1] * jax.process_count() % n:
            raise ValueError(f"batch {k} has {shape[1] * jax.process_count()} rows/images per micro-batch, not "
                             f"divisible by the {n} devices the batch is split over")
        out[k] = NamedSharding(mesh, P(None, row, *([None] * (len(shape) - 2))))
    return out


def host_batch_multiple(mesh, rules=LOGICAL_AXIS_RULES) -> int:
    """Each host pads its rows and images to a multiple of this, so the global counts split evenly."""
    n = batch_divisor(mesh, rules)
    if n % jax.process_count():
        raise ValueError(f"The mesh splits the batch {n} ways, which the {jax.process_count()} processes do not "
                         f"divide: every process must feed its own rows (use data/fsdp axes across hosts)")
    return n // jax.process_count()


def tree_logical_shardings(axes_tree, mesh, rules=LOGICAL_AXIS_RULES):
    """Tree of logical-name tuples -> tree of NamedShardings."""
    return jax.tree.map(lambda names: logical_to_sharding(names, mesh, rules), axes_tree,
                        is_leaf=lambda x: isinstance(x, tuple))


def state_shardings(state_abstract: TrainState, trainable_shardings: dict, mesh) -> TrainState:
    """Shardings of a TrainState: trainable as given, each optimizer moment like its parameter (found by the
    parameter's key path at the end of the moment's path: AdamW's mu/nu, Muon's momentum, and the masked trees of
    a multi_transform alike), everything else (counters) replicated."""
    rep = NamedSharding(mesh, P())
    by_path = {_dict_keys(path): sh for path, sh in jax.tree_util.tree_flatten_with_path(trainable_shardings)[0]}

    def pick(path, x):
        keys = _dict_keys(path)
        for i in range(len(keys)):
            if keys[i:] in by_path:
                return by_path[keys[i:]]
        return rep

    opt = jax.tree_util.tree_map_with_path(pick, state_abstract.opt_state)
    return TrainState(step=rep, trainable=trainable_shardings, opt_state=opt, nonfinite_run=rep, skipped_total=rep)


def _dict_keys(path) -> tuple:
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def jit_train_step(step_fn, mesh, state_sh, frozen_sh, batch_sh, rules=LOGICAL_AXIS_RULES):
    rep = NamedSharding(mesh, P())
    metrics_sh = dict.fromkeys(("loss", "grad_norm", "num_tokens", "finite", "nonfinite_run", "skipped_total"), rep)
    return jit_sharded(step_fn, mesh, in_shardings=(state_sh, frozen_sh, batch_sh),
                       out_shardings=(state_sh, metrics_sh), rules=rules, donate_argnums=(0,))


def jit_eval_step(eval_fn, mesh, state_sh, frozen_sh, batch_sh, rules=LOGICAL_AXIS_RULES):
    rep = NamedSharding(mesh, P())
    return jit_sharded(eval_fn, mesh, in_shardings=(state_sh, frozen_sh, batch_sh),
                       out_shardings={"nll_sum": rep, "num_tokens": rep}, rules=rules)


def put_batch(batch: dict, shardings: dict) -> dict:
    """Host arrays (this process's rows; every row when single-process) -> global jax.Arrays."""
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v)) for k, v in batch.items()}
