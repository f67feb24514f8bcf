"""Weight-only int8 / int4 quantization of the linear layers, with qwix's quantized arrays.

`QuantConfig` says what is quantized and how; it travels on `VipLlavaConfig.quantization` (written to an orbax
directory's config.json as ``quantization_config``, as transformers writes bitsandbytes settings), so every code
path that rebuilds the module or its parameter tree from the config (generation's unrolled copy, the sharding
rules, the planner, orbax restore) sees the same quantized tree.

* int8: one scale per output channel (qwix ``channelwise_axes`` on the kernel's output axis).
* int4: one scale and one zero point per tile of ``tile_size`` input rows per output channel (qwix sub-channel
  ``tiled_axes`` on the contracting axis, as qwix's PTQ rule with ``tile_size`` lays it out for a Dense; minmax
  calibration, so the 16 codes span each tile's own range), the range's clipping searched per tile.
* Weight-only: activations stay in the compute dtype; `QuantDense` dequantizes the weight and multiplies in the
  compute dtype through ``qwix.dot_general`` (its input-dequantizing path, which XLA can fuse into the matmul).

The language model's q/k/v/o/gate/up/down kernels are quantized; the vision tower, projector and ``lm_head``
only when asked (``vision_tower=``, ``projector=``, ``lm_head=``); embeddings, norms, biases and the patch conv
stay in the compute dtype.

A quantized kernel is the dict ``{"qvalue": [in, out] int8/int4, "scale": [1 or in/tile, out]}`` (and
``"zero_point"``, the scale's shape in the qtype, when asymmetric: int4 by default) in place of
``kernel`` (a leading L axis on both when layers are scanned). Its logical axes are the kernel's; a scale axis of
size 1 is replicated.

Why not ``qwix.quantize_model(module, PtqProvider(...))``: it intercepts the methods of one module *instance*,
but generation (`generation.loop`), the engine and the sharding rules rebuild the module and its parameter tree
from the config; and its interception would also catch a LoRA adapter's matmuls inside the same module. The
explicit layer uses the same qwix pieces (``HowToQuantize``, ``qarray.quantize``, ``QArray``,
``qwix.dot_general``) and gives the same tree layout qwix's PTQ gives a Dense kernel (qvalue + scale).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn
import qwix
from qwix._src.core import qarray

Array = jax.Array

QTYPES = {"int8": jnp.int8, "int4": jnp.int4}
QUANT_MODES = tuple(QTYPES)
BITS = {"int8": 8, "int4": 4}
QUANT_METHOD = "qwix"  # the quant_method written in config.json's quantization_config
DEFAULT_TILE_SIZE = 128
LM_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Weight-only quantization: ``mode`` "int8" (per output channel) or "int4" (sub-channel, ``tile_size`` input
    rows a scale). The language model's linear layers always; the others on request."""

    mode: str
    tile_size: int = DEFAULT_TILE_SIZE
    vision_tower: bool = False
    projector: bool = False
    lm_head: bool = False
    asymmetric: bool | None = None  # a zero point per scale (qwix minmax calibration); None: int4 yes, int8 no

    def __post_init__(self):
        if self.mode not in QTYPES:
            raise ValueError(f"quantize={self.mode!r}: choose one of {', '.join(QUANT_MODES)} (or None)")
        if self.asymmetric is None:
            object.__setattr__(self, "asymmetric", self.mode == "int4")
        if not isinstance(self.tile_size, int) or isinstance(self.tile_size, bool) or self.tile_size < 1:
            raise ValueError(f"quantize tile_size must be a positive integer, got {self.tile_size!r}")

    @property
    def qtype(self):
        return QTYPES[self.mode]

    @property
    def bits(self) -> int:
        return BITS[self.mode]

    @property
    def tiled(self) -> bool:
        return self.mode == "int4"

    def how(self, ndim: int = 2) -> qarray.HowToQuantize:
        """qwix's HowToQuantize for a kernel [.., in, out]: every axis but ``in`` channelwise (leading layer axes
        too, so each layer of a stacked kernel keeps its own scales), ``in`` tiled for int4."""
        lead = tuple(range(ndim - 2))
        tiled = {ndim - 2: self.tile_size} if self.tiled else {}
        return qarray.HowToQuantize(qtype=self.qtype, channelwise_axes=lead + (ndim - 1,), tiled_axes=tiled,
                                    calibration_method="minmax" if self.asymmetric else "absmax")

    @property
    def leaves(self) -> tuple[str, ...]:
        """The leaves of a quantized kernel: ``qvalue`` and ``scale``, and ``zero_point`` when asymmetric."""
        return ("qvalue", "scale", "zero_point") if self.asymmetric else ("qvalue", "scale")

    def scale_shape(self, shape) -> tuple[int, ...]:
        shape = tuple(shape)
        rows = shape[-2] // self.tile_size if self.tiled else 1
        return shape[:-2] + (rows, shape[-1])

    def scale_names(self, names) -> tuple:
        """Logical axes of a scale: the kernel's, with the input axis replicated when it has size 1 (int8)."""
        names = tuple(names)
        return names if self.tiled else names[:-2] + (None, names[-1])

    def to_hf(self) -> dict:
        return {"quant_method": QUANT_METHOD, "weight_qtype": self.mode,
                "tile_size": self.tile_size if self.tiled else None,
                "quantize_vision_tower": self.vision_tower, "quantize_projector": self.projector,
                "quantize_lm_head": self.lm_head, "asymmetric": self.asymmetric}

    @classmethod
    def from_hf(cls, d) -> "QuantConfig":
        if not isinstance(d, dict):
            raise ValueError(f"quantization_config must be an object, got {type(d).__name__}")
        method = d.get("quant_method")
        if method != QUANT_METHOD:
            raise ValueError(f"quantization_config quant_method {method!r} is not supported (only {QUANT_METHOD!r}, "
                             f"written by vipllava-jax convert --quantize): load the unquantized checkpoint with "
                             f"quantize='int8' or 'int4' instead")
        # a directory written before zero points has no "asymmetric": its kernels are symmetric
        kw = dict(mode=d.get("weight_qtype"), asymmetric=bool(d.get("asymmetric", False)),
                  vision_tower=bool(d.get("quantize_vision_tower", False)),
                  projector=bool(d.get("quantize_projector", False)), lm_head=bool(d.get("quantize_lm_head", False)))
        if d.get("tile_size") is not None:
            kw["tile_size"] = d["tile_size"]
        return cls(**kw)


