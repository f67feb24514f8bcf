"""Sharded loading and forward passes on 8 CPU devices: logits equal the unsharded run on every mesh, each
parameter sits where the rules table says, per-device bytes match the memory plan, orbax checkpoints move
between meshes, bad mesh specs and batches fail clearly.

8 devices: XLA_FLAGS must hold --xla_force_host_platform_device_count=8 before JAX's CPU backend starts.
This file sets it at import (collection) time; in a pytest run that collects it before any test started the
backend (the usual case: test files only import jax at the top) every test of the run then sees 8 CPU devices,
which the rest of the suite tolerates (it uses the default device). If the backend was already started
with fewer devices, the in-process tests skip and `test_sharding_suite_in_fresh_process` runs this file again
in a fresh interpreter with the flag set, so the sharding tests run either way.
"""
import dataclasses
import os
import subprocess
import sys

N_DEV = 8
_FLAG = f"--xla_force_host_platform_device_count={N_DEV}"


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge.backends_are_initialized())
    except Exception:  # noqa: BLE001 - private API moved: assume not started
        return False


_saved_flags = os.environ.get("XLA_FLAGS")
if not _backend_started() and "xla_force_host_platform_device_count" not in (_saved_flags or ""):
    os.environ["XLA_FLAGS"] = ((_saved_flags or "") + " " + _FLAG).strip()

import jax  # noqa: E402

HAVE_DEVICES = jax.device_count() >= N_DEV  # starts the backend now, with the flag
if _saved_flags is None:  # don't leak the flag into other tests' subprocesses
    os.environ.pop("XLA_FLAGS", None)
else:
    os.environ["XLA_FLAGS"] = _saved_flags

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from vipllava_jax import load_pretrained  # noqa: E402
from vipllava_jax.checkpoints import save_orbax  # noqa: E402
from vipllava_jax.models.params import flat_paths  # noqa: E402
from vipllava_jax.models import KVCache  # noqa: E402
from vipllava_jax.models import PRESETS
from vipllava_jax.parallel import plan_memory  # noqa: E402
from vipllava_jax import make_mesh, sharded_generate  # noqa: E402
from vipllava_jax.parallel import sharded_forward  # noqa: E402
from vipllava_jax.parallel import cache_shardings, logical_spec, param_logical_axes, parse_mesh_spec  # noqa: E402
from vipllava_jax.generation import generate  # noqa: E402
from vipllava_jax.testing import TINY_IMAGE_TOKEN, make_tiny_checkpoint  # noqa: E402
from vipllava_jax.testing.parity import rel_err  # noqa: E402

needs_devices = pytest.mark.skipif(not HAVE_DEVICES, reason=f"JAX started with {jax.device_count()} device(s) "
                                   f"before this file could ask for {N_DEV}: see test_sharding_suite_in_fresh_process")

RTOL = 1e-5
MESHES = ["1 device", "data=8", "fsdp=8", "fsdp=4,tensor=2", "data=2,fsdp=2,tensor=2"]
# The forward and decode runs on the one-axis meshes are slow tests: data=2,fsdp=2,tensor=2 (every axis at once)
# and fsdp=4,tensor=2 are their fast twins. Placement and byte counts are checked on every mesh by default.
RUN_MESHES = [pytest.param(s, marks=pytest.mark.slow) if s in ("data=8", "fsdp=8") else s for s in MESHES]


def make_batch(rng, b=8, n_img=25):
    """b rows of 2*n_img+14 tokens: row 0 holds two images, every other row one; rows 1 and 3 are left padded.
    9 images for 8 rows: the image count does not divide the mesh, the batch does."""
    t = 2 * n_img + 14
    ids = rng.integers(3, 99, (b, t))
    mask = np.ones_like(ids)
    ids[0, 2:2 + n_img] = TINY_IMAGE_TOKEN
    ids[0, 8 + n_img:8 + 2 * n_img] = TINY_IMAGE_TOKEN
    for r in range(1, b):
        s = 4 + 3 * r
        ids[r, s:s + n_img] = TINY_IMAGE_TOKEN
    for r, n in ((1, 5), (3, 2)):
        mask[r, :n] = 0
        ids[r, :n] = 101
    n_images = int((ids == TINY_IMAGE_TOKEN).sum()) // n_img
    pixels = rng.standard_normal((n_images, 3, 30, 30)).astype(np.float32)
    return ids, pixels, mask


def mesh_for(spec, config=None):
    if spec == "1 device":
        return make_mesh("auto", config, devices=jax.devices()[:1])
    return make_mesh(spec, config)


