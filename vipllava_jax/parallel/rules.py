"""The one table that maps logical axis names to mesh axes.

Every parameter and key activation in the model carries logical axis names
(see `models/vision.py`, `models/llama.py`, `models/projector.py`). This table turns them into
mesh axes; `shardings.py` builds shardings from it, `plan.py` computes per-device bytes from it, and
`mesh.check_mesh_fits` checks divisibility against it.

Mesh axes, outermost first (the order devices are laid out in, so ``tensor``
stays inside a host and ``data`` spans hosts/slices where it can):
``data`` (pure data parallel: parameters replicated), ``fsdp`` (data parallel
with parameters sharded, ZeRO-3 style), ``tensor`` (tensor/model parallel:
heads, mlp and vocab split).
"""
from __future__ import annotations

from typing import Any, Sequence

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes, or None for replicated)
LOGICAL_AXIS_RULES: tuple[tuple[str, object], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("head_dim", None),
    # KV cache [B, S, K, H] (stacked [L, B, S, K, H] when layers are scanned; "layers" below)
    ("cache_batch", ("data", "fsdp")),
    ("cache_length", None),
    ("cache_kv_heads", "tensor"),
    # text decoder parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),
    # vision tower parameters
    ("vis_embed", "fsdp"),
    ("vis_heads", "tensor"),
    ("vis_mlp", "tensor"),
    ("vis_patch", None),
    ("vis_pos", None),
    # projector parameters
    ("vis_concat", "fsdp"),
    ("proj_hidden", "tensor"),
)

# Logical axes of the arrays that cross a jit boundary (inputs, outputs, the KV cache).
# pixel_values [I, C, H, W]: images are split like the batch when their count divides evenly.
IO_AXES: dict[str, tuple] = {
    "input_ids": ("batch", "length"),
    "attention_mask": ("batch", "length"),
    "position_ids": ("batch", "length"),
    "pixel_values": ("batch", None, None, None),
    "image_features": ("batch", "length", "act_embed"),
    "logits": ("batch", "length", "act_vocab"),
    "tokens": ("batch", "length"),
}

Rules = Sequence[tuple[str, Any]]


def rule_axes(logical_name: str, rules: Rules = LOGICAL_AXIS_RULES) -> tuple[str, ...]:
    """Mesh axes a logical name maps to (first matching rule), as a tuple (empty: replicated)."""
    for name, axes in rules:
        if name == logical_name:
            if axes is None:
                return ()
            return (axes,) if isinstance(axes, str) else tuple(axes)
    raise ValueError(f"Logical axis name {logical_name!r} has no rule in LOGICAL_AXIS_RULES (parallel/rules.py)")