def make_quant_config(quantize, tile_size: int | None = None, *, vision_tower: bool = False,
                      projector: bool = False, lm_head: bool = False) -> QuantConfig | None:
    """``quantize`` as the loaders take it: None, "int8"/"int4" or a QuantConfig."""
    if quantize is None or isinstance(quantize, QuantConfig):
        return quantize
    return QuantConfig(str(quantize), DEFAULT_TILE_SIZE if tile_size is None else tile_size,
                       vision_tower=vision_tower, projector=projector, lm_head=lm_head)


# --- which kernels ----------------------------------------------------------------------------------------------
def is_quantized_kernel(path: str, quant: QuantConfig | None) -> bool:
    """Whether the Flax kernel at ``path`` ("language_model/layers_0/self_attn/q_proj/kernel") is quantized."""
    if quant is None or not path.endswith("/kernel"):
        return False
    parts = path.split("/")
    if parts[0] == "language_model":
        return parts[-2] in LM_LINEARS
    if parts[0] == "vision_tower":
        return quant.vision_tower and parts[1] == "encoder"
    if parts[0] == "multi_modal_projector":
        return quant.projector
    if parts[0] == "lm_head":
        return quant.lm_head
    return False


def kernel_inputs(config) -> list[tuple[str, int]]:
    """(layer name, input features) of every kernel `QuantConfig` may quantize, for the tile check."""
    tc, vc = config.text, config.vision
    q = config.quantization
    out = [("language_model q/k/v/gate/up_proj (hidden_size)", tc.hidden_size),
           ("language_model o_proj (num_attention_heads x head_dim)", tc.num_attention_heads * tc.head_dim),
           ("language_model down_proj (intermediate_size)", tc.intermediate_size)]
    if q.vision_tower:
        out += [("vision_tower q/k/v/out_proj and fc1 (vision hidden_size)", vc.hidden_size),
                ("vision_tower fc2 (vision intermediate_size)", vc.intermediate_size)]
    if q.projector:
        out += [("projector linear_1 (feature layers x vision hidden_size)",
                 config.num_feature_layers * vc.hidden_size), ("projector linear_2 (hidden_size)", tc.hidden_size)]
    if q.lm_head and not config.tie_word_embeddings:
        out += [("lm_head (hidden_size)", tc.hidden_size)]
    return out


