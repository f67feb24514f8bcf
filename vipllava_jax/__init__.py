"""VipLlava (ViP-LLaVA) in JAX/Flax."""
__version__ = "0.1.0"

from .vision import CLIPVisionConfig, CLIPVisionTransformer
from .llama import KVCache, LlamaConfig, LlamaModel
from .projector import VipLlavaMultiModalProjector
from .vipllava import VipLlavaConfig, VipLlavaForConditionalGeneration, VipLlavaOutput
from .checkpoint import load_pretrained, save_orbax, restore_orbax, load_config
from .convert import load_hf_params, save_hf
from .sharding import make_mesh, sharded_forward, sharded_generate
from .plan import PRESETS, plan_memory
from .generation import StopStrings, generate, generate_stream, generate_stream_tokens, stop_strings_for
