"""Moved to `vipllava_jax.data.synthetic`; this name stays importable (it *is* that module, so every name, private ones
included, and monkeypatching work as before). Code inside the package imports `vipllava_jax.data.synthetic`."""
import sys

from .data import synthetic as _module

sys.modules[__name__] = _module
