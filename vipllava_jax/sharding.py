"""Device meshes and shardings from the logical-axis rules table (`sharding_rules.py`).

* `make_mesh("data=2,fsdp=2,tensor=2" | "auto", config)`: a Mesh with axes (data, fsdp, tensor), checked
  against the device count and the model's dimensions.
* `param_sharding_tree`, `cache_shardings`, `io_sharding`: NamedShardings for parameters, the KV cache and
  the arrays that cross a jit boundary, all from the one table.
* `sharded_forward`, `sharded_generate`: jit with explicit in/out shardings, traced inside
  ``nn.logical_axis_rules`` and the mesh so the model's ``with_logical_constraint`` calls apply.
* `put_global` / `to_host`: host numpy <-> global arrays, the same on one process or many.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec as P

from .sharding_rules import CACHE_KV_AXES, CACHE_MASK_AXES, IO_AXES, LOGICAL_AXIS_RULES, MESH_AXES

Rules = Sequence[tuple[str, Any]]
AnyMesh = Mesh | AbstractMesh


# --- mesh specs -----------------------------------------------------------------------------------------------
def _fmt_sizes(sizes: Mapping[str, int]) -> str:
    return " x ".join(f"{a}={sizes[a]}" for a in MESH_AXES if a in sizes)


def parse_mesh_spec(spec: str | Mapping[str, int] | None, n_devices: int | None = None) -> dict[str, int]:
    """"data=2,fsdp=2,tensor=2" -> sizes of all three axes (missing axes are 1); "auto": all devices on fsdp.

    With ``n_devices`` the sizes must multiply to it; None skips that check (a plan for simulated devices).
    A dict of sizes is accepted too."""
    if isinstance(spec, Mapping):
        items = [(str(k), v) for k, v in spec.items()]
        shown = ",".join(f"{k}={v}" for k, v in items)
    else:
        shown = (spec or "auto").strip()
        if shown == "auto":
            if n_devices is None:
                raise ValueError('Mesh spec "auto" puts every device on fsdp, so it needs the device count '
                                 '(pass --devices N, or give sizes such as "fsdp=8")')
            return {"data": 1, "fsdp": int(n_devices), "tensor": 1}
        items = []
        for part in shown.split(","):
            part = part.strip()
            if not part:
                continue
            if "=" not in part:
                raise ValueError(f"Bad mesh spec {shown!r}: {part!r} is not axis=size "
                                 f"(axes: {', '.join(MESH_AXES)}; e.g. \"data=2,fsdp=2,tensor=2\" or \"auto\")")
            name, val = (s.strip() for s in part.split("=", 1))
            items.append((name, val))
        if not items:
            raise ValueError(f"Bad mesh spec {shown!r}: no axis=size entries")
    sizes = {a: 1 for a in MESH_AXES}
    seen = set()
    for name, val in items:
        if name not in sizes:
            raise ValueError(f"Bad mesh spec {shown!r}: unknown axis {name!r}; the axes are {', '.join(MESH_AXES)}")
        if name in seen:
            raise ValueError(f"Bad mesh spec {shown!r}: axis {name!r} is given twice")
        seen.add(name)
        try:
            size = int(val)
        except (TypeError, ValueError):
            raise ValueError(f"Bad mesh spec {shown!r}: size {val!r} of axis {name!r} is not an integer") from None
        if size < 1:
            raise ValueError(f"Bad mesh spec {shown!r}: axis {name!r} has size {size}; sizes must be >= 1")
        sizes[name] = size
    prod = math.prod(sizes.values())
    if n_devices is not None and prod != n_devices:
        raise ValueError(f"Mesh spec {shown!r} gives {_fmt_sizes(sizes)} = {prod} devices, but there are "
                         f"{n_devices} devices (the sizes of data, fsdp and tensor must multiply to the device count)")
    return sizes


def mesh_sizes(mesh: AnyMesh | Mapping[str, int]) -> dict[str, int]:
    """Axis sizes of a Mesh, an AbstractMesh or a sizes dict, for all of MESH_AXES (absent axes are 1)."""
    shape = mesh if isinstance(mesh, Mapping) else dict(mesh.shape)
    return {a: int(shape.get(a, 1)) for a in MESH_AXES}


def rule_axes(logical_name: str, rules: Rules = LOGICAL_AXIS_RULES) -> tuple[str, ...]:
    """Mesh axes a logical name maps to (first matching rule), as a tuple (empty: replicated)."""
    for name, axes in rules:
        if name == logical_name:
            if axes is None:
                return ()
            return (axes,) if isinstance(axes, str) else tuple(axes)
    raise ValueError(f"Logical axis name {logical_name!r} has no rule in LOGICAL_AXIS_RULES (sharding_rules.py)")


def logical_dims(config) -> dict[str, list[tuple[str, int]]]:
    """Logical axis name -> the model dimensions it labels, for divisibility checks.

    The head axes are checked on the head *count* (a head is never split), which also covers the
    [embed, heads*head_dim] kernels."""
    tc, vc = config.text, config.vision
    heads = [("text num_attention_heads", tc.num_attention_heads)]
    kv = [("text num_key_value_heads", tc.num_key_value_heads)]
    mlp = [("text intermediate_size", tc.intermediate_size)]
    vocab = [("vocab_size", tc.vocab_size)]
    return {
        "heads": heads, "act_heads": heads, "kv_heads": kv, "act_kv_heads": kv, "cache_kv_heads": kv,
        "mlp": mlp, "act_mlp": mlp, "vocab": vocab, "act_vocab": vocab,
        "embed": [("text hidden_size", tc.hidden_size)],
        "proj_hidden": [("projector hidden size (text hidden_size)", tc.hidden_size)],
        "vis_embed": [("vision hidden_size", vc.hidden_size)],
        "vis_heads": [("vision num_attention_heads", vc.num_attention_heads)],
        "vis_mlp": [("vision intermediate_size", vc.intermediate_size)],
        "vis_concat": [(f"projector input ({config.num_feature_layers} x vision hidden_size)",
                        config.num_feature_layers * vc.hidden_size)],
    }


def check_mesh_fits(sizes: Mapping[str, int], config, rules: Rules = LOGICAL_AXIS_RULES) -> None:
    """Every model dimension the rules shard must divide by its mesh axes: e.g. tensor must divide heads,
    kv heads, intermediate size and vocab; fsdp the hidden sizes. Raises one error naming each mesh axis,
    its size and the dimensions it does not divide."""
    if config is None:
        return
    sizes = mesh_sizes(sizes)
    bad: dict[tuple[str, ...], dict[str, int]] = {}
    for name, dims in logical_dims(config).items():
        try:
            axes = rule_axes(name, rules)
        except ValueError:
            continue
        n = math.prod(sizes[a] for a in axes)
        for what, size in dims:
            if n > 1 and size % n:
                bad.setdefault(axes, {})[what] = size
    if bad:
        parts = []
        for axes, dims in bad.items():
            ax = " x ".join(f"{a}={sizes[a]}" for a in axes)
            parts.append(f"mesh axis {ax} does not divide " + ", ".join(f"{k}={v}" for k, v in dims.items()))
        raise ValueError("Mesh " + _fmt_sizes(sizes) + " does not fit the model: " + "; ".join(parts)
                         + ". Choose sizes that divide these dimensions.")


def _device_array(shape: tuple[int, ...], devices: list) -> np.ndarray:
    """Devices arranged for `shape` (data, fsdp, tensor). Multi-slice TPU: data spans slices over DCN."""
    from jax.experimental import mesh_utils
    slices = {getattr(d, "slice_index", 0) for d in devices}
    if len(slices) > 1 and shape[0] % len(slices) == 0:
        try:
            n = len(slices)
            return mesh_utils.create_hybrid_device_mesh((shape[0] // n,) + shape[1:], (n, 1, 1), devices=devices)
        except Exception:  # noqa: BLE001 - fall through to a single-slice layout
            pass
    for kw in ({}, {"allow_split_physical_axes": True}):
        try:
            return mesh_utils.create_device_mesh(shape, devices=devices, **kw)
        except Exception:  # noqa: BLE001 - odd topologies: plain order below
            pass
    # jax.devices() lists devices process by process, so tensor (the last axis) stays inside a host.
    return np.asarray(devices, dtype=object).reshape(shape)


def make_mesh(spec: str | Mapping[str, int] = "auto", config=None, devices: Sequence | None = None) -> Mesh:
    """A Mesh with axes (data, fsdp, tensor) from a spec such as "data=2,fsdp=2,tensor=2" or "auto".

    Checks that the sizes multiply to the number of devices and, given a config, that each sharded model
    dimension divides by its mesh axes (`check_mesh_fits`); errors name the axis and the sizes."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    check_mesh_fits(sizes, config)
    shape = tuple(sizes[a] for a in MESH_AXES)
    return Mesh(_device_array(shape, devices), MESH_AXES)


