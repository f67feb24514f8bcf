"""`load_pretrained` (HF directory, hub id or converted orbax directory) and orbax save/restore.

An orbax directory holds ``config.json`` (the HF config plus a ``vipllava_jax`` entry with the layout)
and ``params/`` (an orbax StandardCheckpointer tree), plus the tokenizer files copied from the HF directory.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import flax

from .convert import (abstract_params, copy_tokenizer_files, flat_paths, load_config_file, load_hf_params,
                      read_hf_config)
from .hf_io import CheckpointError, atomic_output_dir, held_stderr, is_disk_full
from .sharding import check_mesh_fits, mesh_sizes, tree_shardings
from .vipllava import VipLlavaConfig, VipLlavaForConditionalGeneration

FORMAT_KEY = "vipllava_jax"


def is_orbax_dir(path) -> bool:
    p = Path(path)
    if not (p / "config.json").exists() or not (p / "params").is_dir():
        return False
    return FORMAT_KEY in read_hf_config(p)


def check_mesh(config: VipLlavaConfig, mesh) -> None:
    """Every entry point that takes a mesh checks that it fits the model (`sharding.check_mesh_fits`): a vocab,
    head count or MLP size the ``tensor`` axis does not divide is the clear mesh-fit error, never JAX's raw
    IndivisibleError. (No padding: a padded vocab would change the saved shapes and the logits' width.)"""
    if mesh is not None:
        check_mesh_fits(mesh_sizes(mesh), config)


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


def _stacked_path(path: str) -> tuple[str, int] | None:
    m = re.search(r"/layers_(\d+)/", path)
    return (path[:m.start()] + "/layers/" + path[m.end():], int(m.group(1))) if m else None


def relayout(params: dict, scan_layers: bool) -> dict:
    """Stack per-layer params (layers_i) into scanned form ("layers", leading axis L), or the reverse."""
    flat = flat_paths(params)
    out = {}
    if scan_layers:
        groups: dict[str, dict[int, jax.Array]] = {}
        for p, v in flat.items():
            sp = _stacked_path(p)
            if sp is None:
                out[p] = v
            else:
                groups.setdefault(sp[0], {})[sp[1]] = v
        for p, layers in groups.items():
            out[p] = jnp.stack([layers[i] for i in range(len(layers))])
    else:
        for p, v in flat.items():
            m = re.search(r"/layers/", p)
            if m is None:
                out[p] = v
            else:
                for i in range(v.shape[0]):
                    out[p[:m.start()] + f"/layers_{i}/" + p[m.end():]] = v[i]
    return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in out.items()})


def param_shardings(config: VipLlavaConfig, mesh) -> dict[str, jax.sharding.Sharding]:
    """Flax path -> NamedSharding, from the logical names on every parameter and the rules table."""
    check_mesh(config, mesh)
    boxed = abstract_params(VipLlavaForConditionalGeneration(config))
    return flat_paths(tree_shardings(boxed, mesh))


def save_orbax(params: dict, config: VipLlavaConfig, out_dir, *, tokenizer_from=None, overwrite: bool = False) -> Path:
    """Save params + config. Written into a temporary sibling and swapped into place (see
    `hf_io.atomic_output_dir`): ``out_dir`` is at every moment the old checkpoint or the new one, whole."""
    import orbax.checkpoint as ocp
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        with held_stderr(drop_if=is_disk_full):
            ckptr = ocp.StandardCheckpointer()
            try:
                ckptr.save(tmp / "params", params)
                ckptr.wait_until_finished()
            finally:  # joins orbax's background threads, whose failure tracebacks are held back too
                with contextlib.suppress(Exception):
                    ckptr.close()
        if jax.process_index() == 0:
            cfg = config.to_hf()
            cfg[FORMAT_KEY] = {"format": 1, "scan_layers": config.text.scan_layers,
                               "dtypes": sorted({str(np.dtype(x.dtype)) for x in jax.tree.leaves(params)})}
            with open(tmp / "config.json", "w") as f:
                json.dump(cfg, f, indent=2)
            with open(tmp / FILE_LIST, "w") as f:
                json.dump(_list_files(tmp / "params"), f, indent=0)
            if tokenizer_from is not None:
                copy_tokenizer_files(tokenizer_from, tmp)
    return Path(out_dir).absolute()


ORBAX_REQUIRED = ("params/_METADATA", "params/manifest.ocdbt")
FILE_LIST = "params_files.json"  # every file under params/ and its size, written by save_orbax


def _list_files(d: Path) -> dict[str, int]:
    return {str(f.relative_to(d.parent)): f.stat().st_size for f in sorted(d.rglob("*")) if f.is_file()}


