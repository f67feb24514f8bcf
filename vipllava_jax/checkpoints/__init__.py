"""Checkpoints: HF directories (the conversion table, safetensors/.bin readers, export), orbax directories, and
`load_pretrained` over both."""
from .config_file import CheckpointError, load_config_file, read_hf_config
from .convert import copy_tokenizer_files, load_hf_params, save_hf, to_hf_state_dict
from .load import load_config, load_pretrained, resolve_model_path
from .orbax import is_orbax_dir, restore_orbax, save_orbax

__all__ = ["CheckpointError", "load_config_file", "read_hf_config", "copy_tokenizer_files", "load_hf_params",
           "save_hf", "to_hf_state_dict", "load_config", "load_pretrained", "resolve_model_path", "is_orbax_dir",
           "restore_orbax", "save_orbax"]