def abstract_mesh(spec: str | Mapping[str, int], n_devices: int | None = None) -> AbstractMesh:
    """A device-less mesh of the given sizes (for planning without that many devices)."""
    sizes = parse_mesh_spec(spec, n_devices)
    return AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES)


def describe_mesh(mesh: AnyMesh) -> str:
    s = _fmt_sizes(mesh_sizes(mesh))
    if isinstance(mesh, Mesh):
        n_proc = len({d.process_index for d in mesh.devices.flat})
        s += f" ({mesh.devices.size} {mesh.devices.flat[0].platform} devices, {n_proc} process(es))"
    return s


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


@functools.lru_cache(maxsize=16)
def _boxed_params(config):
    from .convert import abstract_params
    from .vipllava import VipLlavaForConditionalGeneration
    return abstract_params(VipLlavaForConditionalGeneration(config))


def abstract_param_tree(config):
    """Boxed (nn.Partitioned) ShapeDtypeStructs of every parameter, from jax.eval_shape (cached per config)."""
    return _boxed_params(config)


def param_logical_axes(config) -> dict[str, tuple]:
    """Flax path ("a/b/kernel") -> logical axis names of that parameter."""
    from .convert import flat_paths
    return {p: tuple(v.names) for p, v in flat_paths(_boxed_params(config)).items()}


