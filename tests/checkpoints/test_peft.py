"""PEFT LoRA adapters both ways, against peft itself on the tiny random checkpoint: an adapter peft saves loads into
ours (`load_pretrained(base, adapter=DIR)`, unrolled and scanned) with PeftModel's logits; one we write
(`save_adapter`, what `train --stage lora` writes to RUN_DIR/adapter) loads in peft with our logits (the unmerged
training forward); keys PEFT uses for VipLlava under the installed transformers; names, shapes and PEFT features we
do not compute are clear errors naming the key."""
import json
import shutil

import jax
import numpy as np
import pytest
import torch

from vipllava_jax import load_pretrained
from vipllava_jax.checkpoints.adapter import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterError, peft_target_regex,
                                              read_adapter, save_adapter)
from vipllava_jax.testing import make_inputs, rel_err, torch_logits
from vipllava_jax.training.lora import LoraConfig, init_lora
from vipllava_jax.training.step import model_inputs

peft = pytest.importorskip("peft")
TARGETS = ("q_proj", "v_proj", "down_proj")


def _hf(base):
    from transformers import VipLlavaForConditionalGeneration
    return VipLlavaForConditionalGeneration.from_pretrained(base).eval()


@pytest.fixture(scope="module")
def peft_adapter(tiny_hf, tmp_path_factory):
    """An adapter saved by peft on the tiny HF model: random A and B (init_lora_weights=False), the projector in
    modules_to_save and perturbed; and that PeftModel's logits."""
    d = tmp_path_factory.mktemp("peft") / "adapter"
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=peft_target_regex(TARGETS), init_lora_weights=False,
                          modules_to_save=["multi_modal_projector"])
    pm = peft.get_peft_model(_hf(tiny_hf), cfg).eval()
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.05 * torch.randn_like(p))
    pm.save_pretrained(d)
    inputs = make_inputs(np.random.default_rng(0))
    return d, inputs, torch_logits(pm, *inputs)


def test_peft_keys_and_regex_match_the_language_model_only(peft_adapter):
    d, _, _ = peft_adapter
    from safetensors.numpy import load_file
    keys = list(load_file(d / ADAPTER_WEIGHTS))
    lora = [k for k in keys if ".lora_" in k]
    assert len(lora) == 2 * 2 * len(TARGETS)  # A and B, 2 layers
    assert all(k.startswith("base_model.model.model.language_model.layers.") for k in lora), lora
    assert not any("vision_tower" in k for k in keys)


@pytest.mark.parametrize("scan", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_peft_saved_adapter_loads_into_ours_with_equal_logits(tiny_hf, peft_adapter, scan):
    d, inputs, ref = peft_adapter
    module, params = load_pretrained(tiny_hf, progress=False, scan_layers=scan, adapter=d)
    ids, pixels, mask = inputs
    ours = module.apply({"params": params}, ids, pixels, mask).logits
    real = mask.astype(bool)
    assert rel_err(ours, ref, real) < 1e-5
    base = torch_logits(_hf(tiny_hf), *inputs)
    assert rel_err(base, ref, real) > 1e-3  # the adapter (and projector) change the output


def test_our_adapter_loads_in_peft_with_our_logits(tiny_hf, tiny_model, tmp_path):
    """save_adapter of a trained-like state (random A, B, a changed projector) -> PeftModel.from_pretrained(base,
    dir) computes our unmerged training forward, x W + (alpha/r) (x A) B, within 1e-5 at fp32."""
    module, params = tiny_model
    cfg = LoraConfig(rank=4, alpha=16.0, targets=("q_proj", "k_proj", "o_proj", "gate_proj", "up_proj"))
    lora = init_lora(params, cfg, jax.random.key(0))
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), lora)
    proj = jax.tree.map(lambda x: x * 1.1 + 0.01, params["multi_modal_projector"])
    frozen = {k: v for k, v in params.items() if k != "multi_modal_projector"}
    out = save_adapter(tmp_path / "adapter", lora, rank=cfg.rank, alpha=cfg.alpha, targets=cfg.targets,
                       modules={"multi_modal_projector": proj}, base_model=str(tiny_hf))
    conf = json.loads((out / ADAPTER_CONFIG).read_text())
    assert conf["modules_to_save"] == ["multi_modal_projector"] and conf["peft_type"] == "LORA"
    pm = peft.PeftModel.from_pretrained(_hf(tiny_hf), out).eval()
    targeted = [n for n, m in pm.named_modules() if hasattr(m, "lora_A")]
    assert len(targeted) == 2 * len(cfg.targets) and all(".language_model." in n for n in targeted), targeted
    inputs = make_inputs(np.random.default_rng(1))
    p, col = model_inputs({"params": {"multi_modal_projector": proj}, "lora": lora}, frozen, cfg)
    ours = module.apply({"params": p, "lora": col}, *inputs[:2], inputs[2]).logits
    assert rel_err(ours, torch_logits(pm, *inputs), inputs[2].astype(bool)) < 1e-5


