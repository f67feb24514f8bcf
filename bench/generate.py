"""Generation benchmark: vipllava-jax against HF transformers (PyTorch), side by side in one run, same weights.

    python bench/generate.py --config tiny                # CPU, a few minutes
    python bench/generate.py --config 7b                  # GPU (7B-shaped random weights, bf16; ~15 GB each side)
    python bench/generate.py --config 7b --json out.jsonl --batches 1,8,32

Random weights of the chosen shape are built once with transformers, saved as safetensors, and loaded by both
sides. Inputs: one image (random pixels at the vision tower's size) and --prompt-tokens random text tokens per row,
the <image> placeholder expanded to image_seq_length tokens as the HF processor does. Both sides generate exactly
--new-tokens tokens greedily (EOS ignored).

Metrics (median of --repeats warm runs):
  ttft_ms        time to the first new token at batch 1 (prefill incl. vision tower, + one token)
  decode_tok_s   B * (N - 1) / (time for N tokens - time for 1 token): the decode loop alone
  e2e_tok_s      B * N / time for N tokens
  compile_s      JAX only: first call minus a warm call (prefill + decode loop, batch = first of --batches)
  cached_compile_s  JAX only: the same after clearing in-memory caches, loading from the persistent cache
  peak_mem_gib   peak device memory (GPU), or the process's peak RSS on CPU (both sides share the process)
Ratios in the table: speed ratios are jax / torch, latency ratios torch / jax, so > 1 means JAX is faster.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", choices=("tiny", "7b", "13b"))
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                    help="default: float32 for tiny, bfloat16 otherwise")
    ap.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes for decode throughput")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=40, help="text tokens besides the image tokens")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also append the JSON lines to this file")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--workdir", default=None, help="where to save the random checkpoint (default: a temp dir)")
    return ap.parse_args(argv)


def median_time(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def host_peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def build_checkpoint(cfg_name: str, dtype: str, out: Path, device: str):
    """Random HF VipLlava weights of the preset's shape, saved to `out`; returns the torch model."""
    import torch
    from transformers import VipLlavaConfig, VipLlavaForConditionalGeneration
    from vipllava_jax.plan import PRESETS
    hf = VipLlavaConfig(**PRESETS[cfg_name].to_hf())
    tdtype = getattr(torch, dtype)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(tdtype)  # init straight in the target dtype (7B in fp32 would double the memory)
    try:
        with torch.device(device):
            model = VipLlavaForConditionalGeneration(hf)
    finally:
        torch.set_default_dtype(prev)
    model = model.eval()
    with torch.no_grad():  # keep activations sane with random weights: small normal weights, unit norms
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.02)
    model.save_pretrained(out)
    return model


def make_inputs(cfg, batch: int, prompt_tokens: int, rng):
    n_img = cfg.image_seq_length
    text = rng.integers(3, min(cfg.text.vocab_size, 32000) - 1, (prompt_tokens,))
    text[text == cfg.image_token_index] = 3
    row = np.concatenate([[1], [cfg.image_token_index] * n_img, text]).astype(np.int64)
    ids = np.tile(row, (batch, 1))
    size = cfg.vision.image_size
    pixels = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    return ids, pixels, np.ones_like(ids)


def bench_jax(module, params, cfg, args, batches, rng, emit):
    import jax
    from vipllava_jax import generation
    n = args.new_tokens

    def run(b, new):
        ids, pix, mask = inputs[b]
        return generation.generate(module, params, ids, pix, mask, max_new_tokens=new, eos_token_id=[])

    inputs = {b: make_inputs(cfg, b, args.prompt_tokens, rng) for b in sorted(set(batches) | {1})}
    b0 = batches[0]
    t0 = time.perf_counter()
    run(b0, n)
    first = time.perf_counter() - t0
    warm = median_time(lambda: run(b0, n), args.repeats)
    emit("jax", "compile_s", b0, first - warm, "s")
    # the persistent compilation cache: drop every in-memory compiled function and time the first call again
    jax.clear_caches()
    generation._compiled.cache_clear()
    t0 = time.perf_counter()
    run(b0, n)
    emit("jax", "cached_compile_s", b0, time.perf_counter() - t0 - warm, "s")
    run(1, 1)
    emit("jax", "ttft_ms", 1, 1e3 * median_time(lambda: run(1, 1), args.repeats), "ms")
    for b in batches:
        run(b, n), run(b, 1)
        t_n = median_time(lambda: run(b, n), args.repeats)
        t_1 = median_time(lambda: run(b, 1), args.repeats)
        emit("jax", "decode_tok_s", b, b * (n - 1) / max(t_n - t_1, 1e-9), "tok/s")
        emit("jax", "e2e_tok_s", b, b * n / t_n, "tok/s")
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        emit("jax", "peak_mem_gib", None, stats["peak_bytes_in_use"] / 2**30, "GiB")
    else:
        emit("jax", "peak_mem_gib", None, host_peak_gib(), "GiB (host RSS)")


