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
from ..models.quantize import LM_LINEARS, keeps_int_dtype, leaf_bytes, make_quant_config
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
    quantize: str | None = None  # weight-only int8/int4 of the language model's linears (models.quantize)
    # training (plan_training): per-device bytes of the trained parameters' fp32 master copies, gradients and
    # AdamW moments, by part (trained groups, LoRA adapters); empty for serving
    training: dict[str, int] = dataclasses.field(default_factory=dict)
    stage: str | None = None

    @property
    def training_bytes_per_device(self) -> int:
        return sum(self.training.values())

    @property
    def total_bytes_per_device(self) -> int:
        return (self.param_bytes_per_device + self.cache_bytes_per_device + self.activation_bytes_per_device
                + self.training_bytes_per_device)

    def fits(self) -> bool | None:
        return None if self.device_memory_bytes is None else self.total_bytes_per_device <= self.device_memory_bytes

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["total_bytes_per_device"] = self.total_bytes_per_device
        d["training_bytes_per_device"] = self.training_bytes_per_device
        return d

    def format(self) -> str:
        m = " x ".join(f"{a}={self.mesh[a]}" for a in MESH_AXES)
        pad = (f" (padded from {self.requested_batch} to a multiple of data x fsdp)"
               if self.batch != self.requested_batch else "")
        lines = [
            f"mesh {m} ({self.n_devices} devices); batch {self.batch}{pad}, seq_len {self.seq_len}, "
            f"{self.num_images} image(s); params {self.dtype}"
            + (f" ({self.quantize} linears)" if self.quantize else "")
            + (f", training stage {self.stage}" if self.stage else f", KV cache {self.cache_dtype}"),
            f"{'':32}{'whole model':>14}{'per device':>14}",
            f"{'parameters':32}{_gib(self.param_bytes):>14}{_gib(self.param_bytes_per_device):>14}"
            f"   ({self.param_count / 1e9:.2f}B params)",
        ]
        for k, v in self.param_groups.items():
            lines.append(f"{'  ' + k:32}{'':>14}{_gib(v):>14}")
        if self.training:
            lines.append(f"{'trained: fp32 master+grad+AdamW':32}{'':>14}{_gib(self.training_bytes_per_device):>14}")
            for k, v in self.training.items():
                lines.append(f"{'  ' + k:32}{'':>14}{_gib(v):>14}")
        else:
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


def param_bytes_per_device(config: VipLlavaConfig, mesh, dtype=jnp.bfloat16, *,
                           skip: tuple[str, ...] = ()) -> tuple[int, int, int, dict]:
    """(param count, total bytes, per-device bytes, per-device bytes by top-level module) from jax.eval_shape.
    A quantized kernel (``config.quantization``) counts its int8/int4 values (int4: half a byte each, as XLA
    packs them) its scales in ``dtype`` and its zero points as int4; scales and zero points are not counted as parameters. ``skip``: top-level groups
    left out (the trained ones, which a training plan counts as fp32 master copies)."""
    sizes, _ = _mesh_arg(mesh, None)
    dt = _dtype(dtype)
    count = total = per = 0
    groups: dict[str, int] = {}
    for path, v in flat_paths(abstract_param_tree(config)).items():
        if path.split("/", 1)[0] in skip:
            continue
        shape = tuple(v.value.shape)
        leaf_dt = v.value.dtype if keeps_int_dtype(path) else dt
        count += 0 if path.endswith(("/kernel/scale", "/kernel/zero_point")) else math.prod(shape)
        total += leaf_bytes(shape, leaf_dt)
        b = leaf_bytes(shard_shape(shape, logical_spec(tuple(v.names)), sizes), leaf_dt)
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
                full_logits: bool = False, device_memory_bytes: int | None = None, quantize=None,
                quantize_tile_size: int | None = None) -> MemoryPlan:
    """Per-device memory for serving `batch` sequences of `seq_len` tokens (prompt incl. image tokens plus
    generated tokens = KV-cache length) with `num_images` images (default: one per sequence).

    config: as `get_config` takes it (a `VipLlavaConfig`, a preset name or a config.json path).
    mesh: a spec string ("data=2,fsdp=4", "auto" with n_devices), a sizes dict, a Mesh or an AbstractMesh;
    no real devices are needed. The batch is padded up to a multiple of data x fsdp, as `sharded_forward`
    does. Raises the same errors as `make_mesh` when the mesh does not fit the model.
    quantize: "int8" / "int4" (``quantize_tile_size``, default 128): the language model's linears weight-only
    quantized, as ``load_pretrained(quantize=)`` loads them."""
    config = _quantized(get_config(config), quantize, quantize_tile_size)
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
                      param_groups=groups, device_memory_bytes=device_memory_bytes,
                      quantize=None if config.quantization is None else config.quantization.mode)


def _quantized(config: VipLlavaConfig, quantize, tile_size) -> VipLlavaConfig:
    q = make_quant_config(quantize, tile_size)
    return config if q is None else config.replace(quantization=q)


