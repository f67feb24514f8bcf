"""The end of a run: the trained model as an HF directory that `transformers` loads.

``RUN_DIR/hf`` is always written whole (a temporary sibling swapped in) and holds, besides the model, a marker
file (`MARKER`) naming the run directory and the step it holds: a run replaces an ``hf`` only when the marker
says this run directory wrote it, and never touches an ``hf`` it did not write (`export_owner`).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from ..checkpoints.atomic import atomic_output_dir
from ..checkpoints.adapter import save_adapter
from ..checkpoints.convert import save_hf
from .lora import LoraConfig
from .step import TrainState, compute_params

MARKER = "vipllava_jax_export.json"


def read_marker(out_dir) -> dict | None:
    """The export marker of ``out_dir`` (a dict), or None where there is none (or it is not ours)."""
    try:
        m = json.loads((Path(out_dir) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("written_by") == "vipllava-jax train" else None


def _same_path(a, b) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, RuntimeError):
        return False


def export_owner(out_dir, run_dir) -> str:
    """Who owns ``out_dir``: "absent", "ours" (a directory whose marker names ``run_dir``, or the train_config.json
    it holds now: the same run, moved) or "foreign" (anything else: a user's file or directory, never touched)."""
    out_dir = Path(out_dir)
    if not out_dir.exists() and not out_dir.is_symlink():
        return "absent"
    m = read_marker(out_dir) if out_dir.is_dir() else None
    if m is None:
        return "foreign"
    if _same_path(m.get("run_dir", ""), run_dir):
        return "ours"
    sha = _config_sha(run_dir)
    return "ours" if sha is not None and m.get("train_config_sha256") == sha else "foreign"


def _config_sha(run_dir) -> str | None:
    try:
        return hashlib.sha256((Path(run_dir) / "train_config.json").read_bytes()).hexdigest()
    except OSError:
        return None


def export_hf(state: TrainState, frozen: dict, config, out_dir, *, lora: LoraConfig | None = None,
              files_from=None, dtype=None, run_dir=None, step: int | None = None) -> Path | None:
    """Merge LoRA into the weights, gather the params to host and write ``out_dir`` (config, safetensors, the
    tokenizer / processor files of ``files_from``, and with ``run_dir`` the `MARKER` naming it and ``step``).
    Written into a temporary sibling and swapped in, so ``out_dir`` is at every moment absent, the old directory
    whole or the new one whole; an existing ``out_dir`` is replaced (the caller checks `export_owner` first).
    Every process must call it (the gather is collective); process 0 writes. Returns the path on process 0."""
    params = _on_host(jax.jit(compute_params, static_argnums=(2, 3))(state.trainable, frozen, lora,
                                                                      config.quantization))
    if jax.process_index() != 0:
        return None
    out_dir = Path(out_dir).absolute()
    with atomic_output_dir(out_dir, overwrite=True, collective=False) as tmp:
        # a QLoRA run's merged kernels are float (the rest dequantized by save_hf): an HF model has no qwix layout
        save_hf(params, config.replace(quantization=None), tmp, dtype=dtype, extra_files_from=files_from,
                overwrite=True)
        _write_marker(tmp, run_dir, step)
    return out_dir


def _on_host(tree):
    """A (possibly multi-host) tree of global arrays as numpy, whole on every process (a collective)."""
    if jax.process_count() > 1:
        tree = multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _write_marker(tmp: Path, run_dir, step) -> None:
    if run_dir is not None:
        marker = {"written_by": "vipllava-jax train", "run_dir": str(Path(run_dir).absolute()), "step": step,
                  "train_config_sha256": _config_sha(run_dir)}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def export_adapter(state: TrainState, out_dir, *, lora: LoraConfig, base_model=None, run_dir=None,
                   step: int | None = None) -> Path | None:
    """Write the run's LoRA as a PEFT adapter directory (`checkpoints.adapter.save_adapter`): the adapters, and
    the projector (which the LoRA stage trains too) in ``modules_to_save``, so ``PeftModel.from_pretrained(base,
    out_dir)`` computes what was trained. Atomic and marked like `export_hf`; every process calls it."""
    trainable = _on_host(state.trainable)
    if jax.process_index() != 0:
        return None
    out_dir = Path(out_dir).absolute()
    with atomic_output_dir(out_dir, overwrite=True, collective=False) as tmp:
        save_adapter(tmp, trainable["lora"], rank=lora.rank, alpha=lora.alpha, targets=lora.targets,
                     modules=trainable.get("params") or None,
                     base_model=None if base_model is None else str(base_model))
        _write_marker(tmp, run_dir, step)
    return out_dir
