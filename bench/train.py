"""Training benchmark: vipllava-jax's train step against HF transformers (PyTorch), side by side in one run.

    python bench/train.py --config tiny                          # CPU, well under a minute
    python bench/train.py --config 7b --layers 8 --seq-len 2048  # one GPU: 7B widths, 8 decoder layers, bf16
    python bench/train.py --config 7b --layers 1 --seq-len 64 --image-size 56 --batch-size 1 --steps 1 --cpu  # smoke
    python bench/train.py --config 7b --layers 2 --seq-len 512 --image-size 56 --stage lora --impl jax --steps 1 --cpu
        # LoRA at 7B widths, and XLA's FLOPs ratio LoRA / full (remat none and full)

Random weights of the chosen shape are built once with transformers, saved as safetensors and loaded by both
sides; both train on the same batch (BOS, the image tokens, random text; the text after the image supervised)
with AdamW (lr 1e-5, weight decay 0, clipping at 1.0) and the same frozen parts:
  --stage full: the projector and the language model train, the vision tower is frozen;
  --stage lora: rank --lora-rank adapters on every Llama linear plus the projector train (PyTorch: peft's
                LoRA, get_peft_model with the same regex of target modules), everything else is frozen.
PyTorch is a plain loop of forward(labels=...), backward, clip_grad_norm_, AdamW.step and zero_grad (bf16 via
torch.autocast with fp32 master weights, as ours); JAX is one jitted step (scanned layers, --remat) with the
state donated. PyTorch runs first and is freed before JAX starts its backend (GPU preallocation).

Metrics (median of --steps timed steps after 2 warm-up steps): step_s, tokens_s (rows x seq-len / step_s),
peak_mem_gib (GPU: device peak; CPU: the process's peak RSS, shared by both sides), mfu (model FLOPs per step /
step_s / peak FLOP/s; see bench/README.md for the FLOP count and the peak used), first_step_loss (both sides'
loss on the first step: at float32 they must agree, a check that they train the same thing) and, for JAX,
compile_s. Ratios: tokens/s and MFU jax / torch, step time torch / jax; above 1 means JAX is faster.
With --stage lora (or --flops-ratio), ``flops_ratio_lora_full_remat_*``: XLA's cost-analysis FLOPs of the compiled LoRA step over the full
step's (make_train_step compiled on abstract shapes, unrolled layers: XLA counts a scan body once; remat off and
at --remat). LoRA computes x W + (alpha/r) (x A) B with W frozen: about 2/3 of full fine-tuning's matmul FLOPs.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import build_model, hf_config_dict, host_peak_gib  # noqa: E402  (bench/generate.py)

LR = 1e-5
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEAK_FLOPS = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
              "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12}  # dense bf16


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", choices=("tiny", "7b", "13b"))
    ap.add_argument("--stage", default="both", choices=("full", "lora", "both"))
    ap.add_argument("--impl", default="both", choices=("jax", "torch", "both"))
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                    help="compute dtype (master weights fp32); default float32 for tiny, bfloat16 otherwise")
    ap.add_argument("--batch-size", type=int, default=None, help="rows per step (default 4 tiny, 1 otherwise)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per row incl. image tokens "
                                                             "(default 64 tiny, 2048 otherwise)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (fit 7B widths on one device)")
    ap.add_argument("--vision-layers", type=int, default=None)
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    ap.add_argument("--remat", default="full", choices=("none", "full", "dots", "dots_no_batch"))
    ap.add_argument("--scan", dest="scan", action="store_true", default=True)
    ap.add_argument("--no-scan", dest="scan", action="store_false")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--flops-ratio", action=argparse.BooleanOptionalAction, default=None,
                    help="also compile both steps on abstract shapes for XLA's FLOPs ratio, LoRA / full, at remat "
                         "none and --remat (default: with --stage lora)")
    ap.add_argument("--json", default=None, help="also append the JSON lines to this file")
    ap.add_argument("--cpu", action="store_true", help="both sides on the CPU even when a GPU is present")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    tiny = args.config == "tiny"
    args.dtype = args.dtype or ("float32" if tiny else "bfloat16")
    args.batch_size = args.batch_size or (4 if tiny else 1)
    args.seq_len = args.seq_len or (64 if tiny else 2048)
    args.text_layers = args.layers  # the names bench/generate.py's hf_config_dict reads
    if args.flops_ratio is None:
        args.flops_ratio = args.stage == "lora"
    if args.steps < 1:
        ap.error("--steps must be at least 1")
    return args


def make_batch(cfg_dict: dict, args, rng) -> dict:
    n_img = cfg_dict["image_seq_length"]
    if args.seq_len < n_img + 4:
        raise SystemExit(f"--seq-len {args.seq_len} leaves no room for text after {n_img} image tokens")
    vocab = min(cfg_dict["text_config"]["vocab_size"], 32000)
    ids = rng.integers(3, vocab - 1, (args.batch_size, args.seq_len))
    ids[ids == cfg_dict["image_token_index"]] = 3
    ids[:, 0] = 1
    ids[:, 1:1 + n_img] = cfg_dict["image_token_index"]
    labels = np.full_like(ids, -100)
    labels[:, 1 + n_img:] = ids[:, 1 + n_img:]
    size = cfg_dict["vision_config"]["image_size"]
    pixels = rng.standard_normal((args.batch_size, 3, size, size)).astype(np.float32)
    return {"input_ids": ids.astype(np.int32), "attention_mask": np.ones_like(ids, np.int32),
            "labels": labels.astype(np.int32), "pixel_values": pixels}


def param_counts(cfg_dict: dict, lora_rank: int) -> dict:
    """Matmul parameters by part (embeddings excluded: a lookup, not a matmul)."""
    t, v = cfg_dict["text_config"], cfg_dict["vision_config"]
    d, f, L = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"]
    hd = t.get("head_dim") or d // t["num_attention_heads"]
    kv = t.get("num_key_value_heads") or t["num_attention_heads"]
    q, k = t["num_attention_heads"] * hd, kv * hd
    lm = L * (d * q + 2 * d * k + q * d + 3 * d * f) + d * t["vocab_size"]
    lora = L * lora_rank * ((d + q) + 2 * (d + k) + (q + d) + 2 * (d + f) + (f + d))
    dv, fv, Lv = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"]
    vis = Lv * (4 * dv * dv + 2 * dv * fv)
    layers = cfg_dict["vision_feature_layer"]
    n_feat = 1 if isinstance(layers, int) else len(layers)
    proj = n_feat * dv * d + d * d
    return {"lm": lm, "lora": lora, "vision": vis, "projector": proj, "layers": L, "d_model": d, "heads_dim": q}


def model_flops(cfg_dict: dict, args, stage: str) -> float:
    """Model FLOPs of one step (see bench/README.md): trained matmul params 6x, frozen ones the decoder still
    back-propagates through (LoRA) 4x, the frozen tower 2x (forward only), attention 12 L T q per token."""
    c = param_counts(cfg_dict, args.lora_rank)
    v = cfg_dict["vision_config"]
    patches = (v["image_size"] // v["patch_size"]) ** 2
    tokens = args.batch_size * args.seq_len
    lm = (6 * c["lm"] if stage == "full" else 4 * c["lm"] + 6 * c["lora"]) * tokens
    attn = 12 * c["layers"] * args.seq_len * c["heads_dim"] * tokens
    images = args.batch_size * (2 * c["vision"] * (patches + 1) + 6 * c["projector"] * patches)
    return float(lm + attn + images)


def peak_flops(device_kind: str, on_gpu: bool) -> tuple[float, str]:
    if on_gpu:
        for k, v in PEAK_FLOPS.items():
            if device_kind.startswith(k):
                return v, f"{k} dense bf16 spec"
        return 989e12, f"{device_kind}: H100 dense bf16 spec assumed"
    import jax
    import jax.numpy as jnp
    a = jnp.ones((1024, 1024), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(10):
        f(a).block_until_ready()
    dt = (time.perf_counter() - t0) / 10
    return 2 * 1024 ** 3 / dt, "measured: a 1024x1024 fp32 matmul in JAX on this CPU"


# --- PyTorch -----------------------------------------------------------------------------------------------
def torch_side(model, batch: dict, args, stage: str, device: str, emit):
    import torch

    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.model.multi_modal_projector.parameters():
        p.requires_grad_(True)
    if stage == "full":
        for p in list(model.model.language_model.parameters()) + list(model.lm_head.parameters()):
            p.requires_grad_(True)
    else:
        import peft
        from vipllava_jax.checkpoints.adapter import peft_target_regex
        torch.manual_seed(args.seed)
        model = peft.get_peft_model(model, peft.LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank,
                                                           target_modules=peft_target_regex(LORA_TARGETS)))
        for p in model.base_model.model.model.multi_modal_projector.parameters():
            p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    tb = {k: torch.tensor(v.astype(np.int64) if v.dtype == np.int32 else v, device=device) for k, v in batch.items()}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def step():
        with autocast:
            loss = model(**tb).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return float(loss.detach())

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    first = step()
    step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    mem = (torch.cuda.max_memory_allocated() / 2**30, "GiB") if device == "cuda" else (host_peak_gib(),
                                                                                         "GiB (host RSS)")
    return first, statistics.median(times), mem, sum(p.numel() for p in params)


# --- JAX -----------------------------------------------------------------------------------------------------
def jax_side(ckpt, batch: dict, args, stage: str):
    import jax
    import jax.numpy as jnp
    from vipllava_jax import load_pretrained
    from vipllava_jax.training.lora import LoraConfig, init_lora
    from vipllava_jax.training.optim import make_optimizer, split_params
    from vipllava_jax.training.step import StepConfig, init_state, make_train_step
    module, params = load_pretrained(ckpt, jnp.float32, scan_layers=args.scan, remat_policy=args.remat,
                                     progress=False)
    if args.dtype == "bfloat16":
        module = module.clone(dtype=jnp.bfloat16)
    trainable, frozen = split_params(params, stage)
    lora_cfg = None
    tr = {"params": trainable, "lora": {}}
    if stage == "lora":
        lora_cfg = LoraConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank, targets=LORA_TARGETS)
        tr["lora"] = init_lora(frozen, lora_cfg, jax.random.key(args.seed))
    tx = make_optimizer(LR, 10**6, warmup_ratio=0.0, weight_decay=0.0)
    state = init_state(tr, tx)
    del params
    step = jax.jit(make_train_step(module, tx, StepConfig(lora=lora_cfg)), donate_argnums=(0,))
    jb = {k: jnp.asarray(v)[None] for k, v in batch.items()}  # one micro-batch
    t0 = time.perf_counter()
    state, m = step(state, frozen, jb)
    first = float(m["loss"])
    compile_s = time.perf_counter() - t0
    state, m = step(state, frozen, jb)
    jax.block_until_ready(m)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, m = step(state, frozen, jb)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    mem = ((stats["peak_bytes_in_use"] / 2**30, "GiB") if stats and "peak_bytes_in_use" in stats
           else (host_peak_gib(), "GiB (host RSS)"))
    n_trained = sum(x.size for x in jax.tree.leaves(state.trainable))
    return first, statistics.median(times), mem, n_trained, compile_s - statistics.median(times)


def flops_ratio(cfg_dict: dict, args, remat: str) -> tuple[float, float, float]:
    """(LoRA step FLOPs, full step FLOPs, ratio) from XLA's cost analysis of make_train_step compiled on abstract
    shapes (no weights), unrolled layers, one micro-batch of this run's batch."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from vipllava_jax.models.config import Runtime, VipLlavaConfig
    from vipllava_jax.models.params import abstract_params
    from vipllava_jax.models.vipllava import VipLlavaForConditionalGeneration
    from vipllava_jax.training.lora import LoraConfig, init_lora
    from vipllava_jax.training.optim import make_optimizer, split_params
    from vipllava_jax.training.step import StepConfig, init_state, make_train_step
    cfg = VipLlavaConfig.from_hf(cfg_dict)
    module = VipLlavaForConditionalGeneration(cfg, Runtime(scan_layers=False, remat_policy=remat))
    if args.dtype == "bfloat16":
        module = module.clone(dtype=jnp.bfloat16)
    params = nn.unbox(abstract_params(module))
    size = cfg.vision.image_size
    b, t = args.batch_size, args.seq_len
    batch = {"input_ids": jax.ShapeDtypeStruct((1, b, t), jnp.int32),
             "attention_mask": jax.ShapeDtypeStruct((1, b, t), jnp.int32),
             "labels": jax.ShapeDtypeStruct((1, b, t), jnp.int32),
             "pixel_values": jax.ShapeDtypeStruct((1, b, 3, size, size), jnp.float32)}
    out = {}
    for stage in ("full", "lora"):
        trainable, frozen = split_params(params, stage)
        lcfg = LoraConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank, targets=LORA_TARGETS) \
            if stage == "lora" else None
        tr = {"params": trainable, "lora": {}}
        if lcfg is not None:
            tr["lora"] = jax.eval_shape(lambda k: init_lora(frozen, lcfg, k), jax.random.key(0))
        tx = make_optimizer(LR, 10**6, warmup_ratio=0.0, weight_decay=0.0)
        state = jax.eval_shape(lambda x: init_state(x, tx), tr)
        c = jax.jit(make_train_step(module, tx, StepConfig(lora=lcfg))).lower(state, frozen, batch).compile()
        ca = c.cost_analysis()
        out[stage] = float((ca[0] if isinstance(ca, list) else ca)["flops"])
    return out["lora"], out["full"], out["lora"] / out["full"]