def device_bytes(tree) -> dict:
    out = {}
    for x in jax.tree.leaves(tree):
        for s in x.addressable_shards:
            out[s.device] = out.get(s.device, 0) + s.data.nbytes
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_sharding")
    make_tiny_checkpoint(d, num_key_value_heads=2, vocab_size=128)
    return d


@pytest.fixture(scope="module")
def reference(tiny):
    """Unsharded fp32 logits on one device."""
    module, params = load_pretrained(tiny, progress=False)
    ids, pixels, mask = make_batch(np.random.default_rng(0))
    logits = np.asarray(jax.jit(module.apply)({"params": params}, ids, pixels, mask).logits)
    return module, params, (ids, pixels, mask), logits


_loaded = {}


@pytest.fixture(scope="module")
def loaded(tiny, reference):
    def get(spec):
        if spec not in _loaded:
            mesh = mesh_for(spec, reference[0].config)
            _loaded[spec] = (mesh,) + load_pretrained(tiny, mesh=mesh, progress=False)
        return _loaded[spec]
    yield get
    _loaded.clear()


@needs_devices
@pytest.mark.parametrize("spec", RUN_MESHES)
def test_sharded_logits_equal_unsharded(loaded, reference, spec):
    mesh, module, params = loaded(spec)
    _, _, (ids, pixels, mask), ref = reference
    logits = sharded_forward(module, params, ids, pixels, mask, mesh=mesh)
    assert logits.shape == ref.shape == (8, 64, 128)
    assert logits.sharding.spec == logical_spec(("batch", "length", "act_vocab"))
    assert rel_err(np.asarray(logits), ref) < RTOL
    if spec == MESHES[-1]:
        last = sharded_forward(module, params, ids, pixels, mask, mesh=mesh, last_token_only=True, gather=True)
        assert rel_err(last[:, 0], ref[:, -1]) < RTOL


MAX_NEW = 6


@pytest.fixture(scope="module")
def reference_tokens(reference):
    module, params, (ids, pixels, mask), _ = reference
    return generate(module, params, ids, pixels, mask, max_new_tokens=MAX_NEW)


@needs_devices
@pytest.mark.parametrize("spec", RUN_MESHES)
def test_sharded_greedy_tokens_equal_unsharded(loaded, reference, reference_tokens, spec):
    """Prefill and the on-device decode loop with params, inputs and the KV cache sharded by the rules."""
    mesh, module, params = loaded(spec)
    _, _, (ids, pixels, mask), _ = reference
    toks = sharded_generate(module, params, ids, pixels, mask, mesh=mesh, max_new_tokens=MAX_NEW)
    assert toks.shape == (8, MAX_NEW)
    np.testing.assert_array_equal(toks, reference_tokens)
    if spec == "data=2,fsdp=2,tensor=2":  # 5 rows: padded to 8 with masked rows, which are dropped
        np.testing.assert_array_equal(
            sharded_generate(module, params, ids[:5], pixels[:6], mask[:5], mesh=mesh, max_new_tokens=MAX_NEW),
            reference_tokens[:5])


@needs_devices
@pytest.mark.parametrize("spec", MESHES)
def test_each_param_sharded_as_the_rules_say(loaded, spec):
    mesh, module, params = loaded(spec)
    axes = param_logical_axes(module.config)
    flat = flat_paths(params)
    assert set(flat) == set(axes)
    for path, x in flat.items():
        assert x.sharding.mesh == mesh, path
        assert x.sharding.spec == logical_spec(axes[path]), path
        assert len(x.sharding.device_set) == mesh.size, path


