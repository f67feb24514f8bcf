"""LoRA adapters in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``), read and written, and
merged into a parameter tree.

PEFT keys (``VipLlavaForConditionalGeneration`` under transformers 5, as ``peft.get_peft_model(...)
.save_pretrained`` writes them): ``base_model.model.<module>.lora_A.weight`` [r, in] and ``.lora_B.weight``
[out, r], ``<module>`` e.g. ``model.language_model.layers.0.self_attn.q_proj`` (transformers 4.x's
``language_model.model.layers.0...`` is read too); a module in ``modules_to_save`` is stored whole under its
own name (``base_model.model.model.multi_modal_projector.linear_1.weight``). The layer computes
``x W^T + (lora_alpha / r) (x A^T) B^T``.

Ours (`training.lora`): ``language_model/layers_i/(self_attn|mlp)/<name>/lora_a`` [.., in, r] and ``lora_b``
[.., r, out] (stacked on a leading L axis when layers are scanned): A and B transposed, the same math.

Only what vipllava-jax trains is read: LoRA on the language model's q/k/v/o/gate/up/down projections, one rank
and alpha for all, the projector in ``modules_to_save``. DoRA, rsLoRA, LoRA biases, per-module ranks or alphas,
other target or saved modules are refused by name (`AdapterError`), as are keys or shapes that do not fit the
base model.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from ..models.params import flat_paths, unflatten_paths
from ..models.quantize import dequantize_kernel, quantize_kernel
from .config_file import CheckpointError
from .hf_io import SafetensorsFile, save_safetensors
from .hf_table import INVERSE, canonical_key, flax_target, hf_key_for

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
LM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SAVABLE_MODULES = ("multi_modal_projector",)  # modules_to_save we read and write (the LoRA stage trains it)
# The HF module-name prefixes (transformers 5) of the parts we write: canonical -> module name.
_MODULE_PREFIXES = (("language_model.", "model.language_model."),
                    ("multi_modal_projector.", "model.multi_modal_projector."))
# adapter_config.json fields whose non-default values we cannot honour: field -> the values we accept.
_UNSUPPORTED = {
    "use_dora": (False, None), "use_rslora": (False, None), "bias": ("none", None), "lora_bias": (False, None),
    "rank_pattern": ({}, None), "alpha_pattern": ({}, None), "layers_to_transform": (None,),
    "layers_pattern": (None, [], ""), "fan_in_fan_out": (False, None), "target_parameters": (None, []),
    "trainable_token_indices": (None,), "use_qalora": (False, None), "layer_replication": (None,),
    "alora_invocation_tokens": (None,),
}
_WHY = {"use_dora": "DoRA", "use_rslora": "rsLoRA (alpha / sqrt(r))", "bias": "trained biases",
        "lora_bias": "LoRA biases", "rank_pattern": "per-module ranks", "alpha_pattern": "per-module alphas"}


class AdapterError(CheckpointError):
    """A PEFT adapter that does not fit the base model, or uses what vipllava-jax does not compute."""


def peft_target_regex(targets) -> str:
    """PEFT's ``target_modules`` as a regex (PEFT full-matches a string against every module name): the
    language model's projections only, in transformers 5's and 4.x's module names; the vision tower's q/k/v
    never match."""
    return r".*language_model\.(?:model\.)?layers\.\d+\.(?:self_attn|mlp)\.(?:" + "|".join(targets) + ")"


@dataclass(frozen=True)
class PeftAdapter:
    """An adapter read into our layout: ``lora`` ({X/lora_a, X/lora_b} nested, the base's layer layout),
    ``modules`` ({param path: array}, whole replacements, e.g. the projector), rank, alpha and targets."""
    rank: int
    alpha: float
    targets: tuple[str, ...]
    lora: dict
    modules: dict
    path: Path

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _param_shape(v) -> tuple:
    v = v.value if isinstance(v, nn.Partitioned) else v
    return tuple(v.shape)


def _kernel_shapes(params) -> dict[str, tuple]:
    """Flax kernel path ("X/kernel") -> shape, a quantized kernel ("X/kernel/qvalue") by its qvalue's."""
    out = {}
    for p, v in flat_paths(params).items():
        if p.endswith("/kernel"):
            out[p] = _param_shape(v)
        elif p.endswith("/kernel/qvalue"):
            out[p[: -len("/qvalue")]] = _param_shape(v)
    return out


def read_adapter_config(adapter_dir) -> dict:
    d = Path(adapter_dir)
    p = d / ADAPTER_CONFIG
    if not d.is_dir():
        raise AdapterError(f"Adapter directory {d} does not exist (it should hold {ADAPTER_CONFIG} and "
                           f"{ADAPTER_WEIGHTS})")
    if not p.exists():
        raise AdapterError(f"No {ADAPTER_CONFIG} in {d}: not a PEFT adapter directory")
    try:
        cfg = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"{p}: not readable JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{p}: a JSON {type(cfg).__name__}, not an object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{p}: peft_type {cfg.get('peft_type')!r}; only LoRA adapters (LORA) are supported")
    for k, ok in _UNSUPPORTED.items():
        if k in cfg and cfg[k] not in ok:
            raise AdapterError(f"{p}: {k}={cfg[k]!r} ({_WHY.get(k, 'a PEFT feature')}) is not supported: vipllava-jax "
                               f"computes plain LoRA, x W + (lora_alpha / r) (x A) B")
    mts = cfg.get("modules_to_save") or []
    bad = [m for m in mts if m not in SAVABLE_MODULES]
    if bad:
        raise AdapterError(f"{p}: modules_to_save {bad} is not supported (only {list(SAVABLE_MODULES)})")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not (isinstance(r, int) and not isinstance(r, bool) and r > 0):
        raise AdapterError(f"{p}: r={r!r} is not a positive integer")
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha) and alpha > 0):
        raise AdapterError(f"{p}: lora_alpha={alpha!r} is not a positive number")
    return cfg


