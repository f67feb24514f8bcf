"""Model inputs from images and text, exactly as Hugging Face's processor makes them (numpy, no torch), visual
prompts drawn on images, and the synthetic visual-prompt task. Imports nothing else from the package."""
from . import synthetic, visual_prompts
from .clip import CLIP_MEAN, CLIP_STD, ImageConfig, expand_to_square, preprocess_image, preprocess_images
from .images import load_image
from .processor import Processor
from .prompts import DEFAULT_SYSTEM_PROMPT, IMAGE_TOKEN, build_prompt

__all__ = ["synthetic", "visual_prompts", "CLIP_MEAN", "CLIP_STD", "ImageConfig", "expand_to_square",
           "preprocess_image", "preprocess_images", "load_image", "Processor", "DEFAULT_SYSTEM_PROMPT",
           "IMAGE_TOKEN", "build_prompt"]
