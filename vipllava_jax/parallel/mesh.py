"""Device meshes: parse a spec ("data=2,fsdp=2,tensor=2" | "auto"), check it against the device count and the
model's dimensions (`check_mesh_fits`), and build the `Mesh` (`make_mesh`) or a device-less `AbstractMesh`."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, Mesh

from .rules import LOGICAL_AXIS_RULES, MESH_AXES, Rules, rule_axes

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


def logical_dims(config) -> dict[str, list[tuple[str, int]]]:
    """Logical axis name -> the model dimensions it labels, for divisibility checks.

    The head axes are checked on the head *count* (a head is never split), which also covers the
    [embed, heads*head_dim] kernels. With int4 quantization (``config.quantization``) a quantized kernel's input
    axis holds input/tile_size scale rows, sharded like it: the tile count must divide too, so that no device
    holds part of a tile."""
    tc, vc = config.text, config.vision
    heads = [("text num_attention_heads", tc.num_attention_heads)]
    kv = [("text num_key_value_heads", tc.num_key_value_heads)]
    mlp = [("text intermediate_size", tc.intermediate_size)]
    vocab = [("vocab_size", tc.vocab_size)]
    q = getattr(config, "quantization", None)
    tiles: dict[str, list[tuple[str, int]]] = {}
    if q is not None and q.tiled:
        def tile(name, what, n):
            tiles.setdefault(name, []).append((f"int4 tiles of {what} ({n} / tile_size {q.tile_size})",
                                               n // q.tile_size))
        tile("embed", "text hidden_size", tc.hidden_size)
        tile("heads", "o_proj input", tc.num_attention_heads * tc.head_dim)
        tile("mlp", "down_proj input", tc.intermediate_size)
        if q.vision_tower:
            tile("vis_embed", "vision hidden_size", vc.hidden_size)
            tile("vis_mlp", "vision intermediate_size", vc.intermediate_size)
            tile("vis_heads", "vision out_proj input", vc.hidden_size)
        if q.projector:
            tile("vis_concat", "projector input", config.num_feature_layers * vc.hidden_size)
            tile("proj_hidden", "projector hidden size", tc.hidden_size)
    dims = {
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
    for name, extra in tiles.items():
        dims[name] = dims[name] + extra
    return dims


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


def check_mesh(config, mesh) -> None:
    """Every entry point that takes a mesh checks that it fits the model (`check_mesh_fits`): a vocab, head count
    or MLP size the ``tensor`` axis does not divide is the clear mesh-fit error, never JAX's raw
    IndivisibleError. (No padding: a padded vocab would change the saved shapes and the logits' width.)"""
    if mesh is not None:
        check_mesh_fits(mesh_sizes(mesh), config)


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
