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


@pytest.mark.parametrize("scan,remat", [(False, "none"), (True, "full")])
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
