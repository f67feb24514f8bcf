"""LoRA the efficient way: the train step computes x W + (alpha/r) (x A) B with W frozen and never differentiated.
Its gradients equal the merged formulation's (W + (alpha/r) A B, differentiated through) at fp32, scanned and
unrolled, remat on and off; the compiled step holds no [in, out] gradient buffer of a frozen weight (read from
XLA's compiled program, with the full fine-tuning step as the check that the reading finds them); and XLA's cost
analysis gives the LoRA step at most 0.72x the full step's FLOPs (remat off, the same layout)."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vipllava_jax.models.config import Runtime
from vipllava_jax.models.params import abstract_params, relayout
from vipllava_jax.models.presets import TINY
from vipllava_jax.models.vipllava import VipLlavaForConditionalGeneration
from vipllava_jax.testing import rel_err
from vipllava_jax.training import loss_fn
from vipllava_jax.training.lora import LoraConfig, init_lora
from vipllava_jax.training.optim import make_optimizer, split_params
from vipllava_jax.training.step import StepConfig, compute_params, init_state, make_train_step, model_inputs


def _text_batch(rng):
    """Two rows of 24 tokens, the second left-padded by 5, every real token supervised (no image: the tower and
    projector are the stage's plain trained / frozen parameters, not what is checked here)."""
    ids = rng.integers(3, 99, (2, 24))
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": np.where(mask.astype(bool), ids, -100)}


@pytest.mark.parametrize("scan,remat", [(False, "none"), pytest.param(True, "full", marks=pytest.mark.slow)])
def test_lora_gradients_equal_the_merged_formulation(tiny_model, scan, remat):
    """d loss / d (A, B) through the unmerged adapters == through W + (alpha/r) A B, within 1e-5 (relative)."""
    module, params = tiny_model
    module = module.clone(runtime=Runtime(scan_layers=scan, remat_policy=remat))
    params = relayout(params, scan)
    cfg = LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"))
    lora = init_lora(params, cfg, jax.random.key(0))
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), lora)  # B != 0
    tr, frozen = {"params": {}, "lora": lora}, params
    batch = _text_batch(np.random.default_rng(0))

    def unmerged(t):
        p, col = model_inputs(t, frozen, cfg)
        return loss_fn(module, p, batch, lora=col)[0]

    def merged(t):
        return loss_fn(module, compute_params(t, frozen, cfg), batch)[0]

    both = jax.jit(lambda t: (jax.value_and_grad(unmerged)(t), jax.value_and_grad(merged)(t)))  # one compile
    (l1, g1), (l2, g2) = both(tr)
    assert abs(float(l1) - float(l2)) <= 1e-6 * abs(float(l2))
    flat1, flat2 = jax.tree_util.tree_flatten_with_path(g1)[0], jax.tree.leaves(g2)
    assert len(flat1) == len(flat2) == 2 * 6 * (1 if scan else 2)
    for (path, a), b in zip(flat1, flat2):
        assert np.abs(b).max() > 0, path
        assert rel_err(a, b) < 1e-5, (jax.tree_util.keystr(path), rel_err(a, b))


# A config whose frozen language-model kernels have shapes no trained parameter has (q [160, 192], k/v [160, 48],
# o [192, 160], gate/up [160, 480], down [480, 160]; the projector's are [96, 160] and [160, 160]), and whose step
# is dominated by the language model's matmuls (rank 2 against width 160; a 30 px image; 4 rows of 44 tokens: 176 rows of activations, no kernel dimension).
SMALL = TINY.replace(text=TINY.text.replace(hidden_size=160, intermediate_size=480, num_attention_heads=4, head_dim=48,
                                            num_key_value_heads=1, vocab_size=256))
KERNEL = re.compile(r"= f32\[(\d+),(\d+)\]\{[^}]*\} ([\w-]+)\(")


def _compiled_step(stage: str):
    module = VipLlavaForConditionalGeneration(SMALL, Runtime(scan_layers=False, remat_policy="none"))
    trainable, frozen = split_params(nn.unbox(abstract_params(module)), stage)
    cfg = LoraConfig(rank=2, alpha=4.0) if stage == "lora" else None
    tr = {"params": trainable, "lora": {}}
    if cfg is not None:
        tr["lora"] = jax.eval_shape(lambda k: init_lora(frozen, cfg, k), jax.random.key(0))
    tx = make_optimizer(1e-4, 10)
    state = jax.eval_shape(lambda t: init_state(t, tx), tr)
    b, t, size = 4, 44, SMALL.vision.image_size
    batch = {"input_ids": jax.ShapeDtypeStruct((1, b, t), jnp.int32),
             "attention_mask": jax.ShapeDtypeStruct((1, b, t), jnp.int32),
             "labels": jax.ShapeDtypeStruct((1, b, t), jnp.int32),
             "pixel_values": jax.ShapeDtypeStruct((1, b, 3, size, size), jnp.float32),
             "image_valid": jax.ShapeDtypeStruct((1, b), bool)}
    return jax.jit(make_train_step(module, tx, StepConfig(lora=cfg))).lower(state, frozen, batch).compile()


