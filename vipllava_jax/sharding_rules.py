"""The one table that maps logical axis names to mesh axes.

Every parameter and key activation in the model carries logical axis names
(see `vision.py`, `llama.py`, `projector.py`). This table turns them into mesh
axes; `sharding.py` builds meshes and shardings from it, `plan.py` computes
per-device bytes from it, and `check_mesh_fits` checks divisibility against it.

Mesh axes, outermost first (the order devices are laid out in, so ``tensor``
stays inside a host and ``data`` spans hosts/slices where it can):
``data`` (pure data parallel: parameters replicated), ``fsdp`` (data parallel
with parameters sharded, ZeRO-3 style), ``tensor`` (tensor/model parallel:
heads, mlp and vocab split).
"""
from __future__ import annotations

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
CACHE_KV_AXES = ("cache_batch", "cache_length", "cache_kv_heads", "head_dim")
CACHE_MASK_AXES = ("cache_batch", "cache_length")
