"""Moved to `vipllava_jax.parallel.rules`; this name stays importable (it *is* that module, so every name, private ones
included, and monkeypatching work as before). Code inside the package imports `vipllava_jax.parallel.rules`."""
import sys

from .parallel import rules as _module

sys.modules[__name__] = _module
