"""loss_fn and its gradients against PyTorch's VipLlava loss and .backward(), the optimizers against
torch.optim.AdamW and torch.optim.Muon, gradient accumulation against one big batch, LoRA against an unmerged
torch forward."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from vipllava_jax import load_pretrained
from vipllava_jax.checkpoints import to_hf_state_dict
from vipllava_jax.checkpoints.hf_table import canonical_key
from vipllava_jax.testing import TINY_IMAGE_TOKEN, make_tiny_checkpoint
from vipllava_jax.testing import rel_err
from vipllava_jax.training import loss_fn
from vipllava_jax.checkpoints.adapter import merge_lora
from vipllava_jax.training.lora import LoraConfig, init_lora
from vipllava_jax.training.optim import (is_muon_matrix, lr_schedule, make_optimizer, merge_params,
                                         split_params)
from vipllava_jax.training.step import StepConfig, init_state, make_train_step

GRAD_RTOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_train")
    tm = make_tiny_checkpoint(d)
    module, params = load_pretrained(d, progress=False)
    return d, tm, module, params


def make_batch(rng, n_img=25):
    """Right padding; row 0 holds two images, row 1 one image, 6 pad tokens and an answer at the very end."""
    t = 2 * n_img + 14
    ids = rng.integers(3, 99, (2, t))
    ids[0, 1:1 + n_img] = TINY_IMAGE_TOKEN
    ids[0, 4 + n_img:4 + 2 * n_img] = TINY_IMAGE_TOKEN
    ids[1, 2:2 + n_img] = TINY_IMAGE_TOKEN
    mask = np.ones_like(ids)
    mask[1, -6:] = 0
    ids[1, -6:] = 101
    labels = np.full_like(ids, -100)
    labels[0, 4 + 2 * n_img:] = ids[0, 4 + 2 * n_img:]  # row 0: answer runs to the last position
    labels[1, n_img + 5:-9] = ids[1, n_img + 5:-9]
    pixels = rng.standard_normal((3, 3, 30, 30)).astype(np.float32)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "labels": labels}


def torch_loss_and_grads(tm, batch):
    tm.zero_grad()
    out = tm(input_ids=torch.tensor(batch["input_ids"]), pixel_values=torch.tensor(batch["pixel_values"]),
             attention_mask=torch.tensor(batch["attention_mask"]), labels=torch.tensor(batch["labels"]))
    out.loss.backward()
    grads = {canonical_key(k): (p.grad.numpy().copy() if p.grad is not None else np.zeros(p.shape, np.float32))
             for k, p in tm.named_parameters()}
    return float(out.loss), grads


def ours_as_hf(tree, config):
    return {canonical_key(k): np.asarray(v) for k, v in to_hf_state_dict(tree, config)}


def test_loss_and_every_gradient_match_torch(tiny):
    _, tm, module, params = tiny
    batch = make_batch(np.random.default_rng(0))
    (loss, metrics), grads = jax.value_and_grad(lambda p: loss_fn(module, p, batch), has_aux=True)(params)
    ref_loss, ref_grads = torch_loss_and_grads(tm, batch)
    assert abs(float(loss) - ref_loss) / ref_loss < 1e-5
    assert int(metrics["num_tokens"]) == int((batch["labels"][:, 1:] != -100).sum())
    ours = ours_as_hf(grads, module.config)
    assert set(ours) == set(ref_grads)
    checked = 0
    for k, g in ref_grads.items():
        if np.abs(g).max() == 0:  # unused by the model (post_layernorm, the last tower layer): ours too
            assert np.abs(ours[k]).max() == 0, k
            continue
        if np.abs(g).max() < 1e-9:  # zero in exact math (key biases: softmax is shift invariant), fp noise
            assert np.abs(ours[k]).max() < 1e-8, k
            continue
        assert ours[k].shape == g.shape, k
        assert rel_err(ours[k], g) < GRAD_RTOL, (k, rel_err(ours[k], g))
        checked += 1
    assert checked > 40


def test_loss_with_padded_image_bucket(tiny):
    """Images padded to a bucket (image_valid false, no tokens) change nothing."""
    _, tm, module, params = tiny
    batch = make_batch(np.random.default_rng(1))
    ref_loss, _ = torch_loss_and_grads(tm, batch)
    padded = dict(batch, pixel_values=np.concatenate([batch["pixel_values"], np.zeros((2, 3, 30, 30), np.float32)]),
                  image_valid=np.array([True, True, True, False, False]))
    loss, _ = jax.jit(lambda p, b: loss_fn(module, p, b))(params, padded)
    assert abs(float(loss) - ref_loss) / ref_loss < 1e-5
    bad = dict(padded, image_valid=np.array([True, True, False, False, False]))  # a real image marked invalid
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        loss_fn(module, params, bad)


def test_labels_out_of_vocab_are_an_error(tiny):
    _, _, module, params = tiny
    batch = make_batch(np.random.default_rng(2))
    batch["labels"][1, 40] = 5000
    with pytest.raises(ValueError, match=r"labels\[1, 40\] = 5000"):
        loss_fn(module, params, batch)


def test_grad_accumulation_equals_one_big_batch(tiny):
    """Two micro-batches with different supervised-token counts: normalised by the global count, the
    accumulated loss and update equal the single big batch's (a mean of means would not)."""
    _, _, module, params = tiny
    b = make_batch(np.random.default_rng(3))
    b["labels"][1, :-12] = -100  # row 1 supervises far fewer tokens than row 0
    trainable, frozen = split_params(params, "full")
    # an "optimizer" that keeps the accumulated gradients as its state: compares them exactly
    tx = optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                      lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))
    step = jax.jit(make_train_step(module, tx, StepConfig()))
    tr = {"params": trainable, "lora": {}}

    def stacked(rows):
        out = {k: v[rows][None] for k, v in b.items() if k != "pixel_values"}
        imgs = [0, 1] if rows == [0] else [2] if rows == [1] else [0, 1, 2]
        out["pixel_values"] = b["pixel_values"][imgs][None]
        out["image_valid"] = np.ones((1, len(imgs)), bool)
        return out

    big = stacked([0, 1])
    m0, m1 = stacked([0]), stacked([1])
    pad = lambda x, n: np.concatenate([x, np.zeros((1, n) + x.shape[2:], x.dtype)], 1)
    micro = {k: np.concatenate([m0[k], pad(m1[k], 1) if k in ("pixel_values", "image_valid") else m1[k]])
             for k in m0}
    s_big, met_big = step(init_state(tr, tx), frozen, big)
    s_acc, met_acc = step(init_state(tr, tx), frozen, micro)
    assert abs(float(met_big["loss"]) - float(met_acc["loss"])) < 1e-6
    assert rel_err(met_acc["grad_norm"], met_big["grad_norm"]) < 1e-5
    g_big, g_acc = jax.tree.leaves(s_big.opt_state), jax.tree.leaves(s_acc.opt_state)
    assert len(g_big) == len(jax.tree.leaves(tr)) > 10
    for a, c in zip(g_big, g_acc):
        assert rel_err(c, a) < 1e-5
    # and the loss is the HF loss of the big batch
    ref, _ = loss_fn(module, params, {k: v[0] for k, v in big.items()})
    assert abs(float(met_big["loss"]) - float(ref)) < 1e-6


