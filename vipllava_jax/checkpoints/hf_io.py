"""Reading and writing HF checkpoint files tensor by tensor, without torch for safetensors.

Supported: ``model.safetensors``, sharded ``model.safetensors.index.json``, and
``pytorch_model.bin`` (sharded ``pytorch_model.bin.index.json`` too; needs torch).
"""
from __future__ import annotations

import json
import os
import secrets
import struct as _struct
from pathlib import Path

import ml_dtypes
import numpy as np

from .config_file import CheckpointError

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_NP_TO_ST = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class SafetensorsFile:
    """Lazy reader: parses the header, reads one tensor at a time with np.memmap (only its bytes)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = _struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(f"{self.path}: truncated or corrupt safetensors file: header says {n} bytes "
                                      f"but the file has {size}")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (a JSON {type(header).__name__}, "
                                  f"not an object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.entries = header
        data_size = size - self.data_start
        spans = []
        for key, e in header.items():
            spans.append(self._check_entry(key, e, data_size))
        spans.sort()
        for (s0, e0, k0), (s1, e1, k1) in zip(spans, spans[1:]):
            if s1 < e0:
                raise CheckpointError(f"{self.path}: tensors {k0!r} (bytes {s0}-{e0}) and {k1!r} (bytes {s1}-{e1}) "
                                      f"overlap: corrupt safetensors header")

    def _check_entry(self, key, e, data_size: int) -> tuple[int, int, str]:
        """One header entry: dtype, shape and data_offsets present and sane, its bytes inside the data section."""
        where = f"{self.path}: tensor {key!r}"
        if not isinstance(e, dict):
            raise CheckpointError(f"{where}: header entry is not an object")
        for field in ("dtype", "shape", "data_offsets"):
            if field not in e:
                raise CheckpointError(f"{where}: header entry has no {field!r}")
        shape, offs = e["shape"], e["data_offsets"]
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)):
            raise CheckpointError(f"{where}: data_offsets {offs!r} is not [begin, end]")
        start, end = offs
        if start < 0 or end < start:
            raise CheckpointError(f"{where}: data_offsets {offs} are negative or reversed: corrupt safetensors "
                                  f"header")
        if end > data_size:
            raise CheckpointError(f"{self.path}: truncated safetensors file: tensor {key!r} needs bytes up to "
                                  f"{self.data_start + end} but the file has {self.data_start + data_size}")
        if e["dtype"] in SAFETENSORS_DTYPES:
            need = int(np.prod(shape)) * np.dtype(SAFETENSORS_DTYPES[e["dtype"]]).itemsize
            if end - start != need:
                raise CheckpointError(f"{where} has {end - start} bytes, shape {tuple(shape)} {e['dtype']} needs "
                                      f"{need}")
        return start, end, key

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def is_float(self, key: str) -> bool:
        return self.entries[key]["dtype"] in FLOAT_DTYPES

    def get(self, key: str) -> np.ndarray:
        """A read-only memory-mapped view; copy it (np.array) to own the data."""
        e = self.entries[key]
        if e["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {key!r} has unsupported dtype {e['dtype']}")
        dtype = np.dtype(SAFETENSORS_DTYPES[e["dtype"]])
        start, end = e["data_offsets"]
        shape = tuple(e["shape"])
        if end - start != int(np.prod(shape)) * dtype.itemsize:
            raise CheckpointError(f"{self.path}: tensor {key!r} has {end - start} bytes, shape {shape} "
                                  f"{e['dtype']} needs {int(np.prod(shape)) * dtype.itemsize}")
        if end == start:
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self.data_start + start, shape=shape)


class TorchBinFile:
    """``pytorch_model.bin`` through ``torch.load(weights_only=True, mmap=True)``."""

    def __init__(self, path):
        try:
            import torch
        except ImportError:
            raise CheckpointError(f"{path} is a PyTorch .bin checkpoint; reading it needs torch "
                                  f"(pip install torch, or convert it to safetensors)") from None
        self.path = Path(path)
        try:
            self.sd = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - torch raises many kinds
            raise CheckpointError(f"{self.path}: cannot read PyTorch checkpoint ({type(e).__name__}: {e})") from None

    def keys(self):
        return list(self.sd)

    def shape(self, key):
        return tuple(self.sd[key].shape)

    def is_float(self, key) -> bool:
        return bool(self.sd[key].dtype.is_floating_point)

    def get(self, key) -> np.ndarray:
        import torch
        t = self.sd[key]
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()


def read_shard_index(index: Path) -> dict[str, str]:
    """``weight_map`` of a shard index, checked: a JSON object with a ``weight_map`` of key -> file name, every
    file inside the model directory (an index naming ``../x.safetensors`` or an absolute path is refused)."""
    try:
        with open(index, "rb") as f:
            data = json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or "weight_map" not in data:
        raise CheckpointError(f"{index}: no 'weight_map' (a shard index maps each tensor name to its file)")
    wm = data["weight_map"]
    if not isinstance(wm, dict):
        raise CheckpointError(f"{index}: 'weight_map' is a {type(wm).__name__}, not an object")
    for key, fn in wm.items():
        if not isinstance(fn, str) or not fn:
            raise CheckpointError(f"{index}: tensor {key!r} maps to {fn!r}, not a file name")
        parts = Path(fn).parts
        if Path(fn).is_absolute() or ".." in parts or "\\" in fn or len(parts) != 1:
            raise CheckpointError(f"{index}: tensor {key!r} maps to {fn!r}, outside the model directory; shard "
                                  f"files must sit beside the index")
    return dict(wm)


class HFCheckpoint:
    """All tensors of an HF model directory, wherever they live. ``items()`` streams (key, shape, getter)."""

    def __init__(self, model_dir: str | os.PathLike):
        d = Path(model_dir)
        self.dir = d
        self.index: Path | None = None
        self.files: dict[str, object] = {}
        self.key_to_file: dict[str, str] = {}
        for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                                   ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            if (d / index_name).exists():
                self.key_to_file = read_shard_index(d / index_name)
                missing = sorted({fn for fn in self.key_to_file.values() if not (d / fn).exists()})
                if missing:
                    raise CheckpointError(f"{d / index_name} lists shard(s) that are missing: {missing}")
                self.index = d / index_name
                break
            if (d / single).exists():
                opener = self._open(single)
                self.key_to_file = {k: single for k in opener.keys()}
                break
        else:
            raise CheckpointError(f"No weights in {d}: looked for model.safetensors, model.safetensors.index.json, "
                                  f"pytorch_model.bin and pytorch_model.bin.index.json")

    def _open(self, fn: str):
        if fn not in self.files:
            p = self.dir / fn
            self.files[fn] = TorchBinFile(p) if fn.endswith(".bin") else SafetensorsFile(p)
        return self.files[fn]

    def keys(self) -> list[str]:
        return list(self.key_to_file)

    def file_of(self, key):
        return self._open(self.key_to_file[key])

    def _file_with(self, key):
        f = self.file_of(key)
        if key not in f.keys():
            where = self.index or "the index"
            raise CheckpointError(f"{where}: tensor {key!r} is mapped to {self.key_to_file[key]}, which does not "
                                  f"hold it")
        return f

    def shape(self, key):
        return self._file_with(key).shape(key)

    def is_float(self, key) -> bool:
        return self._file_with(key).is_float(key)

    def get(self, key) -> np.ndarray:
        return self._file_with(key).get(key)

    def close_file(self, key):
        """Drop the reader of a shard once it is fully read (frees a torch .bin state dict)."""
        fn = self.key_to_file[key]
        self.files.pop(fn, None)


def save_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    """Write a safetensors file atomically (temp file + rename); bf16 via ml_dtypes."""
    path = Path(path)
    header, offset = {}, 0
    for k, a in tensors.items():
        dt = np.dtype(a.dtype)
        if dt not in _NP_TO_ST:
            raise CheckpointError(f"cannot write tensor {k!r} of dtype {dt} to safetensors")
        n = a.size * dt.itemsize
        header[k] = {"dtype": _NP_TO_ST[dt], "shape": list(a.shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = metadata
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    with open(tmp, "wb") as f:
        f.write(_struct.pack("<Q", len(hb)))
        f.write(hb)
        for a in tensors.values():
            f.write(np.ascontiguousarray(a).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
