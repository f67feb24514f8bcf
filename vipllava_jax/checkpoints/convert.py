"""HF VipLlava directories <-> the Flax parameter tree, through the conversion table (`hf_table.py`).

The target tree comes from `jax.eval_shape`, and every missing, unexpected or mis-shaped key is an error naming
the key and both shapes, raised before any tensor data is read (`plan_conversion`); tensors then stream straight
onto their devices (`load_hf_params`). `save_hf` writes the hub layout back.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from tqdm.auto import tqdm

from ..models.config import VipLlavaConfig
from ..models.params import abstract_param_tree, flat_paths, unflatten_paths
from ..models.quantize import dequantize_kernel, is_quantized_kernel, quantize_kernel
from .atomic import atomic_output_dir
from .config_file import CheckpointError
from .hf_io import HFCheckpoint, save_safetensors
from .hf_table import INVERSE, Target, canonical_key, export_key, flax_target, hf_key_for, hf_shape


def _shape_str(s) -> str:
    return "[" + ", ".join(map(str, s)) + "]"


def plan_conversion(ckpt_keys: Iterable[str], shape_of: Callable[[str], tuple], config: VipLlavaConfig,
                    targets: dict[str, tuple], *, scan_layers: bool = False) -> dict[str, Target]:
    """Map every checkpoint key to a target and check names and shapes before any data is read.

    targets: Flax path -> full target shape (of the layout ``scan_layers`` says). Raises CheckpointError listing
    every problem."""
    problems: list[str] = []
    plan: dict[str, Target] = {}
    seen: dict[tuple[str, int | None], str] = {}
    for key in ckpt_keys:
        canon = canonical_key(key)
        if config.tie_word_embeddings and canon == "lm_head.weight":
            continue  # tied: the lm_head is the embedding matrix
        tgt = flax_target(canon, scan_layers)
        if tgt is None:
            problems.append(f"unexpected key {key!r} (shape {_shape_str(shape_of(key))}): no rule in the table "
                            f"matches it")
            continue
        if tgt.path not in targets:
            problems.append(f"unexpected key {key!r} (shape {_shape_str(shape_of(key))}): the config has no "
                            f"parameter {tgt.path} (check num_hidden_layers and tie_word_embeddings)")
            continue
        full = targets[tgt.path]
        if tgt.layer is not None and tgt.layer >= full[0]:
            problems.append(f"unexpected key {key!r}: layer {tgt.layer} but the config has {full[0]} layers")
            continue
        expected = full[1:] if tgt.layer is not None else full
        got = tgt.transform(np.empty(shape_of(key), np.int8)).shape
        if tuple(got) != tuple(expected):
            hf_expected = INVERSE[tgt.transform](np.empty(expected, np.int8)).shape
            problems.append(f"wrong shape for key {key!r}: checkpoint has {_shape_str(shape_of(key))}, the config "
                            f"expects {_shape_str(hf_expected)} (Flax {tgt.path} {_shape_str(expected)})")
            continue
        slot = (tgt.path, tgt.layer)
        if slot in seen:
            problems.append(f"keys {seen[slot]!r} and {key!r} both map to {tgt.path}"
                            + (f" layer {tgt.layer}" if tgt.layer is not None else ""))
            continue
        seen[slot] = key
        plan[key] = tgt
    filled: dict[str, set] = {}
    for (path, layer) in seen:
        filled.setdefault(path, set()).add(layer)
    for path, shape in targets.items():
        got = filled.get(path, set())
        if not got:
            problems.append(f"missing key for {path} (expected HF {hf_key_for(path, None)[0]!r} with shape "
                            f"{_shape_str(hf_shape(path, shape))})")
        elif None not in got:
            lost = sorted(set(range(shape[0])) - got)
            if lost:
                problems.append(f"missing key(s) for layers {lost} of {path} (e.g. "
                                f"{hf_key_for(path, lost[0])[0]!r})")
    if problems:
        head = f"Checkpoint does not match the VipLlava config: {len(problems)} problem(s):\n  "
        more = f"\n  ... and {len(problems) - 30} more" if len(problems) > 30 else ""
        raise CheckpointError(head + "\n  ".join(problems[:30]) + more)
    return plan


# --- loading ------------------------------------------------------------------------------------------------
def _quantized(arr, quant, dtype) -> dict:
    """One float tensor quantized, waited for: JAX dispatches asynchronously, and without the wait the loop
    would read the next tensors while this one's float copy is still held (measured: 3x the peak for int4)."""
    return jax.block_until_ready(quantize_kernel(np.asarray(arr), quant, dtype or arr.dtype))


