"""What each stage trains, and the optimizer: AdamW, linear warmup then cosine decay, global-norm clipping.

Parameters are split into a trainable tree and a frozen tree; only the trainable tree goes to the optimizer,
so frozen parameters have no optimizer state and no gradient is computed for them.
"""
from __future__ import annotations

import math

import flax
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


def make_optimizer(lr: float, total_steps: int, *, warmup_ratio: float = 0.03, weight_decay: float = 0.0,
                   clip_norm: float | None = 1.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8) -> optax.GradientTransformation:
    """AdamW (torch.optim.AdamW's math, decoupled weight decay) after global-norm clipping."""
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"Learning rate must be a positive number, got {lr}")
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts.append(optax.adamw(lr_schedule(lr, total_steps, warmup_ratio), b1=b1, b2=b2, eps=eps,
                             weight_decay=weight_decay))
    return optax.chain(*parts)