def _edit(src, dst, config=None, drop=(), rename=None, reshape=None):
    from safetensors.numpy import load_file, save_file
    shutil.copytree(src, dst)
    if config:
        c = json.loads((dst / ADAPTER_CONFIG).read_text())
        c.update(config)
        (dst / ADAPTER_CONFIG).write_text(json.dumps(c))
    w = load_file(dst / ADAPTER_WEIGHTS)
    w = {(rename(k) if rename else k): v for k, v in w.items() if not any(s in k for s in drop)}
    if reshape:
        w = {k: (reshape(k, v)) for k, v in w.items()}
    save_file(w, dst / ADAPTER_WEIGHTS)
    return dst


def test_adapters_that_do_not_fit_are_clear_errors(tiny_hf, tiny_model, peft_adapter, tmp_path):
    d, _, _ = peft_adapter
    _, params = tiny_model
    q0 = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"
    cases = [
        (dict(config={"use_dora": True}), r"use_dora=True \(DoRA\) is not supported"),
        (dict(config={"use_rslora": True}), r"use_rslora=True .* is not supported"),
        (dict(config={"bias": "all"}), r"bias='all' .* is not supported"),
        (dict(config={"modules_to_save": ["lm_head"]}), r"modules_to_save \['lm_head'\] is not supported"),
        (dict(config={"rank_pattern": {"q_proj": 8}}), r"rank_pattern=.*per-module ranks"),
        (dict(config={"r": 8}), r"lora_A.weight' has shape \[4, \d+\]; this base model with r=8 needs \[8, "),
        (dict(reshape=lambda k, v: v[:, :16] if k == q0 else v), "q_proj.lora_A.weight' has shape \\[4, 16\\]"),
        (dict(rename=lambda k: k.replace("language_model.layers.1.mlp", "vision_tower.encoder.layers.1.mlp")),
         "vision_tower.encoder.layers.1.mlp.down_proj.lora_A.weight' adapts .*not a projection of this base model's "
         "language model"),
        (dict(rename=lambda k: k.replace("layers.1.", "layers.7.")), "layers.7.*not a projection of this base"),
        (dict(drop=("layers.0.self_attn.v_proj.lora_B",)), "language_model/layers_0/self_attn/v_proj/lora_a has "
                                                           "lora_A but no lora_B"),
    ]
    for i, (kw, msg) in enumerate(cases):
        bad = _edit(d, tmp_path / f"bad{i}", **kw)
        with pytest.raises(AdapterError, match=msg):
            read_adapter(bad, params)
    with pytest.raises(AdapterError, match="no adapter for layer 0 of language_model/layers/self_attn/q_proj"):
        from vipllava_jax.models.params import relayout
        read_adapter(_edit(d, tmp_path / "gap", drop=("layers.0.self_attn.q_proj",)), relayout(params, True))
    with pytest.raises(AdapterError, match="No adapter_config.json in"):
        read_adapter(tmp_path, params)


@pytest.mark.parametrize("command", ["generate", "eval", "serve"])
def test_adapter_flag_reaches_load_pretrained(tiny_hf, tmp_path, capsys, monkeypatch, command):
    """--adapter DIR on generate / eval / serve is load_pretrained's adapter=: a directory that is not an
    adapter is the one-line error naming it (exit 2)."""
    from vipllava_jax.checkpoints import load as load_lib
    from vipllava_jax.cli import main as cli_main
    seen = {}
    real = load_lib.load_pretrained

    def spy(*a, **kw):
        seen["adapter"] = kw.get("adapter")
        return real(*a, **kw)

    for mod in ("generate", "eval", "serve"):
        monkeypatch.setattr(f"vipllava_jax.cli.{mod}.load_pretrained", spy)
    extra = {"generate": ["--prompt", "hi", "--max-new-tokens", "1"], "eval": ["--data", str(tmp_path / "d.json"), "--output", str(tmp_path / "o.jsonl")],
             "serve": []}[command]
    if command == "eval":
        (tmp_path / "d.json").write_text("[]")
    code = cli_main([command, "--model", str(tiny_hf), "--adapter", str(tmp_path)] + extra)
    assert code == 2 and seen["adapter"] == str(tmp_path)
    assert f"No adapter_config.json in {tmp_path}" in capsys.readouterr().err
