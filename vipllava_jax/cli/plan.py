"""``vipllava-jax plan``: per-device memory for a mesh, from shapes alone (no devices, no checkpoint needed).

    vipllava-jax plan --mesh "fsdp=8" --config 7b --batch 8 --seq-len 2048
    vipllava-jax plan --mesh auto --devices 16 --config 13b --batch 16 --seq-len 4096 --device-memory 16
    vipllava-jax plan --config 7b --quantize int4 --device-memory 16                 # int4 weights
    vipllava-jax plan --config 7b --stage lora --quantize int4 --device-memory 16    # a QLoRA training step
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax

from ..checkpoints.load import load_config
from ..parallel.plan import find_preset, plan_memory, plan_training
from ..training.optim import STAGES
from .common import add_quantize_args


def register(sub) -> None:
    p = sub.add_parser("plan", help="parameter / KV-cache / activation bytes per device for a mesh",
                       description="Per-device memory for serving a batch on a mesh, computed from shapes "
                                   "(jax.eval_shape) and the sharding rules; devices may be simulated.")
    p.add_argument("--config", default="7b",
                   help="preset (7b, 13b, tiny), or an HF/orbax model directory or config.json (default: 7b)")
    p.add_argument("--mesh", default="auto",
                   help='mesh spec, e.g. "fsdp=8" or "data=2,fsdp=2,tensor=2"; "auto" = all devices on fsdp')
    p.add_argument("--devices", type=int, default=None,
                   help="device count to plan for (default: the product of --mesh sizes; with --mesh auto: "
                        "this machine's jax.device_count())")
    p.add_argument("--batch", type=int, default=1, help="sequences per step (padded to a multiple of data x fsdp)")
    p.add_argument("--seq-len", type=int, default=2048,
                   help="tokens per sequence incl. image tokens and generated tokens (the KV-cache length)")
    p.add_argument("--images", type=int, default=None, help="images per step (default: one per sequence)")
    p.add_argument("--dtype", default="bfloat16", help="parameter/activation dtype (default bfloat16)")
    p.add_argument("--cache-dtype", default=None, help="KV-cache dtype (default: --dtype)")
    p.add_argument("--full-logits", action="store_true",
                   help="count logits for every position (a forward/scoring pass), not just the last (generation)")
    p.add_argument("--device-memory", type=float, default=None, metavar="GIB",
                   help="memory per device in GiB: say whether the plan fits")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    add_quantize_args(p)
    p.add_argument("--stage", choices=sorted(STAGES), default=None,
                   help="plan a training step of this stage (trained parts and LoRA adapters as fp32 master "
                        "copies + gradients + AdamW moments, frozen parts in --dtype or --quantize; no KV cache) "
                        "instead of serving")
    p.add_argument("--lora-rank", type=int, default=128, help="with --stage lora: the adapters' rank (default 128)")
    p.add_argument("--remat", default="full", choices=("none", "full", "dots", "dots_no_batch"),
                   help="with --stage: the layers' rematerialisation (default full)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    n = args.devices
    if n is None and (args.mesh or "auto").strip() == "auto":
        n = jax.device_count()
    mem = None if args.device_memory is None else int(args.device_memory * 2**30)
    # a model directory's config.json is read here (the planner sits below the checkpoint readers); a preset
    # name (first, even where a directory has its name) or a config.json path goes to plan_memory as it is
    config = args.config
    if find_preset(config) is None and Path(config).is_dir():
        config = load_config(config)
    q = dict(quantize=args.quantize, quantize_tile_size=args.quantize_tile_size)
    if args.stage is not None:
        if find_preset(config) is not None:
            config = find_preset(config)
        plan = plan_training(config, args.mesh, args.batch, args.seq_len, args.dtype, trained=STAGES[args.stage],
                             lora_rank=args.lora_rank if args.stage == "lora" else None, remat=args.remat,
                             num_images=args.images, n_devices=n, device_memory_bytes=mem, stage=args.stage, **q)
    else:
        plan = plan_memory(config, args.mesh, args.batch, args.seq_len, args.dtype, cache_dtype=args.cache_dtype,
                           num_images=args.images, n_devices=n, full_logits=args.full_logits, device_memory_bytes=mem,
                           **q)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.format())
    return 0