def test_adamw_step_equals_torch():
    """Three steps of our optimizer (clip 1.0, warmup + cosine, weight decay) vs torch.optim.AdamW with HF's
    cosine schedule and clip_grad_norm_, on the same gradients."""
    from transformers import get_cosine_schedule_with_warmup
    rng = np.random.default_rng(0)
    p0 = {"a": rng.standard_normal((4, 5)).astype(np.float32), "b": rng.standard_normal(3).astype(np.float32)}
    grads = [{k: (rng.standard_normal(v.shape) * s).astype(np.float32) for k, v in p0.items()}
             for s in (0.3, 2.0, 0.7)]
    total, lr, wd = 10, 1e-2, 0.1
    tx = make_optimizer(lr, total, warmup_ratio=0.2, weight_decay=wd)
    params, st = jax.tree.map(jnp.asarray, p0), None
    st = tx.init(params)
    tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in p0.items()}
    opt = torch.optim.AdamW(list(tp.values()), lr=lr, weight_decay=wd, betas=(0.9, 0.999), eps=1e-8)
    sched = get_cosine_schedule_with_warmup(opt, 2, total)
    for g in grads:
        upd, st = tx.update(jax.tree.map(jnp.asarray, g), st, params)
        params = optax.apply_updates(params, upd)
        for k, p in tp.items():
            p.grad = torch.tensor(g[k])
        torch.nn.utils.clip_grad_norm_(list(tp.values()), 1.0)
        opt.step()
        sched.step()
    for k in p0:
        np.testing.assert_allclose(np.asarray(params[k]), tp[k].detach().numpy(), rtol=1e-6, atol=1e-7)
    sch = lr_schedule(lr, total, 0.2)
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    ref = get_cosine_schedule_with_warmup(ref_opt, 2, total)
    for s in range(total):
        assert abs(float(sch(s)) - ref.get_last_lr()[0]) < 1e-9
        ref_opt.step()
        ref.step()


