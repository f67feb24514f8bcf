"""The one table that maps logical axis names to mesh axes.

Every parameter and key activation in the model carries logical axis names
(see `vision.py`, `llama.py`, `projector.py`). This table turns them into mesh
axes; `sharding.py` builds meshes and shardings from it.

Mesh axes: ``data`` (pure data parallel), ``fsdp`` (data parallel with
parameters sharded), ``tensor`` (tensor/model parallel).
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
    # KV cache [B, S, K, H]
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
