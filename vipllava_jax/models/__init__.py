"""The model: architecture configs and `Runtime`, the Flax modules, presets and the parameter tree."""
from .config import (CLIPVisionConfig, HFConfig, LlamaConfig, RopeScaling, Runtime, VipLlavaConfig)
from .llama import DecoderOutput, KVCache, LlamaModel
from .params import abstract_param_tree, abstract_params, flat_paths, is_scanned, relayout, unflatten_paths
from .presets import PRESETS, TINY, VIPLLAVA_7B, VIPLLAVA_13B
from .projector import VipLlavaMultiModalProjector
from .vipllava import VipLlavaForConditionalGeneration, VipLlavaOutput
from .vision import CLIPVisionTransformer

__all__ = ["CLIPVisionConfig", "HFConfig", "LlamaConfig", "RopeScaling", "Runtime", "VipLlavaConfig",
           "DecoderOutput", "KVCache", "LlamaModel", "abstract_param_tree", "abstract_params", "flat_paths",
           "is_scanned", "relayout", "unflatten_paths", "PRESETS", "TINY", "VIPLLAVA_7B", "VIPLLAVA_13B",
           "VipLlavaMultiModalProjector", "VipLlavaForConditionalGeneration", "VipLlavaOutput",
           "CLIPVisionTransformer"]
