"""bench/generate.py runs end to end on the tiny config (small settings) and reports every metric for both sides.
It checks that the benchmark works, not how fast anything is."""
import json
import runpy
import sys
import warnings
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "generate.py"


def test_generate_benchmark_tiny(tmp_path, capsys, monkeypatch):
    out = tmp_path / "bench.jsonl"
    monkeypatch.setattr(sys, "argv", [str(BENCH), "--config", "tiny", "--batches", "1,2", "--new-tokens", "6",
                                      "--repeats", "1", "--json", str(out), "--workdir", str(tmp_path)])
    import jax
    cache_dir = jax.config.jax_compilation_cache_dir
    bench = runpy.run_path(str(BENCH))
    assert bench["main"]() == 0
    assert jax.config.jax_compilation_cache_dir == cache_dir  # not left pointing at the deleted folder
    saved = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # so that any cache would be written
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a write into the deleted cache folder would warn
            jax.jit(lambda x: x * 3 + 1)(jax.numpy.arange(7.0)).block_until_ready()
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", saved)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    got = {(r["impl"], r["metric"], r["batch"]) for r in rows}
    for impl in ("jax", "torch"):
        assert {(impl, "ttft_ms", 1), (impl, "decode_tok_s", 1), (impl, "decode_tok_s", 2),
                (impl, "e2e_tok_s", 2), (impl, "peak_mem_gib", None)} <= got
    assert {("jax", "compile_s", 1), ("jax", "cached_compile_s", 1)} <= got
    assert all(r["value"] > 0 for r in rows if r["metric"] != "compile_s" and "cached" not in r["metric"])
    printed = capsys.readouterr().out
    assert "metric" in printed and "ratio" in printed and "decode_tok_s" in printed


TRAIN_BENCH = BENCH.with_name("train.py")


def test_train_benchmark_tiny(tmp_path, capsys):
    """bench/train.py on the tiny config: both implementations, both stages, every metric; and both sides
    train the same thing: the same first-step loss at float32 and the same number of trained parameters."""
    out = tmp_path / "train.jsonl"
    bench = runpy.run_path(str(TRAIN_BENCH))
    assert bench["main"](["--config", "tiny", "--steps", "1", "--json", str(out), "--workdir", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    got = {(r["impl"], r["stage"], r["metric"]): r["value"] for r in rows}
    for impl in ("jax", "torch"):
        for stage in ("full", "lora"):
            for metric in ("step_s", "tokens_s", "mfu", "peak_mem_gib", "first_step_loss", "trained_params"):
                assert got[(impl, stage, metric)] > 0, (impl, stage, metric)
    for stage in ("full", "lora"):
        j, t = got[("jax", stage, "first_step_loss")], got[("torch", stage, "first_step_loss")]
        assert abs(j - t) <= 1e-4 * t, (stage, j, t)
        assert got[("jax", stage, "trained_params")] == got[("torch", stage, "trained_params")]
    printed = capsys.readouterr().out
    assert "ratio" in printed and "tokens_s" in printed and "mfu" in printed


QUANT_DECODE = BENCH.with_name("quant_decode.py")


def test_quant_decode_weight_bytes_from_the_compiled_step():
    """bench/quant_decode.py at small size (hidden 256, 2 layers): the weight bytes read from the compiled decode
    step are the parameter tree's (int4 packed, bf16 scales, int4 zero points, one embedding row), int8 <= 0.55x and int4 <= 0.30x of
    bf16's, and the quantized step writes no full-size float weight copy beyond what the backend writes for bf16
    weights too (XLA:CPU converts every weight to fp32 for its dot; on GPU/TPU: none)."""
    import jax
    from vipllava_jax.models.presets import TINY
    qd = runpy.run_path(str(QUANT_DECODE))
    cfg = TINY.replace(text=TINY.text.replace(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                              num_key_value_heads=4, head_dim=64))
    res = qd["run"](cfg, layers=2, tile=128, cache_len=64)
    h, f = 256, 512
    # one layer's kernels as (in, out): q, k, v, o [h, h]; gate, up [h, f]; down [f, h]
    kernels = [(h, h)] * 4 + [(h, f)] * 2 + [(f, h)]
    elems = sum(i * o for i, o in kernels)
    scales = {"bf16": 0, "int8": sum(o for _, o in kernels), "int4": sum(i // 128 * o for i, o in kernels)}
    codes = {"bf16": 2 * elems, "int8": elems, "int4": elems // 2}
    for mode, r in res.items():
        norms = 2 * h * 2  # input / post-attention RMSNorm scales, bf16
        zero_points = scales[mode] // 2 if mode == "int4" else 0  # int4, one per scale
        assert r["layer_weight_bytes"] == 2 * (codes[mode] + 2 * scales[mode] + zero_points + norms), mode
        assert r["kernels_quantized"] == (0 if mode == "bf16" else 14)
    assert res["int8"]["ratio_vs_bf16"] <= 0.55 and res["int4"]["ratio_vs_bf16"] <= 0.30
    base = res["bf16"]["dequant_copies"]
    for mode in ("int8", "int4"):
        assert res[mode]["dequant_copies"] == (base if jax.default_backend() == "cpu" else 0), res[mode]