@needs_devices
def test_the_table_itself():
    """A few parameters spelled out, so a change to the table shows up here."""
    mesh = make_mesh("data=2,fsdp=2,tensor=2", PRESETS["tiny"])
    assert parse_mesh_spec("data=2,fsdp=2,tensor=2", 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    axes = param_logical_axes(PRESETS["tiny"])
    want = {
        "language_model/embed_tokens/embedding": P("tensor", "fsdp"),
        "language_model/layers_0/self_attn/q_proj/kernel": P("fsdp", "tensor"),
        "language_model/layers_0/self_attn/k_proj/kernel": P("fsdp", "tensor"),
        "language_model/layers_0/self_attn/o_proj/kernel": P("tensor", "fsdp"),
        "language_model/layers_0/mlp/down_proj/kernel": P("tensor", "fsdp"),
        "language_model/layers_0/input_layernorm/scale": P(None),
        "lm_head/kernel": P("fsdp", "tensor"),
        "vision_tower/embeddings/patch_embedding": P(None, None, None, "fsdp"),
        "vision_tower/embeddings/position_embedding": P(None, "fsdp"),
        "vision_tower/encoder/layers_0/self_attn/q_proj/kernel": P("fsdp", "tensor"),
        "vision_tower/encoder/layers_0/mlp/fc2/kernel": P("tensor", "fsdp"),
        "multi_modal_projector/linear_1/kernel": P("fsdp", "tensor"),
        "multi_modal_projector/linear_2/kernel": P("tensor", "fsdp"),
    }
    for path, spec in want.items():
        assert logical_spec(axes[path]) == spec, path
    assert logical_spec(("batch", "length", "act_heads", "head_dim")) == P(("data", "fsdp"), None, "tensor", None)
    cs = cache_shardings(PRESETS["tiny"], mesh)
    assert cs.k[0].spec == P(("data", "fsdp"), "tensor", None, None) and cs.mask.spec == P(("data", "fsdp"), None)
    with pytest.raises(ValueError, match="'typo_axis' has no rule"):
        logical_spec(("batch", "typo_axis"))


@needs_devices
@pytest.mark.parametrize("spec", MESHES)
def test_per_device_bytes_match_the_plan(loaded, spec):
    mesh, module, params = loaded(spec)
    cfg = module.config
    sizes = dict(mesh.shape)
    plan = plan_memory(cfg, sizes, batch=8, seq_len=64, dtype=jnp.float32)
    per_dev = device_bytes(params)
    assert len(per_dev) == mesh.size
    assert set(per_dev.values()) == {plan.param_bytes_per_device}
    assert plan.param_bytes == sum(x.nbytes for x in jax.tree.leaves(params))
    if spec == "fsdp=8":  # everything but norms, biases and the replicated embeddings splits 8 ways
        assert plan.param_bytes_per_device < plan.param_bytes / 4
    # KV cache created straight onto its shardings
    shard = cache_shardings(cfg, mesh)
    cache = jax.jit(lambda: KVCache.init(cfg.text, 8, 64, jnp.float32), out_shardings=shard)()
    assert set(device_bytes(cache).values()) == {plan.cache_bytes_per_device}
    assert plan.cache_bytes == sum(x.nbytes for x in jax.tree.leaves(cache))


@needs_devices
def test_batch_not_dividing_is_padded_or_an_error(loaded, reference):
    mesh, module, params = loaded("data=2,fsdp=2,tensor=2")
    _, _, (ids, pixels, mask), ref = reference
    # rows 0..5 hold 7 images (row 0 has two)
    out = sharded_forward(module, params, ids[:6], pixels[:7], mask[:6], mesh=mesh, gather=True)
    assert out.shape == (6, 64, 128)
    assert rel_err(out, ref[:6]) < RTOL
    with pytest.raises(ValueError, match=r"Batch size 6 is not divisible by data=2 x fsdp=2 = 4"):
        sharded_forward(module, params, ids[:6], pixels[:7], mask[:6], mesh=mesh, pad_batch=False)


@needs_devices
def test_unsharded_params_are_moved_onto_the_mesh(reference):
    module, params, (ids, pixels, mask), ref = reference
    mesh = make_mesh("fsdp=4,tensor=2", module.config)
    assert rel_err(sharded_forward(module, params, ids, pixels, mask, mesh=mesh, gather=True), ref) < RTOL


@pytest.mark.parametrize("spec,n,match", [
    ("data=3,fsdp=2", 8, r"'data=3,fsdp=2' gives data=3 x fsdp=2 x tensor=1 = 6 devices, but there are 8"),
    ("model=8", 8, r"unknown axis 'model'; the axes are data, fsdp, tensor"),
    ("fsdp=two", 8, r"size 'two' of axis 'fsdp' is not an integer"),
    ("fsdp=0,data=8", 8, r"axis 'fsdp' has size 0"),
    ("fsdp=4,fsdp=2", 8, r"axis 'fsdp' is given twice"),
    ("fsdp8", 8, r"'fsdp8' is not axis=size"),
    ("auto", None, r'"auto" puts every device on fsdp, so it needs the device count'),
])
def test_bad_mesh_specs(spec, n, match):
    with pytest.raises(ValueError, match=match):
        parse_mesh_spec(spec, n)


@pytest.mark.parametrize("spec,match", [
    ("tensor=8", r"tensor=8 does not divide text num_attention_heads=4, text num_key_value_heads=2, "
                 r"vocab_size=100, vision num_attention_heads=4"),
    ("fsdp=3", r"fsdp=3 does not divide text hidden_size=32"),
])
def test_mesh_that_does_not_fit_the_model(spec, match):
    cfg = PRESETS["tiny"]
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=100))
    with pytest.raises(ValueError, match=match):
        plan_memory(cfg, spec, batch=1, seq_len=8)
    if HAVE_DEVICES and spec == "tensor=8":
        with pytest.raises(ValueError, match=match):
            make_mesh(spec, cfg)


