"""What a run started from, cheaply fingerprinted: its data files and its base model. A resume whose data or model
changed at the same path is refused (`check_fingerprint`), naming the file.

Data files (``data``, ``eval_data``): size, SHA-256 of the bytes and, for files up to `COUNT_LIMIT`, the number
of records. The base model (the resolved local directory; a hub id's snapshot): ``config.json``, any index and
the tokenizer and processor files by their bytes; each ``.safetensors`` file by its size, its header (names,
dtypes, shapes, offsets) and a sample of each tensor's bytes (its start, middle and end), since weights replaced
by others of the same shapes keep the header; ``.bin`` files by size and evenly spaced samples; an orbax directory
by those small files (``config.json``, ``params_files.json``) and ``params/``'s ``_METADATA`` and manifests (a
re-save writes data files of new names, which these list). A 7B model's fingerprint reads a few MB, not the
weights.
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

COUNT_LIMIT = 64 << 20  # data files up to this size are parsed to count their records (for the message)
_SAMPLE = 256  # bytes sampled at a tensor's start, middle and end
_CHUNK = 1 << 20
SMALL_FILES = (".json", ".jinja", ".model", ".txt")  # what a hub snapshot holds besides the weights


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _count_records(raw: bytes) -> int | None:
    try:
        text = raw.decode("utf-8")
        if text.lstrip().startswith("["):
            v = json.loads(text)
            return len(v) if isinstance(v, list) else None
        return sum(1 for line in text.splitlines() if line.strip())
    except (UnicodeDecodeError, ValueError):
        return None


def data_fingerprint(path) -> dict | None:
    """``{"path", "size", "sha256", "records"}`` of a data file; None when it cannot be read (the run's own
    reading of it then says why)."""
    p = Path(path).absolute()
    try:
        size = p.stat().st_size
        h = hashlib.sha256()
        records = None
        with open(p, "rb") as f:
            if size <= COUNT_LIMIT:
                raw = f.read()
                h.update(raw)
                records = _count_records(raw)
            else:
                for chunk in iter(lambda: f.read(_CHUNK), b""):
                    h.update(chunk)
    except OSError:
        return None
    return {"path": str(p), "size": size, "sha256": h.hexdigest(), "records": records}


def _safetensors_digest(f: Path) -> str:
    size = f.stat().st_size
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"{size}:{_sha(head)}"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:  # a damaged file: the load names it; here its size and first bytes stand for it
            return f"{size}:{_sha(head + fh.read(4096))}"
        header = fh.read(n)
        h.update(header)
        try:
            entries = json.loads(header)
        except ValueError:
            entries = {}
        for key in sorted(entries) if isinstance(entries, dict) else ():
            offs = entries[key].get("data_offsets") if isinstance(entries[key], dict) else None
            if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)):
                continue
            a, b = 8 + n + offs[0], 8 + n + offs[1]
            for at in sorted({a, max(a, (a + b - _SAMPLE) // 2), max(a, b - _SAMPLE)}):
                fh.seek(at)
                h.update(fh.read(min(_SAMPLE, max(0, b - at))))
    return f"{size}:{h.hexdigest()}"


def _sampled_digest(f: Path, samples: int = 64, block: int = 4096) -> str:
    size = f.stat().st_size
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for i in range(samples):
            fh.seek(max(0, (size - block) * i // max(1, samples - 1)))
            h.update(fh.read(block))
    return f"{size}:{h.hexdigest()}"


def model_fingerprint(model_dir) -> dict:
    """``{"path", "files": {relative name: digest}}`` of a model directory (HF or orbax)."""
    d = Path(model_dir).absolute()
    files: dict[str, str] = {}

    def whole(rel: str) -> None:
        f = d / rel
        if f.is_file():
            b = f.read_bytes()
            files[rel] = f"{len(b)}:{_sha(b)}"

    for f in sorted(d.iterdir()):  # config, index, tokenizer and processor files: small, read whole
        if f.is_file() and f.suffix in SMALL_FILES and f.stat().st_size <= 64 << 20:
            whole(f.name)
    if (d / "params").is_dir():  # orbax (save_orbax / convert)
        for f in sorted((d / "params").rglob("*")):
            if f.is_file() and (f.name in ("_METADATA", "manifest.ocdbt", "_sharding")):
                whole(str(f.relative_to(d)))
        if "params_files.json" not in files:  # older orbax directories: every file's name and size
            files["params/*"] = "-:" + _sha(json.dumps(sorted((str(f.relative_to(d)), f.stat().st_size)
                                                      for f in (d / "params").rglob("*") if f.is_file())).encode())
        return {"path": str(d), "files": files}
    for f in sorted(d.iterdir()):
        if not f.is_file():
            continue
        if f.suffix == ".safetensors":
            files[f.name] = _safetensors_digest(f)
        elif f.suffix == ".bin":
            files[f.name] = _sampled_digest(f)
    return {"path": str(d), "files": files}


def run_fingerprint(data, eval_data, model_dir) -> dict:
    """What `check_fingerprint` compares: the data files and the model a run started from."""
    out = {"model": model_fingerprint(model_dir), "data": data_fingerprint(data)}
    if eval_data:
        out["eval_data"] = data_fingerprint(eval_data)
    return out


def _size(n: int) -> str:
    return f"{n} bytes"


def _data_change(role: str, was: dict, now: dict) -> str:
    what = f"{'eval data' if role == 'eval_data' else 'data'} file {now['path']} changed since the run started"
    if was.get("records") is not None and now.get("records") is not None and was["records"] != now["records"]:
        return f"{what} ({was['records']} -> {now['records']} records)"
    if was.get("size") != now.get("size"):
        return f"{what} ({_size(was.get('size'))} -> {_size(now.get('size'))})"
    return f"{what} (same size, different contents)"


def fingerprint_change(was: dict | None, now: dict) -> str | None:
    """One line naming the first file that differs between a run's saved fingerprint and this run's, or None.
    ``was`` None (a run saved before fingerprints existed) checks nothing. A data file unreadable now is left
    to the run's own reading; an eval file at another path is another setting, not a change."""
    if not was:
        return None
    for role in ("data", "eval_data"):
        w, n = was.get(role), now.get(role)
        if not w or not n:
            continue
        if role == "eval_data" and w.get("path") != n.get("path"):
            continue
        if (w.get("size"), w.get("sha256")) != (n.get("size"), n.get("sha256")):
            return _data_change(role, w, n)
    w, n = was.get("model"), now.get("model")
    if w and n and w.get("files") != n.get("files"):
        wf, nf = w.get("files", {}), n.get("files", {})
        names = sorted(set(wf) | set(nf), key=lambda k: (k != "config.json", k))
        for k in names:
            if wf.get(k) != nf.get(k):
                if k not in nf:
                    how = "is gone"
                elif k not in wf:
                    how = "is new"
                else:
                    ws, ns = wf[k].split(":")[0], nf[k].split(":")[0]
                    how = f"differs ({ws} -> {ns} bytes)" if ws != ns else "differs (same size, other contents)"
                return f"base model {n['path']} changed since the run started: {k} {how}"
    return None
