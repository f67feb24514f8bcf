"""`load_pretrained`: an HF directory, a hub id or an orbax directory -> ``(module, params)``."""
from __future__ import annotations

import os
import re
from pathlib import Path

import jax.numpy as jnp

from ..models.config import Runtime, VipLlavaConfig
from ..models.vipllava import VipLlavaForConditionalGeneration
from ..models.params import flat_paths
from ..models.quantize import DEFAULT_TILE_SIZE, QuantConfig, make_quant_config
from ..parallel.mesh import check_mesh
from ..parallel.shardings import param_shardings
from .adapter import apply_adapter, read_adapter, requantize
from .config_file import CheckpointError, load_config_file
from .convert import load_hf_params
from .orbax import is_orbax_dir, restore_orbax


def resolve_model_path(path: str | os.PathLike) -> Path:
    """A local directory, or a hub id (``llava-hf/vip-llava-7b-hf``) downloaded where a network exists."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    s = str(path)
    if p.exists():
        raise CheckpointError(f"{s} is a file; give the model directory")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", s) and not s.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download
            return Path(snapshot_download(s, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"]))
        except Exception as e:  # noqa: BLE001 - offline, unknown repo, auth...
            raise CheckpointError(f"{s} is not a local directory and could not be fetched from the hub "
                                  f"({type(e).__name__}: {e})") from None
    raise CheckpointError(f"Model directory {s} does not exist")


def load_config(path) -> VipLlavaConfig:
    """The `VipLlavaConfig` of a model directory or hub id (config.json only: no weights are read)."""
    return load_config_file(resolve_model_path(path))


def with_quantization(cfg: VipLlavaConfig, quant: QuantConfig | None, where) -> VipLlavaConfig:
    """The config with the quantization asked for; a checkpoint already quantized keeps its own (asking for
    another is an error naming both)."""
    if cfg.quantization is not None:
        if quant is not None and quant != cfg.quantization:
            raise CheckpointError(f"{where} is already quantized ({cfg.quantization.mode}, tile "
                                  f"{cfg.quantization.tile_size}); it cannot be loaded as {quant.mode} (tile "
                                  f"{quant.tile_size}): load it with no quantize= argument, or quantize the "
                                  f"unquantized checkpoint")
        return cfg
    if quant is None:
        return cfg
    try:
        return cfg.replace(quantization=quant)
    except ValueError as e:  # a tile size that does not divide a layer
        raise ValueError(f"{where}: {e}") from None


def load_pretrained(path, dtype=jnp.float32, *, mesh=None, scan_layers: bool = False, remat_policy: str = "none",
                    attn_impl: str = "auto", runtime: Runtime | None = None, progress: bool = True,
                    verify: bool = True, quantize: str | QuantConfig | None = None,
                    quantize_tile_size: int = DEFAULT_TILE_SIZE, quantize_vision_tower: bool = False,
                    quantize_projector: bool = False, quantize_lm_head: bool = False, adapter=None):
    """Load a VipLlava model: ``(module, params)``.

    path: an HF directory (config.json + safetensors / sharded index / pytorch_model.bin), a hub id where a
    network exists, or a directory written by ``save_orbax`` / ``convert/hf_to_orbax.py``.
    dtype: parameter and compute dtype (None keeps the checkpoint's dtype for the params and computes in fp32).
    mesh: a jax.sharding.Mesh; each tensor then goes straight onto its shards.
    scan_layers, remat_policy, attn_impl: the module's `Runtime` (or give ``runtime=`` whole); the params come
    in the layout it asks for, and ``module.runtime`` holds it.
    verify: for an orbax directory, check each file's CRC-32 against the one recorded at save before reading
    (a damaged file is a `CheckpointError` naming it); False skips that pass over the files (the CLI's
    --no-verify). HF directories have no checksums to check: it changes nothing there.
    quantize: "int8" (one scale per output channel) or "int4" (one scale per ``quantize_tile_size`` input rows
    per output channel): weight-only quantization of the language model's linear kernels with qwix
    (`models.quantize`), each tensor quantized as it is read; ``quantize_vision_tower`` / ``_projector`` /
    ``_lm_head`` quantize those linears too. Scales are in ``dtype``. ``module.config.quantization`` records it.
    A directory written by ``vipllava-jax convert --quantize`` restores quantized with no argument (giving a
    different ``quantize=`` is an error).
    adapter: a PEFT LoRA adapter directory (`checkpoints.adapter`: adapter_config.json +
    adapter_model.safetensors, e.g. RUN_DIR/adapter or one saved by ``peft``) merged into the weights,
    W + (lora_alpha / r) A B (a quantized kernel is dequantized, merged and quantized again); a key or shape that
    does not fit this model, or a PEFT feature we do not compute, is an `AdapterError` naming it.
    """
    layout = dict(scan_layers=scan_layers, remat_policy=remat_policy, attn_impl=attn_impl)
    if runtime is None:
        runtime = Runtime(**layout)
    elif layout != dict(scan_layers=False, remat_policy="none", attn_impl="auto"):
        raise ValueError("give runtime= or scan_layers/remat_policy/attn_impl, not both")
    p = resolve_model_path(path)
    cfg = with_quantization(load_config_file(p), make_quant_config(
        quantize, quantize_tile_size, vision_tower=quantize_vision_tower, projector=quantize_projector,
        lm_head=quantize_lm_head), p)
    check_mesh(cfg, mesh)
    module = VipLlavaForConditionalGeneration(cfg, runtime, dtype=jnp.float32 if dtype is None else dtype)
    scan = runtime.scan_layers
    if is_orbax_dir(p):
        params = restore_orbax(p, cfg, dtype=dtype, mesh=mesh, scan_layers=scan, verify=verify)
    else:
        shardings = flat_paths(param_shardings(cfg, mesh, scan_layers=scan)) if mesh is not None else None
        params = load_hf_params(p, cfg, dtype=dtype, shardings=shardings, progress=progress, scan_layers=scan)
    if adapter is not None:
        params = requantize(apply_adapter(params, read_adapter(adapter, params), cfg.quantization), params,
                            cfg.quantization)
    return module, params