_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<ab>[AB])\.weight\Z")


def read_adapter(adapter_dir, base_params) -> PeftAdapter:
    """Read a PEFT LoRA adapter onto the layout of ``base_params`` (concrete or abstract; unrolled or scanned;
    quantized kernels by their shapes). Every key must name a language-model projection of the base (or a
    module in modules_to_save) with the shapes the base and ``r`` give; anything else is an `AdapterError`
    naming the key."""
    d = Path(adapter_dir)
    cfg = read_adapter_config(d)
    rank, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    wpath = d / ADAPTER_WEIGHTS
    if not wpath.exists():
        alt = d / "adapter_model.bin"
        raise AdapterError(f"No {ADAPTER_WEIGHTS} in {d}" + (" (adapter_model.bin is not read: save it with "
                                                             "safe_serialization=True)" if alt.exists() else ""))
    f = SafetensorsFile(wpath)
    kernels = _kernel_shapes(base_params)
    base_flat = {p: _param_shape(v) for p, v in flat_paths(base_params).items()}
    scan = any("/layers/" in p for p in kernels)
    found: dict[str, dict[int | None, np.ndarray]] = {}  # our lora path -> {layer (scanned) or None: array}
    modules: dict[str, np.ndarray] = {}
    module_layers: dict[str, dict[int, np.ndarray]] = {}
    for key in f.keys():
        if not key.startswith(PEFT_PREFIX):
            raise AdapterError(f"{wpath}: key {key!r} does not start with {PEFT_PREFIX!r}: not a PEFT adapter of "
                               f"the whole model")
        name = key[len(PEFT_PREFIX):]
        if not f.is_float(key):
            raise AdapterError(f"{wpath}: key {key!r} is not a floating-point tensor")
        m = _LORA_KEY.match(name)
        if m is None:
            if ".lora_" in name or "lora_magnitude" in name:
                raise AdapterError(f"{wpath}: key {key!r} is a LoRA variant vipllava-jax does not compute (only "
                                   f"lora_A / lora_B weights)")
            canon = canonical_key(name)
            tgt = flax_target(canon, scan)
            if tgt is None or canon.split(".", 1)[0] not in SAVABLE_MODULES or tgt.path not in base_flat:
                raise AdapterError(f"{wpath}: key {key!r} is neither a LoRA weight of a language-model projection nor "
                                   f"a weight of a module vipllava-jax reads from modules_to_save "
                                   f"({list(SAVABLE_MODULES)})")
            arr = tgt.transform(f.get(key).astype(np.float32))
            want = base_flat[tgt.path][1:] if tgt.layer is not None else base_flat[tgt.path]
            if tuple(arr.shape) != tuple(want):
                raise AdapterError(f"{wpath}: key {key!r} has shape {list(f.shape(key))}, the base model's "
                                   f"{tgt.path} needs {list(want)} (transposed as HF stores it)")
            if tgt.layer is None:
                modules[tgt.path] = arr
            else:
                module_layers.setdefault(tgt.path, {})[tgt.layer] = arr
            continue
        canon = canonical_key(m.group("module") + ".weight")
        tgt = flax_target(canon, scan)
        proj = canon.rsplit(".", 2)[-2] if canon.count(".") >= 2 else ""
        if (tgt is None or not canon.startswith("language_model.layers.") or proj not in LM_PROJECTIONS
                or tgt.path not in kernels):
            raise AdapterError(f"{wpath}: key {key!r} adapts {m.group('module')}, which is not a projection of this "
                               f"base model's language model (vipllava-jax adapts only "
                               f"language_model.layers.N.(self_attn|mlp).({'|'.join(LM_PROJECTIONS)}))")
        shape = kernels[tgt.path][1:] if tgt.layer is not None else kernels[tgt.path]
        n_in, n_out = shape
        want = [rank, n_in] if m.group("ab") == "A" else [n_out, rank]
        if list(f.shape(key)) != want:
            raise AdapterError(f"{wpath}: key {key!r} has shape {list(f.shape(key))}; this base model with r={rank} "
                               f"needs {want}")
        leaf = tgt.path[: -len("kernel")] + ("lora_a" if m.group("ab") == "A" else "lora_b")
        found.setdefault(leaf, {})[tgt.layer] = f.get(key).astype(np.float32).T
    if not found:
        raise AdapterError(f"{wpath}: no lora_A / lora_B weights in it")
    for leaf in list(found):
        other = leaf[: -1] + ("b" if leaf.endswith("a") else "a")
        if other not in found:
            raise AdapterError(f"{wpath}: {leaf} has lora_{leaf[-1].upper()} but no lora_{other[-1].upper()}")
    lora = {}
    for leaf, by_layer in found.items():
        if scan:
            n_layers = kernels[leaf.rsplit("/", 1)[0] + "/kernel"][0]
            missing = [i for i in range(n_layers) if i not in by_layer]
            if missing:
                key, _ = hf_key_for(leaf[: -len("lora_a")] + "kernel", missing[0])
                raise AdapterError(f"{wpath}: no adapter for layer {missing[0]} of {leaf} (expected "
                                   f"{PEFT_PREFIX}...{key[:-len('.weight')]}.lora_A/B.weight): an adapter on some "
                                   f"layers only is not supported with scanned layers")
            lora[leaf] = np.stack([by_layer[i] for i in range(n_layers)])
        else:
            lora[leaf] = by_layer[None]
    for path, by_layer in module_layers.items():
        modules[path] = np.stack([by_layer[i] for i in range(len(by_layer))])
    targets = tuple(sorted({p.split("/")[-2] for p in lora}, key=LM_PROJECTIONS.index))
    return PeftAdapter(rank=rank, alpha=alpha, targets=targets, lora=unflatten_paths(lora), modules=modules, path=d)


