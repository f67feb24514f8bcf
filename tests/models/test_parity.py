"""Tiny random HF checkpoints (save_pretrained) vs our Flax modules, per part and end to end, at fp32."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vipllava_jax import load_pretrained
from vipllava_jax.models import Runtime, VipLlavaForConditionalGeneration
from vipllava_jax.testing import make_tiny_checkpoint
from vipllava_jax.testing.parity import RTOL, make_inputs, rel_err, torch_logits  # noqa: F401 (rel_err: test_train_*)


VARIANTS = {
    "gqa": dict(num_key_value_heads=2),
    "mha": dict(num_key_value_heads=4),
    "layers_default": dict(vision_feature_layers=[-2, -5, -8, -11, 6], vision_layers=12),
    "layers_int": dict(vision_feature_layers=-2),
    "layers_int_positive": dict(vision_feature_layers=1),
    "biases": dict(attention_bias=True, mlp_bias=True),
    "tied": dict(tie_word_embeddings=True),
    "rope_linear": dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}),
    "rope_dynamic": dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
                         max_position_embeddings=32),
    "rope_llama3": dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                                         "rope_theta": 500000.0}),
}


@pytest.fixture(scope="module")
def gqa_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("gqa")
    return d, make_tiny_checkpoint(d, num_key_value_heads=2)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_torch(tmp_path, name):
    tm = make_tiny_checkpoint(tmp_path, **VARIANTS[name])
    module, params = load_pretrained(tmp_path, progress=False)
    ids, pixels, mask = make_inputs(np.random.default_rng(1))
    ours = module.apply({"params": params}, ids, pixels, mask).logits
    ref = torch_logits(tm, ids, pixels, mask)
    assert ours.shape == ref.shape == (2, ids.shape[1], 128)
    real = mask.astype(bool)  # HF's left-pad rows carry arbitrary values
    assert rel_err(ours, ref, real) < RTOL


@pytest.mark.parametrize("scan,remat", [(False, "none"), (True, "none"), (True, "full"), (False, "dots")])
def test_vision_hidden_states_projector_and_logits(gqa_ckpt, scan, remat):
    d, tm = gqa_ckpt
    module, params = load_pretrained(d, scan_layers=scan, remat_policy=remat, progress=False)
    if scan:
        assert params["language_model"]["layers"]["mlp"]["up_proj"]["kernel"].shape == (2, 32, 64)
    ids, pixels, mask = make_inputs(np.random.default_rng(2))
    feats, hs = module.apply({"params": params}, pixels, method=module.encode_images)
    with torch.no_grad():
        ref_hs = tm.model.vision_tower(torch.tensor(pixels), output_hidden_states=True).hidden_states
        ref_feats = tm.model.get_image_features(pixel_values=torch.tensor(pixels)).pooler_output
    assert hs.shape[0] == len(ref_hs) == 4
    for i, r in enumerate(ref_hs):
        assert rel_err(hs[i], r.numpy()) < RTOL, f"vision hidden state {i}"
    assert feats.shape == tuple(ref_feats.shape) == (3, 25, 32)
    assert rel_err(feats, ref_feats.numpy()) < RTOL
    out = jax.jit(module.apply)({"params": params}, ids, pixels, mask)
    assert rel_err(out.logits, torch_logits(tm, ids, pixels, mask), mask.astype(bool)) < RTOL


def test_left_padded_row_equals_row_alone(gqa_ckpt):
    d, tm = gqa_ckpt
    module, params = load_pretrained(d, progress=False)
    ids, pixels, mask = make_inputs(np.random.default_rng(3))
    batch = np.asarray(module.apply({"params": params}, ids, pixels, mask).logits)
    alone = np.asarray(module.apply({"params": params}, ids[1:, 7:], pixels[2:], mask[1:, 7:]).logits)
    assert rel_err(batch[1, 7:], alone[0]) < RTOL


def test_attention_through_jax_dot_product_attention(gqa_ckpt):
    """attn_impl="jax" makes the jax.nn.dot_product_attention call that the cuDNN path makes (same
    layout, [B, 1, T, S] mask, GQA), letting JAX pick a kernel that runs on CPU. Left-pad rows are
    fully masked there, so this also checks they stay finite and do not leak into real rows."""
    d, tm = gqa_ckpt
    module, params = load_pretrained(d, progress=False)
    cfg = module.config
    ids, pixels, mask = make_inputs(np.random.default_rng(5))
    out = VipLlavaForConditionalGeneration(cfg, Runtime(attn_impl="jax")).apply({"params": params}, ids, pixels, mask).logits
    assert np.isfinite(np.asarray(out)).all()
    assert rel_err(out, torch_logits(tm, ids, pixels, mask), mask.astype(bool)) < RTOL
    with pytest.raises(ValueError, match="attn_impl='flash'"):
        Runtime(attn_impl="flash")


def test_bfloat16_error_is_torch_bfloat16_error(gqa_ckpt):
    """In bf16 both implementations round; ours should stray from the fp32 reference no more than
    PyTorch's bf16 run does (up to a small factor) and stay close to PyTorch's bf16 logits."""
    import copy

    d, tm = gqa_ckpt
    ids, pixels, mask = make_inputs(np.random.default_rng(6))
    real = mask.astype(bool)
    ref32 = torch_logits(tm, ids, pixels, mask)
    ref16 = torch_logits(copy.deepcopy(tm).to(torch.bfloat16), ids, pixels, mask)
    module, params = load_pretrained(d, dtype=jnp.bfloat16, progress=False)
    out = module.apply({"params": params}, ids, jnp.asarray(pixels, jnp.bfloat16), mask).logits
    assert out.dtype == jnp.bfloat16
    ours16 = np.asarray(out.astype(jnp.float32))
    torch_err = rel_err(ref16, ref32, real)
    assert 0 < torch_err < 0.05
    assert rel_err(ours16, ref32, real) < 2 * torch_err
    assert rel_err(ours16, ref16, real) < 2 * torch_err


def test_sharded_safetensors_with_index(tmp_path):
    tm = make_tiny_checkpoint(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    module, params = load_pretrained(tmp_path, progress=False)
    ids, pixels, mask = make_inputs(np.random.default_rng(4))
    assert rel_err(module.apply({"params": params}, ids, pixels, mask).logits,
                   torch_logits(tm, ids, pixels, mask), mask.astype(bool)) < RTOL


def test_pytorch_bin(tmp_path):
    tm = make_tiny_checkpoint(tmp_path, safe_serialization=False)
    if not (tmp_path / "pytorch_model.bin").exists():  # transformers 5 always writes safetensors: write a .bin
        from safetensors.torch import load_file
        sd = load_file(tmp_path / "model.safetensors")
        torch.save(sd, tmp_path / "pytorch_model.bin")
        (tmp_path / "model.safetensors").unlink()
    module, params = load_pretrained(tmp_path, progress=False)
    ids, pixels, mask = make_inputs(np.random.default_rng(5))
    assert rel_err(module.apply({"params": params}, ids, pixels, mask).logits,
                   torch_logits(tm, ids, pixels, mask), mask.astype(bool)) < RTOL
