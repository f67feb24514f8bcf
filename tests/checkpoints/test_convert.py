"""Converter: key layouts, dtype, row-exact embeddings, orbax round trip, export to HF, and every error."""
import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as np_load_file
from safetensors.torch import load_file, save_file

from vipllava_jax import load_pretrained
from vipllava_jax.checkpoints import save_hf, save_orbax
from vipllava_jax.checkpoints.hf_table import canonical_key
from vipllava_jax.checkpoints import CheckpointError
from vipllava_jax.testing import make_tiny_checkpoint

from vipllava_jax.testing.parity import RTOL, make_inputs, rel_err, torch_logits


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    return d, make_tiny_checkpoint(d)


def copy_with_keys(src, dst, rename=None, drop=None, add=None, reshape=None):
    """Copy a checkpoint directory, rewriting the keys of its safetensors file."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    sd = load_file(src / "model.safetensors")
    out = {}
    for k, v in sd.items():
        if drop and k == drop:
            continue
        if reshape and k == reshape:
            v = v[:-1]
        out[rename(k) if rename else k] = v
    if add:
        out.update(add)
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


LAYOUTS = {
    # transformers 4.x hub files
    "hub_4x": lambda k: k.replace("vision_tower.", "vision_tower.vision_model.", 1) if k.startswith("vision_tower.") else k,
    # transformers 5 module names
    "tf5_modules": lambda k: ("model." + k.replace("language_model.model.", "language_model.", 1)
                              if not k.startswith("language_model.lm_head") else "lm_head.weight"),
}


@pytest.mark.parametrize("layout", ["tf5_save", *LAYOUTS])
def test_key_layouts(ckpt, tmp_path, layout):
    d, tm = ckpt
    src = d if layout == "tf5_save" else copy_with_keys(d, tmp_path / layout, rename=LAYOUTS[layout])
    keys = list(load_file(src / "model.safetensors"))
    if layout == "hub_4x":
        assert any(k.startswith("vision_tower.vision_model.") for k in keys)
    if layout == "tf5_modules":
        assert "lm_head.weight" in keys and any(k.startswith("model.language_model.layers") for k in keys)
    module, params = load_pretrained(src, progress=False)
    ids, pixels, mask = make_inputs(np.random.default_rng(0))
    assert rel_err(module.apply({"params": params}, ids, pixels, mask).logits,
                   torch_logits(tm, ids, pixels, mask), mask.astype(bool)) < RTOL


def test_keeps_checkpoint_dtype_and_copies_rows_exactly(tmp_path):
    make_tiny_checkpoint(tmp_path, dtype=torch.bfloat16, vocab_size=160)
    _, params = load_pretrained(tmp_path, dtype=None, progress=False)
    dtypes = {x.dtype for x in jax.tree.leaves(params)}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    sd = load_file(tmp_path / "model.safetensors")
    emb = sd["language_model.model.embed_tokens.weight"].view(torch.int16).numpy()
    head = sd["language_model.lm_head.weight"].view(torch.int16).numpy()
    ours_emb = np.asarray(params["language_model"]["embed_tokens"]["embedding"]).view(np.int16)
    ours_head = np.asarray(params["lm_head"]["kernel"]).view(np.int16).T
    assert ours_emb.shape == (160, 32)
    np.testing.assert_array_equal(ours_emb, emb)  # bit-exact, every row
    np.testing.assert_array_equal(ours_head, head)
    _, p32 = load_pretrained(tmp_path, dtype=jnp.float32, progress=False)
    assert {x.dtype for x in jax.tree.leaves(p32)} == {jnp.dtype(jnp.float32)}


def test_orbax_round_trip(ckpt, tmp_path):
    d, tm = ckpt
    module, params = load_pretrained(d, progress=False)
    out = save_orbax(params, module.config, tmp_path / "orbax", tokenizer_from=d)
    assert not (tmp_path / "orbax.partial").exists()
    with pytest.raises(FileExistsError, match="already exists"):
        save_orbax(params, module.config, out)
    m2, p2 = load_pretrained(out)
    assert m2.config == module.config
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Saved unrolled, restored scanned: same numbers.
    m3, p3 = load_pretrained(out, scan_layers=True)
    ids, pixels, mask = make_inputs(np.random.default_rng(1))
    assert rel_err(m3.apply({"params": p3}, ids, pixels, mask).logits,
                   torch_logits(tm, ids, pixels, mask), mask.astype(bool)) < RTOL


@pytest.mark.parametrize("scan", [False, True])
def test_export_to_hf_loads_in_transformers(ckpt, tmp_path, scan):
    from transformers import VipLlavaForConditionalGeneration
    d, tm = ckpt
    module, params = load_pretrained(d, scan_layers=scan, progress=False)
    out = save_hf(params, module.config, tmp_path / "hf", max_shard_bytes=100_000)
    assert (out / "model.safetensors.index.json").exists()
    back = VipLlavaForConditionalGeneration.from_pretrained(out).eval()
    ref = dict(tm.state_dict())
    got = dict(back.state_dict())
    assert set(ref) == set(got)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=k)


# --- errors: each names the problem -------------------------------------------------------------------------
def test_missing_key(ckpt, tmp_path):
    d, _ = ckpt
    bad = copy_with_keys(d, tmp_path / "bad", drop="language_model.model.layers.1.mlp.up_proj.weight")
    with pytest.raises(CheckpointError, match=r"missing key.*layers_1/mlp/up_proj/kernel.*language_model\.layers\.1\.mlp\.up_proj\.weight.*\[64, 32\]"):
        load_pretrained(bad, progress=False)


def test_unexpected_key(ckpt, tmp_path):
    d, _ = ckpt
    bad = copy_with_keys(d, tmp_path / "bad", add={"multi_modal_projector.linear_3.weight": torch.zeros(4, 4)})
    with pytest.raises(CheckpointError, match=r"unexpected key 'multi_modal_projector\.linear_3\.weight' \(shape \[4, 4\]\)"):
        load_pretrained(bad, progress=False)


def test_extra_layer_is_unexpected(ckpt, tmp_path):
    d, _ = ckpt
    bad = copy_with_keys(d, tmp_path / "bad", add={"language_model.model.layers.7.input_layernorm.weight": torch.ones(32)})
    with pytest.raises(CheckpointError, match=r"unexpected key 'language_model\.model\.layers\.7\.input_layernorm\.weight'"):
        load_pretrained(bad, progress=False)


def test_wrong_shape(ckpt, tmp_path):
    d, _ = ckpt
    key = "language_model.model.layers.0.self_attn.k_proj.weight"
    bad = copy_with_keys(d, tmp_path / "bad", reshape=key)
    with pytest.raises(CheckpointError, match=rf"wrong shape for key '{key}': checkpoint has \[15, 32\], the config expects \[16, 32\]"):
        load_pretrained(bad, progress=False)


def test_truncated_safetensors(ckpt, tmp_path):
    d, _ = ckpt
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    f = bad / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated safetensors file"):
        load_pretrained(bad, progress=False)
    f.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        load_pretrained(bad, progress=False)


def test_config_of_another_architecture(ckpt, tmp_path):
    d, _ = ckpt
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "llava", ["LlavaForConditionalGeneration"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model_type 'llava'.*LlavaForConditionalGeneration.*not a VipLlava"):
        load_pretrained(bad, progress=False)


@pytest.mark.parametrize("field,value,match", [
    (("text_config", "rope_parameters"), {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}, "Unsupported rope type 'yarn'"),
    (("text_config", "hidden_act"), "mish", r"text_config\.hidden_act='mish'"),
    (("vision_config", "hidden_act"), "swoosh", r"vision_config\.hidden_act='swoosh'"),
    (("projector_hidden_act",), "tanh", r"projector_hidden_act='tanh'"),
    (("text_config", "model_type"), "mistral", "model_type 'mistral'"),
])
def test_unsupported_config_values(ckpt, tmp_path, field, value, match):
    d, _ = ckpt
    cfg = json.loads((d / "config.json").read_text())
    node = cfg
    for f in field[:-1]:
        node = node[f]
    node[field[-1]] = value
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        load_pretrained(bad, progress=False)


def test_missing_dir_and_weights(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "nope", progress=False)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="not a VipLlava"):
        load_pretrained(tmp_path, progress=False)


def test_image_tokens_do_not_match_images(ckpt):
    d, _ = ckpt
    module, params = load_pretrained(d, progress=False)
    ids, pixels, mask = make_inputs(np.random.default_rng(0))
    with pytest.raises(ValueError, match="Image features and image tokens do not match, tokens: 75, features: 50"):
        module.apply({"params": params}, ids, pixels[:2], mask)
    # Under jit the count cannot be checked on the host: the output is NaN, never silently wrong.
    out = jax.jit(module.apply)({"params": params}, ids, pixels[:2], mask)
    assert np.isnan(np.asarray(out.logits)).all()


def test_canonical_keys():
    assert canonical_key("vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight") == "vision_tower.encoder.layers.0.mlp.fc1.weight"
    assert canonical_key("model.language_model.norm.weight") == "language_model.norm.weight"
    assert canonical_key("language_model.lm_head.weight") == "lm_head.weight"
    assert canonical_key("model.multi_modal_projector.linear_1.bias") == "multi_modal_projector.linear_1.bias"
