"""Memory planning: parameter, KV-cache and activation bytes per device for a mesh, from shapes alone.

Shapes come from ``jax.eval_shape`` (the parameter tree and `KVCache.init`) and, for activations, from the
model's einsum shapes; per-device sizes come from the logical-axis rules table applied on a device-less
`jax.sharding.AbstractMesh`, so a plan for 64 devices runs on a laptop. Parameter and KV-cache bytes are
exact (they equal the bytes in each device's ``addressable_shards``); activation bytes are an estimate of
the largest set of arrays live at once during prefill with the XLA attention path (no flash attention,
which would drop the [T, S] score matrices), and exclude XLA's workspace and fragmentation.

Built-in configs: `models.presets.PRESETS` (``7b``, ``13b``, ``tiny``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, Mesh

from ..models.config import VipLlavaConfig
from ..models.llama import KVCache
from ..models.params import abstract_param_tree, flat_paths
from ..models.presets import PRESETS
from .mesh import batch_divisor, check_mesh_fits, mesh_sizes, parse_mesh_spec
from .rules import MESH_AXES
from .shardings import cache_shardings, logical_spec, shard_shape

def find_preset(name: str | os.PathLike) -> VipLlavaConfig | None:
    """The preset a name means (``7b``, ``vip-llava-13b-hf``, ``TINY``, ...); None for any other name."""
    return PRESETS.get(str(name).lower().removeprefix("vip-llava-").removesuffix("-hf"))


def get_config(name_or_path: str | os.PathLike | VipLlavaConfig) -> VipLlavaConfig:
    """A `VipLlavaConfig` as it is, a preset name (7b, 13b, tiny; before any path of that name), a config.json
    path, or a model directory's config.json (HF and orbax directories both hold one). Errors name the file; the
    ``plan`` command reads directories with `vipllava_jax.checkpoints.load_config`, whose errors are
    `CheckpointError`s."""
    if isinstance(name_or_path, VipLlavaConfig):
        return name_or_path
    preset = find_preset(name_or_path)
    if preset is not None:
        return preset
    p = Path(name_or_path)
    if p.is_dir() and (p / "config.json").is_file():
        p = p / "config.json"
    if p.is_file():
        try:
            with open(p) as f:
                return VipLlavaConfig.from_hf(json.load(f))
        except (ValueError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
            raise ValueError(f"{p}: {e}") from None
    raise ValueError(f"Unknown config {name_or_path!r}: give one of {', '.join(PRESETS)} or a model directory / "
                     f"config.json")


PLAN_DTYPES = ("float32", "bfloat16", "float16")  # what the model computes in (quantized weights: --quantize)
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "f32": "float32"}


def _dtype(d) -> np.dtype:
    """A parameter / cache dtype: one of `PLAN_DTYPES` (a name, an alias such as bf16, or a dtype); anything
    else is a ValueError naming it."""
    if d is None:
        return np.dtype(np.float32)
    name = _DTYPE_ALIASES.get(d.lower(), d.lower()) if isinstance(d, str) else d
    try:
        dt = np.dtype(jnp.dtype(name))
    except (TypeError, ValueError):
        dt = None
    if dt is None or dt.name not in PLAN_DTYPES:
        raise ValueError(f"dtype {d!r} is not one the model computes in: give one of {', '.join(PLAN_DTYPES)} "
                         f"(or bf16, fp16, fp32)")
    return dt


@dataclasses.dataclass
class Item:
    """One kind of array: `count` arrays of `shape` with logical axes `axes`."""
    name: str
    shape: tuple[int, ...]
    axes: tuple
    dtype: np.dtype
    count: int = 1
    total_bytes: int = 0
    per_device_bytes: int = 0


@dataclasses.dataclass
class MemoryPlan:
    mesh: dict[str, int]
    n_devices: int
    batch: int  # after padding to a multiple of data x fsdp
    requested_batch: int
    seq_len: int
    num_images: int
    dtype: str
    cache_dtype: str
    param_count: int
    param_bytes: int  # whole model
    param_bytes_per_device: int
    cache_bytes: int
    cache_bytes_per_device: int
    activation_bytes_per_device: int  # estimated peak (prefill)
    activations: dict[str, int]  # per-device bytes of each activation group
    param_groups: dict[str, int]  # per-device bytes by top-level module
    device_memory_bytes: int | None = None

    @property
    def total_bytes_per_device(self) -> int:
        return self.param_bytes_per_device + self.cache_bytes_per_device + self.activation_bytes_per_device

    def fits(self) -> bool | None:
        return None if self.device_memory_bytes is None else self.total_bytes_per_device <= self.device_memory_bytes

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["total_bytes_per_device"] = self.total_bytes_per_device
        return d

    def format(self) -> str:
        m = " x ".join(f"{a}={self.mesh[a]}" for a in MESH_AXES)
        pad = (f" (padded from {self.requested_batch} to a multiple of data x fsdp)"
               if self.batch != self.requested_batch else "")
        lines = [
            f"mesh {m} ({self.n_devices} devices); batch {self.batch}{pad}, seq_len {self.seq_len}, "
            f"{self.num_images} image(s); params {self.dtype}, KV cache {self.cache_dtype}",
            f"{'':32}{'whole model':>14}{'per device':>14}",
            f"{'parameters':32}{_gib(self.param_bytes):>14}{_gib(self.param_bytes_per_device):>14}"
            f"   ({self.param_count / 1e9:.2f}B params)",
        ]
        for k, v in self.param_groups.items():
            lines.append(f"{'  ' + k:32}{'':>14}{_gib(v):>14}")
        lines.append(f"{'KV cache':32}{_gib(self.cache_bytes):>14}{_gib(self.cache_bytes_per_device):>14}")
        lines.append(f"{'activations (peak, estimate)':32}{'':>14}{_gib(self.activation_bytes_per_device):>14}")
        for k, v in self.activations.items():
            lines.append(f"{'  ' + k:32}{'':>14}{_gib(v):>14}")
        lines.append(f"{'total':32}{'':>14}{_gib(self.total_bytes_per_device):>14}")
        if self.device_memory_bytes is not None:
            lines.append(f"device memory {_gib(self.device_memory_bytes).strip()}: "
                         + ("fits" if self.fits() else "DOES NOT FIT"))
        return "\n".join(lines)


def _gib(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.1f} KiB"


def _bytes(shape, dtype) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


def _per_device(shape, axes, dtype, sizes) -> int:
    return _bytes(shard_shape(shape, logical_spec(axes), sizes), dtype)


def _mesh_arg(mesh, n_devices):
    if isinstance(mesh, (Mesh, AbstractMesh)):
        sizes = mesh_sizes(mesh)
        return sizes, math.prod(sizes.values())
    sizes = parse_mesh_spec(mesh, n_devices)
    return sizes, math.prod(sizes.values())


def param_bytes_per_device(config: VipLlavaConfig, mesh, dtype=jnp.bfloat16) -> tuple[int, int, int, dict]:
    """(param count, total bytes, per-device bytes, per-device bytes by top-level module) from jax.eval_shape."""
    sizes, _ = _mesh_arg(mesh, None)
    dt = _dtype(dtype)
    count = total = per = 0
    groups: dict[str, int] = {}
    for path, v in flat_paths(abstract_param_tree(config)).items():
        shape = tuple(v.value.shape)
        count += math.prod(shape)
        total += _bytes(shape, dt)
        b = _per_device(shape, tuple(v.names), dt, sizes)
        per += b
        g = path.split("/")[0]
        groups[g] = groups.get(g, 0) + b
    return count, total, per, groups


def cache_bytes_per_device(config: VipLlavaConfig, mesh, batch: int, seq_len: int, dtype=jnp.bfloat16) -> tuple[int, int]:
    """(total, per-device) bytes of a KVCache for `batch` rows of `seq_len` slots, from jax.eval_shape."""
    sizes, _ = _mesh_arg(mesh, None)
    am = AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES)
    cache = jax.eval_shape(lambda: KVCache.init(config.text, batch, seq_len, _dtype(dtype)))
    shard = cache_shardings(config, am)
    total = per = 0
    for x, s in zip(jax.tree.leaves(cache), jax.tree.leaves(shard)):
        total += _bytes(x.shape, x.dtype)
        per += _bytes(shard_shape(x.shape, s.spec, sizes), x.dtype)
    return total, per


def activation_items(config: VipLlavaConfig, batch: int, seq_len: int, num_images: int, dtype,
                     full_logits: bool = False) -> dict[str, list[Item]]:
    """The large arrays of a prefill, grouped by phase; logical axes as the model constrains them."""
    vc, tc = config.vision, config.text
    dt, f32 = _dtype(dtype), np.dtype(np.float32)
    i, p1, p = num_images, vc.num_patches + 1, vc.num_patches
    b, t = batch, seq_len
    n, k, h, d, f, v = (tc.num_attention_heads, tc.num_key_value_heads, tc.head_dim, tc.hidden_size,
                        tc.intermediate_size, tc.vocab_size)
    bt = ("batch", "length")
    items = {
        "vision tower": [
            Item("hidden states (all layers kept)", (vc.num_hidden_layers + 1, i, p1, vc.hidden_size),
                 (None, "batch", "length", "act_embed"), dt),
            Item("q, k, v", (i, p1, vc.num_attention_heads, vc.head_dim), bt + ("act_heads", "head_dim"), dt, 3),
            Item("attention scores (fp32)", (i, vc.num_attention_heads, p1, p1),
                 ("batch", "act_heads", None, None), f32),
            Item("attention probs", (i, vc.num_attention_heads, p1, p1), ("batch", "act_heads", None, None), dt),
            Item("mlp hidden", (i, p1, vc.intermediate_size), bt + ("act_mlp",), dt, 2),
            Item("projector input", (i, p, config.num_feature_layers * vc.hidden_size), bt + ("act_embed",), dt),
        ],
        "decoder layer": [
            Item("image features", (i, p, d), bt + ("act_embed",), dt),
            Item("embeddings, residual, norm", (b, t, d), bt + ("act_embed",), dt, 3),
            Item("q", (b, t, n, h), bt + ("act_heads", "head_dim"), dt),
            Item("k, v (new)", (b, t, k, h), bt + ("act_kv_heads", "head_dim"), dt, 2),
            Item("attention scores (fp32)", (b, n, t, t), ("batch", "act_heads", None, None), f32),
            Item("attention probs", (b, n, t, t), ("batch", "act_heads", None, None), dt),
            Item("mlp gate, up, act*up", (b, t, f), bt + ("act_mlp",), dt, 3),
        ],
        "logits": [Item("logits" + (" (all positions)" if full_logits else " (last position)"),
                        (b, t if full_logits else 1, v), bt + ("act_vocab",), dt)],
    }
    return items


def plan_memory(config: VipLlavaConfig | str | os.PathLike, mesh, batch: int, seq_len: int, dtype=jnp.bfloat16, *,
                cache_dtype=None, num_images: int | None = None, n_devices: int | None = None,
                full_logits: bool = False, device_memory_bytes: int | None = None) -> MemoryPlan:
    """Per-device memory for serving `batch` sequences of `seq_len` tokens (prompt incl. image tokens plus
    generated tokens = KV-cache length) with `num_images` images (default: one per sequence).

    config: as `get_config` takes it (a `VipLlavaConfig`, a preset name or a config.json path).
    mesh: a spec string ("data=2,fsdp=4", "auto" with n_devices), a sizes dict, a Mesh or an AbstractMesh;
    no real devices are needed. The batch is padded up to a multiple of data x fsdp, as `sharded_forward`
    does. Raises the same errors as `make_mesh` when the mesh does not fit the model."""
    config = get_config(config)
    sizes, nd = _mesh_arg(mesh, n_devices)
    check_mesh_fits(sizes, config)
    if seq_len < 1 or batch < 1:
        raise ValueError(f"batch ({batch}) and seq_len ({seq_len}) must be >= 1")
    if seq_len > config.text.max_position_embeddings:
        raise ValueError(f"seq_len {seq_len} exceeds max_position_embeddings {config.text.max_position_embeddings}")
    div = batch_divisor(sizes)
    padded = -(-batch // div) * div
    num_images = batch if num_images is None else num_images
    cache_dtype = dtype if cache_dtype is None else cache_dtype
    count, p_total, p_dev, groups = param_bytes_per_device(config, sizes, dtype)
    c_total, c_dev = cache_bytes_per_device(config, sizes, padded, seq_len, cache_dtype)
    acts = {}
    for group, items in activation_items(config, padded, seq_len, num_images, dtype, full_logits).items():
        acts[group] = sum(_per_device(it.shape, it.axes, it.dtype, sizes) * it.count for it in items)
    peak = max(acts["vision tower"], acts["decoder layer"] + acts["logits"])
    return MemoryPlan(mesh=sizes, n_devices=nd, batch=padded, requested_batch=batch, seq_len=seq_len,
                      num_images=num_images, dtype=str(_dtype(dtype)), cache_dtype=str(_dtype(cache_dtype)),
                      param_count=count, param_bytes=p_total, param_bytes_per_device=p_dev, cache_bytes=c_total,
                      cache_bytes_per_device=c_dev, activation_bytes_per_device=peak, activations=acts,
                      param_groups=groups, device_memory_bytes=device_memory_bytes)
