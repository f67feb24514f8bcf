"""What several subcommands share: dtype choices, the persistent compilation cache, command-line text checks."""
from __future__ import annotations

import os
from pathlib import Path

import jax

DTYPES = ("auto", "bfloat16", "float32")
DEFAULT_CACHE_DIR = Path(os.environ.get("VIPLLAVA_JAX_CACHE", "~/.cache/vipllava_jax")).expanduser() / "xla"


def enable_compilation_cache(path: str) -> None:
    """JAX's persistent compilation cache: a second run loads compiled programs instead of compiling."""
    if not path:
        return
    Path(path).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Programs that compile faster than this are not worth a disk entry; JAX's own variable overrides it.
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def auto_dtype(dtype: str) -> str:
    """--dtype auto: bfloat16 on GPU/TPU, float32 on CPU."""
    if dtype == "auto":
        return "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return dtype


def add_quantize_args(p) -> None:
    """--quantize int8|int4 and --quantize-tile-size: weight-only quantization at load (`load_pretrained`)."""
    p.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="load the language model's linear weights quantized (weight-only, qwix): int8 one scale per "
                        "output channel, int4 one scale per --quantize-tile-size input rows (default: as stored)")
    p.add_argument("--quantize-tile-size", type=int, default=128, metavar="N",
                   help="int4: input rows sharing a scale (default 128; must divide each quantized layer's input)")


def quantize_kwargs(args) -> dict:
    """`load_pretrained` keywords from --quantize / --quantize-tile-size."""
    q = getattr(args, "quantize", None)
    return {} if q is None else {"quantize": q, "quantize_tile_size": args.quantize_tile_size}