def param_sharding_tree(config, mesh: AnyMesh, rules: Rules = LOGICAL_AXIS_RULES):
    """Nested dict of NamedShardings, the structure of the parameter tree (unboxed). A mesh that does not fit
    the model (`check_mesh_fits`) is the clear mesh-fit error: this serves `shard_params`, `sharded_forward`,
    `generate(mesh=...)` and training."""
    check_mesh_fits(mesh_sizes(mesh), config, rules)
    return tree_shardings(_boxed_params(config), mesh, rules)


def shard_params(params, config, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES):
    """Put params onto the shardings the rules give (a no-op for arrays already placed so)."""
    target = param_sharding_tree(config, mesh, rules)
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


def cache_shardings(config, mesh: AnyMesh, rules: Rules = LOGICAL_AXIS_RULES):
    """A KVCache of NamedShardings, with the structure `KVCache.init(config.text, ...)` has."""
    from .llama import KVCache
    tc = config.text
    if tc.scan_layers:
        k = v = logical_to_sharding(("layers",) + CACHE_KV_AXES, mesh, rules)
    else:
        k = v = tuple(logical_to_sharding(CACHE_KV_AXES, mesh, rules) for _ in range(tc.num_hidden_layers))
    return KVCache(k=k, v=v, mask=logical_to_sharding(CACHE_MASK_AXES, mesh, rules),
                   index=NamedSharding(mesh, P()))


