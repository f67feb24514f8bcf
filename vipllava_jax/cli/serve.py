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
    p.add_argument("--chunk", type=int, default=8, help="decode steps per device call (requests join between)")
    p.add_argument("--mesh", default=None,
                   help="device mesh spec; the engine runs on one device for now, so only a 1-device mesh")
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
    for name in ("max_batch", "max_queue", "chunk"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    enable_compilation_cache(args.compilation_cache)

    model_dir = resolve_model_path(args.model)
    config = load_config(model_dir)
    proc = Processor.from_pretrained(model_dir)
    if args.mesh:
        mesh = make_mesh(args.mesh, config)
        if mesh.size > 1:
            raise ValueError(f"--mesh {args.mesh}: {mesh.size} devices, but the serving engine runs on one device "
                             "for now (Engine(mesh=...) is not implemented)")
    dtype = auto_dtype(args.dtype)
    t0 = time.perf_counter()
    module, params = load_pretrained(model_dir, dtype=jnp.dtype(dtype), progress=False, verify=not args.no_verify,
                                     adapter=args.adapter, **quantize_kwargs(args))
    print(f"[loaded {model_dir} as {dtype} in {time.perf_counter() - t0:.1f}s on {jax.devices()[0].platform}]",
          file=sys.stderr, flush=True)
    engine = Engine(module, params, proc, max_batch=args.max_batch, max_model_len=args.max_model_len,
                    chunk=args.chunk, max_queue=args.max_queue)
    app = create_app(engine, proc, model_name=args.served_model_name or args.model, start_engine=True,
                     stop_grace_s=args.shutdown_grace, allowed_local_media_path=args.allowed_local_media_path,
                     api_key=args.api_key or os.environ.get("VIPLLAVA_API_KEY") or None,
                     generation_defaults=generation_defaults(model_dir))
    print(f"[serving {args.served_model_name or args.model} at http://{args.host}:{args.port}/v1 (max_batch "
          f"{engine.max_batch}, max_model_len {engine.max_model_len}); /health answers 200 once the warm-up has "
          f"compiled {len(engine.prefill_buckets)} prompt buckets]", file=sys.stderr, flush=True)
    run_server(app, args.host, args.port, grace_s=args.shutdown_grace, log_level=args.log_level)
    return 0