def check_tiles(config) -> None:
    """int4: every quantized kernel's input features must be a whole number of tiles; one error naming each
    layer, its size and the tile sizes that would fit."""
    q = config.quantization
    if q is None or not q.tiled:
        return
    bad = [(what, n) for what, n in kernel_inputs(config) if n % q.tile_size]
    if bad:
        g = functools.reduce(math.gcd, [n for _, n in kernel_inputs(config)])
        fits = [t for t in (256, 128, 64, 32, 16, 8) if g % t == 0]
        raise ValueError(f"int4 tile_size {q.tile_size} does not divide the input features of "
                         + ", ".join(f"{w}={n}" for w, n in bad)
                         + (f"; tile sizes that divide every quantized layer: {fits}" if fits else "")
                         + " (quantize_tile_size= / --quantize-tile-size)")


# --- quantizing -------------------------------------------------------------------------------------------------
# int4 clipping: each tile's range is a fraction of its calibrated range (absmax, or min and max when asymmetric),
# from this grid, the one with the least squared error (round to nearest at every candidate). int8's error is
# far below its bar, so int8 keeps the calibrated range.
INT4_CLIP_GRID = tuple(1.0 - 0.05 * i for i in range(11))  # 1.0, 0.95, ..., 0.5


@functools.partial(jax.jit, static_argnames=("quant", "dtype"))
def _quantize(w, quant: QuantConfig, dtype):
    how = quant.how(w.ndim)
    if quant.mode != "int4":
        q = qarray.quantize(w, how)
        out = {"qvalue": q.qvalue, "scale": q.scale.astype(dtype)}
        return out if q.zero_point is None else {**out, "zero_point": q.zero_point}

    cal = qarray.calibrate(w, how)  # {"absmax"} or {"min", "max"}, each the scale's shape
    scale_shape = next(iter(cal.values())).shape

    def scale_zero(f):  # the scale and zero point (None: symmetric) with the range scaled by f
        return qarray.compute_scale_zero_point({k: v * f for k, v in cal.items()}, how.qtype)

    tiles = w.reshape(w.shape[:-2] + (scale_shape[-2], -1, w.shape[-1]))  # [.., in/tile, tile, out]
    lo, hi = (float(x) for x in (jnp.iinfo(how.qtype).min, jnp.iinfo(how.qtype).max))

    def tile_grid(f):  # (scale, zero point or None, and both shaped to broadcast over `tiles`)
        scale, zero = scale_zero(f)
        return scale, zero, scale[..., None, :], 0.0 if zero is None else zero.astype(jnp.float32)[..., None, :]

    def err(f):  # each tile's squared error at range factor f, in one fusion (no full-size temporaries)
        _, _, step, z = tile_grid(f)
        # codes - zero: the zero point (an integer) moved into the clip bounds, so that no full-size broadcast of
        # it is kept (it rounds differently from the final codes only at exact ties, which do not matter here)
        return jnp.sum(jnp.square(jnp.clip(jnp.round(tiles / step), lo - z, hi - z) * step - tiles), axis=-2)

    def better(i, carry):  # a loop, not unrolled: one candidate at a time (peak memory)
        best, best_err = carry
        e = err(grid[i])
        return jnp.where(e < best_err, grid[i], best), jnp.minimum(e, best_err)

    grid = jnp.asarray(INT4_CLIP_GRID, jnp.float32)
    f, _ = jax.lax.fori_loop(1, len(INT4_CLIP_GRID), better, (jnp.ones(scale_shape, jnp.float32), err(1.0)))
    scale, zero, step, z = tile_grid(f)
    # round to nearest and clip, as qwix's convert_to does (its quantize_with_scale_zero_point kept two full-size
    # float temporaries here)
    codes = jnp.clip(jnp.round(tiles / step + z), lo, hi).astype(how.qtype).reshape(w.shape)
    out = {"qvalue": codes, "scale": scale.astype(dtype)}
    return out if zero is None else {**out, "zero_point": zero}  # zero points in the qtype (qwix's convention)