def io_sharding(name: str, mesh: AnyMesh, rules: Rules = LOGICAL_AXIS_RULES) -> NamedSharding:
    """Sharding of a named jit input/output (input_ids, attention_mask, pixel_values, logits, tokens...)."""
    return logical_to_sharding(IO_AXES[name], mesh, rules)


def batch_divisor(mesh: AnyMesh | Mapping[str, int], rules: Rules = LOGICAL_AXIS_RULES) -> int:
    """How many ways the batch axis is split: the product of the mesh axes "batch" maps to (data x fsdp)."""
    sizes = mesh_sizes(mesh)
    return math.prod(sizes[a] for a in rule_axes("batch", rules))


def check_batch(batch: int, mesh: AnyMesh | Mapping[str, int], rules: Rules = LOGICAL_AXIS_RULES) -> None:
    n = batch_divisor(mesh, rules)
    if batch % n:
        sizes = mesh_sizes(mesh)
        ax = " x ".join(f"{a}={sizes[a]}" for a in rule_axes("batch", rules))
        raise ValueError(f"Batch size {batch} is not divisible by {ax} = {n}, the mesh axes the batch is split "
                         f"over; use a batch that is a multiple of {n}, or pad_batch=True (pads with fully masked "
                         f"rows and drops them from the result)")


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
    from jax.experimental import multihost_utils
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


def _pixel_sharding(n_images: int, mesh: Mesh, rules: Rules) -> NamedSharding:
    if n_images % batch_divisor(mesh, rules) == 0:
        return io_sharding("pixel_values", mesh, rules)
    # The vision tower's constraints still split the images inside the jit (unevenly).
    return NamedSharding(mesh, P())


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
    """For train steps and anything else: e.g. ``in_shardings=(param_sharding_tree(cfg, mesh),
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
    cfg = module.config
    ps = param_sharding_tree(cfg, mesh, rules)
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
    params = shard_params(params, cfg, mesh, rules)
    has_pixels, has_mask = pixel_values is not None, attention_mask is not None
    pix_sharded = has_pixels and np.shape(pixel_values)[0] % batch_divisor(mesh, rules) == 0
    fn = _forward_fn(module, mesh, rules, last_token_only, has_pixels, pix_sharded, has_mask)
    args = [put_global(np.asarray(input_ids, np.int32) if not isinstance(input_ids, jax.Array) else input_ids,
                       io_sharding("input_ids", mesh, rules))]
    if has_pixels:
        args.append(put_global(pixel_values, _pixel_sharding(np.shape(pixel_values)[0], mesh, rules)))
    if has_mask:
        args.append(put_global(attention_mask, io_sharding("attention_mask", mesh, rules)))
    with mesh_context(mesh, rules):
        logits = fn(params, *args)
        if n_pad:
            logits = logits[:b]
    return to_host(logits) if gather else logits


def sharded_generate(module, params, input_ids, pixel_values=None, attention_mask=None, *, mesh: Mesh,
                     max_new_tokens: int, pad_batch: bool = True, rules: Rules = LOGICAL_AXIS_RULES,
                     gather: bool = True, **generate_kw) -> np.ndarray:
    """`generation.generate` on a mesh: params on the rules' shardings, inputs as global arrays split over
    data x fsdp, the KV cache sharded by the rules (cache_batch, cache_kv_heads), traced inside the mesh and
    the rules so the model's constraints apply. Returns the new tokens [B, max_new_tokens] as numpy on every
    process (``gather`` is accepted for symmetry with `sharded_forward`; tokens are always gathered)."""
    from .generation import generate
    if not pad_batch:
        check_batch(np.shape(input_ids)[0], mesh, rules)
    return generate(module, params, input_ids, pixel_values, attention_mask, max_new_tokens=max_new_tokens,
                    mesh=mesh, rules=tuple(rules), **generate_kw)
