"""Moved to `vipllava_jax.testing.tiny_tokenizer`; this name stays importable (it *is* that module, so every name, private ones
included, and monkeypatching work as before). Code inside the package imports `vipllava_jax.testing.tiny_tokenizer`."""
import sys

from .testing import tiny_tokenizer as _module

sys.modules[__name__] = _module