def adapter_targets(adapter_dir) -> tuple[str, ...]:
    """The projections an adapter's weights adapt (q_proj, v_proj, ...), from its key names alone (no base)."""
    wpath = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not wpath.exists():
        raise AdapterError(f"No {ADAPTER_WEIGHTS} in {adapter_dir}")
    names = set()
    for key in SafetensorsFile(wpath).keys():
        m = _LORA_KEY.match(key)
        if m:
            names.add(m.group("module").rsplit(".", 1)[-1])
    bad = sorted(names - set(LM_PROJECTIONS))
    if bad or not names:
        raise AdapterError(f"{wpath}: adapts {bad or 'nothing'}; vipllava-jax adapts only {list(LM_PROJECTIONS)}")
    return tuple(t for t in LM_PROJECTIONS if t in names)


def _lora_delta(a, b, scale: float):
    return scale * jnp.einsum("...ir,...ro->...io", jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))


def merge_lora(params, lora: dict, scale: float, quant=None):
    """``params`` with each adapted kernel W replaced by ``W + scale * A @ B`` (computed in fp32, cast to W's
    dtype; a quantized kernel is dequantized first and comes back as a float kernel in its scales' dtype, so
    ``quant`` (the `QuantConfig`) is needed then). Under jit or eagerly; W's sharding is kept."""
    if not lora:
        return params
    flat = dict(flat_paths(params))
    ad = flat_paths(lora)
    for pa in ad:
        if not pa.endswith("/lora_a"):
            continue
        base = pa[: -len("/lora_a")]
        delta = _lora_delta(ad[pa], ad[base + "/lora_b"], scale)
        if base + "/kernel/qvalue" in flat:
            if quant is None:
                raise ValueError(f"{base}/kernel is quantized: merge_lora needs its QuantConfig (quant=)")
            w = dequantize_kernel({leaf: flat.pop(f"{base}/kernel/{leaf}") for leaf in quant.leaves}, quant)
        else:
            w = flat[base + "/kernel"]
        merged = (w.astype(jnp.float32) + delta).astype(w.dtype)
        sharding = getattr(w, "sharding", None)
        if isinstance(w, jax.Array) and not isinstance(w, jax.core.Tracer) and sharding is not None:
            merged = jax.device_put(merged, sharding)
        flat[base + "/kernel"] = merged
    return unflatten_paths(flat)


