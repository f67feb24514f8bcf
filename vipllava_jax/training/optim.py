"""What each stage trains, and the optimizer: AdamW (or Muon on the weight matrices, AdamW on the rest), linear
warmup then cosine decay, global-norm clipping.

Parameters are split into a trainable tree and a frozen tree; only the trainable tree goes to the optimizer,
so frozen parameters have no optimizer state and no gradient is computed for them.
"""
from __future__ import annotations

import math

import flax
import jax
import jax.numpy as jnp
import optax

from ..models.params import flat_paths

# stage -> top-level parameter groups it trains (LoRA adapters come on top for "lora").
# ViP-LLaVA: stage 1 trains the projector; stages 2 and 3 the projector and the language model; the vision
# tower is always frozen. "all" (every part, the tower included) is for training a model from scratch.
STAGES: dict[str, tuple[str, ...]] = {
    "projector": ("multi_modal_projector",),
    "full": ("multi_modal_projector", "language_model", "lm_head"),
    "lora": ("multi_modal_projector",),
    "all": ("multi_modal_projector", "language_model", "lm_head", "vision_tower"),
}


def check_stage(stage: str) -> str:
    if stage not in STAGES:
        raise ValueError(f"Unknown stage {stage!r}; choose from {list(STAGES)}")
    return stage


def _nest(flat: dict) -> dict:
    return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def is_trainable(path: str, stage: str) -> bool:
    return path.split("/", 1)[0] in STAGES[check_stage(stage)]


def split_params(params, stage: str) -> tuple[dict, dict]:
    """(trainable, frozen): two disjoint trees whose union is params."""
    flat = flat_paths(params)
    train = {p: v for p, v in flat.items() if is_trainable(p, stage)}
    frozen = {p: v for p, v in flat.items() if not is_trainable(p, stage)}
    return _nest(train), _nest(frozen)


def merge_params(*trees) -> dict:
    """The union of disjoint parameter trees (split_params' inverse)."""
    flat: dict = {}
    for t in trees:
        for p, v in flat_paths(t).items():
            if p in flat:
                raise ValueError(f"Parameter {p} is in two of the trees being merged")
            flat[p] = v
    return _nest(flat)


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """HF's rule: ceil(total * ratio)."""
    return int(math.ceil(total_steps * warmup_ratio))


def lr_schedule(lr: float, total_steps: int, warmup_ratio: float = 0.03) -> optax.Schedule:
    """Linear warmup from 0, then cosine decay to 0 at total_steps (HF get_cosine_schedule_with_warmup)."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be at least 1, got {total_steps}")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
    w = warmup_steps(total_steps, warmup_ratio)
    return optax.warmup_cosine_decay_schedule(0.0, lr, w, max(total_steps, w + 1), end_value=0.0)


OPTIMIZERS = ("adamw", "muon")

# torch.optim.Muon's defaults: the quintic Newton-Schulz coefficients, 5 steps, its eps, momentum 0.95 (Nesterov)
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
MUON_EPS = 1e-7
MUON_MOMENTUM = 0.95
MUON_RMS = 0.2  # torch's adjust_lr_fn="match_rms_adamw": updates with AdamW's typical RMS, so AdamW's lr carries over


def is_muon_matrix(path: str, shape) -> bool:
    """The parameters Muon updates: the weight matrices of the layers (``.../kernel``, 2-D, or 3-D with scanned
    layers first). Embeddings, lm_head, position embeddings, the patch convolution, norms and biases stay on AdamW,
    as in Muon's recipe (its orthogonal update suits hidden linear maps, not input/output tables)."""
    name = path.split("/")
    return name[-1] == "kernel" and len(shape) in (2, 3) and "lm_head" not in name


def newton_schulz(x, steps: int = NS_STEPS, eps: float = MUON_EPS):
    """torch.optim.Muon's orthogonalisation of x [..., A, B] (each trailing matrix; leading axes are scanned
    layers): Frobenius-normalise, then `steps` quintic Newton-Schulz iterations on the wide orientation. In
    float32, where torch uses bfloat16: two bfloat16 implementations were seen 5% apart on the same input (the
    iteration amplifies rounding), and on this CPU float32 was the faster (a 32 x 96 demo step: +4% over AdamW,
    +30% in bfloat16)."""
    a, b, c = NS_COEFFS
    out_dtype, x = x.dtype, x.astype(jnp.float32)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = jnp.swapaxes(x, -1, -2)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=(-2, -1), keepdims=True), eps)
    for _ in range(steps):
        gram = x @ jnp.swapaxes(x, -1, -2)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (jnp.swapaxes(x, -1, -2) if tall else x).astype(out_dtype)


def scale_by_muon(momentum: float = MUON_MOMENTUM, nesterov: bool = True, ns_steps: int = NS_STEPS,
                  rms: float = MUON_RMS) -> optax.GradientTransformation:
    """torch.optim.Muon's update direction for matrices [..., in, out], before the learning rate: momentum
    buffer ``buf += (1 - m)(g - buf)``, Nesterov ``g + m (buf - g)``, Newton-Schulz, times ``rms * sqrt(max(in,
    out))`` (adjust_lr_fn="match_rms_adamw"; torch's [out, in] weight is our kernel transposed, and the
    orthogonalisation commutes with transposition)."""

    def init(params):
        return optax.TraceState(trace=jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params=None):
        del params
        buf = jax.tree.map(lambda b, g: b + (1 - momentum) * (g - b), state.trace, grads)
        direction = jax.tree.map(lambda b, g: g + momentum * (b - g), buf, grads) if nesterov else buf
        out = jax.tree.map(lambda d: newton_schulz(d, ns_steps) * (rms * math.sqrt(max(d.shape[-2:]))), direction)
        return out, optax.TraceState(trace=buf)

    return optax.GradientTransformation(init, update)


def make_optimizer(lr: float, total_steps: int, *, warmup_ratio: float = 0.03, weight_decay: float = 0.0,
                   clip_norm: float | None = 1.0, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   optimizer: str = "adamw", muon_lr: float | None = None) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (torch.optim.AdamW's math, decoupled weight decay), or with
    ``optimizer="muon"`` torch.optim.Muon (adjust_lr_fn="match_rms_adamw", peak lr ``muon_lr``, default ``lr``)
    on the `is_muon_matrix` parameters and AdamW (peak ``lr``) on the rest; both warmup + cosine, the same decay."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {optimizer!r}; choose from {list(OPTIMIZERS)}")
    muon_lr = lr if muon_lr is None else muon_lr
    for name, v in (("Learning rate", lr), ("Muon learning rate", muon_lr)):
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"{name} must be a positive number, got {v}")
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    adamw = optax.adamw(lr_schedule(lr, total_steps, warmup_ratio), b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    if optimizer == "adamw":
        return optax.chain(*parts, adamw)
    # -lr * (adjusted update + wd * p): torch's p * (1 - lr * wd) - adjusted_lr * update
    muon = optax.chain(scale_by_muon(), optax.add_decayed_weights(weight_decay),
                       optax.scale_by_learning_rate(lr_schedule(muon_lr, total_steps, warmup_ratio)))

    def labels(params):
        def label(path, v):
            return "muon" if is_muon_matrix("/".join(str(getattr(k, "key", k)) for k in path), v.shape) else "adamw"
        return jax.tree_util.tree_map_with_path(label, params)

    return optax.chain(*parts, optax.multi_transform({"muon": muon, "adamw": adamw}, labels))
