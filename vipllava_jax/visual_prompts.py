"""Moved to `vipllava_jax.data.visual_prompts`; this name stays importable (it *is* that module, so every name, private ones
included, and monkeypatching work as before). Code inside the package imports `vipllava_jax.data.visual_prompts`."""
import sys

from .data import visual_prompts as _module

sys.modules[__name__] = _module
