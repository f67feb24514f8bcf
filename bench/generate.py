"""Generation benchmark: vipllava-jax against HF transformers (PyTorch), side by side in one run, same weights.

    python bench/generate.py --config tiny                # CPU: about 1-2 minutes on 2 cores
    python bench/generate.py --config 7b                  # one GPU (7B-shaped random weights, bf16; ~14 GB each side)
    python bench/generate.py --config 7b --json out.jsonl --batches 1,8,32
    python bench/generate.py --config 7b --quantize int8   # JAX with int8 weights (bf16 PyTorch beside it)

Random weights of the chosen shape are built once with transformers (on the target device, in the target dtype),
saved as safetensors into a temp dir, and loaded by both sides; nothing is downloaded. Inputs: one image (random
pixels at the vision tower's size) and --prompt-tokens random text tokens per row, the <image> placeholder expanded
to image_seq_length image tokens as the HF processor does; batch B repeats that row B times with B images. Both
sides generate exactly --new-tokens tokens greedily (EOS ignored). PyTorch runs first; its model is freed before
JAX loads the weights and initializes its device (so JAX's GPU memory preallocation does not starve PyTorch).

Metrics (median of --repeats warm runs; wall time with time.perf_counter, results fetched to the host):
  ttft_ms           time to the first new token at batch 1 (prefill incl. the vision tower, + one token)
  decode_tok_s      B * (N - 1) / (time for N tokens - time for 1 token): the decode loop alone
  e2e_tok_s         B * N / time for N tokens, prefill included
  first_call_s      JAX only: wall time of the very first call (batch = first of --batches, N tokens)
  compile_s         JAX only: first call minus a warm call (prefill + decode loop programs)
  cached_compile_s  JAX only: the same after dropping the in-memory compiled functions, so the programs come
                    from the persistent compilation cache (a fresh process with a warm cache)
  peak_mem_gib      peak device memory on GPU (JAX memory_stats()["peak_bytes_in_use"],
                    torch.cuda.max_memory_allocated); on CPU the process's peak RSS ("host RSS"), which
                    both sides share since they run in one process
Ratios in the table: speed ratios are jax / torch, latency ratios torch / jax, so > 1 means JAX is faster.

--text-layers / --vision-layers / --image-size shrink a preset (e.g. a quick smoke test of the 7b code path on
a CPU: --config 7b --text-layers 1 --image-size 56 --dtype float32 --batches 1 --new-tokens 4 --repeats 1).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", choices=("tiny", "7b", "13b"), help="a vipllava_jax.models.PRESETS preset")
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                    help="default: float32 for tiny, bfloat16 otherwise")
    ap.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes for decode throughput")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=40, help="text tokens besides the image tokens")
    ap.add_argument("--image-size", type=int, default=None,
                    help="image side in pixels (default: the preset's, 336 for 7b, 30 for tiny); changes the "
                         "tower's position table and image_seq_length = (size / patch)^2 on both sides")
    ap.add_argument("--text-layers", type=int, default=None, help="override the decoder depth (smoke tests)")
    ap.add_argument("--vision-layers", type=int, default=None,
                    help="override the vision tower depth (must still cover vision_feature_layers)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    ap.add_argument("--seed", type=int, default=0, help="weights and inputs")
    ap.add_argument("--json", default=None, help="also append the JSON lines to this file")
    ap.add_argument("--skip-torch", action="store_true", help="JAX only")
    ap.add_argument("--cpu", action="store_true", help="run both sides on the CPU even when a GPU is present")
    ap.add_argument("--workdir", default=None, help="where to save the random checkpoint (default: a temp dir, "
                                                    "removed at the end)")
    ap.add_argument("--quantize", default=None, choices=("int8", "int4"),
                    help="JAX side: the language model's linear weights loaded int8 / int4 (weight-only, qwix); "
                         "PyTorch stays in --dtype. bench/quant_decode.py reads the weight bytes from the compiled "
                         "decode step")
    ap.add_argument("--quantize-tile-size", type=int, default=128,
                    help="int4: input rows a scale (default 128; the tiny config needs 16 or 32)")
    args = ap.parse_args(argv)
    if args.new_tokens < 2:
        ap.error("--new-tokens must be at least 2 (decode throughput excludes the first token)")
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    return args


def median_time(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def host_peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def hf_config_dict(args) -> dict:
    """The preset as an HF config dict, with the --image-size / --text-layers / --vision-layers overrides."""
    from vipllava_jax.models.presets import PRESETS
    d = PRESETS[args.config].to_hf()
    v, t = d["vision_config"], d["text_config"]
    if args.image_size is not None:
        if args.image_size % v["patch_size"]:
            raise SystemExit(f"--image-size {args.image_size} is not a multiple of the patch size {v['patch_size']}")
        v["image_size"] = args.image_size
        d["image_seq_length"] = (args.image_size // v["patch_size"]) ** 2
    if args.text_layers is not None:
        t["num_hidden_layers"] = args.text_layers
    if args.vision_layers is not None:
        v["num_hidden_layers"] = args.vision_layers
    return d


def build_model(cfg_dict: dict, dtype: str, device: str, seed: int):
    """A random HF VipLlavaForConditionalGeneration built straight on `device` in `dtype`."""
    import torch
    from transformers import VipLlavaConfig, VipLlavaForConditionalGeneration
    hf = VipLlavaConfig(**cfg_dict)
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))  # init in the target dtype (7B in fp32 would need 28 GB)
    try:
        with torch.device(device):
            model = VipLlavaForConditionalGeneration(hf)
    finally:
        torch.set_default_dtype(prev)
    model = model.eval()
    with torch.no_grad():  # sane activations with random weights: small normal matrices, norms left at 1
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.02)
    return model


def make_inputs(cfg, batch: int, prompt_tokens: int, rng):
    """[BOS, <image> x image_seq_length, text...] repeated `batch` times, one random image per row."""
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
    from vipllava_jax.generation import generate
    from vipllava_jax.generation.loop import _compiled
    n = args.new_tokens

    def run(b, new):
        ids, pix, mask = inputs[b]
        out = generate(module, params, ids, pix, mask, max_new_tokens=new, eos_token_id=[])
        assert out.shape == (b, new), out.shape  # numpy: the result is on the host, so the work is done
        return out

    inputs = {b: make_inputs(cfg, b, args.prompt_tokens, rng) for b in sorted(set(batches) | {1})}
    b0 = batches[0]
    t0 = time.perf_counter()
    run(b0, n)
    first = time.perf_counter() - t0
    warm = median_time(lambda: run(b0, n), args.repeats)
    emit("jax", "first_call_s", b0, first, "s")
    emit("jax", "compile_s", b0, first - warm, "s")
    # the persistent compilation cache: drop every in-memory compiled function and time the first call again
    jax.clear_caches()
    _compiled.cache_clear()
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
        with torch.inference_mode():
            out = model.generate(input_ids=ids, pixel_values=pix, attention_mask=mask, max_new_tokens=new,
                                 min_new_tokens=new, do_sample=False, pad_token_id=0)
        sync()
        assert out.shape == (b, ids.shape[1] + new), out.shape
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


LATENCY = ("ttft_ms",)  # lower is better; ratio torch / jax
SPEED = ("decode_tok_s", "e2e_tok_s")  # higher is better; ratio jax / torch


def table(rows) -> str:
    by = {}
    for r in rows:
        by.setdefault((r["metric"], r["batch"]), {})[r["impl"]] = r
    rank = {"ttft_ms": 0, "decode_tok_s": 1, "e2e_tok_s": 1, "peak_mem_gib": 2, "first_call_s": 3,
            "compile_s": 3, "cached_compile_s": 3}
    names = list(rank)
    keys = sorted(by, key=lambda k: (rank.get(k[0], 4), k[1] or 0, names.index(k[0]) if k[0] in rank else 0))
    lines = [f"{'metric':<18}{'batch':>6}{'jax':>18}{'torch':>18}{'ratio':>9}"]
    for metric, batch in keys:
        d = by[(metric, batch)]
        j, t = d.get("jax"), d.get("torch")
        ratio = ""
        if j and t and j["value"] > 0 and t["value"] > 0:
            if metric in LATENCY:
                ratio = f"{t['value'] / j['value']:.2f}x"
            elif metric in SPEED:
                ratio = f"{j['value'] / t['value']:.2f}x"

        def fmt(r):
            return "" if r is None else f"{r['value']:.3g} {r['unit'].split(' ')[0]}"
        lines.append(f"{metric:<18}{'' if batch is None else batch:>6}{fmt(j):>18}{fmt(t):>18}{ratio:>9}")
    return "\n".join(lines)


def main(argv=None) -> int:
    t_start = time.perf_counter()
    args = parse_args(argv)
    dtype = args.dtype or ("float32" if args.config == "tiny" else "bfloat16")
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    if not batches or min(batches) < 1:
        raise SystemExit(f"--batches {args.batches!r}: give positive batch sizes")
    import jax  # configure only: the backend starts after PyTorch is done (JAX preallocates GPU memory)
    cache = Path(tempfile.mkdtemp(prefix="vipllava-bench-xla-"))
    if args.cpu:
        jax.config.update("jax_platforms", "cpu")
    cache_settings = {"jax_compilation_cache_dir": str(cache), "jax_persistent_cache_min_compile_time_secs": 0.0,
                      "jax_persistent_cache_min_entry_size_bytes": 0}
    saved_settings = {k: getattr(jax.config, k) for k in cache_settings}  # restored when main() returns
    for k, v in cache_settings.items():
        jax.config.update(k, v)
    import torch
    import transformers
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    torch_device = (f"cuda ({torch.cuda.get_device_name()})" if device == "cuda"
                    else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    cfg_dict = hf_config_dict(args)
    meta = {"config": args.config, "dtype": dtype, "date": datetime.date.today().isoformat(),
            "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens,
            "image_size": cfg_dict["vision_config"]["image_size"], "image_tokens": cfg_dict["image_seq_length"],
            "text_layers": cfg_dict["text_config"]["num_hidden_layers"], "repeats": args.repeats,
            "quantize": args.quantize and f"{args.quantize}" + (f" tile {args.quantize_tile_size}"
                                                                if args.quantize == "int4" else ""),
            "jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__}
    print(json.dumps({"meta": {**meta, "torch_device": torch_device}}), flush=True)
    rows = []
    devices = {"torch": torch_device}

    def emit(impl, metric, batch, value, unit):
        r = {"impl": impl, "config": args.config, "dtype": dtype, "device": devices[impl], "batch": batch,
             "metric": metric, "value": float(value), "unit": unit, **meta}
        rows.append(r)
        line = json.dumps(r)
        print(line, flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(line + "\n")

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="vipllava-bench-"))
    ckpt = work / f"random-{args.config}"
    try:
        t0 = time.perf_counter()
        model = build_model(cfg_dict, dtype, device, args.seed)
        attn = getattr(model.config, "_attn_implementation", None)
        model.save_pretrained(ckpt)
        print(f"# random {args.config} checkpoint ({sum(p.numel() for p in model.parameters()) / 1e9:.3g}B "
              f"params, {dtype}, torch attention: {attn}) in {time.perf_counter() - t0:.1f}s: {ckpt}",
              file=sys.stderr, flush=True)
        from vipllava_jax.checkpoints import load_config
        cfg = load_config(ckpt)
        if not args.skip_torch:
            bench_torch(model, cfg, args, batches, np.random.default_rng(args.seed), emit, device)
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        import jax.numpy as jnp
        from vipllava_jax import load_pretrained
        jdev = jax.devices()[0]
        devices["jax"] = f"{jdev.platform} ({jdev.device_kind})"
        print(json.dumps({"meta": {**meta, "jax_device": devices["jax"]}}), flush=True)
        module, params = load_pretrained(ckpt, dtype=jnp.dtype(dtype), progress=False, quantize=args.quantize,
                                         quantize_tile_size=args.quantize_tile_size)
        bench_jax(module, params, module.config, args, batches, np.random.default_rng(args.seed), emit)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
        for k, v in saved_settings.items():  # the cache folder goes away: stop pointing at it
            jax.config.update(k, v)
        from jax.experimental.compilation_cache import compilation_cache
        compilation_cache.reset_cache()  # the cache object keeps its path until reset
        shutil.rmtree(cache, ignore_errors=True)
    print(f"\n{args.config} {dtype}{' (JAX: ' + meta['quantize'] + ' weights)' if meta['quantize'] else ''}: "
          f"{meta['prompt_tokens']} text tokens + 1 image ({meta['image_size']} px, "
          f"{meta['image_tokens']} image tokens), {args.new_tokens} new tokens, median of {args.repeats}; "
          f"{meta['date']}\nJAX {jax.__version__} on {devices['jax']}; PyTorch {torch.__version__} "
          f"(transformers {transformers.__version__}) on {torch_device}")
    print(table(rows))
    print(f"# total {time.perf_counter() - t_start:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
