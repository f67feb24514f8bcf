"""Moved to `vipllava_jax.checkpoints` (hf_table.py: the conversion table; convert.py: load and export),
`vipllava_jax.models.params` (abstract_params, flat_paths) and `vipllava_jax.models.config` (config.json); these
names stay importable."""
from .checkpoints.convert import (TOKENIZER_FILES, copy_tokenizer_files, load_hf_params, plan_conversion, save_hf,
                                  to_hf_state_dict)
from .checkpoints.hf_table import (EXPORT_PREFIXES, INVERSE, KEY_PREFIXES, TABLE, Target, canonical_key,
                                   conv_to_hwio, export_key, flax_target, hf_key_for, hwio_to_conv, identity,
                                   linear_to_kernel)
from .models.config import load_config_file, read_hf_config
from .models.params import abstract_params, flat_paths

__all__ = ["TOKENIZER_FILES", "copy_tokenizer_files", "load_hf_params", "plan_conversion", "save_hf",
           "to_hf_state_dict", "EXPORT_PREFIXES", "INVERSE", "KEY_PREFIXES", "TABLE", "Target", "canonical_key",
           "conv_to_hwio", "export_key", "flax_target", "hf_key_for", "hwio_to_conv", "identity", "linear_to_kernel",
           "load_config_file", "read_hf_config", "abstract_params", "flat_paths"]
