"""Moved to `vipllava_jax.cli.demo`; these names stay importable."""
from .cli.demo import (DEMO_SYSTEM_PROMPT, DEMO_TEMPLATE, HELDOUT_SEED, N_HELDOUT, TRAIN_SEED, demo_model_path,
                       format_accuracy, heldout_accuracy, run_demo, write_heldout)

__all__ = ["demo_model_path", "run_demo", "heldout_accuracy", "write_heldout", "format_accuracy", "TRAIN_SEED",
           "HELDOUT_SEED", "N_HELDOUT", "DEMO_TEMPLATE", "DEMO_SYSTEM_PROMPT"]
