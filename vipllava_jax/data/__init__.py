"""Model inputs from images and text, exactly as Hugging Face's processor makes them (numpy, no torch), visual
prompts drawn on images, the LLaVA record schema and the templates training and evaluation share, and the
synthetic visual-prompt task. Imports nothing else from the package."""
from . import markers, records, synthetic, visual_prompts
from .clip import CLIP_MEAN, CLIP_STD, ImageConfig, expand_to_square, preprocess_image, preprocess_images
from .images import load_image
from .processor import Processor
from .prompts import DEFAULT_SYSTEM_PROMPT, IMAGE_TOKEN, TEMPLATES, build_prompt, stop_for_template
from .records import RecordError, Region, load_records

__all__ = ["markers", "records", "synthetic", "visual_prompts", "CLIP_MEAN", "CLIP_STD", "ImageConfig",
           "expand_to_square", "preprocess_image", "preprocess_images", "load_image", "Processor",
           "DEFAULT_SYSTEM_PROMPT", "IMAGE_TOKEN", "TEMPLATES", "build_prompt", "stop_for_template", "RecordError",
           "Region", "load_records"]
