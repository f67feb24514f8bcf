"""Quantized weights on a mesh: qvalues and scales sharded by the one rules table, a sharded quantized load (8 CPU
devices, fsdp=4 x tensor=2) giving the unsharded quantized logits, and the mesh-fit check
covering int4 tiles."""
import json
import textwrap

import pytest

from vipllava_jax.models.presets import TINY, VIPLLAVA_7B
from vipllava_jax.models.quantize import QuantConfig
from vipllava_jax.parallel.mesh import check_mesh_fits

CHILD = textwrap.dedent(r'''
    import json, sys
    import jax, numpy as np
    from vipllava_jax import load_pretrained
    from vipllava_jax.models.params import flat_paths
    from vipllava_jax.parallel import make_mesh
    from vipllava_jax.parallel.shardings import logical_spec, param_logical_axes

    path = sys.argv[1]
    ids = np.random.default_rng(0).integers(0, 99, (4, 12)).astype(np.int32)
    out = {}
    for mode, tile in (("int4", 8),):  # int4: tiled scales, the harder case (int8 is checked below, abstractly)
        m, p = load_pretrained(path, quantize=mode, quantize_tile_size=tile, progress=False)
        ref = np.asarray(m.apply({"params": p}, ids).logits)
        mesh = make_mesh("fsdp=4,tensor=2", m.config)
        ms, ps = load_pretrained(path, quantize=mode, quantize_tile_size=tile, progress=False, mesh=mesh)
        got = np.asarray(ms.apply({"params": ps}, ids).logits)
        axes = param_logical_axes(ms.config)
        specs_ok, sharded = True, 0
        for k, v in flat_paths(ps).items():
            want = logical_spec(axes[k])
            specs_ok &= v.sharding.spec == want or tuple(v.sharding.spec) == tuple(want)[:len(v.sharding.spec)]
            if k.endswith("/kernel/qvalue") and len(v.addressable_shards) and \
                    v.addressable_shards[0].data.shape != v.shape:
                sharded += 1
        q = flat_paths(ps)["language_model/layers_0/mlp/down_proj/kernel/scale"]
        out[mode] = {"max_diff": float(np.abs(got - ref).max()), "specs_ok": bool(specs_ok), "sharded_qvalues": sharded,
                     "scale_spec": str(q.sharding.spec), "scale_shard": list(q.addressable_shards[0].data.shape)}
    print(json.dumps(out))
''')


@pytest.mark.slow  # a fresh process with 8 devices (~14 s); the rules' specs are checked abstractly below
def test_sharded_quantized_load_equals_unsharded(tiny_hf, run_python, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    r = run_python([script, tiny_hf], devices=8)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for mode, m in res.items():
        assert m["max_diff"] < 1e-5, (mode, m)
        assert m["specs_ok"], (mode, m)
        assert m["sharded_qvalues"] == 14, (mode, m)  # 7 linears x 2 layers, all split
    # int4 tile 8: down_proj [64, 32] has 8 scale rows, split over tensor=2 (mlp) like the kernel's rows
    assert res["int4"]["scale_spec"] == "P('tensor', 'fsdp')" and res["int4"]["scale_shard"] == [4, 8]


def test_scales_follow_the_rules_table():
    """int8: one scale row per kernel, replicated on the input axis, split on the output axis like the kernel;
    int4: the scale rows (tiles) split like the kernel's rows."""
    from jax.sharding import PartitionSpec as P
    from vipllava_jax.models.params import flat_paths
    from vipllava_jax.parallel.mesh import abstract_mesh
    from vipllava_jax.parallel.shardings import param_shardings
    cfg = TINY.replace(quantization=QuantConfig("int8"))
    for scan, lead in ((False, ()), (True, (None,))):
        sh = flat_paths(param_shardings(cfg, abstract_mesh("fsdp=4,tensor=2"), scan_layers=scan))
        base = "language_model/layers" + ("" if scan else "_0")
        assert sh[base + "/mlp/down_proj/kernel/qvalue"].spec == P(*lead, "tensor", "fsdp")
        assert sh[base + "/mlp/down_proj/kernel/scale"].spec == P(*lead, None, "fsdp")
        assert sh[base + "/self_attn/q_proj/kernel/scale"].spec == P(*lead, None, "tensor")
        assert sh["lm_head/kernel"].spec == P("fsdp", "tensor")  # not quantized by default
    sh = flat_paths(param_shardings(TINY.replace(quantization=QuantConfig("int4", 8)), abstract_mesh("fsdp=4,tensor=2")))
    assert sh["language_model/layers_0/mlp/down_proj/kernel/scale"].spec == P("tensor", "fsdp")
    assert sh["language_model/layers_0/self_attn/o_proj/kernel/scale"].spec == P("tensor", "fsdp")


def test_mesh_fit_check_covers_int4_tiles():
    q7 = VIPLLAVA_7B.replace(quantization=QuantConfig("int4"))
    check_mesh_fits({"fsdp": 4, "tensor": 2}, q7)  # 4096/128 = 32 tiles, 11008/128 = 86
    with pytest.raises(ValueError, match=r"tensor=4 does not divide int4 tiles of down_proj input \(11008 / "
                                         r"tile_size 128\)=86"):
        check_mesh_fits({"tensor": 4}, q7)
    check_mesh_fits({"tensor": 4}, VIPLLAVA_7B.replace(quantization=QuantConfig("int8")))  # no tiles: fits
    tiny = TINY.replace(quantization=QuantConfig("int4", 16))  # hidden 32 = 2 tiles of 16
    with pytest.raises(ValueError, match=r"fsdp=4 does not divide int4 tiles of text hidden_size \(32 / tile_size "
                                         r"16\)=2"):
        check_mesh_fits({"fsdp": 4, "tensor": 2}, tiny)


def test_tile_that_does_not_divide_a_layer_is_named():
    with pytest.raises(ValueError, match=r"int4 tile_size 128 does not divide the input features of language_model "
                                         r"q/k/v/gate/up_proj \(hidden_size\)=32.*tile sizes that divide every "
                                         r"quantized layer: \[32, 16, 8\]"):
        TINY.replace(quantization=QuantConfig("int4"))
