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