def table(rows) -> str:
    by = {}
    for r in rows:
        by.setdefault((r["stage"], r["metric"]), {})[r["impl"]] = r
    order = ("step_s", "tokens_s", "mfu", "peak_mem_gib", "first_step_loss", "compile_s", "trained_params",
             "flops_ratio_lora_full_remat_none", "flops_ratio_lora_full_remat_full", "flops_ratio_lora_full_remat_dots",
             "flops_ratio_lora_full_remat_dots_no_batch")
    lines = [f"{'stage':<6}{'metric':<17}{'jax':>20}{'torch':>20}{'ratio':>9}"]
    for (stage, metric) in sorted(by, key=lambda k: (k[0], order.index(k[1]))):
        d = by[(stage, metric)]
        j, t = d.get("jax"), d.get("torch")
        ratio = ""
        if j and t and j["value"] > 0 and t["value"] > 0:
            if metric == "step_s":
                ratio = f"{t['value'] / j['value']:.2f}x"
            elif metric in ("tokens_s", "mfu"):
                ratio = f"{j['value'] / t['value']:.2f}x"

        def fmt(r):
            return "" if r is None else f"{r['value']:.4g} {r['unit'].split(' ')[0]}".strip()
        lines.append(f"{stage:<6}{metric:<17}{fmt(j):>20}{fmt(t):>20}{ratio:>9}")
    return "\n".join(lines)


