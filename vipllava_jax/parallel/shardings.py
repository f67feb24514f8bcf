"""Shardings from the logical-axis rules table (`rules.py`): parameters (`param_shardings`, the one cached way),
the KV cache (`cache_shardings`) and the arrays that cross a jit boundary (`io_sharding`); host numpy <-> global
arrays (`put_global` / `to_host`), the same on one process or many."""
from __future__ import annotations

import functools
import math
from typing import Mapping, Sequence

import jax
import numpy as np
import flax.linen as nn
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ..models.llama import CACHE_KV_AXES, CACHE_MASK_AXES, KVCache
from ..models.params import abstract_param_tree, flat_paths
from .mesh import AnyMesh, batch_divisor, check_mesh_fits, mesh_sizes
from .rules import IO_AXES, LOGICAL_AXIS_RULES, Rules, rule_axes


# --- logical names -> shardings ---------------------------------------------------------------------------------
def logical_spec(names: Sequence[str | None], rules: Rules = LOGICAL_AXIS_RULES) -> P:
    """Logical axis names -> PartitionSpec, dim by dim: each name takes its rule's mesh axes unless an earlier
    dim already took one of them (then it stays replicated), as flax's resolver does for a one-rule-per-name
    table. Unlike flax's, a name may repeat (the patch kernel is ("vis_patch", "vis_patch", ...)), and a name
    with no rule is an error (a typo would otherwise silently replicate)."""
    out, used = [], set()
    for name in names:
        if name is None:
            out.append(None)
            continue
        axes = rule_axes(name, rules)
        if not axes or used & set(axes):
            out.append(None)
            continue
        used |= set(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    return P(*out)


def logical_to_sharding(names: Sequence[str | None], mesh: AnyMesh, rules: Rules = LOGICAL_AXIS_RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_spec(names, rules))


logical_sharding = logical_to_sharding


def tree_shardings(boxed_tree, mesh: AnyMesh, rules: Rules = LOGICAL_AXIS_RULES):
    """Boxed abstract tree (from jax.eval_shape of init) -> same-structure tree of NamedShardings."""
    specs = nn.get_partition_spec(boxed_tree)
    return jax.tree.map(lambda s: logical_to_sharding(tuple(s), mesh, rules), specs,
                        is_leaf=lambda x: isinstance(x, P))


def param_shardings(config, mesh: AnyMesh, *, scan_layers: bool = False, rules: Rules = LOGICAL_AXIS_RULES):
    """Nested dict of NamedShardings with the structure of the (unboxed) parameter tree of ``config`` in the given
    layout (``module.runtime.scan_layers``): the one way to get parameter shardings, cached per (config, layout,
    mesh, rules). A mesh that does not fit the model (`check_mesh_fits`) is the clear mesh-fit error. Serves
    `load_pretrained(mesh=)`, `restore_orbax`, `shard_params`, `sharded_forward`, `generate(mesh=)` and training.
    The tree is shared: do not modify it (``flat_paths(...)`` gives a fresh flat dict)."""
    return _param_shardings(config, mesh, bool(scan_layers), tuple(rules))


@functools.lru_cache(maxsize=32)
def _param_shardings(config, mesh, scan_layers: bool, rules):
    check_mesh_fits(mesh_sizes(mesh), config, rules)
    return tree_shardings(abstract_param_tree(config, scan_layers), mesh, rules)


def param_logical_axes(config, *, scan_layers: bool = False) -> dict[str, tuple]:
    """Flax path ("a/b/kernel") -> logical axis names of that parameter."""
    return {p: tuple(v.names) for p, v in flat_paths(abstract_param_tree(config, scan_layers)).items()}


def shard_params(params, config, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES, *, scan_layers: bool = False):
    """Put params onto the shardings the rules give (a no-op for arrays already placed so)."""
    target = param_shardings(config, mesh, scan_layers=scan_layers, rules=rules)
    if _tree_sharded_as(params, target):
        return params
    return jax.device_put(params, target)


def _tree_sharded_as(tree, shardings) -> bool:
    leaves, treedef = jax.tree.flatten(tree)
    try:
        sh = treedef.flatten_up_to(shardings)
    except (ValueError, TypeError):
        return False
    return all(isinstance(x, jax.Array) and x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(leaves, sh))


def cache_shardings(config, mesh: AnyMesh, rules: Rules = LOGICAL_AXIS_RULES, *, scan_layers: bool = False):
    """A KVCache of NamedShardings, with the structure `KVCache.init(config.text, ..., scan_layers=...)` has."""
    tc = config.text
    if scan_layers:
        k = v = logical_to_sharding(("layers",) + CACHE_KV_AXES, mesh, rules)
    else:
        k = v = tuple(logical_to_sharding(CACHE_KV_AXES, mesh, rules) for _ in range(tc.num_hidden_layers))
    return KVCache(k=k, v=v, mask=logical_to_sharding(CACHE_MASK_AXES, mesh, rules),
                   index=NamedSharding(mesh, P()))


def io_sharding(name: str, mesh: AnyMesh, rules: Rules = LOGICAL_AXIS_RULES) -> NamedSharding:
    """Sharding of a named jit input/output (input_ids, attention_mask, pixel_values, logits, tokens...)."""
    return logical_to_sharding(IO_AXES[name], mesh, rules)


def shard_shape(shape: Sequence[int], spec: P, mesh: AnyMesh | Mapping[str, int]) -> tuple[int, ...]:
    """Per-device shape of an array of `shape` under `spec` (ceil for uneven splits, as XLA pads)."""
    sizes = mesh_sizes(mesh)
    out = []
    for i, d in enumerate(shape):
        axes = spec[i] if i < len(spec) else None
        axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        out.append(-(-d // math.prod(sizes[a] for a in axes)))
    return tuple(out)


# --- host <-> global arrays -------------------------------------------------------------------------------------
def put_global(x, sharding: NamedSharding) -> jax.Array:
    """A global jax.Array with `sharding` from host data that every process holds in full (the same prompts on
    every host), or from an existing jax.Array. Each device gets only its slice."""
    if isinstance(x, jax.Array):
        if x.sharding.is_equivalent_to(sharding, x.ndim):
            return x
        if x.is_fully_addressable and not sharding.is_fully_addressable:
            x = np.asarray(x)
        else:
            return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def to_host(x) -> np.ndarray:
    """The full value of a (possibly multi-host) global array as numpy, on every process."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _pad_rows(x, n: int, value):
    if x is None or n == 0:
        return x
    x = np.asarray(x)
    return np.concatenate([x, np.full((n,) + x.shape[1:], value, x.dtype)], axis=0)


def pad_batch_inputs(input_ids, attention_mask, mesh, config, rules: Rules = LOGICAL_AXIS_RULES):
    """Append fully masked rows (pad token, mask 0) so the batch divides by data x fsdp. Returns
    (input_ids, attention_mask, n_pad)."""
    ids = np.asarray(input_ids)
    b = ids.shape[0]
    n = batch_divisor(mesh, rules)
    n_pad = (-b) % n
    if n_pad == 0:
        return input_ids, attention_mask, 0
    mask = np.ones(ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask)
    pad_id = config.text.pad_token_id
    if pad_id is None or pad_id == config.image_token_index:
        pad_id = 0
    return _pad_rows(ids, n_pad, pad_id), _pad_rows(mask, n_pad, 0), n_pad


def pixel_sharding(n_images: int, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> NamedSharding:
    """pixel_values [I, ...]: split like the batch when the image count divides by data x fsdp, else replicated."""
    if n_images % batch_divisor(mesh, rules) == 0:
        return io_sharding("pixel_values", mesh, rules)
    # The vision tower's constraints still split the images inside the jit (unevenly).
    return NamedSharding(mesh, P())