def _frozen_sized_results(hlo: str) -> list[str]:
    """Ops (other than reading a parameter) whose result has the [in, out] or [out, in] shape of an adapted
    language-model kernel."""
    c = SMALL.text
    d, q, kv, f = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, \
        c.intermediate_size
    shapes = {(d, q), (d, kv), (q, d), (d, f), (f, d)}
    shapes |= {s[::-1] for s in shapes}
    return [m.group(3) for m in KERNEL.finditer(hlo)
            if (int(m.group(1)), int(m.group(2))) in shapes and m.group(3) not in ("parameter", "bitcast")]


def test_compiled_lora_step_has_no_frozen_weight_gradient_and_two_thirds_of_the_flops():
    full, lora = _compiled_step("full"), _compiled_step("lora")
    # the reading finds the full step's weight gradients (dots, optimizer fusions), so it can fail
    assert _frozen_sized_results(full.as_text()).count("dot") >= 7 * SMALL.text.num_hidden_layers
    assert _frozen_sized_results(lora.as_text()) == []

    def flops(c):
        ca = c.cost_analysis()
        return (ca[0] if isinstance(ca, list) else ca)["flops"]

    ratio = flops(lora) / flops(full)
    assert 0.6 < ratio <= 0.72, ratio


# --- runs: QLoRA, the PEFT adapter a run writes, --init-adapter ----------------------------------------------------
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from colour_runs import write_dataset  # tests/training/colour_runs.py
    from vipllava_jax.testing import make_tiny_checkpoint, make_tiny_processor
    root = tmp_path_factory.mktemp("lora_run")
    make_tiny_checkpoint(root / "model")
    make_tiny_processor(root / "model")
    return root, root / "model", write_dataset(root, n=8)


def _cfg(env, out, **kw):
    from vipllava_jax.training import TrainConfig
    root, model, data = env
    d = dict(model=str(model), data=str(data), image_folder=str(root / "images"), output=str(out), stage="lora",
             max_steps=6, batch_size=4, lr=0.1, warmup_ratio=0.0, max_length=64, devices=1, seed=0, progress=False,
             system_prompt="", lora_rank=4, lora_alpha=8.0, quantize="int4", quantize_tile_size=16,
             dtype="bfloat16", save_interval_minutes=0)
    d.update(kw)
    return TrainConfig(**d)


def _losses(run_dir):
    import json
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow  # about 40 s here (three runs); the fast twin is test_qlora_step_learns_and_is_deterministic
def test_qlora_run_learns_resumes_bitwise_and_writes_a_peft_adapter(env, tmp_path, monkeypatch):
    """train --stage lora --quantize int4 (bf16 compute, fp32 adapters): the loss falls; stopped at step 3 and
    resumed, the losses and the adapter equal an uninterrupted run's bitwise; RUN_DIR/adapter loads in peft on
    the float base with the logits of our float base with that adapter."""
    from safetensors.numpy import load_file
    from vipllava_jax.training import preemption, train
    ref = tmp_path / "ref"
    train(_cfg(env, ref))
    lr = _losses(ref)
    assert max(lr[4], lr[5], lr[6]) < lr[1] - 0.2, lr  # 4.87 -> 4.6 (rank-4 adapters on a random tiny model)
    out = tmp_path / "resumed"
    real = preemption.Preemption.should_stop
    monkeypatch.setattr(preemption.Preemption, "should_stop", lambda self, step: step == 3 or real(self, step))
    assert train(_cfg(env, out))["stopped"]
    monkeypatch.setattr(preemption.Preemption, "should_stop", real)
    assert train(_cfg(env, out))["steps"] == 6
    assert _losses(out) == lr
    a, b = load_file(out / "adapter" / "adapter_model.safetensors"), load_file(ref / "adapter" /
                                                                               "adapter_model.safetensors")
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    # the adapter is PEFT's: the same logits in peft as in ours (both on the float base)
    peft = pytest.importorskip("peft")
    from transformers import VipLlavaForConditionalGeneration
    from vipllava_jax import load_pretrained
    from vipllava_jax.testing import make_inputs, torch_logits
    pm = peft.PeftModel.from_pretrained(VipLlavaForConditionalGeneration.from_pretrained(env[1]), ref / "adapter")
    inputs = make_inputs(np.random.default_rng(0))
    module, params = load_pretrained(env[1], progress=False, adapter=ref / "adapter")
    ours = module.apply({"params": params}, *inputs[:2], inputs[2]).logits
    assert rel_err(ours, torch_logits(pm.eval(), *inputs), inputs[2].astype(bool)) < 1e-5


