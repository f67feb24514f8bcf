"""Moved to `vipllava_jax.parallel.plan`; this name stays importable (it *is* that module, so every name, private ones
included, and monkeypatching work as before). Code inside the package imports `vipllava_jax.parallel.plan`."""
import sys

from .parallel import plan as _module

sys.modules[__name__] = _module
