"""End-to-end fine-tuning on a tiny random checkpoint: loss falls, every stage trains only what it should,
the HF export loads in transformers with equal logits, 8 devices (fsdp=4 x tensor=2) match 1 device step by
step, a stopped run resumes bitwise, and changed settings refuse to resume."""
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from colour_runs import cli_args, write_dataset  # tests/training/colour_runs.py
from vipllava_jax import load_pretrained
from vipllava_jax.checkpoints.hf_table import canonical_key
from vipllava_jax.cli import main as cli_main
from vipllava_jax.testing import make_tiny_checkpoint
from vipllava_jax.testing import make_tiny_processor
from vipllava_jax.testing import rel_err
from vipllava_jax.training import TrainConfig, train
from vipllava_jax.training import preemption
from vipllava_jax.training import trainer as trainer_lib

REPO = Path(__file__).resolve().parents[2]
# The module's runs (env, full_run, mesh8_run) are shared by many tests: one xdist worker (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("train_run")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_run")
    model = root / "model"
    make_tiny_checkpoint(model)
    make_tiny_processor(model)
    data = write_dataset(root)
    return root, model, data


def base_cfg(env, out, **kw):
    root, model, data = env
    d = dict(model=str(model), data=str(data), image_folder=str(root / "images"), output=str(out), stage="full",
             max_steps=12, batch_size=4, lr=2e-2, warmup_ratio=0.1, max_length=256, mesh="auto", devices=1, seed=0,
             progress=False, system_prompt="")
    d.update(kw)
    return TrainConfig(**d)


