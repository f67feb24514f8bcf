"""Real-size shapes with jax.eval_shape: parameter counts equal PyTorch's for the 7B and 13B configs."""
import math

import jax
import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, VipLlavaConfig as HFConfig, VipLlavaForConditionalGeneration

from vipllava_jax.models import Runtime, VipLlavaConfig, VipLlavaForConditionalGeneration as Ours
from vipllava_jax.models.params import abstract_params, flat_paths

VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
TEXT = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
}


def hf_config(size):
    return HFConfig(vision_config=CLIPVisionConfig(**VISION),
                    text_config=LlamaConfig(vocab_size=32064, max_position_embeddings=4096, pad_token_id=32001,
                                            **TEXT[size]),
                    image_token_index=32000, image_seq_length=576)


@pytest.mark.parametrize("size", ["7b", "13b"])
@pytest.mark.parametrize("scan", [False, True])
def test_param_count_equals_torch(size, scan):
    hf = hf_config(size)
    with torch.device("meta"):
        tm = VipLlavaForConditionalGeneration(hf)
    torch_count = sum(p.numel() for p in tm.parameters())
    cfg = VipLlavaConfig.from_hf(hf.to_dict())
    assert cfg.image_seq_length == 576 and cfg.vision.num_patches == 576
    assert cfg.vision_feature_layers == (-2, -5, -8, -11, 6)
    flat = flat_paths(abstract_params(Ours(cfg, Runtime(scan_layers=scan))))
    ours = sum(math.prod(v.value.shape) for v in flat.values())
    assert ours == torch_count
    emb = flat["language_model/embed_tokens/embedding"].value
    assert emb.shape == (32064, TEXT[size]["hidden_size"])
    assert flat["multi_modal_projector/linear_1/kernel"].value.shape == (5 * 1024, TEXT[size]["hidden_size"])


def test_full_forward_shapes_7b():
    cfg = VipLlavaConfig.from_hf(hf_config("7b").to_dict())
    m = Ours(cfg)
    params = jax.tree.map(lambda x: x.value, abstract_params(m), is_leaf=lambda x: hasattr(x, "value"))
    ids = jax.ShapeDtypeStruct((2, 600), np.int32)
    pv = jax.ShapeDtypeStruct((2, 3, 336, 336), np.float32)
    out = jax.eval_shape(lambda p, i, x: m.apply({"params": p}, i, x), params, ids, pv)
    assert out.logits.shape == (2, 600, 32064)
    assert out.image_features.shape == (2, 576, 4096)
