"""Tiny random HF VipLlava checkpoints for tests, the demo and the notebooks (needs torch + transformers)."""
from __future__ import annotations

from pathlib import Path

TINY_IMAGE_TOKEN = 100
TINY_PAD_TOKEN = 101


def tiny_hf_config(*, num_key_value_heads: int = 2, vision_feature_layers=(-2, 0, 1), text_layers: int = 2,
                   vision_layers: int = 3, rope_parameters: dict | None = None, tie_word_embeddings: bool = False,
                   attention_bias: bool = False, mlp_bias: bool = False, vocab_size: int = 128,
                   image_token_index: int = TINY_IMAGE_TOKEN, hidden_act: str = "silu",
                   max_position_embeddings: int = 256):
    """A transformers VipLlavaConfig with a 30 px image, 6 px patches (25 image tokens) and a 32-wide decoder."""
    from transformers import CLIPVisionConfig, LlamaConfig, VipLlavaConfig
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
                          num_attention_heads=4, image_size=30, patch_size=6, projection_dim=16)
    tkw = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=text_layers,
               num_attention_heads=4, num_key_value_heads=num_key_value_heads, attention_bias=attention_bias,
               mlp_bias=mlp_bias, hidden_act=hidden_act, max_position_embeddings=max_position_embeddings,
               tie_word_embeddings=tie_word_embeddings, pad_token_id=TINY_PAD_TOKEN, eos_token_id=2, bos_token_id=1)
    if rope_parameters is not None:
        tkw["rope_parameters"] = rope_parameters
    tc = LlamaConfig(**tkw)
    return VipLlavaConfig(vision_config=vc, text_config=tc, image_token_index=image_token_index,
                          vision_feature_layer=vision_feature_layers, image_seq_length=25,
                          tie_word_embeddings=tie_word_embeddings)


def make_tiny_checkpoint(out_dir, *, seed: int = 0, safe_serialization: bool = True, max_shard_size=None,
                         dtype=None, **config_kw):
    """save_pretrained a random tiny VipLlavaForConditionalGeneration into out_dir; returns the torch model."""
    import torch
    from transformers import VipLlavaForConditionalGeneration
    torch.manual_seed(seed)
    model = VipLlavaForConditionalGeneration(tiny_hf_config(**config_kw)).eval()
    # Random init leaves norms at 1/0; perturb everything so every parameter matters in a parity test.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    if dtype is not None:
        model = model.to(dtype)
    kw = {"safe_serialization": safe_serialization}
    if max_shard_size is not None:
        kw["max_shard_size"] = max_shard_size
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, **kw)
    return model