def test_muon_step_equals_torch():
    """Three steps of optimizer="muon" (clip 1.0, warmup + cosine, weight decay) vs torch.optim.Muon
    (adjust_lr_fn="match_rms_adamw") on the layer matrices and torch.optim.AdamW on the rest, on the same
    gradients. Our kernels are [in, out] (torch's weight transposed); a scanned [L, in, out] kernel is L torch
    matrices. torch orthogonalises in bfloat16, we in float32: the matrices' updates agree to bf16 precision."""
    from transformers import get_cosine_schedule_with_warmup
    rng = np.random.default_rng(1)
    p0 = {"layer": {"kernel": rng.standard_normal((6, 10)).astype(np.float32),
                    "bias": rng.standard_normal(10).astype(np.float32)},
          "layers": {"kernel": rng.standard_normal((2, 8, 5)).astype(np.float32)},  # scanned: 2 layers
          "embed": {"embedding": rng.standard_normal((7, 6)).astype(np.float32)},
          "lm_head": {"kernel": rng.standard_normal((10, 7)).astype(np.float32)}}
    flat = {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(p0).items()}
    grads = [{k: (rng.standard_normal(v.shape) * s).astype(np.float32) for k, v in flat.items()}
             for s in (0.3, 2.0, 0.7)]
    total, lr, muon_lr, wd = 10, 1e-2, 3e-2, 0.1
    tx = make_optimizer(lr, total, warmup_ratio=0.2, weight_decay=wd, optimizer="muon", muon_lr=muon_lr)
    params = jax.tree.map(jnp.asarray, p0)
    st = tx.init(params)
    # torch: one parameter per matrix ([out, in]); the scanned kernel's layers are separate matrices
    muon_t = {"layer/kernel": [torch.nn.Parameter(torch.tensor(flat["layer/kernel"].T.copy()))],
              "layers/kernel": [torch.nn.Parameter(torch.tensor(m.T.copy())) for m in flat["layers/kernel"]]}
    adam_t = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in flat.items() if k not in muon_t}
    muon_opt = torch.optim.Muon([p for ps in muon_t.values() for p in ps], lr=muon_lr, weight_decay=wd,
                                adjust_lr_fn="match_rms_adamw")
    adam_opt = torch.optim.AdamW(list(adam_t.values()), lr=lr, weight_decay=wd, betas=(0.9, 0.999), eps=1e-8)
    scheds = [get_cosine_schedule_with_warmup(o, 2, total) for o in (muon_opt, adam_opt)]
    everything = list(adam_t.values()) + [p for ps in muon_t.values() for p in ps]
    for g in grads:
        upd, st = tx.update(flax.traverse_util.unflatten_dict(
            {tuple(k.split("/")): jnp.asarray(v) for k, v in g.items()}), st, params)
        params = optax.apply_updates(params, upd)
        for k, p in adam_t.items():
            p.grad = torch.tensor(g[k])
        for k, ps in muon_t.items():
            mats = [g[k]] if g[k].ndim == 2 else list(g[k])
            for p, m in zip(ps, mats):
                p.grad = torch.tensor(m.T.copy())
        torch.nn.utils.clip_grad_norm_(everything, 1.0)  # over every parameter, as our global-norm clip
        for o, sc in zip((muon_opt, adam_opt), scheds):
            o.step()
            sc.step()
    ours = {"/".join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(params).items()}
    for k, p in adam_t.items():
        np.testing.assert_allclose(ours[k], p.detach().numpy(), rtol=1e-6, atol=1e-7, err_msg=k)
    for k, ps in muon_t.items():
        theirs = np.stack([p.detach().numpy().T for p in ps]).reshape(flat[k].shape)
        moved_ours, moved_theirs = ours[k] - flat[k], theirs - flat[k]
        # torch's bf16 Newton-Schulz: measured 1.9% apart here; a 10% wrong scale, no Nesterov, no decay or no
        # momentum each move them by more than 5% (checked by mutation)
        assert rel_err(moved_ours, moved_theirs) < 5e-2, (k, rel_err(moved_ours, moved_theirs))
        assert np.abs(moved_theirs).max() > 1e-3  # the matrices did move


