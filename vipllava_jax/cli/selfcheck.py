"""``vipllava-jax selfcheck``: parity with PyTorch on a tiny random checkpoint, no download needed.

Builds a tiny random HF VipLlava checkpoint, converts it to orbax, loads it back, runs one forward
pass on a left-padded batch with two images in one row, prints how far our logits are from PyTorch's, then
generates greedily (prefill + on-device decode loop) and compares the tokens with HF ``generate``.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import jax
import numpy as np

from ..checkpoints.load import load_pretrained
from ..checkpoints.orbax import save_orbax
from ..generation.api import generate
from ..testing.parity import rel_err
from ..testing.tiny_model import TINY_IMAGE_TOKEN, make_tiny_checkpoint
from .common import add_quantize_args


def register(sub) -> None:
    p = sub.add_parser("selfcheck", help="tiny random checkpoint: convert, run, compare with PyTorch (needs torch)")
    p.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp dir)")
    add_quantize_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    jax.config.update("jax_default_matmul_precision", "highest")
    try:
        import torch
    except ImportError:
        raise ValueError("the self-check compares against PyTorch: pip install torch (CPU: pip install torch==2.13.0)")

    work = Path(args.workdir or tempfile.mkdtemp(prefix="vipllava-selfcheck-"))
    hf_dir, orbax_dir = work / "tiny-hf", work / "tiny-orbax"
    ref = make_tiny_checkpoint(hf_dir)
    print(f"1. tiny random HF checkpoint: {hf_dir}")
    module, params = load_pretrained(hf_dir, progress=False)
    save_orbax(params, module.config, orbax_dir, tokenizer_from=hf_dir, overwrite=True)
    print(f"2. converted to orbax:        {orbax_dir}")
    module, params = load_pretrained(orbax_dir)
    print(f"3. loaded back: {sum(x.size for x in jax.tree.leaves(params)):,} parameters")

    rng = np.random.default_rng(0)
    n_img = module.config.image_seq_length
    ids = rng.integers(3, 99, (2, 2 * n_img + 12))
    ids[0, 2:2 + n_img] = TINY_IMAGE_TOKEN
    ids[0, 5 + n_img:5 + 2 * n_img] = TINY_IMAGE_TOKEN  # two images in row 0
    ids[1, 20:20 + n_img] = TINY_IMAGE_TOKEN
    mask = np.ones_like(ids)
    mask[1, :9] = 0  # row 1 is left padded
    pixels = rng.standard_normal((3, 3, 30, 30)).astype(np.float32)
    ours = np.asarray(jax.jit(module.apply)({"params": params}, ids, pixels, mask).logits)
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels),
                     attention_mask=torch.tensor(mask)).logits.numpy()
    err = rel_err(ours, theirs, mask.astype(bool))
    print(f"4. logits {list(ours.shape)}: max relative error vs PyTorch = {err:.2e} "
          f"({'OK' if err < 1e-4 else 'MISMATCH'})")
    n_new = 8
    toks = generate(module, params, ids, pixels, mask, max_new_tokens=n_new)
    with torch.no_grad():
        ref_toks = ref.generate(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels),
                                attention_mask=torch.tensor(mask), max_new_tokens=n_new, do_sample=False,
                                pad_token_id=module.config.text.pad_token_id)[:, ids.shape[1]:].numpy()
    ref_toks = np.pad(ref_toks, ((0, 0), (0, n_new - ref_toks.shape[1])),
                      constant_values=module.config.text.pad_token_id)
    same = np.array_equal(toks, ref_toks)
    print(f"5. greedy generation, {n_new} new tokens per row: {toks.tolist()} "
          f"({'same as' if same else 'DIFFERENT from'} HF generate)")
    if getattr(args, "quantize", None):
        # the tiny model's layers are 32 and 64 wide: an int4 tile of at most 16 rows fits them
        tile = min(args.quantize_tile_size, 16)
        q_dir = work / f"tiny-orbax-{args.quantize}"
        qm, qp = load_pretrained(hf_dir, progress=False, quantize=args.quantize, quantize_tile_size=tile)
        save_orbax(qp, qm.config, q_dir, tokenizer_from=hf_dir, overwrite=True)
        qm, qp = load_pretrained(q_dir)
        q_logits = np.asarray(jax.jit(qm.apply)({"params": qp}, ids, pixels, mask).logits)
        m = mask.astype(bool)
        agree = float((q_logits.argmax(-1) == theirs.argmax(-1))[m].mean())
        q_toks = generate(qm, qp, ids, pixels, mask, max_new_tokens=n_new)
        print(f"6. {args.quantize} weights (tile {tile} rows) through an orbax directory: logits max relative error "
              f"vs PyTorch fp32 = {rel_err(q_logits, theirs, m):.2e}, top-1 agreement {agree:.1%} over {m.sum()} "
              f"positions; greedy tokens {'same as' if np.array_equal(q_toks, ref_toks) else 'differ from'} fp32's")
    return 0 if err < 1e-4 and same else 1
