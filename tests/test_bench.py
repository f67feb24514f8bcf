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