def _damaged_orbax(path: Path, e: BaseException | None) -> CheckpointError | None:
    """One line naming the orbax directory and the file that is missing or damaged: a file of the list
    save_orbax wrote absent or of another size, a required file absent or empty, else a file named in the
    error, else the error's first line. None (with no error given) when nothing is seen wrong."""
    listed = path / FILE_LIST
    if listed.is_file():
        try:
            sizes = json.loads(listed.read_text())
        except (OSError, ValueError):
            return CheckpointError(f"Damaged orbax checkpoint {path}: {FILE_LIST} is not valid JSON")
        for rel, size in sizes.items():
            f = path / rel
            if not f.is_file():
                return CheckpointError(f"Damaged orbax checkpoint {path}: {rel} is missing")
            if f.stat().st_size != size:
                return CheckpointError(f"Damaged orbax checkpoint {path}: {rel} is truncated or damaged "
                                       f"({f.stat().st_size} bytes, written as {size})")
    for rel in ORBAX_REQUIRED:
        f = path / rel
        if not f.is_file():
            return CheckpointError(f"Damaged orbax checkpoint {path}: {rel} is missing")
        if f.stat().st_size == 0:
            return CheckpointError(f"Damaged orbax checkpoint {path}: {rel} is empty")
    text = "" if e is None else f"{type(e).__name__}: {e}"
    for m in re.finditer(r"(ocdbt\.process_\d+/)?(d/[0-9a-f]{16,}|manifest\.ocdbt|_METADATA|_sharding)", text):
        return CheckpointError(f"Damaged orbax checkpoint {path}: params/{m.group(0)} is missing or truncated")
    if e is None:
        return None
    first = text.strip().splitlines()[0][:300] if text.strip() else "unreadable"
    return CheckpointError(f"Damaged orbax checkpoint {path}: a file under params/ is missing or truncated ({first})")


def restore_orbax(path, config: VipLlavaConfig, *, dtype=None, mesh=None) -> dict:
    """Restore ``params`` of an orbax directory. A damaged directory (a data file, ``manifest.ocdbt`` or
    ``_METADATA`` missing or truncated) is one `CheckpointError` naming it and the file; the hundreds of lines
    orbax's background threads print meanwhile are held back."""
    path = Path(path).absolute()
    bad = _damaged_orbax(path, None)  # a few stats: fail before orbax starts its threads
    if bad is not None:
        raise bad
    check_mesh(config, mesh)
    try:
        with held_stderr(drop_if=lambda e: True):
            return _restore_orbax(path, config, dtype=dtype, mesh=mesh)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - tensorstore/orbax raise many kinds for damaged files
        raise _damaged_orbax(path, e) from None


def _restore_orbax(path: Path, config: VipLlavaConfig, *, dtype=None, mesh=None) -> dict:
    import orbax.checkpoint as ocp
    saved_scan = read_hf_config(path)[FORMAT_KEY].get("scan_layers", False)
    saved_cfg = config.with_layout(scan_layers=saved_scan)
    boxed = abstract_params(VipLlavaForConditionalGeneration(saved_cfg))
    ckptr = ocp.StandardCheckpointer()
    meta = ckptr.metadata(path / "params")
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    saved_dtypes = {p: np.dtype(m.dtype) for p, m in flat_paths(tree).items()}
    shard = flat_paths(tree_shardings(boxed, mesh)) if mesh is not None else {}
    abstract = {}
    for p, v in flat_paths(boxed).items():
        v = v.value
        if p not in saved_dtypes:
            raise CheckpointError(f"{path}: orbax checkpoint has no parameter {p}")
        sh = shard.get(p) or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract[p] = jax.ShapeDtypeStruct(v.shape, dtype or saved_dtypes[p], sharding=sh)
    extra = set(saved_dtypes) - set(abstract)
    if extra:
        raise CheckpointError(f"{path}: orbax checkpoint has parameters the config does not: {sorted(extra)[:5]}")
    target = flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in abstract.items()})
    params = ckptr.restore(path / "params", target)
    if saved_scan != config.text.scan_layers:
        params = relayout(params, config.text.scan_layers)
        if mesh is not None:  # stacking/unstacking leaves arbitrary shardings: put them back on the rules'
            params = jax.device_put(params, tree_shardings(abstract_params(VipLlavaForConditionalGeneration(config)), mesh))
    return params


def load_config(path) -> VipLlavaConfig:
    return load_config_file(resolve_model_path(path))


def load_pretrained(path, dtype=jnp.float32, *, mesh=None, scan_layers: bool = False, remat_policy: str = "none",
                    progress: bool = True):
    """Load a VipLlava model: ``(module, params)``.

    path: an HF directory (config.json + safetensors / sharded index / pytorch_model.bin), a hub id where a
    network exists, or a directory written by ``save_orbax`` / ``convert/hf_to_orbax.py``.
    dtype: parameter and compute dtype (None keeps the checkpoint's dtype for the params and computes in fp32).
    mesh: a jax.sharding.Mesh; each tensor then goes straight onto its shards.
    """
    p = resolve_model_path(path)
    cfg = load_config_file(p, scan_layers=scan_layers, remat_policy=remat_policy)
    check_mesh(cfg, mesh)
    module = VipLlavaForConditionalGeneration(cfg, dtype=jnp.float32 if dtype is None else dtype)
    if is_orbax_dir(p):
        params = restore_orbax(p, cfg, dtype=dtype, mesh=mesh)
    else:
        shardings = param_shardings(cfg, mesh) if mesh is not None else None
        params = load_hf_params(p, cfg, dtype=dtype, shardings=shardings, progress=progress)
    return module, params