def test_init_adapter_starts_the_run_from_a_peft_adapter(env, tmp_path):
    """--init-adapter DIR (saved by peft): the run's first state computes PeftModel's logits; the CLI takes r,
    alpha and targets from it; other settings are refused naming both."""
    peft = pytest.importorskip("peft")
    import argparse
    import torch
    from transformers import VipLlavaForConditionalGeneration
    from vipllava_jax.checkpoints.adapter import peft_target_regex
    from vipllava_jax.cli.train import config_from_args
    from vipllava_jax.testing import make_inputs, torch_logits
    from vipllava_jax.training import trainer as trainer_lib
    torch.manual_seed(0)
    pm = peft.get_peft_model(VipLlavaForConditionalGeneration.from_pretrained(env[1]), peft.LoraConfig(
        r=2, lora_alpha=6, target_modules=peft_target_regex(("k_proj", "up_proj")), init_lora_weights=False)).eval()
    pm.save_pretrained(tmp_path / "ad")
    kw = {k: v for k, v in _cfg(env, tmp_path / "run", quantize=None, dtype="float32").to_dict().items()
          if not k.startswith("lora_")}
    flags = argparse.Namespace(config=None, **dict(kw, init_adapter=str(tmp_path / "ad")))
    cfg = config_from_args(flags)
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets) == (2, 6.0, ("k_proj", "up_proj"))
    s = trainer_lib.setup(cfg)
    state = s.init_state()
    inputs = make_inputs(np.random.default_rng(2))
    p, col = model_inputs(state.trainable, s.frozen, s.step_cfg.lora)
    ours = s.module.apply({"params": p, "lora": col}, *inputs[:2], inputs[2]).logits
    assert rel_err(ours, torch_logits(pm, *inputs), inputs[2].astype(bool)) < 1e-5
    with pytest.raises(trainer_lib.TrainError, match="holds r=2, lora_alpha=6 on k_proj,up_proj; this run has "
                                                     "lora_rank=4"):
        trainer_lib.setup(cfg.replace(lora_rank=4))


def test_qlora_step_learns_and_is_deterministic(env):
    """The fast twin of the QLoRA run: the tiny model loaded int4 (scanned, full remat, bf16 compute, fp32
    adapters), its jitted LoRA step: the loss falls over 6 steps on one batch, no quantized weight changes, and
    steps 4-6 replayed from a copy of the state after step 3 give bitwise the same losses and adapters (what a
    resume restores)."""
    from vipllava_jax import load_pretrained
    module, params = load_pretrained(env[1], progress=False, scan_layers=True, remat_policy="full",
                                     quantize="int4", quantize_tile_size=16)
    module = module.clone(dtype=jnp.bfloat16)
    trainable, frozen = split_params(params, "lora")
    cfg = LoraConfig(rank=4, alpha=8.0)
    tr = {"params": trainable, "lora": init_lora(frozen, cfg, jax.random.key(0))}
    assert jax.tree.leaves(tr["lora"])[0].dtype == jnp.float32
    assert "qvalue" in frozen["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    tx = make_optimizer(0.1, 6, warmup_ratio=0.0)
    step = jax.jit(make_train_step(module, tx, StepConfig(lora=cfg)))
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 99, (2, 40))
    ids[:, 1:26] = TINY.image_token_index
    batch = {"input_ids": ids[None], "attention_mask": np.ones((1, 2, 40), np.int32),
             "labels": np.where(np.arange(40) >= 26, ids, -100)[None],
             "pixel_values": rng.standard_normal((1, 2, 3, 30, 30)).astype(np.float32),
             "image_valid": np.ones((1, 2), bool)}
    state, losses = init_state(tr, tx), []
    for i in range(6):
        state, m = step(state, frozen, batch)
        losses.append(float(m["loss"]))
        if i == 2:
            saved = jax.tree.map(np.array, state)
    assert losses[-1] < losses[0] - 0.15, losses  # 4.89 -> 4.66: rank-4 adapters on a random tiny model learn slowly
    replay = jax.tree.map(jnp.asarray, saved)
    for i in range(3, 6):
        replay, m = step(replay, frozen, batch)
        assert float(m["loss"]) == losses[i]
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(replay.trainable), jax.tree.leaves(state.trainable)))
