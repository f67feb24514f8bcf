"""``vipllava-jax serve``: an OpenAI-compatible chat server with continuous batching.

    vipllava-jax serve --model llava-hf/vip-llava-7b-hf --max-model-len 2048
    vipllava-jax serve --model DIR --port 8000 --max-batch 16 --api-key sk-local \\
        --allowed-local-media-path /data/images

Then POST /v1/chat/completions (streaming or not, images as data: URLs, file:// under
--allowed-local-media-path, or http(s)), GET /v1/models, /health (503 until the warm-up has compiled every
shape, then 200) and /metrics (Prometheus). One engine thread owns the device and decodes up to --max-batch
requests at once; a new request joins between two decode chunks. Binds 127.0.0.1 unless --host says otherwise;
SIGTERM or Ctrl-C stops taking requests, lets the running ones finish (up to --shutdown-grace seconds) and exits
0. Needs the serve extra (pip install -e ".[serve]"): fastapi, uvicorn, pydantic, prometheus_client.

Several devices: --mesh "tensor=4" shards the weights and the KV cache. Several hosts (a pod slice, or
--coordinator/--num-processes/--process-id): run the same command on every host; process 0 serves HTTP and plans
each batch, the others follow its device calls on their shards (stop process 0: the others exit with it).

    vipllava-jax serve --model DIR --mesh fsdp=2,tensor=4 --coordinator host0:1234 --num-processes 2 --process-id I
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import jax
import jax.numpy as jnp

from ..checkpoints.load import load_config, load_pretrained, resolve_model_path
from ..data.processor import Processor
from ..generation.engine import Engine
from ..parallel.distributed import BroadcastChannel, add_distributed_args, initialize_from_args
from ..parallel.mesh import make_mesh
from .common import DEFAULT_CACHE_DIR, DTYPES, auto_dtype, enable_compilation_cache, add_quantize_args, quantize_kwargs


def register(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible chat server with continuous batching",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF model directory, hub id, or orbax directory")
    p.add_argument("--served-model-name", default=None,
                   help="the model id /v1/models lists and requests name (default: --model as given)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=16, help="decode slots: requests decoded together")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting for a slot; one more is answered 429 with Retry-After")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="tokens per request, prompt and answer together (default: the model's context); a "
                        "longer prompt is answered 400. Smaller is faster: every decode step reads this many "
                        "cache slots per request")
    p.add_argument("--max-images", type=int, default=1,
                   help="images one request may hold (default 1); the warm-up also compiles prompts with this many")
    p.add_argument("--chunk", type=int, default=8, help="decode steps per device call (requests join between)")
    p.add_argument("--mesh", default=None,
                   help='device mesh over every device of every host, e.g. "tensor=4" or "fsdp=2,tensor=4": weights '
                        "and the KV cache's kv heads sharded by the rules table, decode slots replicated (default: "
                        "one device; with several processes, every device on fsdp)")
    p.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                   help="file:// images may come from this directory (symlinks and '..' resolved); none by default")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: the VIPLLAVA_API_KEY "
                        "environment variable, or no key)")
    p.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="seconds running requests may take to finish after SIGTERM / Ctrl-C")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="parameter/compute dtype (auto: bfloat16 on GPU/TPU, float32 on CPU)")
    p.add_argument("--no-verify", action="store_true",
                   help="orbax directory: skip checking each file's checksum before loading")
    add_quantize_args(p)
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a PEFT LoRA adapter directory (RUN_DIR/adapter, or one saved by peft) merged into the model")
    p.add_argument("--compilation-cache", default=str(DEFAULT_CACHE_DIR),
                   help="JAX persistent compilation cache directory ('' to turn it off): a second start warms "
                        "up from it")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    add_distributed_args(p, mesh=False)
    p.set_defaults(func=run)


def generation_defaults(model_dir) -> dict:
    """Sampling for requests that leave temperature / top_p out: the checkpoint's generation_config.json when it
    sets do_sample (its temperature and top_p), else greedy (HF's default), as vLLM's --generation-config auto."""
    try:
        cfg = json.loads((model_dir / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {"temperature": 0.0, "top_p": 1.0}
    if not isinstance(cfg, dict) or not cfg.get("do_sample"):
        return {"temperature": 0.0, "top_p": 1.0}
    return {"temperature": float(cfg.get("temperature") or 1.0), "top_p": float(cfg.get("top_p") or 1.0)}


def run(args: argparse.Namespace) -> int:
    try:  # the serve extra; imported here so that other commands neither need nor load it
        from ..serving import create_app, run_server
    except ImportError as e:
        raise ValueError(f"serve needs the serve extra ({e}): pip install -e \".[serve]\"") from None
    for name in ("max_batch", "max_queue", "chunk", "max_images"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    initialize_from_args(args)  # multi-host: before any device use
    enable_compilation_cache(args.compilation_cache)
    hosts, me = jax.process_count(), jax.process_index()

    model_dir = resolve_model_path(args.model)
    config = load_config(model_dir)
    proc = Processor.from_pretrained(model_dir)
    mesh = make_mesh(args.mesh or "auto", config) if args.mesh or hosts > 1 else None
    dtype = auto_dtype(args.dtype)
    t0 = time.perf_counter()
    module, params = load_pretrained(model_dir, dtype=jnp.dtype(dtype), progress=False, verify=not args.no_verify,
                                     adapter=args.adapter, mesh=mesh, **quantize_kwargs(args))
    print(f"[loaded {model_dir} as {dtype} in {time.perf_counter() - t0:.1f}s on {jax.devices()[0].platform}]",
          file=sys.stderr, flush=True)
    engine = Engine(module, params, proc, max_batch=args.max_batch, max_model_len=args.max_model_len,
                    chunk=args.chunk, max_queue=args.max_queue, mesh=mesh, image_buckets=(0, 1, args.max_images),
                    channel=BroadcastChannel() if hosts > 1 else None)
    if me != 0:  # multi-host: process 0 serves HTTP and plans; this one runs the same device calls on its shards
        print(f"[process {me} of {hosts}: following process 0's engine on {len(jax.local_devices())} local "
              f"device(s) of the mesh {dict(mesh.shape)}]", file=sys.stderr, flush=True)
        engine.follow()
        print(f"[process {me}: process 0 stopped; exiting]", file=sys.stderr, flush=True)
        return 0
    app = create_app(engine, proc, model_name=args.served_model_name or args.model, start_engine=True,
                     stop_grace_s=args.shutdown_grace, allowed_local_media_path=args.allowed_local_media_path,
                     api_key=args.api_key or os.environ.get("VIPLLAVA_API_KEY") or None,
                     generation_defaults=generation_defaults(model_dir))
    print(f"[serving {args.served_model_name or args.model} at http://{args.host}:{args.port}/v1 (max_batch "
          f"{engine.max_batch}, max_model_len {engine.max_model_len}); /health answers 200 once the warm-up has "
          f"compiled {len(engine.prefill_buckets)} prompt buckets]", file=sys.stderr, flush=True)
    run_server(app, args.host, args.port, grace_s=args.shutdown_grace, log_level=args.log_level)
    return 0
