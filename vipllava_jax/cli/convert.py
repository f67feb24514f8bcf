"""``vipllava-jax convert``: HF directory -> orbax directory (and back with --to-hf).

    vipllava-jax convert llava-hf/vip-llava-7b-hf OUT --dtype bfloat16 --quantize int4   # a quantized orbax dir
"""
from __future__ import annotations

import argparse

import jax.numpy as jnp

from ..checkpoints.convert import save_hf
from ..checkpoints.load import load_pretrained, resolve_model_path
from ..checkpoints.orbax import save_orbax
from .common import add_quantize_args, quantize_kwargs

DTYPES = {"keep": None, "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert an HF VipLlava checkpoint to an orbax directory (or back)")
    p.add_argument("src", help="HF model directory or hub id (or an orbax directory with --to-hf)")
    p.add_argument("out", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="keep", help="parameter dtype (default: keep the checkpoint's)")
    p.add_argument("--scan-layers", action="store_true", help="store layers stacked for nn.scan (training layout)")
    p.add_argument("--to-hf", action="store_true", help="write an HF safetensors directory instead")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-verify", action="store_true",
                   help="an orbax SRC: skip checking each file's checksum before reading it")
    add_quantize_args(p)
    p.add_argument("--quantize-lm-head", action="store_true", help="with --quantize: quantize lm_head too")
    p.add_argument("--quantize-projector", action="store_true", help="with --quantize: quantize the projector too")
    p.add_argument("--quantize-vision-tower", action="store_true",
                   help="with --quantize: quantize the vision tower's linear layers too")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    dtype = DTYPES[args.dtype]
    dtype = None if dtype is None else jnp.dtype(dtype)
    src = resolve_model_path(args.src)
    if args.quantize and args.to_hf:
        raise ValueError("--quantize writes an orbax directory; --to-hf writes float weights (a quantized SRC is "
                         "written dequantized)")
    quant = quantize_kwargs(args)
    if quant:
        quant.update(quantize_lm_head=args.quantize_lm_head, quantize_projector=args.quantize_projector,
                     quantize_vision_tower=args.quantize_vision_tower)
    module, params = load_pretrained(src, dtype=dtype, scan_layers=args.scan_layers and not args.to_hf,
                                     verify=not args.no_verify, **quant)
    if args.to_hf:
        out = save_hf(params, module.config, args.out, extra_files_from=src, overwrite=args.overwrite)
    else:
        out = save_orbax(params, module.config, args.out, tokenizer_from=src, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0
