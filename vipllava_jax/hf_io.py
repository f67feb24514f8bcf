"""Reading and writing HF checkpoint files tensor by tensor, without torch for safetensors.

Supported: ``model.safetensors``, sharded ``model.safetensors.index.json``, and
``pytorch_model.bin`` (sharded ``pytorch_model.bin.index.json`` too; needs torch).
"""
from __future__ import annotations

import json
import os
import struct as _struct
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_NP_TO_ST = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}


class CheckpointError(ValueError):
    pass


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
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.entries = header
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self.data_start + end > size:
            raise CheckpointError(f"{self.path}: truncated safetensors file: tensors need {self.data_start + end} "
                                  f"bytes but the file has {size}")

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

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

    def get(self, key) -> np.ndarray:
        import torch
        t = self.sd[key]
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()


class HFCheckpoint:
    """All tensors of an HF model directory, wherever they live. ``items()`` streams (key, shape, getter)."""

    def __init__(self, model_dir: str | os.PathLike):
        d = Path(model_dir)
        self.dir = d
        self.files: dict[str, object] = {}
        self.key_to_file: dict[str, str] = {}
        for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                                   ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            if (d / index_name).exists():
                with open(d / index_name) as f:
                    wm = json.load(f)["weight_map"]
                self.key_to_file = dict(wm)
                missing = sorted({fn for fn in wm.values() if not (d / fn).exists()})
                if missing:
                    raise CheckpointError(f"{d / index_name} lists shard(s) that are missing: {missing}")
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

    def shape(self, key):
        return self.file_of(key).shape(key)

    def get(self, key) -> np.ndarray:
        f = self.file_of(key)
        if key not in f.keys():
            raise CheckpointError(f"tensor {key!r} is listed in the index but missing from {f.path}")
        return f.get(key)

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
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(_struct.pack("<Q", len(hb)))
        f.write(hb)
        for a in tensors.values():
            f.write(np.ascontiguousarray(a).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
