"""Moved to `vipllava_jax.cli.train`; this name stays importable (it *is* that module, so every name, private ones
included, and monkeypatching work as before). Code inside the package imports `vipllava_jax.cli.train`."""
import sys

from .cli import train as _module

sys.modules[__name__] = _module
