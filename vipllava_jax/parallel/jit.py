"""jit with explicit in/out shardings from the rules table, traced inside the mesh and ``nn.logical_axis_rules``
so the model's ``with_logical_constraint`` calls apply: `jit_sharded` (train steps, anything) and
`sharded_forward` (one forward pass). Sharded generation is `generation.sharded_generate`."""
from __future__ import annotations

import functools

import jax
import numpy as np
import flax.linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .mesh import batch_divisor, check_batch
from .rules import LOGICAL_AXIS_RULES, Rules
from .shardings import io_sharding, pad_batch_inputs, param_shardings, pixel_sharding, put_global, shard_params, to_host


class _MeshContext:
    """``jax.set_mesh(mesh)`` + ``nn.logical_axis_rules(rules)``: what jit needs at trace time for the model's
    ``with_logical_constraint`` calls to take effect."""

    def __init__(self, mesh, rules):
        self.mesh, self.rules = mesh, rules

    def __enter__(self):
        self._m = jax.set_mesh(self.mesh)
        self._m.__enter__()
        self._r = nn.logical_axis_rules(self.rules)
        self._r.__enter__()
        return self

    def __exit__(self, *exc):
        self._r.__exit__(*exc)
        return self._m.__exit__(*exc)


def mesh_context(mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> _MeshContext:
    return _MeshContext(mesh, rules)


# --- jitted, sharded entry points -------------------------------------------------------------------------------
class ShardedJit:
    """``jax.jit`` with explicit in/out shardings whose calls (and lowering) run inside the mesh and the
    logical-axis rules, so ``nn.with_logical_constraint`` inside the traced function takes effect."""

    def __init__(self, fn, mesh: Mesh, in_shardings, out_shardings, rules: Rules = LOGICAL_AXIS_RULES, **jit_kw):
        self.mesh, self.rules = mesh, tuple(rules)
        self._jit = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings, **jit_kw)

    def __call__(self, *args, **kw):
        with mesh_context(self.mesh, self.rules):
            return self._jit(*args, **kw)

    def lower(self, *args, **kw):
        with mesh_context(self.mesh, self.rules):
            return self._jit.lower(*args, **kw)


def jit_sharded(fn, mesh: Mesh, *, in_shardings, out_shardings, rules: Rules = LOGICAL_AXIS_RULES,
                **jit_kw) -> ShardedJit:
    """For train steps and anything else: e.g. ``in_shardings=(param_shardings(cfg, mesh),
    shardings_like_params(opt_state, ps, mesh), io_sharding("input_ids", mesh), ...)``, donate_argnums=..."""
    return ShardedJit(fn, mesh, in_shardings, out_shardings, rules, **jit_kw)


def shardings_like_params(tree, param_shardings, mesh: Mesh):
    """Shardings for a tree that holds parameter-shaped subtrees (an optax state: Adam's mu and nu, ...):
    every subtree with the parameter tree's structure gets the parameter shardings, every other leaf
    (step counts, scalars) is replicated. Works on abstract (jax.eval_shape) trees too."""
    p_def = jax.tree.structure(param_shardings)
    replicated = NamedSharding(mesh, P())

    def is_params(x):
        try:
            return jax.tree.structure(x) == p_def
        except Exception:  # noqa: BLE001
            return False

    return jax.tree.map(lambda x: param_shardings if is_params(x) else replicated, tree, is_leaf=is_params)


@functools.lru_cache(maxsize=32)
def _forward_fn(module, mesh: Mesh, rules, last_token_only: bool, has_pixels: bool, pixels_sharded: bool,
                has_mask: bool):
    ps = param_shardings(module.config, mesh, scan_layers=module.runtime.scan_layers, rules=rules)
    ids_s, mask_s = io_sharding("input_ids", mesh, rules), io_sharding("attention_mask", mesh, rules)
    pix_s = io_sharding("pixel_values", mesh, rules) if pixels_sharded else NamedSharding(mesh, P())

    def fwd(params, ids, *rest):
        rest = list(rest)
        pixels = rest.pop(0) if has_pixels else None
        mask = rest.pop(0) if has_mask else None
        return module.apply({"params": params}, ids, pixels, mask, last_token_only=last_token_only).logits

    in_s = (ps, ids_s) + ((pix_s,) if has_pixels else ()) + ((mask_s,) if has_mask else ())
    return jax.jit(fwd, in_shardings=in_s, out_shardings=io_sharding("logits", mesh, rules))


def sharded_forward(module, params, input_ids, pixel_values=None, attention_mask=None, *, mesh: Mesh,
                    last_token_only: bool = False, pad_batch: bool = True, rules: Rules = LOGICAL_AXIS_RULES,
                    gather: bool = False):
    """Logits [B, T, V] (or [B, 1, V] with last_token_only) of one forward pass, jitted with explicit
    in/out shardings from the rules table.

    Inputs are host arrays that every process holds in full (or global jax.Arrays). params are moved onto
    the rules' shardings if they are not there already (load them with ``mesh=`` to avoid the copy).
    A batch that does not divide by data x fsdp is padded with masked rows (pad_batch=True) or is an
    error. Returns a global jax.Array sharded as IO_AXES["logits"], or numpy on every process with gather=True."""
    rules = tuple(rules)
    cfg = module.config
    b = np.shape(input_ids)[0]
    n_pad = 0
    if b % batch_divisor(mesh, rules):
        if not pad_batch:
            check_batch(b, mesh, rules)
        input_ids, attention_mask, n_pad = pad_batch_inputs(input_ids, attention_mask, mesh, cfg, rules)
    params = shard_params(params, cfg, mesh, rules, scan_layers=module.runtime.scan_layers)
    has_pixels, has_mask = pixel_values is not None, attention_mask is not None
    pix_sharded = has_pixels and np.shape(pixel_values)[0] % batch_divisor(mesh, rules) == 0
    fn = _forward_fn(module, mesh, rules, last_token_only, has_pixels, pix_sharded, has_mask)
    args = [put_global(np.asarray(input_ids, np.int32) if not isinstance(input_ids, jax.Array) else input_ids,
                       io_sharding("input_ids", mesh, rules))]
    if has_pixels:
        args.append(put_global(pixel_values, pixel_sharding(np.shape(pixel_values)[0], mesh, rules)))
    if has_mask:
        args.append(put_global(attention_mask, io_sharding("attention_mask", mesh, rules)))
    with mesh_context(mesh, rules):
        logits = fn(params, *args)
        if n_pad:
            logits = logits[:b]
    return to_host(logits) if gather else logits