def load_hf_params(model_dir: str | os.PathLike, config: VipLlavaConfig, *, dtype=None, shardings: dict | None = None,
                   progress: bool = True, scan_layers: bool = False) -> dict:
    """Stream an HF checkpoint onto the Flax tree (layers stacked for ``nn.scan`` with ``scan_layers``).

    dtype: None keeps each tensor's checkpoint dtype. shardings: Flax path -> jax.sharding.Sharding, to place
    each tensor straight onto its shards (each process reads only the slices its devices hold).

    ``config.quantization`` (`models.quantize.QuantConfig`): each kernel it names is quantized as it is read
    (``kernel`` becomes ``kernel/qvalue`` + ``kernel/scale`` [+ ``kernel/zero_point``], scales in ``dtype``), so the host never holds more
    than the quantized tree plus one float tensor (and, with scanned layers, the quantized layers of the one
    stacked kernel being filled)."""
    quant = config.quantization
    targets = {p: tuple(v.value.shape if isinstance(v, nn.Partitioned) else v.shape)
               for p, v in flat_paths(abstract_param_tree(config.replace(quantization=None), scan_layers)).items()}
    ckpt = HFCheckpoint(model_dir)
    keys = ckpt.keys()
    plan = plan_conversion(keys, ckpt.shape, config, targets, scan_layers=scan_layers)
    not_float = [k for k in plan if not ckpt.is_float(k)]
    if not_float:
        raise CheckpointError(f"{model_dir}: tensor(s) stored as integers or booleans where floating-point "
                              f"weights are expected: {not_float[:5]}" + (" ..." if len(not_float) > 5 else ""))
    out: dict[str, jax.Array] = {}
    stacks: dict[str, tuple[np.ndarray, set]] = {}
    total = sum(int(np.prod(ckpt.shape(k))) for k in plan)
    bar = tqdm(total=total, unit="param", unit_scale=True, desc="Converting", disable=not progress)

    def place_quantized(path, q):
        for leaf, v in q.items():
            sh = None if shardings is None else shardings.get(f"{path}/{leaf}")
            out[f"{path}/{leaf}"] = v if sh is None else jax.device_put(v, sh)

    def place(path, arr):
        if is_quantized_kernel(path, quant):
            place_quantized(path, _quantized(arr, quant, dtype))
            return
        sh = None if shardings is None else shardings.get(path)
        target_dtype = dtype or arr.dtype
        if sh is None:
            out[path] = jax.device_put(np.array(arr, dtype=target_dtype))
        else:
            out[path] = jax.make_array_from_callback(
                arr.shape, sh, lambda idx: np.asarray(arr[idx], dtype=target_dtype))

    lazy_stacks: dict[str, dict[int, np.ndarray]] = {}
    qstacks: dict[str, dict[int, dict]] = {}

    def place_stacked(path, layers):
        target_dtype = dtype or layers[0].dtype
        shape = (len(layers),) + tuple(layers[0].shape)

        def read(idx):
            rest = tuple(idx[1:])
            return np.stack([np.asarray(layers[i][rest], dtype=target_dtype) for i in range(len(layers))[idx[0]]])
        out[path] = jax.make_array_from_callback(shape, shardings[path], read)

    for key in keys:
        if key not in plan:
            continue
        tgt = plan[key]
        arr = tgt.transform(ckpt.get(key))
        if tgt.layer is None:
            place(tgt.path, arr)
        elif is_quantized_kernel(tgt.path, quant):
            # Scanned: quantize each layer as it comes, stack the quantized layers once all are in.
            done = qstacks.setdefault(tgt.path, {})
            done[tgt.layer] = _quantized(arr, quant, dtype)
            if len(done) == targets[tgt.path][0]:
                place_quantized(tgt.path, {leaf: jnp.stack([done[i][leaf] for i in range(len(done))])
                                           for leaf in quant.leaves})
                del qstacks[tgt.path]
        elif shardings is not None and shardings.get(tgt.path) is not None:
            # Sharded and scanned: keep each layer's lazy view and stack only the slices this process's
            # devices hold, so no host ever materialises the whole stacked tensor.
            views = lazy_stacks.setdefault(tgt.path, {})
            views[tgt.layer] = arr
            if len(views) == targets[tgt.path][0]:
                place_stacked(tgt.path, [views[i] for i in range(len(views))])
                del lazy_stacks[tgt.path]
        else:
            if tgt.path not in stacks:
                stacks[tgt.path] = (np.empty(targets[tgt.path], dtype or arr.dtype), set())
            buf, done = stacks[tgt.path]
            buf[tgt.layer] = arr
            done.add(tgt.layer)
            if len(done) == buf.shape[0]:
                place(tgt.path, buf)
                del stacks[tgt.path]
        del arr
        bar.update(int(np.prod(ckpt.shape(key))))
    bar.close()
    return unflatten_paths(out)


