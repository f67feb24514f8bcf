"""Quantized loading (load_pretrained(quantize=)): qwix's absmax rounding bound on every kernel, scanned and
unrolled layouts agree, ``convert --quantize`` writes an orbax directory that restores the same arrays and logits
without the original weights, and the loader holds one float kernel at a time (peak host memory: slow test)."""
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vipllava_jax import load_pretrained
from vipllava_jax.checkpoints import CheckpointError
from vipllava_jax.cli import main
from vipllava_jax.models.params import flat_paths
from vipllava_jax.models.quantize import INT4_CLIP_GRID, LM_LINEARS, dequantize_kernel, leaf_bytes

IDS = np.random.default_rng(0).integers(0, 99, (2, 16)).astype(np.int32)


def _float_kernels(tiny_model):
    return {p: np.asarray(v) for p, v in flat_paths(tiny_model[1]).items()
            if p.startswith("language_model/") and p.endswith("/kernel")}


@pytest.mark.parametrize("mode,tile", [("int8", 128), ("int4", 16)])
def test_every_lm_kernel_is_quantized_to_nearest(tiny_hf, tiny_model, mode, tile):
    module, params = load_pretrained(tiny_hf, quantize=mode, quantize_tile_size=tile, progress=False)
    flat = flat_paths(params)
    floats = _float_kernels(tiny_model)
    assert len(floats) == 2 * len(LM_LINEARS)
    for p, w in floats.items():
        assert p not in flat  # no float copy left beside the quantized one
        q, s = flat[p + "/qvalue"], flat[p + "/scale"]
        assert q.dtype == {"int8": jnp.int8, "int4": jnp.int4}[mode] and q.shape == w.shape
        assert s.shape == ((1,) if mode == "int8" else (w.shape[0] // tile,)) + (w.shape[1],)
        rows = w.reshape(s.shape[0], -1, w.shape[1])
        sc = np.asarray(s, np.float64)
        lo, hi = {"int8": (-128, 127), "int4": (-8, 7)}[mode]
        if mode == "int8":
            # symmetric absmax: the largest |w| of each channel maps to 127 + 1/2 (qwix widens the bound by half a
            # step so the top code's bucket is whole)
            assert p + "/zero_point" not in flat
            zp = np.zeros_like(sc)
            np.testing.assert_allclose(sc, np.abs(rows).max(1) / 127.5, rtol=1e-6)
        else:
            # asymmetric: each tile's range [min(w, 0), max(w, 0)], scaled by the INT4_CLIP_GRID fraction with the
            # least squared error, spans the 16 codes; the zero point is the code of 0
            z = flat[p + "/zero_point"]
            assert z.dtype == jnp.int4 and z.shape == s.shape
            zp = np.asarray(z, np.float64)
            tlo, thi = np.minimum(rows.min(1), 0), np.maximum(rows.max(1), 0)
            grid = np.asarray(INT4_CLIP_GRID)
            frac = sc * 15 / (thi - tlo)
            assert (np.abs(frac[..., None] - grid).min(-1) < 1e-5).all(), p

            def sse(step, zero):
                codes = np.clip(np.round(rows / step[:, None] + zero[:, None]), lo, hi)
                return (((codes - zero[:, None]) * step[:, None] - rows) ** 2).sum(1)

            cands = []
            for c in grid:
                step = (thi - tlo) * c / 15
                cands.append(sse(step, np.clip(np.round(lo - tlo * c / step), lo, hi)))
            assert (sse(sc, zp) <= np.min(cands, 0) * (1 + 1e-4) + 1e-12).all(), p
        # every code is the nearest, clipped to the code range
        x = rows / sc[:, None] + zp[:, None]
        want = np.clip(np.round(x), lo, hi)
        got = np.asarray(q, np.int32).reshape(rows.shape)
        tie = np.abs(np.abs(x - np.floor(x)) - 0.5) < 1e-4  # fp32 vs float64 may round a near-tie either way
        assert ((got == want) | tie).all(), p
        leaves = {k: flat[f"{p}/{k}"] for k in module.config.quantization.leaves}
        deq = np.asarray(dequantize_kernel(leaves, module.config.quantization))
        np.testing.assert_allclose(deq.reshape(rows.shape), (got - zp[:, None]) * sc[:, None], rtol=1e-6, atol=1e-9)
        if mode == "int8":  # nothing clipped: every weight within half a step
            assert (np.abs(deq - w).reshape(rows.shape) <= sc[:, None] / 2 + 1e-7).all(), p
    # the rest stays float: embeddings, lm_head, the tower
    assert flat["lm_head/kernel"].dtype == jnp.float32
    assert flat["vision_tower/encoder/layers_0/mlp/fc1/kernel"].dtype == jnp.float32


def test_scanned_quantized_layers_stack_the_unrolled_ones(tiny_hf):
    """Loaded straight into the scanned layout, each layer's codes and scales are the unrolled load's."""
    _, unrolled = load_pretrained(tiny_hf, quantize="int4", quantize_tile_size=16, progress=False)
    _, scanned = load_pretrained(tiny_hf, quantize="int4", quantize_tile_size=16, progress=False, scan_layers=True)
    u, s = flat_paths(unrolled), flat_paths(scanned)
    for leaf in ("qvalue", "scale"):
        stacked = s[f"language_model/layers/mlp/down_proj/kernel/{leaf}"]
        for i in range(2):
            np.testing.assert_array_equal(np.asarray(stacked[i], np.float32),
                                          np.asarray(u[f"language_model/layers_{i}/mlp/down_proj/kernel/{leaf}"],
                                                     np.float32))


@pytest.mark.slow
def test_scanned_and_unrolled_quantized_layers_agree(tiny_hf):
    outs = []
    for scan in (False, True):
        m, p = load_pretrained(tiny_hf, quantize="int4", quantize_tile_size=16, progress=False, scan_layers=scan)
        outs.append(np.asarray(m.apply({"params": p}, IDS).logits))
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)


def test_convert_quantize_round_trip(tiny_hf, tmp_path):
    src = tmp_path / "hf"
    shutil.copytree(tiny_hf, src)
    out = tmp_path / "q4"
    assert main(["convert", str(src), str(out), "--quantize", "int4", "--quantize-tile-size", "16"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "qwix", "weight_qtype": "int4", "tile_size": 16,
                                          "quantize_vision_tower": False, "quantize_projector": False,
                                          "quantize_lm_head": False, "asymmetric": True}
    direct_m, direct = load_pretrained(src, quantize="int4", quantize_tile_size=16, progress=False)
    shutil.rmtree(src)  # restored without the original weights
    m, p = load_pretrained(out)
    assert m.config.quantization == direct_m.config.quantization
    a, b = flat_paths(direct), flat_paths(p)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(np.asarray(a[k], np.float32), np.asarray(b[k], np.float32)), k
    assert np.array_equal(np.asarray(m.apply({"params": p}, IDS).logits),
                          np.asarray(direct_m.apply({"params": direct}, IDS).logits))
    with pytest.raises(CheckpointError, match=r"already quantized \(int4, tile 16\); it cannot be loaded as int8"):
        load_pretrained(out, quantize="int8")
    # back to HF: the float kernels the int4 codes stand for
    hf = tmp_path / "back"
    assert main(["convert", str(out), str(hf), "--to-hf"]) == 0
    mb, pb = load_pretrained(hf, progress=False)
    k = "language_model/layers_1/mlp/down_proj/kernel"
    np.testing.assert_array_equal(np.asarray(flat_paths(pb)[k]),
                                  np.asarray(dequantize_kernel({leaf: b[f"{k}/{leaf}"] for leaf in ("qvalue", "scale",
                                                                                                   "zero_point")},
                                                               m.config.quantization)))


def test_loader_holds_one_float_kernel_at_a_time(tiny_hf, monkeypatch):
    """The tensor-by-tensor property behind the peak-memory figure, at tiny size: whenever a kernel is quantized,
    no float copy of any other quantized kernel is alive on the device."""
    import vipllava_jax.checkpoints.convert as convert
    from vipllava_jax.models.params import abstract_param_tree
    from vipllava_jax.models.presets import TINY
    shapes = {v.value.shape for p, v in flat_paths(abstract_param_tree(TINY)).items()
              if p.startswith("language_model/") and p.endswith("/kernel")}
    before = {id(x) for x in jax.live_arrays()}  # other tests' float trees
    seen = []
    orig = convert.quantize_kernel

    def spy(w, quant, dtype=None):
        out = orig(w, quant, dtype)
        live = [x for x in jax.live_arrays()
                if id(x) not in before and x.dtype == jnp.float32 and x.shape in shapes]
        seen.append(len(live))
        return out

    monkeypatch.setattr(convert, "quantize_kernel", spy)
    load_pretrained(tiny_hf, quantize="int8", progress=False)
    assert len(seen) == 14 and max(seen) <= 1, seen


MEMORY_SCRIPT = Path(__file__).with_name("memory_child.py")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_load_peak_memory(tmp_path, run_python, mode):
    """A 441 MB fp32 checkpoint (6 layers of 1024 x 4096) loaded int8 / int4: peak host growth stays near the
    quantized tree plus one float tensor (plus what compiling qwix's quantize for each kernel shape costs,
    measured at about 60 MB here), far below a float copy. glibc's malloc is told to return large frees
    (MALLOC_MMAP_THRESHOLD_) so that RSS shows what is live rather than freed blocks kept in its heap."""
    env = {"MALLOC_MMAP_THRESHOLD_": "1048576"}
    r = run_python([MEMORY_SCRIPT, "write", tmp_path, "quantize"], full_opt=True, **env)
    assert r.returncode == 0, r.stderr[-2000:]
    size = os.path.getsize(tmp_path / "model.safetensors")
    r = run_python([MEMORY_SCRIPT, "load", tmp_path, mode], full_opt=True, **env)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    growth = (m["peak_kb"] - m["base_kb"]) * 1024
    largest = 4096 * 1024 * 4
    print(f"{mode}: checkpoint {size / 1e6:.0f} MB, quantized tree {m['param_bytes'] / 1e6:.0f} MB, peak growth "
          f"{growth / 1e6:.0f} MB")
    assert growth < m["param_bytes"] + 2 * largest + 80e6
    assert growth < 0.55 * size


def test_symmetric_int4_directories_still_restore(tiny_hf, tmp_path):
    """A quantized directory written before zero points (no "asymmetric" in its quantization_config, kernels
    {qvalue, scale}) restores as symmetric int4, equal to a symmetric load of the float checkpoint."""
    from vipllava_jax.checkpoints import save_orbax
    from vipllava_jax.models.quantize import QuantConfig
    sym = QuantConfig("int4", 16, asymmetric=False)
    m, p = load_pretrained(tiny_hf, quantize=sym, progress=False)
    assert not any(k.endswith("zero_point") for k in flat_paths(p))
    out = save_orbax(p, m.config, tmp_path / "old")
    cfg = json.loads((out / "config.json").read_text())
    del cfg["quantization_config"]["asymmetric"]  # as the older writer left it
    (out / "config.json").write_text(json.dumps(cfg))
    m2, p2 = load_pretrained(out)
    assert m2.config.quantization == sym and QuantConfig.from_hf(cfg["quantization_config"]).asymmetric is False
    np.testing.assert_array_equal(np.asarray(m2.apply({"params": p2}, IDS).logits),
                                  np.asarray(m.apply({"params": p}, IDS).logits))
    assert QuantConfig("int4").asymmetric and not QuantConfig("int8").asymmetric  # the defaults