@needs_devices
def test_make_mesh_errors_name_axis_and_sizes():
    with pytest.raises(ValueError, match=r"data=2 x fsdp=2 x tensor=1 = 4 devices, but there are 8"):
        make_mesh("data=2,fsdp=2")
    mesh = make_mesh("auto", PRESETS["tiny"])
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}


@needs_devices
def test_orbax_saved_on_one_mesh_restores_onto_another(loaded, reference, tmp_path):
    mesh_a, module, params_a = loaded("fsdp=4,tensor=2")
    _, ref_params, (ids, pixels, mask), ref = reference
    out = save_orbax(params_a, module.config, tmp_path / "orbax")
    for spec, scan in (("data=2,fsdp=2,tensor=2", False), ("fsdp=8", True)):
        mesh_b = make_mesh(spec, module.config)
        m_b, params_b = load_pretrained(out, mesh=mesh_b, scan_layers=scan)
        axes = param_logical_axes(m_b.config, scan_layers=m_b.runtime.scan_layers)
        for path, x in flat_paths(params_b).items():
            assert x.sharding.mesh == mesh_b and x.sharding.spec == logical_spec(axes[path]), path
        if not scan:
            for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params_b)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        logits = sharded_forward(m_b, params_b, ids, pixels, mask, mesh=mesh_b, gather=True)
        assert rel_err(logits, ref) < RTOL


@needs_devices
def test_scanned_layers_load_sharded_from_safetensors(tiny, reference):
    _, _, (ids, pixels, mask), ref = reference
    mesh = make_mesh("data=2,fsdp=2,tensor=2", reference[0].config)
    module, params = load_pretrained(tiny, mesh=mesh, scan_layers=True, progress=False)
    k = params["language_model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert k.shape == (2, 32, 64) and k.sharding.spec == P(None, "fsdp", "tensor")
    assert k.addressable_shards[0].data.shape == (2, 16, 32)
    axes = param_logical_axes(module.config, scan_layers=module.runtime.scan_layers)
    for path, x in flat_paths(params).items():
        assert x.sharding.spec == logical_spec(axes[path]), path
    assert rel_err(sharded_forward(module, params, ids, pixels, mask, mesh=mesh, gather=True), ref) < RTOL


@pytest.mark.slow  # ~25 s of compiling on 2 cores
@needs_devices
def test_train_step_on_a_mesh(loaded, reference):
    """A jitted Adam step with explicit shardings: gradients equal the unsharded ones, parameters and
    optimizer state stay where the rules put them (donated buffers included)."""
    import optax
    from jax.sharding import NamedSharding
    from vipllava_jax.parallel import io_sharding, jit_sharded, param_shardings, put_global, shardings_like_params
    mesh, module, params = loaded("fsdp=4,tensor=2")
    _, ref_params, (ids, pixels, mask), _ = reference
    opt = optax.adam(1e-3)

    def loss_fn(p, ids, pixels, mask):
        logits = module.apply({"params": p}, ids, pixels, mask).logits
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), ids[:, 1:, None], -1)[..., 0]
        return (nll * mask[:, 1:]).sum() / mask[:, 1:].sum()

    def step(p, s, ids, pixels, mask):
        loss, g = jax.value_and_grad(loss_fn)(p, ids, pixels, mask)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss, g

    ps = param_shardings(module.config, mesh)
    ss = shardings_like_params(jax.eval_shape(opt.init, params), ps, mesh)
    state = jax.jit(opt.init, out_shardings=ss)(params)
    rep = NamedSharding(mesh, P())
    f = jit_sharded(step, mesh, in_shardings=(ps, ss, io_sharding("input_ids", mesh), rep,
                                              io_sharding("attention_mask", mesh)),
                    out_shardings=(ps, ss, rep, ps), donate_argnums=(0, 1))
    args = (put_global(ids, io_sharding("input_ids", mesh)), put_global(pixels, rep),
            put_global(mask, io_sharding("attention_mask", mesh)))
    new_p, new_s, loss, grads = f(jax.tree.map(jnp.copy, params), state, *args)
    ref_loss, ref_g = jax.jit(jax.value_and_grad(loss_fn))(ref_params, ids, pixels, mask)
    assert rel_err(loss, ref_loss) < RTOL
    flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])  # noqa: E731
    assert rel_err(flat(grads), flat(ref_g)) < RTOL
    assert all(x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(jax.tree.leaves(new_p), jax.tree.leaves(ps)))
    mu = new_s[0].mu
    assert all(x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(jax.tree.leaves(mu), jax.tree.leaves(ps)))
    assert new_s[0].count.sharding.is_fully_replicated