@pytest.mark.parametrize("scan", [False, True])
def test_muon_takes_the_layer_matrices_and_adamw_the_rest(tiny, scan):
    """Muon gets every attention / MLP / projector kernel of both towers (a scanned layer stack too, per layer);
    embeddings, lm_head, position and patch embeddings, norms and biases stay on AdamW."""
    d, _, _, _ = tiny
    _, params = load_pretrained(d, progress=False, scan_layers=scan)
    flat = {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(params).items()}
    muon = {k for k, v in flat.items() if is_muon_matrix(k, v.shape)}
    expected = {k for k in flat if k.endswith("/kernel") and not k.startswith("lm_head")}
    assert muon == expected and len(muon) > 10
    assert any(flat[k].ndim == 3 for k in muon) == scan
    for k in ("language_model/embed_tokens/embedding", "vision_tower/embeddings/position_embedding",
              "vision_tower/embeddings/patch_embedding", "lm_head/kernel"):
        assert k in flat and k not in muon, k
    with pytest.raises(ValueError, match="Unknown optimizer 'sgd'"):
        make_optimizer(1e-3, 10, optimizer="sgd")


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_optimizer_moments_are_sharded_like_their_parameters(optimizer):
    """state_shardings gives each moment (AdamW's mu / nu, Muon's momentum inside multi_transform's masked trees)
    its parameter's sharding, and the counters a replicated one."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from vipllava_jax.training.step import state_shardings
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tensor"))
    params = {"params": {"a": {"kernel": jnp.zeros((4, 6))}, "b": {"kernel": jnp.zeros((6, 4))},
                         "n": {"scale": jnp.zeros(6)}}, "lora": {}}
    specs = {"a": P("fsdp", "tensor"), "b": P("tensor", "fsdp"), "n": P("tensor")}
    shard = {"params": {k: {next(iter(params["params"][k])): NamedSharding(mesh, v)} for k, v in specs.items()},
             "lora": {}}
    tx = make_optimizer(1e-3, 10, optimizer=optimizer)
    abstract = jax.eval_shape(lambda t: init_state(t, tx), params)
    sh = state_shardings(abstract, shard, mesh)
    seen = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(sh.opt_state)[0]:
        keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        name = next((k for k in keys if k in specs), None)
        assert leaf.spec == (specs[name] if name else P()), (path, leaf.spec)
        if name:
            seen[name] = seen.get(name, 0) + 1
    # AdamW: mu and nu of every parameter; Muon: a momentum per matrix, mu and nu for the norm
    assert seen == ({"a": 2, "b": 2, "n": 2} if optimizer == "adamw" else {"a": 1, "b": 1, "n": 2}), seen
    assert sh.step.spec == P()


def test_lora_merge_equals_unmerged_torch_forward(tiny):
    """Our merged W + (alpha/r) A B vs torch computing x W^T + (alpha/r) (x A) B with hooks on the base model."""
    d, tm, module, params = tiny
    cfg = LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
    lora = init_lora(params, cfg, jax.random.key(0))
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), lora)  # B != 0
    merged = merge_lora(params, lora, cfg.scale)
    batch = make_batch(np.random.default_rng(4))
    ours = module.apply({"params": merged}, batch["input_ids"], batch["pixel_values"], batch["attention_mask"]).logits
    flat = {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(lora, sep="/").items()}
    hooks = []
    for i, layer in enumerate(tm.model.language_model.layers):
        for name in cfg.targets:
            part = "mlp" if name == "down_proj" else "self_attn"
            mod = getattr(getattr(layer, part), name)
            a = torch.tensor(flat[f"language_model/layers_{i}/{part}/{name}/lora_a"])
            b = torch.tensor(flat[f"language_model/layers_{i}/{part}/{name}/lora_b"])
            hooks.append(mod.register_forward_hook(
                lambda m, inp, out, a=a, b=b: out + cfg.scale * (inp[0] @ a) @ b))
    try:
        with torch.no_grad():
            ref = tm(input_ids=torch.tensor(batch["input_ids"]), pixel_values=torch.tensor(batch["pixel_values"]),
                     attention_mask=torch.tensor(batch["attention_mask"])).logits.numpy()
    finally:
        for h in hooks:
            h.remove()
    real = batch["attention_mask"].astype(bool)
    assert rel_err(ours, ref, real) < 1e-5
    base = module.apply({"params": params}, batch["input_ids"], batch["pixel_values"], batch["attention_mask"]).logits
    assert rel_err(base, ref, real) > 1e-3  # the adapters do change the output
