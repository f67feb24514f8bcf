"""Orbax directories: `save_orbax` / `restore_orbax` (atomic writes, damaged files named in one line).

An orbax directory holds ``config.json`` (the HF config plus a ``vipllava_jax`` entry with the layout)
and ``params/`` (an orbax StandardCheckpointer tree), plus the tokenizer files copied from the HF directory.
"""
from __future__ import annotations

import contextlib
import gc
import json
import re
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from ..models.config import VipLlavaConfig
from ..models.params import abstract_param_tree, flat_paths, is_scanned, relayout, unflatten_paths
from ..parallel.mesh import check_mesh
from ..parallel.shardings import param_shardings
from .atomic import atomic_output_dir, held_stderr, is_disk_full
from .config_file import CheckpointError, read_hf_config
from .convert import copy_tokenizer_files

FORMAT_KEY = "vipllava_jax"


def is_orbax_dir(path) -> bool:
    p = Path(path)
    if not (p / "config.json").exists() or not (p / "params").is_dir():
        return False
    return FORMAT_KEY in read_hf_config(p)


def save_orbax(params: dict, config: VipLlavaConfig, out_dir, *, tokenizer_from=None, overwrite: bool = False) -> Path:
    """Save params + config (and the params' layout: stacked for ``nn.scan`` or not, read from the tree). Written
    into a temporary sibling and swapped into place (see `atomic.atomic_output_dir`): ``out_dir`` is at every
    moment the old checkpoint or the new one, whole."""
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
            cfg[FORMAT_KEY] = {"format": 1, "scan_layers": is_scanned(params),
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


def restore_orbax(path, config: VipLlavaConfig, *, dtype=None, mesh=None, scan_layers: bool = False) -> dict:
    """Restore ``params`` of an orbax directory, in the layout ``scan_layers`` asks for (whatever the saved one),
    on ``mesh`` if given. A damaged directory (a data file, ``manifest.ocdbt`` or
    ``_METADATA`` missing or truncated) is one `CheckpointError` naming it and the file; the hundreds of lines
    orbax's background threads print meanwhile are held back."""
    path = Path(path).absolute()
    bad = _damaged_orbax(path, None)  # a few stats: fail before orbax starts its threads
    if bad is not None:
        raise bad
    check_mesh(config, mesh)
    with held_stderr(drop_if=lambda e: True):
        try:
            return _restore_orbax(path, config, dtype=dtype, mesh=mesh, scan_layers=scan_layers)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - tensorstore/orbax raise many kinds for damaged files
            bad = _damaged_orbax(path, e)
        # orbax's failed reads leave suspended coroutines that raise again when finalized ("Exception ignored
        # in ..."): finalize them now, while stderr is held, not at some later collection at a random point
        # (Python 3.11's traceback formatting inside an unlucky collection can break a running ast.parse)
        gc.collect()
        raise bad from None


def _restore_orbax(path: Path, config: VipLlavaConfig, *, dtype=None, mesh=None, scan_layers: bool = False) -> dict:
    saved_scan = bool(read_hf_config(path)[FORMAT_KEY].get("scan_layers", False))
    boxed = abstract_param_tree(config, saved_scan)
    ckptr = ocp.StandardCheckpointer()
    meta = ckptr.metadata(path / "params")
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    saved_dtypes = {p: np.dtype(m.dtype) for p, m in flat_paths(tree).items()}
    shard = flat_paths(param_shardings(config, mesh, scan_layers=saved_scan)) if mesh is not None else {}
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
    target = unflatten_paths(abstract)
    params = ckptr.restore(path / "params", target)
    if saved_scan != bool(scan_layers):
        params = relayout(params, scan_layers)
        if mesh is not None:  # stacking/unstacking leaves arbitrary shardings: put them back on the rules'
            params = jax.device_put(params, param_shardings(config, mesh, scan_layers=scan_layers))
    return params
