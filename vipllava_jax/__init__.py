"""VipLlava (ViP-LLaVA) in JAX/Flax.

The rooms, each importing only the ones before it: `models` (configs, `Runtime`, modules, presets, the parameter
tree) and `data` (images, prompts, records, processor, visual prompts, the synthetic task) -> `parallel` (meshes,
shardings, planner, multi-host) -> `checkpoints` (HF and orbax) -> `generation` | `training` -> `evals` |
`testing` -> `cli`. This module exports the six entry points (`pipeline`: chat messages in, answers out, as HF's
``image-text-to-text`` pipeline); everything else is imported from its room (``from vipllava_jax.data import
Processor``).
"""
__version__ = "0.1.0"

from .checkpoints.load import load_pretrained
from .generation.api import generate, generate_stream, sharded_generate
from .generation.pipeline import pipeline
from .parallel.mesh import make_mesh

__all__ = ["load_pretrained", "generate", "generate_stream", "sharded_generate", "make_mesh", "pipeline"]
