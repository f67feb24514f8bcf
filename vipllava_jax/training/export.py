"""The end of a run: the trained model as an HF directory that `transformers` loads."""
from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from ..checkpoints.convert import save_hf
from .lora import LoraConfig
from .step import TrainState, compute_params


def export_hf(state: TrainState, frozen: dict, config, out_dir, *, lora: LoraConfig | None = None,
              files_from=None, dtype=None) -> Path | None:
    """Merge LoRA into the weights, gather the params to host and write ``out_dir`` (config, safetensors, and
    the tokenizer / processor files of ``files_from``). Written beside and renamed, so never half-written.
    Every process must call it (the gather is collective); process 0 writes. Returns the path on process 0."""
    params = jax.jit(compute_params, static_argnums=2)(state.trainable, frozen, lora)
    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
    params = jax.tree.map(np.asarray, jax.device_get(params))
    if jax.process_index() != 0:
        return None
    return save_hf(params, config, out_dir, dtype=dtype, extra_files_from=files_from)