def quantize_kernel(w, quant: QuantConfig, dtype=None) -> dict[str, Array]:
    """A float kernel [.., in, out] (numpy or jax) -> ``{"qvalue", "scale"}`` (scales in ``dtype``, default the
    kernel's; ``"zero_point"`` too when ``quant.asymmetric``). In fp32, round to nearest with qwix's ``qarray``
    pieces: absmax calibration (minmax when asymmetric); int4 with each tile's clipping range searched for the
    least squared error (`INT4_CLIP_GRID`)."""
    dtype = jnp.dtype(dtype or w.dtype)
    return _quantize(jnp.asarray(w, jnp.float32), quant, dtype)


def dequantize_kernel(k: dict, quant: QuantConfig, dtype=None) -> Array:
    """``{"qvalue", "scale"}`` -> the float kernel it stands for (in ``dtype``, default the scale's)."""
    scale = k["scale"] if dtype is None else k["scale"].astype(dtype)
    return qwix.dequantize(qwix.QArray(k["qvalue"], scale, k.get("zero_point"), qtype=quant.qtype))


def keeps_int_dtype(path: str) -> bool:
    """A quantized kernel's integer leaf (its values, its zero points): stored and loaded in its own int8/int4
    dtype, never cast to the model's float dtype as its scales are."""
    return path.endswith(("/kernel/qvalue", "/kernel/zero_point"))


def is_quantized_leaf(path: str) -> bool:
    return path.endswith(("/kernel/qvalue", "/kernel/scale", "/kernel/zero_point"))


def leaf_bytes(shape, dtype) -> int:
    """Bytes an array takes on a device: int4 packs two values a byte (XLA's layout on CPU, GPU and TPU);
    numpy's ``nbytes`` of an int4 array counts one byte each."""
    n = math.prod(shape)
    dt = jnp.dtype(dtype)
    if dt == jnp.int4:
        return -(-n // 2)
    return n * dt.itemsize


# --- the layer --------------------------------------------------------------------------------------------------
class QuantDense(nn.Dense):
    """nn.Dense with a quantized kernel ``{"qvalue" [in, out], "scale"[, "zero_point"]}``: the same call and bias. ``names``: the
    kernel's logical axes (the scale's follow, `QuantConfig.scale_names`). A subclass of nn.Dense so that a
    Dense subclass that adds to ``super().__call__`` (the LoRA layer) composes with it (`with_quantized_kernel`)."""

    quant: QuantConfig | None = None
    names: tuple = ()

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        shape = (inputs.shape[-1], self.features)
        q = self.quant

        def init(key):
            k = quantize_kernel(nn.initializers.lecun_normal()(key, shape, jnp.float32), q, jnp.float32)
            return {name: nn.Partitioned(v, self.names if name == "qvalue" else q.scale_names(self.names))
                    for name, v in k.items()}

        kernel = self.param("kernel", init)
        w = qwix.QArray(kernel["qvalue"], kernel["scale"].astype(self.dtype), kernel.get("zero_point"),
                        qtype=q.qtype)
        # Weight-only: qwix dequantizes the weight and multiplies in the compute dtype (its input-dequantizing
        # path for a float lhs), which XLA on GPU/TPU can fuse into the matmul's operand read.
        y = qwix.dot_general(inputs.astype(self.dtype), w, (((inputs.ndim - 1,), (0,)), ((), ())))
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,)).astype(self.dtype)
        return y.astype(self.dtype)


@functools.lru_cache(maxsize=None)
def with_quantized_kernel(dense_cls: type) -> type:
    """The quantized form of an nn.Dense class: `QuantDense` for nn.Dense, and for a subclass that adds to
    ``super().__call__`` (a LoRA layer) a class whose ``super()`` is `QuantDense`."""
    if dense_cls is nn.Dense:
        return QuantDense
    return type("Quant" + dense_cls.__name__, (dense_cls, QuantDense), {"__module__": __name__})


__all__ = ["QuantConfig", "QuantDense", "with_quantized_kernel", "QUANT_MODES", "make_quant_config", "is_quantized_kernel", "check_tiles",
           "quantize_kernel", "dequantize_kernel", "leaf_bytes", "is_quantized_leaf", "keeps_int_dtype"]