def losses(run_dir) -> dict[int, float]:
    rows = [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def tb_scalars(run_dir, tag: str) -> dict[int, float]:
    """What TensorBoard shows for ``tag``: the event files in order, each whole record's CRCs checked (a torn
    last record ends a file, as in TensorBoard), a SessionLog START at step s hiding earlier events at >= s."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog
    from tensorboardX.record_writer import masked_crc32c
    shown: dict[int, float] = {}
    for f in sorted((Path(run_dir) / "tb").glob("events.out.tfevents.*"), key=lambda f: f.stat().st_mtime_ns):
        b, i = f.read_bytes(), 0
        while i + 12 <= len(b):
            (n,), (hcrc,) = struct.unpack("<Q", b[i:i + 8]), struct.unpack("<I", b[i + 8:i + 12])
            if i + 16 + n > len(b):
                break
            data, (dcrc,) = b[i + 12:i + 12 + n], struct.unpack("<I", b[i + 12 + n:i + 16 + n])
            assert (hcrc, dcrc) == (masked_crc32c(b[i:i + 8]), masked_crc32c(data)), f"{f}: bad record at {i}"
            ev, i = Event.FromString(data), i + 16 + n
            if ev.HasField("session_log") and ev.session_log.status == SessionLog.START:
                shown = {s: v for s, v in shown.items() if s < ev.step}
            for v in ev.summary.value:
                if v.tag == tag:
                    shown[ev.step] = v.simple_value
    return shown


def float32s(d: dict[int, float]) -> dict[int, float]:
    return {k: float(np.float32(v)) for k, v in d.items()}


def hf_weights(d) -> dict[str, np.ndarray]:
    files = sorted(Path(d).glob("*.safetensors"))
    out = {}
    for f in files:
        out.update({canonical_key(k): v for k, v in load_file(f).items()})
    return out


@pytest.fixture(scope="module")
def full_run(env):
    out = env[0] / "run_full"
    summary = train(base_cfg(env, out, max_steps=30))
    return out, summary


def test_full_stage_loss_falls_and_export_loads_in_transformers(env, full_run):
    from transformers import VipLlavaForConditionalGeneration
    out, summary = full_run
    ls = losses(out)
    assert sorted(ls) == list(range(1, 31))
    assert np.mean([ls[s] for s in range(26, 31)]) < 0.3 * np.mean([ls[s] for s in range(1, 4)])
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "examples_seen", "dropped_examples"} <= set(rows[0])
    assert tb_scalars(out, "loss") == float32s(ls)
    hf = out / "hf"
    assert (hf / "tokenizer.json").exists() and (hf / "processor_config.json").exists()
    tm = VipLlavaForConditionalGeneration.from_pretrained(hf).eval()
    module, params = load_pretrained(hf, progress=False)
    ids = np.array([[1] + [100] * 25 + [5, 6, 7, 8]])
    pixels = np.random.default_rng(0).standard_normal((1, 3, 30, 30)).astype(np.float32)
    ours = module.apply({"params": params}, ids, pixels).logits
    with torch.no_grad():
        ref = tm(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels)).logits.numpy()
    assert rel_err(ours, ref) < 1e-5
    # frozen tower bitwise as it was; the language model and projector moved
    before, after = hf_weights(env[1]), hf_weights(hf)
    assert set(before) == set(after)
    for k in before:
        same = np.array_equal(before[k], after[k])
        if k.startswith("vision_tower."):
            assert same, k
        elif k.startswith(("multi_modal_projector.", "lm_head.")) or ".layers." in k:
            assert not same, k


@pytest.mark.parametrize("stage,trained", [
    ("projector", ("multi_modal_projector.",)),
    ("lora", ("multi_modal_projector.", "q_proj", "v_proj")),
])
def test_stage_trains_only_its_parameters(env, tmp_path, stage, trained):
    train(base_cfg(env, tmp_path / stage, stage=stage, max_steps=3, lora_rank=4, lora_alpha=8.0,
                   lora_targets=("q_proj", "v_proj")))
    before, after = hf_weights(env[1]), hf_weights(tmp_path / stage / "hf")
    for k in before:
        changed = not np.array_equal(before[k], after[k])
        should = any(t in k for t in trained) and not k.startswith("vision_tower.")
        assert changed == should, k


def test_stopped_run_resumes_bitwise(env, full_run, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    ref_out = env[0] / "run_full"
    cfg = base_cfg(env, out, max_steps=30, save_every=5)
    stop_at = {"step": 13}
    real = preemption.Preemption.should_stop
    monkeypatch.setattr(preemption.Preemption, "should_stop", lambda self, step: step == stop_at["step"]
                        or real(self, step))
    s1 = train(cfg)
    assert s1["steps"] == 13 and s1["stopped"] and not (out / "hf").exists()
    stop_at["step"] = -1
    s2 = train(cfg)
    assert s2["steps"] == 30
    assert losses(out) == losses(ref_out)
    assert tb_scalars(out, "loss") == float32s(losses(out))
    a, b = hf_weights(out / "hf"), hf_weights(ref_out / "hf")
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_muon_run_learns_and_resumes_bitwise(env, tmp_path, monkeypatch):
    """optimizer="muon" end to end: the loss falls, and a run stopped at step 7 resumes (Muon's momentum and
    AdamW's moments restored from orbax) to the same losses and weights as an uninterrupted run."""
    ref = tmp_path / "ref"
    train(base_cfg(env, ref, max_steps=16, optimizer="muon", muon_lr=2e-2))
    lr = losses(ref)
    assert lr[16] < 0.5 * lr[1], lr
    saved = json.loads((ref / "train_config.json").read_text())
    assert saved["optimizer"] == "muon" and saved["muon_lr"] == 2e-2
    out = tmp_path / "resumed"
    stop_at = {"step": 7}
    real = preemption.Preemption.should_stop
    monkeypatch.setattr(preemption.Preemption, "should_stop", lambda self, step: step == stop_at["step"]
                        or real(self, step))
    assert train(base_cfg(env, out, max_steps=16, optimizer="muon", muon_lr=2e-2))["stopped"]
    stop_at["step"] = -1
    with pytest.raises(trainer_lib.TrainError, match="optimizer='muon'.*optimizer='adamw'"):
        train(base_cfg(env, out, max_steps=16))
    assert train(base_cfg(env, out, max_steps=16, optimizer="muon", muon_lr=2e-2))["steps"] == 16
    assert losses(out) == lr
    a, b = hf_weights(out / "hf"), hf_weights(ref / "hf")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    # a run saved before these settings existed was an AdamW run: it resumes as one, not as a Muon run
    old = {k: v for k, v in base_cfg(env, out).to_dict().items() if k not in ("optimizer", "muon_lr")}
    trainer_lib.check_resume(old, base_cfg(env, out))
    with pytest.raises(trainer_lib.TrainError, match="optimizer='adamw'.*optimizer='muon'"):
        trainer_lib.check_resume(old, base_cfg(env, out, optimizer="muon"))


def test_resume_with_changed_settings_is_refused(env, full_run):
    out = full_run[0]
    with pytest.raises(trainer_lib.TrainError, match=r"lr=0.02.*lr=0.001"):
        train(base_cfg(env, out, max_steps=30, lr=1e-3))


def test_cli_config_file_and_flag_override(env, tmp_path, capsys):
    root, model, data = env
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"stage: projector\nmax_steps: 2\nbatch-size: 4\nlr: 1.0e-3\nmax_length: 256\nsystem_prompt: ''\n"
                   f"model: {model}\ndata: {data}\nimage_folder: {root / 'images'}\n")
    rc = cli_main(["train", "--config", str(cfg), "--output", str(tmp_path / "o"), "--max-steps", "3",
                   "--no-progress", "--length-buckets", "128,192,256", "--group-by-length", "2"])
    assert rc == 0
    saved = json.loads((tmp_path / "o" / "train_config.json").read_text())
    assert saved["max_steps"] == 3 and saved["stage"] == "projector" and saved["batch_size"] == 4
    assert saved["length_buckets"] == [128, 192, 256] and saved["group_by_length"] == 2
    assert sorted(losses(tmp_path / "o")) == [1, 2, 3]
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: projector\nlearning_rate: 1\n")
    assert cli_main(["train", "--config", str(bad), "--output", str(tmp_path / "x"), "--model", str(model),
                     "--data", str(data)]) == 2
    assert "unknown setting 'learning_rate'" in capsys.readouterr().err


_MESH_SCRIPT = """
import json, sys
from vipllava_jax.training import TrainConfig, train
import jax
assert jax.device_count() == 8, jax.devices()
cfg = TrainConfig(**json.loads(sys.argv[1]))
train(cfg)
"""


def _subprocess_env(**extra) -> dict:
    env_vars = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env_vars.update(PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    JAX_DEFAULT_MATMUL_PRECISION="highest", JAX_PLATFORMS="cpu", **extra)
    return env_vars


@pytest.fixture(scope="module")
def mesh8_run(env):
    """The 30-step run on 8 CPU devices of one process, fsdp=4 x tensor=2."""
    out = env[0] / "mesh8"
    cfg = base_cfg(env, out, max_steps=30, mesh="fsdp=4,tensor=2", devices=None)
    r = subprocess.run([sys.executable, "-c", _MESH_SCRIPT, json.dumps(cfg.to_dict())], capture_output=True,
                       text=True, timeout=600,
                       env=_subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _close(a: dict, b: dict, steps) -> None:
    # fp32 sums reduced in another order (8 devices' shards) drift apart over the steps: 1.1e-5 relative at step 15
    # was seen on one machine (1e-5 passed on others); a sharding error moves the loss by far more than 3e-5
    for s in steps:
        assert abs(a[s] - b[s]) <= 3e-5 * max(1.0, abs(b[s])), (s, a[s], b[s])


def test_eight_devices_fsdp_tensor_match_one_device(full_run, mesh8_run):
    one, eight = losses(full_run[0]), losses(mesh8_run)
    assert sorted(one) == sorted(eight) == list(range(1, 31))
    _close(eight, one, one)


@pytest.mark.slow  # ~35 s; fast twins: test_eight_devices_fsdp_tensor_match_one_device (the same mesh's losses in one
# process) and test_stopped_run_resumes_bitwise (a stop at a step saves and resumes bitwise)
def test_two_processes_match_one_process_and_resume_in_one(env, full_run, mesh8_run, tmp_path):
    """Two processes (jax.distributed + gloo, 4 CPU devices each, one global fsdp=4 x tensor=2 mesh), each
    reading its own rows: the losses equal the one-process 8-device run's. SIGTERM to process 0 stops both at
    the same step (JAX's preemption sync point), exit 0; the checkpoint they wrote then resumes in ONE process
    and the run ends with the same losses."""
    import signal
    import socket
    import time
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "two"
    cfg = base_cfg(env, out, max_steps=30, mesh="fsdp=4,tensor=2", devices=None)
    procs = [subprocess.Popen(
        [sys.executable, str(REPO / "train" / "train.py")] + cli_args(cfg) +
        ["--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
        env=_subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=4"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        _wait_for_step(procs[0], out, 12, timeout=400)
        procs[0].send_signal(signal.SIGTERM)
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"process {i}:\n{log[-4000:]}"
    assert "Stopped at step" in logs[0] and "Stopped at step" not in logs[1]  # only process 0 prints
    two = losses(out)
    stop = max(two)
    assert 12 <= stop < 30 and sorted(two) == list(range(1, stop + 1))
    _close(two, losses(mesh8_run), two)
    summary = train(cfg.replace(mesh="auto", devices=1))  # one process, one device, the two processes' checkpoint
    assert summary["steps"] == 30
    resumed = losses(out)
    assert sorted(resumed) == list(range(1, 31))
    _close(resumed, losses(full_run[0]), range(stop + 1, 31))


def test_nonfinite_step_stops_naming_it_or_is_skipped(env, tmp_path, monkeypatch):
    real = trainer_lib.stack_micro
    poison = {"steps": {4}, "n": 0}

    def poisoned(batches, *args):
        out = real(batches, *args)
        poison["n"] += 1
        if poison["n"] in poison["steps"]:
            out["pixel_values"] = out["pixel_values"] * np.float32("nan")
        return out

    monkeypatch.setattr(trainer_lib, "stack_micro", poisoned)
    with pytest.raises(trainer_lib.TrainError, match=r"Non-finite loss or gradient at step 4 .*last good checkpoint: "
                                                     r".*checkpoints/2"):
        train(base_cfg(env, tmp_path / "stop", max_steps=6, save_every=2))
    poison["n"] = 0
    train(base_cfg(env, tmp_path / "skip", max_steps=6, skip_nonfinite=True))
    rows = {r["step"]: r for r in map(json.loads, (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines())}
    assert [rows[s]["skipped_steps"] for s in range(1, 7)] == [0, 0, 0, 1, 1, 1]
    assert np.isnan(rows[4]["loss"]) and all(np.isfinite(rows[s]["loss"]) for s in (5, 6))
    assert all(np.isfinite(v).all() for v in hf_weights(tmp_path / "skip" / "hf").values())
    poison["n"], poison["steps"] = 0, {3, 4, 5, 6}
    with pytest.raises(trainer_lib.TrainError, match="2 non-finite steps in a row, the last at step 4"):
        train(base_cfg(env, tmp_path / "many", max_steps=6, skip_nonfinite=True, max_skips=2))


def _start(cfg) -> subprocess.Popen:
    env_vars = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    JAX_DEFAULT_MATMUL_PRECISION="highest")
    return subprocess.Popen([sys.executable, str(REPO / "train" / "train.py")] + cli_args(cfg), env=env_vars,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_step(proc, run_dir, step, timeout=300):
    import time
    t0 = time.time()
    path = Path(run_dir) / "metrics.jsonl"
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stdout.read()[-2000:]}")
        if path.exists() and len(path.read_text().splitlines()) >= step:
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the run")


@pytest.mark.slow  # ~25 s; fast twin: test_stopped_run_resumes_bitwise (the same stop, save and bitwise resume,
# in process through the preemption check)
def test_sigterm_saves_exits_zero_and_resumes_bitwise(env, full_run, tmp_path):
    """SIGTERM (preemption) in the middle of a run from the CLI: it finishes the step, saves, says where it
    stopped, exits 0; the same command again completes it, bitwise equal to the uninterrupted run."""
    import signal
    cfg = base_cfg(env, tmp_path / "term", max_steps=30)
    proc = _start(cfg)
    _wait_for_step(proc, tmp_path / "term", 5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "Stopped at step" in out and "Run the same command again to resume" in out
    assert not (tmp_path / "term" / "hf").exists()
    proc = _start(cfg)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "Resuming" in out
    assert losses(tmp_path / "term") == losses(full_run[0])
    a, b = hf_weights(tmp_path / "term" / "hf"), hf_weights(full_run[0] / "hf")
    assert all(np.array_equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize("kill_after", [3, pytest.param(7, marks=pytest.mark.slow)])
def test_sigkill_during_saves_resumes_from_a_whole_checkpoint(env, full_run, tmp_path, kill_after):
    """Saving every step (asynchronously), SIGKILL at some moment: whatever checkpoint is left is whole, the
    next run resumes from it and ends bitwise equal to the uninterrupted run."""
    import signal
    cfg = base_cfg(env, tmp_path / "kill", max_steps=30, save_every=1)
    proc = _start(cfg)
    _wait_for_step(proc, tmp_path / "kill", kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    s = train(cfg)
    assert s["steps"] == 30
    assert losses(tmp_path / "kill") == losses(full_run[0])
    assert tb_scalars(tmp_path / "kill", "loss") == float32s(losses(full_run[0]))
    a, b = hf_weights(tmp_path / "kill" / "hf"), hf_weights(full_run[0] / "hf")
    assert all(np.array_equal(a[k], b[k]) for k in b)


def test_full_disk_is_one_clear_error_and_the_last_checkpoint_resumes(env, full_run, tmp_path):
    """A real full disk (a 1.6 MB tmpfs; skipped where mounting is not allowed) while saving every step."""
    import shutil
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1600k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        cfg = base_cfg(env, mnt / "run", max_steps=30, save_every=1, keep=100)
        with pytest.raises(trainer_lib.TrainError, match=r"Disk full .* the last whole checkpoint is .*checkpoints/\d+"):
            train(cfg)
        shutil.copytree(mnt / "run", tmp_path / "moved")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)  # lazy: a writer may still hold a file
    s = train(base_cfg(env, tmp_path / "moved", max_steps=30, save_every=1, keep=100))
    assert s["steps"] == 30
    assert losses(tmp_path / "moved") == losses(full_run[0])
    assert tb_scalars(tmp_path / "moved", "loss") == float32s(losses(full_run[0]))
    a, b = hf_weights(tmp_path / "moved" / "hf"), hf_weights(full_run[0] / "hf")
    assert all(np.array_equal(a[k], b[k]) for k in b)


def test_eval_loss_and_keeping_latest_and_best(env, tmp_path):
    """Eval every 3 steps: its loss is the supervised-token mean of HF-convention losses over the eval set
    (recomputed here from the exported model), and the checkpoints kept are the 2 newest and the 2 best."""
    from vipllava_jax.data import Processor
    from vipllava_jax.data.records import load_records
    from vipllava_jax.training.loss import loss_fn
    from vipllava_jax.training.pipeline import make_eval_iterator
    root, model, data = env
    cfg = base_cfg(env, tmp_path / "ev", max_steps=9, save_every=1, keep=2, eval_data=str(data), eval_every=3)
    train(cfg)
    rows = [json.loads(ln) for ln in (tmp_path / "ev" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    assert sorted(evals) == [3, 6, 9]
    best2 = sorted(evals, key=evals.get)[:2]
    kept = sorted(int(p.name) for p in (tmp_path / "ev" / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == sorted({8, 9} | set(best2))
    module, params = load_pretrained(tmp_path / "ev" / "hf", progress=False)
    proc = Processor.from_pretrained(model)
    dcfg = cfg.data_config(module.config, proc)
    total = count = 0.0
    for b in make_eval_iterator(load_records(data), proc, dcfg, image_folder=root / "images", batch_size=4):
        loss, m = loss_fn(module, params, b)
        total += float(loss) * int(m["num_tokens"])
        count += int(m["num_tokens"])
    assert abs(total / count - evals[9]) < 1e-5 * evals[9]


def test_bfloat16_compute_with_fp32_master_weights(env, tmp_path):
    """--dtype bfloat16: compute in bf16, parameters (and the export) stay fp32; the loss falls like fp32's."""
    out = tmp_path / "bf16"
    train(base_cfg(env, out, max_steps=12, dtype="bfloat16"))
    ls = losses(out)
    assert ls[12] < 0.8 * ls[1]
    w = hf_weights(out / "hf")
    assert all(v.dtype == np.float32 for v in w.values())
    # bf16-rounded weights would lose the low mantissa bits of the fp32 updates: the trained ones keep them
    lm = w["language_model.layers.0.mlp.up_proj.weight"]
    assert np.any(lm.view(np.uint32) & 0xFFFF)
