"""What the orbax checksums cost: save with and without the CRC-32 pass, load with and without verification.

    python bench/checksum.py                      # ~1.2 GB checkpoint (7b shapes, bf16, 1 decoder layer, 12 CLIP layers)
    python bench/checksum.py --text-layers 3      # bigger (~2 GB)
    python bench/checksum.py --workdir /data/tmp  # the disk to measure (default: the system temp directory)

Random weights of a shrunk 7b preset are saved with `save_orbax` (the real code path: orbax, then
`params_files.json` with each file's size and CRC-32) into a temp directory, removed at the end. Timed (median of
--repeats, wall time):

  save_s / save_nocrc_s   save_orbax, with the checksum pass and with `_list_files(checksum=False)`
  load_*_s                restore_orbax with verify=True / verify=False; "warm": the files in the page cache (just
                          written or read), "cold": each file evicted first with posix_fadvise(DONTNEED), so the
                          reads come from the disk (as after a reboot or for a checkpoint bigger than the RAM)
  verify_s                the checksum pass alone (`_bad_checksum`), warm
Ratios: with / without. GB/s: checkpoint bytes / seconds. Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from vipllava_jax.checkpoints import orbax as O  # noqa: E402
from vipllava_jax.models.config import VipLlavaConfig  # noqa: E402
from vipllava_jax.models.params import abstract_param_tree, flat_paths, unflatten_paths  # noqa: E402
from vipllava_jax.models.presets import PRESETS  # noqa: E402


def make_config(text_layers: int, vision_layers: int) -> VipLlavaConfig:
    d = PRESETS["7b"].to_hf()
    d["text_config"]["num_hidden_layers"] = text_layers
    d["vision_config"]["num_hidden_layers"] = vision_layers
    return VipLlavaConfig.from_hf(d)


def random_params(cfg: VipLlavaConfig, seed: int) -> dict:
    """bf16 random bits with the top exponent bit cleared (finite, |x| < 2): incompressible, so the files on disk
    are as big as the arrays, as with real weights."""
    import ml_dtypes
    rng = np.random.default_rng(seed)
    out = {}
    for p, v in flat_paths(abstract_param_tree(cfg, False)).items():
        shape = v.value.shape
        bits = np.frombuffer(rng.bytes(2 * int(np.prod(shape))), np.uint16) & np.uint16(0xBFFF)
        out[p] = bits.view(ml_dtypes.bfloat16).reshape(shape)
    return unflatten_paths(out)


def evict(d: Path) -> None:
    for f in d.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def timed(fn, repeats: int, before=lambda: None) -> float:
    ts = []
    for _ in range(repeats):
        before()
        t0 = time.perf_counter()
        r = fn()
        jax.block_until_ready(r)
        ts.append(time.perf_counter() - t0)
        del r
    return statistics.median(ts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text-layers", type=int, default=1)
    ap.add_argument("--vision-layers", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default=None, help="where the temp checkpoints go (default: the temp directory)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    cfg = make_config(args.text_layers, args.vision_layers)
    params = random_params(cfg, args.seed)
    work = Path(tempfile.mkdtemp(prefix="vipllava-checksum-", dir=args.workdir))
    try:
        out = work / "ckpt"
        save = lambda: O.save_orbax(params, cfg, out, overwrite=True)  # noqa: E731
        plain_list = functools.partial(O._list_files, checksum=False)
        real_list = O._list_files

        def save_nocrc():
            O._list_files = plain_list
            try:
                return save()
            finally:
                O._list_files = real_list

        save()  # warm-up: orbax's first save in a process sets things up
        t_save = timed(save, args.repeats)
        t_save_nocrc = timed(save_nocrc, args.repeats)
        save()  # the checkpoint the loads read, with checksums
        gb = sum(f.stat().st_size for f in (out / "params").rglob("*") if f.is_file()) / 1e9
        n_files = len(json.loads((out / O.FILE_LIST).read_text()))

        load = lambda verify: lambda: O.restore_orbax(out, cfg, verify=verify)  # noqa: E731
        load(True)()  # warm-up
        t_warm_v = timed(load(True), args.repeats)
        t_warm = timed(load(False), args.repeats)
        t_verify = timed(lambda: O._bad_checksum(out), args.repeats)
        cold = functools.partial(evict, out)
        t_cold_v = timed(load(True), args.repeats, before=cold)
        t_cold = timed(load(False), args.repeats, before=cold)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    res = dict(gb=round(gb, 3), files=n_files, cpus=os.cpu_count(), machine=platform.processor() or platform.machine(),
               save_s=t_save, save_nocrc_s=t_save_nocrc, verify_s=t_verify, load_warm_verify_s=t_warm_v,
               load_warm_s=t_warm, load_cold_verify_s=t_cold_v, load_cold_s=t_cold)
    rows = [("save", t_save, t_save_nocrc), ("load, warm cache", t_warm_v, t_warm),
            ("load, cold cache", t_cold_v, t_cold)]
    print(f"checkpoint: {gb:.2f} GB in {n_files} files under params/; {os.cpu_count()} CPUs; median of {args.repeats}")
    print(f"{'':18} {'with crc32':>12} {'without':>12} {'ratio':>7} {'GB/s with':>10} {'GB/s without':>13}")
    for name, a, b in rows:
        print(f"{name:18} {a:11.2f}s {b:11.2f}s {a / b:7.2f} {gb / a:10.2f} {gb / b:13.2f}")
    print(f"checksum pass alone (warm): {t_verify:.2f}s = {gb / t_verify:.2f} GB/s")
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
