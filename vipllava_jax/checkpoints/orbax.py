"""Orbax directories: `save_orbax` / `restore_orbax` (atomic writes, checksums, damaged files named in one line).

An orbax directory holds ``config.json`` (the HF config plus a ``vipllava_jax`` entry with the layout),
``params/`` (an orbax StandardCheckpointer tree), ``params_files.json`` (every file under ``params/``, its size
and its CRC-32, written last by `save_orbax`), plus the tokenizer files copied from the HF directory.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from ..models.config import VipLlavaConfig
from ..models.params import abstract_param_tree, flat_paths, is_scanned, relayout, unflatten_paths
from ..models.quantize import is_quantized_kernel, keeps_int_dtype, quantize_kernel
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
    moment the old checkpoint or the new one, whole. ``params_files.json`` records each file's size and CRC-32
    (computed by process 0 after orbax has finished, reading the files back), which `restore_orbax` checks."""
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
            with open(tmp / FILE_LIST, "w") as f:  # one line a file
                f.write("{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}"
                                             for k, v in _list_files(tmp / "params").items()) + "\n}\n")
            if tokenizer_from is not None:
                copy_tokenizer_files(tokenizer_from, tmp)
    return Path(out_dir).absolute()


ORBAX_REQUIRED = ("params/_METADATA", "params/manifest.ocdbt")
# Every file under params/, its size and its checksum, written by save_orbax: {"params/...": {"size": N,
# "crc32": "8 hex digits"}}. Directories written before checksums hold {"params/...": N} (sizes only).
FILE_LIST = "params_files.json"
CHECKSUM = "crc32"  # zlib's CRC-32 (stdlib, about 2 GB/s a core; it releases the GIL, so files hash in parallel)
_CHUNK = 16 << 20  # bytes read at a time: a file is never read whole into memory


