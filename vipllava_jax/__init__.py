"""VipLlava (ViP-LLaVA) in JAX/Flax.

Sub-packages, each importing only the ones before it: `models` (configs, `Runtime`, modules, presets, the
parameter tree) and `data` (images, prompts, processor, visual prompts: imports nothing else) -> `parallel`
(meshes, shardings, planner, multi-host) -> `checkpoints` (HF and orbax) -> `generation` | `training` ->
`testing` -> `cli`.
"""
__version__ = "0.1.0"

from .models import (CLIPVisionConfig, CLIPVisionTransformer, KVCache, LlamaConfig, LlamaModel, Runtime,
                     VipLlavaConfig, VipLlavaForConditionalGeneration, VipLlavaMultiModalProjector, VipLlavaOutput)
from .models.presets import PRESETS
from .parallel import make_mesh, plan_memory, sharded_forward
from .checkpoints import load_config, load_hf_params, load_pretrained, restore_orbax, save_hf, save_orbax
from .generation import (GenerationConfig, StopStrings, generate, generate_stream, generate_stream_tokens,
                         sharded_generate, stop_strings_for)

__all__ = ["CLIPVisionConfig", "CLIPVisionTransformer", "KVCache", "LlamaConfig", "LlamaModel", "Runtime",
           "VipLlavaConfig", "VipLlavaForConditionalGeneration", "VipLlavaMultiModalProjector", "VipLlavaOutput",
           "PRESETS", "make_mesh", "plan_memory", "sharded_forward", "load_config", "load_hf_params", "load_pretrained",
           "restore_orbax", "save_hf", "save_orbax", "GenerationConfig", "StopStrings", "generate", "generate_stream",
           "generate_stream_tokens", "sharded_generate", "stop_strings_for"]