def apply_adapter(params, adapter: PeftAdapter, quant=None):
    """The base ``params`` with ``adapter`` merged in (`merge_lora`) and its saved modules put in place (in the
    dtype and sharding of the parameters they replace)."""
    params = merge_lora(params, adapter.lora, adapter.scale, quant)
    if not adapter.modules:
        return params
    flat = dict(flat_paths(params))
    for path, arr in adapter.modules.items():
        old = flat[path]
        new = jnp.asarray(arr, old.dtype)
        flat[path] = jax.device_put(new, old.sharding) if isinstance(old, jax.Array) else new
    return unflatten_paths(flat)


def requantize(merged, like, quant):
    """``merged`` (from `merge_lora` / `apply_adapter` on the quantized tree ``like``) with each kernel that was
    quantized in ``like`` and came back float quantized again (``quant``), its scales in their old dtype and
    every leaf on its old sharding: the tree keeps ``like``'s layout."""
    if quant is None:
        return merged
    old, flat = flat_paths(like), dict(flat_paths(merged))
    for path in [p for p in old if p.endswith("/kernel/qvalue")]:
        k = path[: -len("/qvalue")]
        if k not in flat:
            continue
        q = quantize_kernel(flat.pop(k), quant, old[k + "/scale"].dtype)
        for leaf in quant.leaves:
            ref = old[f"{k}/{leaf}"]
            flat[f"{k}/{leaf}"] = jax.device_put(q[leaf], ref.sharding) if isinstance(ref, jax.Array) else q[leaf]
    return unflatten_paths(flat)


def _module_name(canon: str) -> str:
    for src, dst in _MODULE_PREFIXES:
        if canon.startswith(src):
            return dst + canon[len(src):]
    raise ValueError(f"no PEFT module name for {canon}")


def save_adapter(out_dir, lora: dict, *, rank: int, alpha: float, targets, modules: dict | None = None,
                 base_model: str | None = None) -> Path:
    """Write ``out_dir/adapter_config.json`` and ``adapter_model.safetensors`` that ``peft.PeftModel
    .from_pretrained(VipLlavaForConditionalGeneration.from_pretrained(base), out_dir)`` loads: ``lora`` (our
    layout, host or device arrays, scanned or unrolled) as lora_A / lora_B, ``modules`` (a params subtree such
    as {"multi_modal_projector": ...}) whole, listed in ``modules_to_save``. Float32 tensors. Writes into
    ``out_dir`` (the caller makes it atomic)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}

    def layers_of(path, value):
        value = np.asarray(jax.device_get(value.value if isinstance(value, nn.Partitioned) else value), np.float32)
        if "/layers/" in path:
            return [(i, value[i]) for i in range(value.shape[0])]
        return [(None, value)]

    for path, value in flat_paths(lora).items():
        kernel = path.rsplit("/", 1)[0] + "/kernel"
        ab = "A" if path.endswith("/lora_a") else "B"
        for i, v in layers_of(path, value):
            canon, _ = hf_key_for(kernel, i)
            tensors[f"{PEFT_PREFIX}{_module_name(canon)[: -len('.weight')]}.lora_{ab}.weight"] = \
                np.ascontiguousarray(v.T)
    saved = sorted({p.split("/", 1)[0] for p in flat_paths(modules or {})})
    for path, value in flat_paths(modules or {}).items():
        for i, v in layers_of(path, value):
            canon, tf = hf_key_for(path, i)
            tensors[PEFT_PREFIX + _module_name(canon)] = np.ascontiguousarray(INVERSE[tf](v))
    save_safetensors(out / ADAPTER_WEIGHTS, tensors, {"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": None, "r": int(rank), "lora_alpha": float(alpha),
        "target_modules": peft_target_regex(tuple(targets)), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": saved or None,
        "init_lora_weights": True, "inference_mode": True, "base_model_name_or_path": base_model,
        "revision": None, "auto_mapping": {"base_model_class": "VipLlavaForConditionalGeneration",
                                           "parent_library": "transformers.models.vipllava.modeling_vipllava"},
    }
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "AdapterError", "PeftAdapter", "adapter_targets", "apply_adapter",
           "merge_lora", "peft_target_regex", "read_adapter", "read_adapter_config", "requantize", "save_adapter"]
