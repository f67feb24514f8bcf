"""Test helpers: tiny random HF checkpoints (`make_tiny_checkpoint`, `tiny_hf_config`), a tiny offline processor
(`make_tiny_processor`) and parity helpers (`parity.rel_err`, ...). Needs torch + transformers when called."""
from .parity import RTOL, make_inputs, rel_err, torch_logits
from .tiny_model import TINY_IMAGE_TOKEN, TINY_PAD_TOKEN, make_tiny_checkpoint, tiny_hf_config
from .tiny_tokenizer import make_tiny_processor

__all__ = ["RTOL", "make_inputs", "rel_err", "torch_logits", "TINY_IMAGE_TOKEN", "TINY_PAD_TOKEN",
           "make_tiny_checkpoint", "tiny_hf_config", "make_tiny_processor"]
