"""`CheckpointError`, and reading a model directory's ``config.json`` into a `VipLlavaConfig`."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..models.config import VipLlavaConfig


class CheckpointError(ValueError):
    """A checkpoint (its config.json, a weights file, an index, an orbax directory) that cannot be used as it
    is: the message names the file and what is wrong. Every reader in `vipllava_jax.checkpoints` raises it."""


def read_hf_config(model_dir: str | os.PathLike) -> dict:
    """config.json as a dict; anything that is not a JSON object is a `CheckpointError` naming the file."""
    p = Path(model_dir) / "config.json"
    if not p.exists():
        raise CheckpointError(f"No config.json in {model_dir}")
    try:
        with open(p, "rb") as f:
            raw = f.read()
        if not raw.strip():
            raise CheckpointError(f"{p} is empty: it should hold the model's config (a JSON object)")
        d = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{p}: a JSON {type(d).__name__}, not an object of config fields")
    return d


def load_config_file(model_dir: str | os.PathLike, **kw) -> VipLlavaConfig:
    """`VipLlavaConfig.from_hf` of a directory's config.json; a bad field is a `CheckpointError` naming the file."""
    p = Path(model_dir) / "config.json"
    d = read_hf_config(model_dir)
    try:
        return VipLlavaConfig.from_hf(d, **kw)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{p}: {e}") from None
