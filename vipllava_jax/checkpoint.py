"""Moved to `vipllava_jax.checkpoints` (load.py, orbax.py) and `vipllava_jax.models.params` (relayout); these names
stay importable."""
from .checkpoints.load import load_config, load_pretrained, resolve_model_path
from .checkpoints.orbax import FORMAT_KEY, is_orbax_dir, restore_orbax, save_orbax
from .models.params import relayout
from .parallel.mesh import check_mesh

__all__ = ["load_config", "load_pretrained", "resolve_model_path", "FORMAT_KEY", "is_orbax_dir", "restore_orbax",
           "save_orbax", "relayout", "check_mesh"]