# --- export -------------------------------------------------------------------------------------------------
def to_hf_state_dict(params: dict, config: VipLlavaConfig) -> Iterable[tuple[str, np.ndarray]]:
    """Yield (HF key in the hub layout, numpy array) tensor by tensor. A quantized kernel (``config.quantization``)
    is written as the float kernel it stands for (dequantized, in its scales' dtype): HF has no layout for
    qwix's tiles."""
    flat = flat_paths(params)
    for path in [p for p in flat if p.endswith("/kernel/qvalue")]:
        k = path.rsplit("/", 1)[0]
        flat[k] = dequantize_kernel({leaf: flat.pop(f"{k}/{leaf}") for leaf in config.quantization.leaves},
                                    config.quantization)
    for path, value in flat.items():
        value = value.value if isinstance(value, nn.Partitioned) else value
        scanned = "layers/" in path and not re.search(r"layers_\d+", path)
        if scanned:
            for i in range(value.shape[0]):
                key, tf = hf_key_for(path, i)
                yield export_key(key), INVERSE[tf](np.asarray(jax.device_get(value[i])))
        else:
            key, tf = hf_key_for(path, None)
            yield export_key(key), INVERSE[tf](np.asarray(jax.device_get(value)))


def save_hf(params: dict, config: VipLlavaConfig, out_dir: str | os.PathLike, *, dtype=None,
            max_shard_bytes: int = 5 * 2**30, extra_files_from: str | os.PathLike | None = None,
            overwrite: bool = False) -> Path:
    """Write an HF directory (config.json + safetensors shards + index) that transformers loads.

    Written into a temporary sibling and swapped into place (`atomic.atomic_output_dir`), so ``out_dir`` is at
    every moment absent, the old directory whole (replaced only with ``overwrite``), or the new one whole.
    Call it on process 0 with host (numpy) params."""
    with atomic_output_dir(out_dir, overwrite=overwrite, collective=False) as tmp:
        shards: list[dict[str, np.ndarray]] = [{}]
        size = 0
        weight_map = {}
        names = []

        def flush():
            nonlocal size
            if shards[-1]:
                fn = f"model-{len(names) + 1:05d}.safetensors"
                save_safetensors(tmp / fn, shards[-1], {"format": "pt"})
                for k in shards[-1]:
                    weight_map[k] = fn
                names.append(fn)
                shards[-1] = {}
                size = 0

        for key, arr in to_hf_state_dict(params, config):
            if dtype is not None:
                arr = arr.astype(dtype)
            arr = np.ascontiguousarray(arr)
            if size and size + arr.nbytes > max_shard_bytes:
                flush()
            shards[-1][key] = arr
            size += arr.nbytes
        flush()
        total = len(names)
        final = {}
        for i, fn in enumerate(names):
            new = "model.safetensors" if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            os.replace(tmp / fn, tmp / new)
            final[fn] = new
        if total > 1:
            index = {"metadata": {}, "weight_map": {k: final[v] for k, v in weight_map.items()}}
            with open(tmp / "model.safetensors.index.json", "w") as f:
                json.dump(index, f, indent=2)
        with open(tmp / "config.json", "w") as f:  # float weights: a quantized tree is written dequantized
            json.dump(config.replace(quantization=None).to_hf(), f, indent=2)
        if extra_files_from is not None:
            copy_tokenizer_files(extra_files_from, tmp)
    return Path(out_dir).absolute()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "preprocessor_config.json", "processor_config.json", "chat_template.json",
                   "chat_template.jinja", "generation_config.json")


def copy_tokenizer_files(src, dst):
    """Copy the tokenizer / processor / generation files of an HF directory that exist into ``dst``."""
    for fn in TOKENIZER_FILES:
        if (Path(src) / fn).exists():
            shutil.copy2(Path(src) / fn, Path(dst) / fn)