def main(argv=None) -> int:
    t_start = time.perf_counter()
    args = parse_args(argv)
    import jax  # configure only: the backend starts after PyTorch is done (JAX preallocates GPU memory)
    if args.cpu:
        jax.config.update("jax_platforms", "cpu")
    import torch
    import transformers
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    torch_device = (f"cuda ({torch.cuda.get_device_name()})" if device == "cuda"
                    else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    cfg_dict = hf_config_dict(args)
    stages = ("full", "lora") if args.stage == "both" else (args.stage,)
    meta = {"config": args.config, "dtype": args.dtype, "date": datetime.date.today().isoformat(),
            "batch_size": args.batch_size, "seq_len": args.seq_len, "remat": args.remat, "scan": args.scan,
            "text_layers": cfg_dict["text_config"]["num_hidden_layers"], "image_size":
            cfg_dict["vision_config"]["image_size"], "lora_rank": args.lora_rank, "steps": args.steps,
            "jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__}
    rows = []

    def emit(impl, stage, metric, value, unit, device_name):
        r = {"impl": impl, "stage": stage, "metric": metric, "value": float(value), "unit": unit,
             "device": device_name, **meta}
        rows.append(r)
        line = json.dumps(r)
        print(line, flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(line + "\n")

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="vipllava-bench-train-"))
    ckpt = work / f"random-{args.config}"
    batch = make_batch(cfg_dict, args, np.random.default_rng(args.seed))
    tokens = args.batch_size * args.seq_len
    results = {}
    try:
        model = build_model(cfg_dict, "float32", device, args.seed)  # fp32 master weights on both sides
        model.save_pretrained(ckpt)
        if args.impl in ("torch", "both"):
            for stage in stages:
                if stage != stages[0]:  # a fresh copy: the LoRA wrappers / updates must not carry over
                    model = transformers.VipLlavaForConditionalGeneration.from_pretrained(ckpt).to(device)
                results[("torch", stage)] = torch_side(model, batch, args, stage, device, emit)
                del model
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
        else:
            del model
        jdev = jax.devices()[0]
        jax_device = f"{jdev.platform} ({jdev.device_kind})"
        peak, peak_src = peak_flops(jdev.device_kind, jdev.platform == "gpu")
        meta["peak_flops"], meta["peak_source"] = peak, peak_src
        if args.impl in ("jax", "both"):
            for stage in stages:
                results[("jax", stage)] = jax_side(ckpt, batch, args, stage)
        for (impl, stage), res in sorted(results.items()):
            first, step_s, (mem, mem_unit), n_trained = res[:4]
            dname = jax_device if impl == "jax" else torch_device
            flops = model_flops(cfg_dict, args, stage)
            emit(impl, stage, "step_s", step_s, "s", dname)
            emit(impl, stage, "tokens_s", tokens / step_s, "tok/s", dname)
            emit(impl, stage, "mfu", flops / step_s / peak, "fraction", dname)
            emit(impl, stage, "peak_mem_gib", mem, mem_unit, dname)
            emit(impl, stage, "first_step_loss", first, "nats", dname)
            emit(impl, stage, "trained_params", n_trained, "params", dname)
            if impl == "jax":
                emit(impl, stage, "compile_s", res[4], "s", dname)
        if args.impl in ("jax", "both") and args.flops_ratio:
            for remat in dict.fromkeys(("none", args.remat)):
                lora_f, full_f, ratio = flops_ratio(cfg_dict, args, remat)
                emit("jax", "lora", f"flops_ratio_lora_full_remat_{remat}", ratio, "fraction", jax_device)
                print(f"XLA cost analysis, remat {remat}: LoRA step {lora_f:.4g} FLOPs, full step {full_f:.4g} "
                      f"FLOPs, ratio {ratio:.3f}", flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.config} {args.dtype}: batch {args.batch_size} x {args.seq_len} tokens "
          f"({cfg_dict['image_seq_length']} image tokens), {meta['text_layers']} decoder layers, remat "
          f"{args.remat}, scan {args.scan}, median of {args.steps} steps; {meta['date']}\n"
          f"JAX {jax.__version__} on {jax_device}; PyTorch {torch.__version__} on {torch_device}; "
          f"peak for MFU {peak:.3g} FLOP/s ({peak_src})")
    print(table(rows))
    print(f"# total {time.perf_counter() - t_start:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