def lora_items(config: VipLlavaConfig, rank: int, targets: tuple[str, ...] = LM_LINEARS) -> list[Item]:
    """The LoRA adapters on the language model's linears: A [in, r] keeps the kernel's input axis, B [r, out]
    its output axis (training.lora's layout), one pair per layer."""
    tc = config.text
    n, k, h, d, f = (tc.num_attention_heads, tc.num_key_value_heads, tc.head_dim, tc.hidden_size,
                     tc.intermediate_size)
    kernels = {"q_proj": (d, n * h, "embed", "heads"), "k_proj": (d, k * h, "embed", "kv_heads"),
               "v_proj": (d, k * h, "embed", "kv_heads"), "o_proj": (n * h, d, "heads", "embed"),
               "gate_proj": (d, f, "embed", "mlp"), "up_proj": (d, f, "embed", "mlp"), "down_proj": (f, d, "mlp", "embed")}
    f32, L = np.dtype(np.float32), tc.num_hidden_layers
    out = []
    for t in targets:
        i, o, ai, ao = kernels[t]
        out += [Item(f"{t} A", (i, rank), (ai, None), f32, L), Item(f"{t} B", (rank, o), (None, ao), f32, L)]
    return out


def plan_training(config: VipLlavaConfig | str | os.PathLike, mesh, batch: int, seq_len: int, dtype=jnp.bfloat16, *,
                  trained: tuple[str, ...], lora_rank: int | None = None, remat: str = "full",
                  num_images: int | None = None, n_devices: int | None = None, quantize=None,
                  quantize_tile_size: int | None = None, device_memory_bytes: int | None = None,
                  stage: str | None = None) -> MemoryPlan:
    """Per-device memory of one training step on `batch` sequences of `seq_len` tokens.

    trained: the top-level parameter groups the stage trains (``training.optim.STAGES``); they, and the LoRA
    adapters (``lora_rank``: rank r on every language-model linear), are fp32 master copies with an fp32
    gradient and two fp32 AdamW moments (16 bytes a parameter). Every other parameter is frozen, in ``dtype``
    (or int8/int4 with ``quantize``: QLoRA). Activations (an estimate): with ``remat`` other than "none" each
    layer's input is kept ([L, B, T, D]) and one layer's forward is recomputed and differentiated at a time
    (twice its prefill arrays: the arrays and their gradients); with "none" every layer's arrays are kept. Plus
    the full-sequence logits in fp32 and their gradient, and the vision tower's forward (no gradient: frozen)."""
    config = _quantized(get_config(config), quantize, quantize_tile_size)
    sizes, nd = _mesh_arg(mesh, n_devices)
    check_mesh_fits(sizes, config)
    if seq_len < 1 or batch < 1:
        raise ValueError(f"batch ({batch}) and seq_len ({seq_len}) must be >= 1")
    div = batch_divisor(sizes)
    padded = -(-batch // div) * div
    num_images = batch if num_images is None else num_images
    count, p_total, p_dev, groups = param_bytes_per_device(config, sizes, dtype, skip=tuple(trained))
    training: dict[str, int] = {}
    all_count = count
    for path, v in flat_paths(abstract_param_tree(config)).items():
        g = path.split("/", 1)[0]
        if g in trained:
            shape = tuple(v.value.shape)
            all_count += math.prod(shape)
            training[g] = training.get(g, 0) + 4 * _per_device(shape, tuple(v.names), np.float32, sizes)
    if lora_rank:
        training["LoRA adapters (rank %d)" % lora_rank] = sum(
            4 * _per_device(it.shape, it.axes, it.dtype, sizes) * it.count for it in lora_items(config, lora_rank))
    tc = config.text
    items = activation_items(config, padded, seq_len, num_images, dtype, full_logits=True)
    layer = sum(_per_device(it.shape, it.axes, it.dtype, sizes) * it.count for it in items["decoder layer"])
    f32 = np.dtype(np.float32)
    logits = 2 * _per_device((padded, seq_len, tc.vocab_size), ("batch", "length", "act_vocab"), f32, sizes)
    if remat == "none":
        decoder = tc.num_hidden_layers * layer
    else:
        saved = tc.num_hidden_layers * _per_device((padded, seq_len, tc.hidden_size),
                                                   ("batch", "length", "act_embed"), _dtype(dtype), sizes)
        decoder = saved + 2 * layer
    vision = sum(_per_device(it.shape, it.axes, it.dtype, sizes) * it.count for it in items["vision tower"])
    acts = {"vision tower (forward)": vision, "decoder (remat %s)" % remat: decoder, "logits + grad (fp32)": logits}
    peak = max(vision, decoder + logits)
    return MemoryPlan(mesh=sizes, n_devices=nd, batch=padded, requested_batch=batch, seq_len=seq_len,
                      num_images=num_images, dtype=str(_dtype(dtype)), cache_dtype=str(_dtype(dtype)),
                      param_count=all_count, param_bytes=p_total, param_bytes_per_device=p_dev, cache_bytes=0,
                      cache_bytes_per_device=0, activation_bytes_per_device=peak, activations=acts,
                      param_groups=groups, device_memory_bytes=device_memory_bytes,
                      quantize=None if config.quantization is None else config.quantization.mode,
                      training=training, stage=stage)
