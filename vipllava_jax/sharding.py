"""Device meshes and shardings from the logical-axis rules table (`sharding_rules.py`)."""
from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
import flax.linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .sharding_rules import LOGICAL_AXIS_RULES, MESH_AXES


def parse_mesh_spec(spec: str, n_devices: int) -> dict[str, int]:
    """"data=2,fsdp=2,tensor=2" -> sizes for all three axes (missing axes are 1). "auto": all devices on fsdp."""
    spec = (spec or "auto").strip()
    if spec == "auto":
        return {"data": 1, "fsdp": n_devices, "tensor": 1}
    sizes = {a: 1 for a in MESH_AXES}
    for part in spec.split(","):
        if "=" not in part:
            raise ValueError(f"Bad mesh spec {spec!r}: {part!r} is not axis=size (axes: {', '.join(MESH_AXES)})")
        name, val = (s.strip() for s in part.split("=", 1))
        if name not in sizes:
            raise ValueError(f"Bad mesh spec {spec!r}: unknown axis {name!r}; axes are {', '.join(MESH_AXES)}")
        try:
            sizes[name] = int(val)
        except ValueError:
            raise ValueError(f"Bad mesh spec {spec!r}: size {val!r} of axis {name!r} is not an integer") from None
        if sizes[name] < 1:
            raise ValueError(f"Bad mesh spec {spec!r}: axis {name!r} has size {sizes[name]}")
    prod = math.prod(sizes.values())
    if prod != n_devices:
        raise ValueError(f"Mesh spec {spec!r} has {' x '.join(f'{k}={v}' for k, v in sizes.items())} = {prod} "
                         f"devices, but there are {n_devices} devices")
    return sizes


def check_mesh_fits(sizes: dict[str, int], config) -> None:
    """tensor must divide heads, kv heads, mlp and vocab of the text decoder, and the vision tower's heads/mlp."""
    t = sizes.get("tensor", 1)
    if t == 1 or config is None:
        return
    tc, vc = config.text, config.vision
    dims = {"text num_attention_heads": tc.num_attention_heads, "text num_key_value_heads": tc.num_key_value_heads,
            "text intermediate_size": tc.intermediate_size, "vocab_size": tc.vocab_size,
            "vision num_attention_heads": vc.num_attention_heads, "vision intermediate_size": vc.intermediate_size}
    bad = {k: v for k, v in dims.items() if v % t}
    if bad:
        raise ValueError("Mesh axis tensor=%d does not divide %s" % (t, ", ".join(f"{k}={v}" for k, v in bad.items())))


def make_mesh(spec: str = "auto", config=None, devices: Sequence | None = None) -> Mesh:
    """A Mesh with axes (data, fsdp, tensor) from a spec such as "data=2,fsdp=2,tensor=2" or "auto"."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    check_mesh_fits(sizes, config)
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        arr = jax.experimental.mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # noqa: BLE001 - fall back to plain order on odd topologies
        arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, MESH_AXES)


def logical_to_sharding(names: tuple, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> NamedSharding:
    return NamedSharding(mesh, nn.logical_to_mesh_axes(names, rules))


def tree_shardings(boxed_tree, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """Boxed abstract tree (from jax.eval_shape of init) -> same-structure tree of NamedShardings."""
    specs = nn.get_partition_spec(boxed_tree)
    return jax.tree.map(lambda s: NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(s), rules)), specs,
                        is_leaf=lambda x: isinstance(x, P))
