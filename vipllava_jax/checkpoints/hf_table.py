"""The conversion table: HF VipLlava checkpoint keys <-> Flax parameter paths.

Every HF key is first normalised to one canonical form (whatever the transformers version that wrote it,
`canonical_key`), then matched against `TABLE`: (HF key pattern, Flax path, transform). Transforms are small
named functions and are exact (transposes only): the math in the weights never changes. `flax_target` maps a
key forward, `hf_key_for` a Flax path back, `export_key` gives the layout we write.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np

# --- key layouts -----------------------------------------------------------------------------------------
# (prefix as written, canonical prefix). Applied in order, first match wins.
#   transformers 4.x hub files:   vision_tower.vision_model.*, language_model.model.*, language_model.lm_head.*
#   transformers 5 save_pretrained: vision_tower.* (no vision_model.), language_model.model.*, language_model.lm_head.*
#   transformers 5 module names:  model.vision_tower.*, model.language_model.*, model.multi_modal_projector.*, lm_head.*
KEY_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("model.language_model.model.", "language_model."),
    ("model.language_model.", "language_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
)
# The layout we write back (the hub checkpoints' layout, which transformers 4.x and 5 both read).
EXPORT_PREFIXES: tuple[tuple[str, str], ...] = (
    ("vision_tower.", "vision_tower.vision_model."),
    ("language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)


def canonical_key(key: str) -> str:
    for src, dst in KEY_PREFIXES:
        if key.startswith(src):
            return dst + key[len(src):]
    return key


def export_key(canon: str) -> str:
    for src, dst in EXPORT_PREFIXES:
        if canon.startswith(src):
            return dst + canon[len(src):]
    return canon


# --- transforms (HF tensor -> Flax array, and back) ---------------------------------------------------------
def identity(x):
    return x


def linear_to_kernel(w):  # torch Linear [out, in] -> Dense kernel [in, out]
    return w.T


def conv_to_hwio(w):  # torch Conv2d [D, C, p, p] -> [p, p, C, D]
    return w.transpose(2, 3, 1, 0)


def hwio_to_conv(w):
    return w.transpose(3, 2, 0, 1)


INVERSE: dict[Callable, Callable] = {identity: identity, linear_to_kernel: linear_to_kernel, conv_to_hwio: hwio_to_conv}

# --- the table --------------------------------------------------------------------------------------------
# (canonical HF key regex, Flax path with "{L}" for a layer index, transform). `(?P<L>\d+)` captures the layer.
_V = r"vision_tower\.encoder\.layers\.(?P<L>\d+)\."
_T = r"language_model\.layers\.(?P<L>\d+)\."
TABLE: tuple[tuple[str, str, Callable], ...] = (
    (r"vision_tower\.embeddings\.class_embedding", "vision_tower/embeddings/class_embedding", identity),
    (r"vision_tower\.embeddings\.patch_embedding\.weight", "vision_tower/embeddings/patch_embedding", conv_to_hwio),
    (r"vision_tower\.embeddings\.position_embedding\.weight", "vision_tower/embeddings/position_embedding", identity),
    (r"vision_tower\.(?P<m>pre_layrnorm|post_layernorm)\.weight", "vision_tower/{m}/scale", identity),
    (r"vision_tower\.(?P<m>pre_layrnorm|post_layernorm)\.bias", "vision_tower/{m}/bias", identity),
    (_V + r"self_attn\.(?P<m>[qkv]_proj|out_proj)\.weight", "vision_tower/encoder/{L}/self_attn/{m}/kernel", linear_to_kernel),
    (_V + r"self_attn\.(?P<m>[qkv]_proj|out_proj)\.bias", "vision_tower/encoder/{L}/self_attn/{m}/bias", identity),
    (_V + r"mlp\.(?P<m>fc[12])\.weight", "vision_tower/encoder/{L}/mlp/{m}/kernel", linear_to_kernel),
    (_V + r"mlp\.(?P<m>fc[12])\.bias", "vision_tower/encoder/{L}/mlp/{m}/bias", identity),
    (_V + r"(?P<m>layer_norm[12])\.weight", "vision_tower/encoder/{L}/{m}/scale", identity),
    (_V + r"(?P<m>layer_norm[12])\.bias", "vision_tower/encoder/{L}/{m}/bias", identity),
    (r"multi_modal_projector\.projector_layernorm\.weight", "multi_modal_projector/projector_layernorm/scale", identity),
    (r"multi_modal_projector\.projector_layernorm\.bias", "multi_modal_projector/projector_layernorm/bias", identity),
    (r"multi_modal_projector\.(?P<m>linear_[12])\.weight", "multi_modal_projector/{m}/kernel", linear_to_kernel),
    (r"multi_modal_projector\.(?P<m>linear_[12])\.bias", "multi_modal_projector/{m}/bias", identity),
    (r"language_model\.embed_tokens\.weight", "language_model/embed_tokens/embedding", identity),
    (_T + r"self_attn\.(?P<m>[qkvo]_proj)\.weight", "language_model/{L}/self_attn/{m}/kernel", linear_to_kernel),
    (_T + r"self_attn\.(?P<m>[qkvo]_proj)\.bias", "language_model/{L}/self_attn/{m}/bias", identity),
    (_T + r"mlp\.(?P<m>gate_proj|up_proj|down_proj)\.weight", "language_model/{L}/mlp/{m}/kernel", linear_to_kernel),
    (_T + r"mlp\.(?P<m>gate_proj|up_proj|down_proj)\.bias", "language_model/{L}/mlp/{m}/bias", identity),
    (_T + r"(?P<m>input_layernorm|post_attention_layernorm)\.weight", "language_model/{L}/{m}/scale", identity),
    (r"language_model\.norm\.weight", "language_model/norm/scale", identity),
    (r"lm_head\.weight", "lm_head/kernel", linear_to_kernel),
)
_COMPILED = tuple((re.compile(p + r"\Z"), f, t) for p, f, t in TABLE)


@dataclasses.dataclass(frozen=True)
class Target:
    path: str  # Flax path, "/"-joined
    layer: int | None  # index into the stacked leading axis when layers are scanned
    transform: Callable


def flax_target(canon: str, scan_layers: bool) -> Target | None:
    for rx, fmt, tf in _COMPILED:
        m = rx.match(canon)
        if not m:
            continue
        g = m.groupdict()
        layer = int(g["L"]) if g.get("L") is not None else None
        lname = "layers" if scan_layers else f"layers_{layer}"
        return Target(fmt.format(L=lname, m=g.get("m")), layer if scan_layers else None, tf)
    return None


def _flax_layer_regex(fmt: str) -> re.Pattern:
    rx = re.escape(fmt).replace(r"\{L\}", r"(?P<L>layers(?:_\d+)?)").replace(r"\{m\}", r"(?P<m>[A-Za-z0-9_]+)")
    return re.compile(rx + r"\Z")


_FLAX_TO_HF = tuple((_flax_layer_regex(f), p, t) for p, f, t in TABLE)


def _hf_from_pattern(pattern: str, m: str | None, layer: int | None) -> str:
    s = pattern.replace(r"\.", ".")
    s = re.sub(r"\(\?P<L>\\d\+\)", str(layer), s)
    s = re.sub(r"\(\?P<m>[^)]*\)", m or "", s)
    return s


def hf_key_for(path: str, layer: int | None, config=None) -> tuple[str, Callable]:
    """Flax path (+ stacked layer index) -> (canonical HF key, forward transform). (``config`` is unused: kept so
    existing calls keep working.)"""
    for rx, pattern, tf in _FLAX_TO_HF:
        mm = rx.match(path)
        if not mm:
            continue
        g = mm.groupdict()
        if "L" in g:
            lname = g["L"]
            layer = int(lname.split("_")[1]) if lname.startswith("layers_") else layer
        return _hf_from_pattern(pattern, g.get("m"), layer), tf
    raise KeyError(f"no table rule produces Flax path {path}")


def hf_shape(path: str, shape) -> tuple[int, ...]:
    """The HF tensor shape of a Flax parameter of ``shape`` (one layer of a stacked one)."""
    key, tf = hf_key_for(path, 0)
    if "layers/" in path and not re.search(r"layers_\d+", path):
        shape = shape[1:]
    return INVERSE[tf](np.empty(shape, np.int8)).shape
