"""Architecture configs (one per HF config.json section) and the runtime layout beside them.

* `HFConfig`: the base of the architecture configs, frozen dataclasses that mirror one section of an HF
  ``config.json`` (``from_hf(dict)`` / ``to_hf()``, ``replace``). They say what the checkpoint *is*.
* `CLIPVisionConfig`, `LlamaConfig` (with `RopeScaling`), `VipLlavaConfig`.
* `Runtime`: how the JAX modules are laid out and run (``scan_layers``, ``remat_policy``, ``attn_impl``). It is
  not part of a checkpoint, so it sits beside the config: ``VipLlavaForConditionalGeneration(config, runtime)``.

A bad field is a ``ValueError``; reading a model directory's config.json (a `CheckpointError` naming the file)
is `vipllava_jax.checkpoints.config_file`.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, ClassVar

from .layers import check_activation, check_attn_impl, check_remat
from .quantize import QuantConfig, check_tiles

DEFAULT_FEATURE_LAYERS = (-2, -5, -8, -11, 6)


def check_field_types(d: dict, section: str, *, positive: tuple[str, ...] = (), ints: tuple[str, ...] = (),
                      floats: tuple[str, ...] = (), bools: tuple[str, ...] = ()) -> None:
    """Types of a config.json section's fields (those present): positive integers, integers (or null), numbers,
    booleans. JSON strings such as "4096" are refused, naming the field, rather than failing deep inside."""
    def bad(f, want):
        raise ValueError(f"{section}{f}={d[f]!r} must be {want}")
    for f in positive:
        if f in d and (not isinstance(d[f], int) or isinstance(d[f], bool) or d[f] < 1):
            bad(f, "a positive integer")
    for f in ints:
        v = d.get(f)
        vs = v if isinstance(v, (list, tuple)) else (v,)
        if f in d and not all(x is None or (isinstance(x, int) and not isinstance(x, bool)) for x in vs):
            bad(f, "an integer (or null)")
    for f in floats:
        if f in d and (not isinstance(d[f], (int, float)) or isinstance(d[f], bool)):
            bad(f, "a number")
    for f in bools:
        if f in d and not isinstance(d[f], bool):
            bad(f, "true or false")


@dataclasses.dataclass(frozen=True)
class Runtime:
    """How the JAX modules are laid out and run; none of it is in a checkpoint.

    scan_layers: stack the layers of both towers under ``nn.scan`` (one traced layer: training, compile time);
      the parameter tree then holds ``layers`` with a leading layer axis instead of ``layers_0`` ...
    remat_policy: ``none``, ``full``, ``dots``, ``dots_no_batch``: wrap each layer in ``nn.remat``.
    attn_impl: the decoder's attention (``auto``, ``cudnn``, ``xla``, ``jax``; see `layers.attention`).
    The numbers are the same whatever the layout (tested)."""

    scan_layers: bool = False
    remat_policy: str = "none"
    attn_impl: str = "auto"

    def __post_init__(self):
        check_remat(self.remat_policy)
        check_attn_impl(self.attn_impl)

    def replace(self, **kw) -> "Runtime":
        return dataclasses.replace(self, **kw)


def check_runtime(runtime, owner: str) -> None:
    """A module's ``runtime`` field must be a `Runtime` (catches a dtype passed where the runtime goes)."""
    if not isinstance(runtime, Runtime):
        raise TypeError(f"{owner}(config, runtime, dtype): runtime must be a Runtime, got {runtime!r}")


@dataclasses.dataclass(frozen=True)
class HFConfig:
    """Base of the architecture configs: a frozen dataclass mirroring one section of an HF ``config.json``.

    Subclasses name the fields written back (`HF_FIELDS`) and the section's ``model_type``; ``to_hf`` writes
    those fields plus ``model_type`` (hooks: `_hf_extra`), ``from_hf`` reads them back, checked."""

    MODEL_TYPE: ClassVar[str] = ""
    HF_FIELDS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_hf(cls, d: dict, **overrides):
        raise NotImplementedError

    @classmethod
    def _hf_kwargs(cls, d: dict) -> dict[str, Any]:
        return {f: d[f] for f in cls.HF_FIELDS if f in d}

    def _hf_extra(self, out: dict) -> None:
        """Adjust ``to_hf``'s dict in place (fields that are not written as they are stored)."""

    def to_hf(self) -> dict:
        out = {f: getattr(self, f) for f in self.HF_FIELDS}
        self._hf_extra(out)
        out["model_type"] = self.MODEL_TYPE
        return out

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)