@needs_devices
def test_activation_estimate_is_near_xla():
    """The plan's activation estimate vs XLA's own temp-buffer size for the compiled, sharded prefill of a
    mid-sized config where activations dominate (within 2x either way; it is an estimate)."""
    from vipllava_jax.models import VipLlavaForConditionalGeneration
    from vipllava_jax.models.params import abstract_param_tree
    from vipllava_jax.parallel import io_sharding, jit_sharded, param_shardings
    cfg = PRESETS["tiny"]
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, hidden_size=256, intermediate_size=1024, vocab_size=1024,
                                               num_attention_heads=8, num_key_value_heads=8))
    spec, b, t = "data=2,fsdp=2,tensor=2", 8, 256
    mesh, m = make_mesh(spec, cfg), VipLlavaForConditionalGeneration(cfg)
    ps = param_shardings(cfg, mesh)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.value.shape, jnp.float32), abstract_param_tree(cfg),
                            is_leaf=lambda x: hasattr(x, "value"))
    f = jit_sharded(lambda p, i, px, mk: m.apply({"params": p}, i, px, mk, last_token_only=True).logits, mesh,
                    in_shardings=(ps, io_sharding("input_ids", mesh), io_sharding("pixel_values", mesh),
                                  io_sharding("attention_mask", mesh)), out_shardings=io_sharding("logits", mesh))
    ids = jax.ShapeDtypeStruct((b, t), jnp.int32)
    ma = f.lower(abstract, ids, jax.ShapeDtypeStruct((b, 3, 30, 30), jnp.float32), ids).compile().memory_analysis()
    plan = plan_memory(cfg, spec, b, t, jnp.float32)
    assert 0.5 < plan.activation_bytes_per_device / ma.temp_size_in_bytes < 2.0
    assert plan.param_bytes_per_device <= ma.argument_size_in_bytes < plan.param_bytes_per_device * 1.1


def test_plan_cli_and_presets(capsys):
    from vipllava_jax.cli import main
    assert main(["plan", "--mesh", "fsdp=8", "--config", "7b", "--batch", "8", "--seq-len", "2048"]) == 0
    out = capsys.readouterr().out
    assert "fsdp=8" in out and "KV cache" in out
    p = plan_memory("7b", "fsdp=8", 8, 2048)
    # bf16 7B: 32 layers x (k, v) x [8, 2048, 32, 128] = 8 GiB in all, 1 GiB per device; + slot mask + index
    assert p.cache_bytes == 8 * 2**30 + 8 * 2048 + 4
    assert p.cache_bytes_per_device == 2**30 + 2048 + 4
    assert p.param_bytes == 2 * p.param_count and 7.0e9 < p.param_count < 7.1e9
    assert p.param_bytes / 8 <= p.param_bytes_per_device < p.param_bytes / 8 * 1.01
    p13 = plan_memory("13b", "data=2,fsdp=4,tensor=2", 8, 2048)
    assert p13.param_bytes / 8 <= p13.param_bytes_per_device < p13.param_bytes / 8 * 1.01
    assert main(["plan", "--mesh", "tensor=3", "--config", "13b"]) == 2
    assert "tensor=3 does not divide text num_attention_heads=40" in capsys.readouterr().err


def test_tiny_preset_is_the_test_checkpoint_config():
    from vipllava_jax.models import VipLlavaConfig
    from vipllava_jax.testing import tiny_hf_config
    assert VipLlavaConfig.from_hf(tiny_hf_config().to_dict()) == PRESETS["tiny"]


def test_sharding_suite_in_fresh_process():
    """Runs this file under 8 CPU devices when this interpreter's JAX started with fewer."""
    if HAVE_DEVICES:
        pytest.skip("the sharding tests ran in this process")
    env = dict(os.environ, XLA_FLAGS=((os.environ.get("XLA_FLAGS") or "") + " " + _FLAG).strip())
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
