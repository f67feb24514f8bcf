"""Tiny random HF VipLlava checkpoints for tests, the demo and the notebooks (needs torch + transformers), with
the shapes of the ``tiny`` preset (`models.presets.TINY`): 30 px images, 6 px patches (25 image tokens), 32-wide
towers, vocab 128, image token 100, pad token 101."""
from __future__ import annotations

from pathlib import Path

from ..models.presets import TINY

_V, _T = TINY.vision, TINY.text
TINY_IMAGE_TOKEN = TINY.image_token_index
TINY_PAD_TOKEN = _T.pad_token_id


def tiny_hf_config(*, num_key_value_heads: int = _T.num_key_value_heads,
                   vision_feature_layers=TINY.vision_feature_layers, text_layers: int = _T.num_hidden_layers,
                   vision_layers: int = _V.num_hidden_layers, rope_parameters: dict | None = None,
                   tie_word_embeddings: bool = False, attention_bias: bool = False, mlp_bias: bool = False,
                   vocab_size: int = _T.vocab_size, image_token_index: int = TINY_IMAGE_TOKEN,
                   hidden_act: str = _T.hidden_act, max_position_embeddings: int = _T.max_position_embeddings):
    """A transformers VipLlavaConfig of the tiny preset, with these fields changed."""
    from transformers import CLIPVisionConfig, LlamaConfig, VipLlavaConfig
    vc = CLIPVisionConfig(hidden_size=_V.hidden_size, intermediate_size=_V.intermediate_size,
                          num_hidden_layers=vision_layers, num_attention_heads=_V.num_attention_heads,
                          image_size=_V.image_size, patch_size=_V.patch_size, projection_dim=_V.projection_dim,
                          hidden_act=_V.hidden_act, layer_norm_eps=_V.layer_norm_eps)
    tkw = dict(vocab_size=vocab_size, hidden_size=_T.hidden_size, intermediate_size=_T.intermediate_size,
               num_hidden_layers=text_layers, num_attention_heads=_T.num_attention_heads,
               num_key_value_heads=num_key_value_heads, attention_bias=attention_bias, mlp_bias=mlp_bias,
               hidden_act=hidden_act, max_position_embeddings=max_position_embeddings, rms_norm_eps=_T.rms_norm_eps,
               tie_word_embeddings=tie_word_embeddings, pad_token_id=TINY_PAD_TOKEN, eos_token_id=_T.eos_token_id,
               bos_token_id=_T.bos_token_id)
    if rope_parameters is not None:
        tkw["rope_parameters"] = rope_parameters
    tc = LlamaConfig(**tkw)
    return VipLlavaConfig(vision_config=vc, text_config=tc, image_token_index=image_token_index,
                          vision_feature_layer=vision_feature_layers, image_seq_length=TINY.image_seq_length,
                          projector_hidden_act=TINY.projector_hidden_act, tie_word_embeddings=tie_word_embeddings)


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