# --- vision tower -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(HFConfig):
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768  # unused by VipLlava; kept so the config round-trips

    MODEL_TYPE: ClassVar[str] = "clip_vision_model"
    HF_FIELDS: ClassVar[tuple[str, ...]] = (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size",
        "num_channels", "hidden_act", "layer_norm_eps", "projection_dim")

    def __post_init__(self):
        check_activation(self.hidden_act, "vision_config.hidden_act")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"vision_config.hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"vision_config.image_size={self.image_size} is not divisible by patch_size={self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf(cls, d: dict, **overrides) -> "CLIPVisionConfig":
        mt = d.get("model_type", "clip_vision_model")
        if mt == "clip" and "vision_config" in d:  # a full CLIP config: take its vision half
            d = d["vision_config"]
        elif mt not in ("clip_vision_model",):
            raise ValueError(f"vision_config has model_type {mt!r}; only CLIP vision towers ('clip_vision_model') are supported")
        check_field_types(d, "vision_config.", positive=(
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
            "patch_size", "num_channels", "projection_dim"), floats=("layer_norm_eps",))
        kw = cls._hf_kwargs(d)
        kw.update(overrides)
        return cls(**kw)


# --- decoder ----------------------------------------------------------------------------------------------
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float | None = None  # llama3
    high_freq_factor: float | None = None  # llama3
    original_max_position_embeddings: int | None = None  # llama3

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"Unsupported rope type {self.rope_type!r}; supported: {list(ROPE_TYPES)}")
        if self.rope_type == "llama3" and None in (self.low_freq_factor, self.high_freq_factor,
                                                   self.original_max_position_embeddings):
            raise ValueError("rope type 'llama3' needs factor, low_freq_factor, high_freq_factor and "
                             "original_max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class LlamaConfig(HFConfig):
    vocab_size: int = 32064
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None

    MODEL_TYPE: ClassVar[str] = "llama"
    HF_FIELDS: ClassVar[tuple[str, ...]] = (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "attention_bias", "mlp_bias",
        "hidden_act", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")

    def __post_init__(self):
        check_activation(self.hidden_act, "text_config.hidden_act")
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"text_config.num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")

    @classmethod
    def from_hf(cls, d: dict, **overrides) -> "LlamaConfig":
        mt = d.get("model_type", "llama")
        if mt != "llama":
            raise ValueError(f"text_config has model_type {mt!r}; only Llama decoders ('llama') are supported")
        check_field_types(d, "text_config.", positive=(
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings"), ints=("num_key_value_heads", "head_dim", "bos_token_id", "eos_token_id",
                                              "pad_token_id"),
            floats=("rms_norm_eps", "rope_theta"), bools=("attention_bias", "mlp_bias"))
        for f in ("num_key_value_heads", "head_dim"):
            if d.get(f) is not None and d[f] < 1:
                raise ValueError(f"text_config.{f}={d[f]!r} must be a positive integer")
        kw = cls._hf_kwargs(d)
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = tuple(kw["eos_token_id"])
        if "num_key_value_heads" not in kw or kw["num_key_value_heads"] is None:
            kw["num_key_value_heads"] = d.get("num_attention_heads", cls.num_attention_heads)
        # transformers 5 writes `rope_parameters`; 4.x writes `rope_theta` + `rope_scaling`.
        rp = dict(d.get("rope_parameters") or {})
        rs = dict(d.get("rope_scaling") or {})
        theta = rp.pop("rope_theta", d.get("rope_theta", cls.rope_theta))
        spec = rp or rs
        rope_type = spec.pop("rope_type", spec.pop("type", "default"))
        if float(spec.pop("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError("partial_rotary_factor != 1 is not supported")
        known = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
        if rope_type != "default":
            unknown = set(spec) - known
            if unknown:
                raise ValueError(f"Unsupported rope_scaling fields {sorted(unknown)} for rope type {rope_type!r}")
        kw["rope_theta"] = float(theta)
        kw["rope_scaling"] = RopeScaling(rope_type=rope_type, **{k: v for k, v in spec.items() if k in known}) \
            if rope_type != "default" else RopeScaling()
        kw.update(overrides)
        return cls(**kw)

    def _hf_extra(self, out: dict) -> None:
        if isinstance(out["eos_token_id"], tuple):
            out["eos_token_id"] = list(out["eos_token_id"])
        rs = self.rope_scaling
        out["rope_theta"] = self.rope_theta
        if rs.rope_type == "default":
            out["rope_scaling"] = None
        else:
            out["rope_scaling"] = {k: v for k, v in dataclasses.asdict(rs).items() if v is not None}


# --- the whole model --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VipLlavaConfig(HFConfig):
    vision: CLIPVisionConfig = CLIPVisionConfig()
    text: LlamaConfig = LlamaConfig()
    image_token_index: int = 32000
    projector_hidden_act: str = "gelu"
    projector_layernorm_eps: float = 1e-5
    vision_feature_layers: int | tuple[int, ...] = DEFAULT_FEATURE_LAYERS
    image_seq_length: int = 576
    tie_word_embeddings: bool = False
    # Weight-only int8/int4 kernels (models.quantize); config.json's "quantization_config" when written by
    # vipllava-jax convert --quantize. None: every weight in the float dtype it is loaded in.
    quantization: QuantConfig | None = None

    MODEL_TYPE: ClassVar[str] = "vipllava"

    def __post_init__(self):
        check_activation(self.projector_hidden_act, "projector_hidden_act")
        n = self.vision.num_patches
        if self.image_seq_length != n:  # HF's model ignores the field: features come from the tower's geometry
            warnings.warn(f"config image_seq_length={self.image_seq_length} disagrees with the vision tower, which "
                          f"gives (image_size // patch_size) ** 2 = {n} features per image; like transformers, "
                          f"the model uses {n}", stacklevel=3)
            object.__setattr__(self, "image_seq_length", n)
        layers = self.vision_feature_layers
        if isinstance(layers, list):
            object.__setattr__(self, "vision_feature_layers", tuple(layers))
            layers = self.vision_feature_layers
        n = self.vision.num_hidden_layers + 1
        for i in (layers,) if isinstance(layers, int) else layers:
            if not -n <= i < n:
                raise ValueError(f"vision_feature_layers entry {i} is out of range for a vision tower with {n} "
                                 f"hidden states")
        if self.quantization is not None:
            check_tiles(self)

    @property
    def num_feature_layers(self) -> int:
        return 1 if isinstance(self.vision_feature_layers, int) else len(self.vision_feature_layers)

    @classmethod
    def from_hf(cls, d: dict, **overrides) -> "VipLlavaConfig":
        """Build from an HF ``config.json`` dict (transformers 4.x or 5.x). The layout (scan, remat, attention)
        is not in a checkpoint: give a `Runtime` to the module instead."""
        mt = d.get("model_type")
        if mt != "vipllava":
            arch = d.get("architectures")
            raise ValueError(f"config.json describes model_type {mt!r} (architectures {arch}), not a VipLlava "
                             f"checkpoint (model_type 'vipllava')")
        for section in ("vision_config", "text_config"):  # no silent fallback to the 7B defaults
            if not isinstance(d.get(section), dict):
                what = "missing" if d.get(section) is None else f"a {type(d[section]).__name__}, not an object"
                raise ValueError(f"config has no usable {section!r} section ({what}); a VipLlava config.json "
                                 f"describes both towers")
        check_field_types(d, "", positive=("image_seq_length",), ints=("image_token_index", "image_token_id",
                                                                       "vision_feature_layer"),
                          floats=("projector_layernorm_eps",))
        vision = CLIPVisionConfig.from_hf(d["vision_config"])
        text = LlamaConfig.from_hf(d["text_config"])
        kw: dict[str, Any] = {}
        for f in ("image_token_index", "projector_hidden_act", "projector_layernorm_eps", "image_seq_length"):
            if f in d:
                kw[f] = d[f]
        if "image_token_id" in d and "image_token_index" not in d:
            kw["image_token_index"] = d["image_token_id"]
        layers = d.get("vision_feature_layer", d.get("vision_feature_layers", DEFAULT_FEATURE_LAYERS))
        kw["vision_feature_layers"] = layers if isinstance(layers, int) else tuple(layers)
        tie = d.get("tie_word_embeddings")
        kw["tie_word_embeddings"] = bool(text.tie_word_embeddings if tie is None else tie)
        if d.get("quantization_config") is not None:
            kw["quantization"] = QuantConfig.from_hf(d["quantization_config"])
        kw.update(overrides)
        return cls(vision=vision, text=text, **kw)

    def to_hf(self) -> dict:
        layers = self.vision_feature_layers
        return {
            "architectures": ["VipLlavaForConditionalGeneration"],
            "model_type": self.MODEL_TYPE,
            "vision_config": self.vision.to_hf(),
            "text_config": self.text.to_hf(),
            "image_token_index": self.image_token_index,
            "projector_hidden_act": self.projector_hidden_act,
            "projector_layernorm_eps": self.projector_layernorm_eps,
            "vision_feature_layer": layers if isinstance(layers, int) else list(layers),
            "image_seq_length": self.image_seq_length,
            "tie_word_embeddings": self.tie_word_embeddings,
        } | ({} if self.quantization is None else {"quantization_config": self.quantization.to_hf()})

