"""Built-in architecture configs: ``7b`` and ``13b`` (the llava-hf/vip-llava-7b-hf / -13b-hf shapes) and ``tiny``
(the tiny random checkpoint `vipllava_jax.testing.make_tiny_checkpoint` writes: 30 px images, 6 px patches, so 25
image tokens, 32-wide towers, vocab 128). The memory planner, the benchmarks and the test helpers take them
from here."""
from __future__ import annotations

from .config import CLIPVisionConfig, LlamaConfig, VipLlavaConfig

_CLIP_L_336 = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                               num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
                               hidden_act="quick_gelu", layer_norm_eps=1e-5)


def _llama(hidden, layers, heads, mlp):
    return LlamaConfig(vocab_size=32064, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu", bos_token_id=1, eos_token_id=2,
                       pad_token_id=32001)


# llava-hf/vip-llava-7b-hf: CLIP ViT-L/14-336 + Vicuna-7B
VIPLLAVA_7B = VipLlavaConfig(vision=_CLIP_L_336, text=_llama(4096, 32, 32, 11008), image_token_index=32000,
                             projector_hidden_act="gelu", vision_feature_layers=(-2, -5, -8, -11, 6),
                             image_seq_length=576)
# llava-hf/vip-llava-13b-hf: CLIP ViT-L/14-336 + Vicuna-13B
VIPLLAVA_13B = VipLlavaConfig(vision=_CLIP_L_336, text=_llama(5120, 40, 40, 13824), image_token_index=32000,
                              projector_hidden_act="gelu", vision_feature_layers=(-2, -5, -8, -11, 6),
                              image_seq_length=576)
# The tiny test model: image token 100, pad token 101.
TINY = VipLlavaConfig(
    vision=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            image_size=30, patch_size=6, projection_dim=16, hidden_act="quick_gelu"),
    text=LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     rms_norm_eps=1e-6, hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=101),
    image_token_index=100, projector_hidden_act="gelu", vision_feature_layers=(-2, 0, 1), image_seq_length=25)

PRESETS: dict[str, VipLlavaConfig] = {"7b": VIPLLAVA_7B, "13b": VIPLLAVA_13B, "tiny": TINY}
