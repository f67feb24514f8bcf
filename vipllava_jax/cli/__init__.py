"""The ``vipllava-jax`` command: ``generate``, ``convert``, ``plan``, ``demo``, ``selfcheck``, ``train``, ``eval``,
``serve``."""
from __future__ import annotations

import argparse
import sys

from . import convert, demo, generate, plan, selfcheck, serve, train
from . import eval as eval_


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vipllava-jax", description="VipLlava (ViP-LLaVA) in JAX")
    sub = ap.add_subparsers(dest="command", required=True)
    for command in (demo, generate, convert, plan, train, eval_, selfcheck, serve):  # one module per subcommand
        command.register(sub)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
            PermissionError) as e:
        # A clear error (bad input, a path that cannot be used): one line, exit 2. A genuine failure (selfcheck
        # finding a mismatch) returns 1 from its command; anything unforeseen keeps its traceback.
        print(f"vipllava-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
