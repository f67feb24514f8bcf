"""Moved to `vipllava_jax.checkpoints.hf_io`; this name stays importable (it *is* that module, so every name, private ones
included, and monkeypatching work as before). Code inside the package imports `vipllava_jax.checkpoints.hf_io`."""
import sys

from .checkpoints import hf_io as _module

sys.modules[__name__] = _module
