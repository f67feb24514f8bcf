"""The ``vipllava-jax`` command: ``generate``, ``convert``, ``plan``, ``demo``, ``train``, ``eval``."""
from __future__ import annotations

import argparse
import sys

from . import cli_convert, cli_demo, cli_eval, cli_generate, cli_plan, cli_train


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vipllava-jax", description="VipLlava (ViP-LLaVA) in JAX")
    sub = ap.add_subparsers(dest="command", required=True)
    cli_generate.register(sub)
    cli_demo.register(sub)
    cli_convert.register(sub)
    cli_plan.register(sub)
    cli_train.register(sub)
    cli_eval.register(sub)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"vipllava-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
