"""Moved to `vipllava_jax.generation.evaluation`; this name stays importable (it *is* that module, so every name, private ones
included, and monkeypatching work as before). Code inside the package imports `vipllava_jax.generation.evaluation`."""
import sys

from .generation import evaluation as _module

sys.modules[__name__] = _module