def bench_torch(model, cfg, args, batches, rng, emit, device):
    import torch
    n = args.new_tokens
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    inputs = {}
    for b in sorted(set(batches) | {1}):
        ids, pix, mask = make_inputs(cfg, b, args.prompt_tokens, rng)
        inputs[b] = (torch.tensor(ids, device=device), torch.tensor(pix, device=device, dtype=model.dtype),
                     torch.tensor(mask, device=device))

    def run(b, new):
        ids, pix, mask = inputs[b]
        with torch.no_grad():
            out = model.generate(input_ids=ids, pixel_values=pix, attention_mask=mask, max_new_tokens=new,
                                 min_new_tokens=new, do_sample=False, pad_token_id=0)
        sync()
        return out

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run(1, 1)
    emit("torch", "ttft_ms", 1, 1e3 * median_time(lambda: run(1, 1), args.repeats), "ms")
    for b in batches:
        run(b, 2)
        t_n = median_time(lambda: run(b, n), args.repeats)
        t_1 = median_time(lambda: run(b, 1), args.repeats)
        emit("torch", "decode_tok_s", b, b * (n - 1) / max(t_n - t_1, 1e-9), "tok/s")
        emit("torch", "e2e_tok_s", b, b * n / t_n, "tok/s")
    if device == "cuda":
        emit("torch", "peak_mem_gib", None, torch.cuda.max_memory_allocated() / 2**30, "GiB")
    else:
        emit("torch", "peak_mem_gib", None, host_peak_gib(), "GiB (host RSS)")


def table(rows) -> str:
    by = {}
    for r in rows:
        by.setdefault((r["metric"], r["batch"]), {})[r["impl"]] = r
    lines = [f"{'metric':<18}{'batch':>6}{'jax':>18}{'torch':>18}{'ratio':>9}"]
    for (metric, batch), d in by.items():
        j, t = d.get("jax"), d.get("torch")
        ratio = ""
        if j and t and j["value"] and t["value"] and metric != "peak_mem_gib":
            ratio = t["value"] / j["value"] if metric.endswith(("_ms", "_s")) and "tok" not in metric else \
                j["value"] / t["value"]
            ratio = f"{ratio:.2f}x"
        fmt = lambda r: "" if r is None else f"{r['value']:.3g} {r['unit'].split(' ')[0]}"  # noqa: E731
        lines.append(f"{metric:<18}{'' if batch is None else batch:>6}{fmt(j):>18}{fmt(t):>18}{ratio:>9}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    dtype = args.dtype or ("float32" if args.config == "tiny" else "bfloat16")
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    import jax
    import jax.numpy as jnp
    cache = Path(tempfile.mkdtemp(prefix="vipllava-bench-xla-"))
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    import torch
    from vipllava_jax import load_pretrained
    device = "cuda" if torch.cuda.is_available() and args.config != "tiny" else "cpu"
    jax_device = jax.devices()[0]
    meta = {"config": args.config, "dtype": dtype, "jax_device": jax_device.device_kind,
            "torch_device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
            "date": datetime.date.today().isoformat(), "new_tokens": args.new_tokens,
            "prompt_tokens": args.prompt_tokens, "jax": jax.__version__, "torch": torch.__version__}
    print(json.dumps({"meta": meta}), flush=True)
    rows = []

    def emit(impl, metric, batch, value, unit):
        r = {"impl": impl, "metric": metric, "batch": batch, "value": float(value), "unit": unit, **meta}
        rows.append(r)
        line = json.dumps(r)
        print(line, flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(line + "\n")

    work = Path(args.workdir or tempfile.mkdtemp(prefix="vipllava-bench-"))
    ckpt = work / f"random-{args.config}"
    t0 = time.perf_counter()
    model = build_checkpoint(args.config, dtype, ckpt, device)
    print(f"# random {args.config} checkpoint in {time.perf_counter() - t0:.1f}s: {ckpt}", file=sys.stderr)
    if not args.skip_torch:
        bench_torch(model, load_cfg(ckpt), args, batches, np.random.default_rng(args.seed), emit, device)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    module, params = load_pretrained(ckpt, dtype=jnp.dtype(dtype), progress=False)
    bench_jax(module, params, module.config, args, batches, np.random.default_rng(args.seed), emit)
    print(f"\n{args.config} {dtype}, {args.prompt_tokens} text tokens + 1 image, {args.new_tokens} new tokens; "
          f"JAX on {meta['jax_device']}, PyTorch on {meta['torch_device']}; {meta['date']}")
    print(table(rows))
    return 0


def load_cfg(ckpt):
    from vipllava_jax.checkpoint import load_config
    return load_config(ckpt)


if __name__ == "__main__":
    sys.exit(main())
