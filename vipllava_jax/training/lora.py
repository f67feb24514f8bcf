"""LoRA adapters on the language model's linear layers, kept beside the frozen weights, never merged in training.

For a target kernel W [.., in, out] (a leading L axis when layers are scanned) the adapter is
A [.., in, r] and B [.., r, out], and the layer computes ``x W + (alpha / r) (x A) B`` (`models.layers.LoraDense`
reads them from the model's "lora" variable collection, `lora_collection`). W is an input the gradient is not
taken for: no [in, out] weight gradient is ever formed, and W may be bf16 or quantized (QLoRA). B starts at zero,
so the adapted model starts equal to the base model (as PEFT). Only A and B (and whatever else the stage trains)
get gradients and optimizer state. Export merges W + (alpha / r) A B (`checkpoints.adapter.merge_lora`, which
also reads and writes PEFT's adapter format): the same function up to rounding.

Einsum letters: L layers, I in features, O out features, R rank.
"""
from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import flax

from ..models.params import flat_paths

# HF PEFT names; ViP-LLaVA's LoRA recipe adapts every Llama linear (not lm_head, projector or tower).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_TARGET_RE = re.compile(r"^language_model/layers(_\d+)?/(self_attn|mlp)/(\w+)/kernel(/qvalue)?$")  # or quantized


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 128
    alpha: float = 256.0
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self):
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", tuple(t.strip() for t in self.targets.split(",") if t.strip()))
        unknown = set(self.targets) - set(LORA_TARGETS)
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets {sorted(unknown) or '(none)'} are not Llama linear layers; choose "
                             f"from {list(LORA_TARGETS)}")
        if not (isinstance(self.rank, int) and self.rank > 0):
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"LoRA alpha must be a positive number, got {self.alpha!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def target_paths(params, cfg: LoraConfig) -> list[str]:
    """Flax paths of the kernels the adapters attach to (``X/kernel``, or ``X/kernel/qvalue`` when quantized)."""
    out = []
    for p in flat_paths(params):
        m = _TARGET_RE.match(p)
        if m and m.group(3) in cfg.targets:
            out.append(p)
    if not out:
        raise ValueError(f"No LoRA target {list(cfg.targets)} found in the language model's parameters")
    return sorted(out)


def _nest(flat: dict) -> dict:
    return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def _kernel_axes(param_axes: dict, adapter_path: str) -> tuple:
    k = adapter_path.rsplit("/", 1)[0] + "/kernel"
    return tuple(param_axes[k] if k in param_axes else param_axes[k + "/qvalue"])


def init_lora(params, cfg: LoraConfig, key: jax.Array, dtype=jnp.float32) -> dict:
    """The adapters as a tree beside the params: for a kernel at ``X/kernel`` [.., in, out], ``X/lora_a``
    [.., in, r] ~ kaiming-uniform (as PEFT) and ``X/lora_b`` [.., r, out] = 0. Concrete or abstract params."""
    flat = flat_paths(params)
    out = {}
    for i, p in enumerate(target_paths(params, cfg)):
        shape = flat[p].shape
        lead, (n_in, n_out) = shape[:-2], shape[-2:]
        bound = 1.0 / math.sqrt(n_in)  # kaiming_uniform(a=sqrt(5)) on torch's [r, in] weight
        base = p[: p.rindex("/kernel")]
        out[base + "/lora_a"] = jax.random.uniform(jax.random.fold_in(key, i), lead + (n_in, cfg.rank), dtype,
                                                   -bound, bound)
        out[base + "/lora_b"] = jnp.zeros(lead + (cfg.rank, n_out), dtype)
    return _nest(out)


def lora_collection(lora: dict, cfg: LoraConfig) -> dict:
    """The model's "lora" variable collection for an adapter tree: the same paths, A as is and B times alpha / r
    (folded in here, [r, out] multiplies, so the layer needs no scale; the gradient flows through it)."""
    return _nest({p: cfg.scale * v if p.endswith("/lora_b") else v for p, v in flat_paths(lora).items()})


def lora_logical_axes(param_axes: dict[str, tuple], lora: dict) -> dict:
    """Logical axis names of each adapter leaf: A keeps the kernel's input axis, B its output axis; the rank
    axis is replicated."""
    out = {}
    for pa in flat_paths(lora):
        names = _kernel_axes(param_axes, pa)
        out[pa] = names[:-1] + (None,) if pa.endswith("/lora_a") else names[:-2] + (None, names[-1])
    return _nest(out)
