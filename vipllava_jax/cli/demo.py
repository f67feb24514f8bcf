"""``vipllava-jax demo``: the shipped demo model answers a question about a marked object in a fresh synthetic
scene, then its accuracy on held-out scenes (the library half is `vipllava_jax.evals.demo`).

    vipllava-jax demo [--seed N] [--save-marked scene.png] [--n-eval 200] [--model DIR] [--quantize int8|int4]
"""
from __future__ import annotations

import argparse

from ..evals.demo import N_HELDOUT, run_demo, shipped_model_available
from . import selfcheck
from .common import add_quantize_args, quantize_kwargs


def register(sub) -> None:
    p = sub.add_parser("demo", help="a demo model answers a question about a marked object in a synthetic scene "
                                    "(no download; with no trained model shipped, the parity self-check)")
    p.add_argument("--seed", type=int, default=0, help="which scene to draw (any integer gives a new scene)")
    p.add_argument("--save-marked", default=None, metavar="PNG",
                   help="where to save the marked image (default: vipllava-demo-<seed>.png in the temp directory)")
    p.add_argument("--n-eval", type=int, default=N_HELDOUT,
                   help=f"held-out scenes to measure accuracy on (default {N_HELDOUT}; 0 skips it)")
    p.add_argument("--model", default=None,
                   help="a demo-format HF directory, e.g. WORK/run/hf from train/train_demo.py (default: the shipped "
                        "model)")
    p.add_argument("--workdir", default=None, help="the self-check's working directory (when it runs)")
    add_quantize_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.n_eval < 0:
        raise ValueError(f"--n-eval must be >= 0, got {args.n_eval}")
    if args.model is None and not shipped_model_available():
        # This release ships no trained demo model yet (train/train_demo.py builds one): the built-in job is the
        # parity self-check, which needs nothing but the package (and torch).
        print("No trained demo model is shipped in this release (train one with train/train_demo.py and pass "
              "--model WORK/run/hf); running `vipllava-jax selfcheck` instead.")
        return selfcheck.run(args)
    res = run_demo(args.seed, out_image=args.save_marked, n_eval=args.n_eval, model=args.model,
                   **quantize_kwargs(args))
    print(f"({res['seconds']:.0f} s)")
    return 0
