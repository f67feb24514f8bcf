"""Moved to `vipllava_jax.data` (images.py, clip.py, prompts.py, processor.py); these names stay importable."""
from .data.clip import CLIP_MEAN, CLIP_STD, ImageConfig, expand_to_square, preprocess_image, preprocess_images
from .data.images import load_image
from .data.processor import Processor
from .data.prompts import DEFAULT_SYSTEM_PROMPT, IMAGE_TOKEN, build_prompt

__all__ = ["CLIP_MEAN", "CLIP_STD", "DEFAULT_SYSTEM_PROMPT", "IMAGE_TOKEN", "ImageConfig", "load_image",
           "expand_to_square", "preprocess_image", "preprocess_images", "build_prompt", "Processor"]