def _crc32(f: Path) -> str:
    crc, buf = 0, bytearray(_CHUNK)
    view = memoryview(buf)
    with open(f, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
    return f"{crc:08x}"


def _checksums(files: list[Path]) -> list[str]:
    """CRC-32 of each file, several files at a time (reads and zlib.crc32 run outside the GIL)."""
    workers = max(1, min(8, os.cpu_count() or 1, len(files)))
    if workers == 1:
        return [_crc32(f) for f in files]
    with ThreadPoolExecutor(workers) as ex:
        return list(ex.map(_crc32, files))


def _list_files(d: Path, checksum: bool = True) -> dict[str, dict]:
    """``{"params/...": {"size": N, "crc32": "..."}}`` for every file under ``d`` (no "crc32" without checksum)."""
    files = [f for f in sorted(d.rglob("*")) if f.is_file()]
    sums = _checksums(files) if checksum else [None] * len(files)
    out = {}
    for f, crc in zip(files, sums):
        out[str(f.relative_to(d.parent))] = {"size": f.stat().st_size} if crc is None else \
            {"size": f.stat().st_size, CHECKSUM: crc}
    return out


def _read_file_list(path: Path) -> dict[str, tuple[int, str | None]] | CheckpointError | None:
    """params_files.json as ``{rel: (size, crc32 or None)}``; None when there is none (a directory written
    before save_orbax listed its files), a `CheckpointError` when it cannot be read."""
    listed = path / FILE_LIST
    if not listed.is_file():
        return None
    try:
        raw = json.loads(listed.read_text())
    except (OSError, ValueError):
        return CheckpointError(f"Damaged orbax checkpoint {path}: {FILE_LIST} is not valid JSON")
    out = {}
    for rel, v in raw.items() if isinstance(raw, dict) else ():
        if isinstance(v, dict):
            size, crc = v.get("size"), v.get(CHECKSUM)
        else:  # the first format: sizes only
            size, crc = v, None
        if type(size) is not int or not (crc is None or isinstance(crc, str)) or ".." in Path(rel).parts:
            break
        out[rel] = (size, crc)
    else:
        if isinstance(raw, dict):
            return out
    return CheckpointError(f"Damaged orbax checkpoint {path}: {FILE_LIST} is not a list of files, sizes and "
                           f"checksums")


def _bad_checksum(path: Path) -> CheckpointError | None:
    """The first file whose CRC-32 is not the one params_files.json recorded, as one `CheckpointError`; None
    when all agree (or nothing was recorded: a directory written before checksums, or before file lists)."""
    listed = _read_file_list(path)
    if not isinstance(listed, dict):
        return listed
    todo = [(rel, crc) for rel, (_, crc) in listed.items() if crc is not None]
    for (rel, want), got in zip(todo, _checksums([path / rel for rel, _ in todo])):
        if got != want:
            return CheckpointError(
                f"Damaged orbax checkpoint {path}: {rel} checksum mismatch ({CHECKSUM} {got}, written as {want}): "
                f"the file was changed or damaged after it was written; re-convert the checkpoint, or pass "
                f"--no-verify (verify=False in Python) to load it anyway")
    return None


def _plain(e: BaseException) -> str:
    """An exception chain's most telling message, made one line of plain words: tensorstore's own error (the
    innermost of the chain) rather than orbax's wrapper, and no object reprs (orbax ends its messages with the
    repr of a pybind11 bound method spanning dozens of lines)."""
    chain, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    for x in reversed(chain):  # innermost first
        text = str(x).split(" See full TensorStore details", 1)[0]
        text = re.sub(r"<class '([\w.]+)'>", r"\1", text)
        while re.search(r"<[^<>]*>", text):
            text = re.sub(r"\s*<[^<>]*>", "", text)
        text = " ".join(text.split()).rstrip(" :;,.")
        if text:
            text = f"{type(x).__name__}: {text}"
            return text if len(text) <= 300 else text[:297].rstrip() + "..."
    return f"{type(chain[0]).__name__}" if chain else "unreadable"


def _damaged_orbax(path: Path, e: BaseException | None) -> CheckpointError | None:
    """One line naming the orbax directory and the file that is missing or damaged: a file of the list
    save_orbax wrote absent or of another size, a required file absent or empty, else a file named in the
    error, else the error's first line. None (with no error given) when nothing is seen wrong."""
    listed = _read_file_list(path)
    if isinstance(listed, CheckpointError):
        return listed
    if listed is not None:
        for rel, (size, _) in listed.items():
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
    return CheckpointError(f"Damaged orbax checkpoint {path}: a file under params/ is missing, truncated or "
                           f"damaged ({_plain(e)}); re-convert the checkpoint")


def restore_orbax(path, config: VipLlavaConfig, *, dtype=None, mesh=None, scan_layers: bool = False,
                  verify: bool = True) -> dict:
    """Restore ``params`` of an orbax directory, in the layout ``scan_layers`` asks for (whatever the saved one),
    on ``mesh`` if given. A damaged directory (a data file, ``manifest.ocdbt`` or
    ``_METADATA`` missing or truncated) is one `CheckpointError` naming it and the file; the hundreds of lines
    orbax's background threads print meanwhile are held back.

    verify: first check every file's CRC-32 against the one ``params_files.json`` recorded at save (the whole
    checkpoint is read once more; see README for the cost), so that a file damaged in place, at its size, is
    refused naming it rather than loaded as weights. With several processes each one checks every file.
    False skips it (sizes are still checked); directories written before checksums are checked by size only."""
    path = Path(path).absolute()
    bad = _damaged_orbax(path, None)  # a few stats: fail before orbax starts its threads
    if bad is None and verify:
        bad = _bad_checksum(path)
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
    saved = read_hf_config(path)
    saved_scan = bool(saved[FORMAT_KEY].get("scan_layers", False))
    if config.quantization is not None and saved.get("quantization_config") is None:
        # a float checkpoint loaded quantized: restore it in float, then quantize kernel by kernel (the float
        # tree is whole on the devices first: convert --quantize once to load quantized from the start)
        params = _restore_orbax(path, config.replace(quantization=None), dtype=dtype, mesh=None,
                                scan_layers=scan_layers)
        flat = flat_paths(params)
        for p in [p for p in flat if is_quantized_kernel(p, config.quantization)]:
            q = quantize_kernel(flat.pop(p), config.quantization, dtype)
            flat.update({f"{p}/{leaf}": v for leaf, v in q.items()})
        params = unflatten_paths(flat)
        if mesh is not None:
            params = jax.device_put(params, param_shardings(config, mesh, scan_layers=scan_layers))
        return params
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
        keep = keeps_int_dtype(p)  # quantized values and zero points stay int8/int4; their scales take dtype
        abstract[p] = jax.ShapeDtypeStruct(v.shape, saved_dtypes[p] if keep else dtype or saved_dtypes[p],
                                           sharding=sh)
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
