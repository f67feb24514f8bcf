"""How a run ends, and what it leaves: RUN_DIR/hf always holds the final step's weights (a force-resumed extension
re-exports) and is never a directory the run did not write; a stop (Ctrl-C, SIGTERM) or an image that fails to
decode saves a checkpoint first and resumes bitwise; checkpoints are also saved on a time interval; a run that
cannot go on exits 2.

Cheap: one tiny model, 3-4 steps a run, the runs shared through module fixtures."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from colour_runs import cli_args, write_dataset  # tests/training/colour_runs.py
from vipllava_jax import load_pretrained
from vipllava_jax.cli import main as cli_main
from vipllava_jax.cli.train import main as train_py_main
from vipllava_jax.cli.train import summary_line
from vipllava_jax.training import TrainConfig, train
from vipllava_jax.training import preemption
from vipllava_jax.training import trainer as trainer_lib
from vipllava_jax.training.config import FIELDS
from vipllava_jax.training.export import MARKER
from vipllava_jax.training.optim import split_params

REPO = Path(__file__).resolve().parents[2]
# The module's runs (ref_run) are shared by its tests: one xdist worker (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("run_end")


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_hf):
    root = tmp_path_factory.mktemp("run_end")
    return root, tiny_hf, write_dataset(root)


def make_cfg(env, out, images=None, **kw) -> TrainConfig:
    root, model, data = env
    d = dict(model=str(model), data=str(data), image_folder=str(images or root / "images"), output=str(out),
             stage="full", max_steps=3, batch_size=4, lr=2e-2, warmup_ratio=0.1, max_length=256, devices=1, seed=0,
             progress=False, system_prompt="")
    d.update(kw)
    return TrainConfig(**d)


def losses(run_dir) -> dict[int, float]:
    rows = [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def saved_steps(run_dir) -> list[int]:
    return sorted(int(p.name) for p in (Path(run_dir) / "checkpoints").iterdir() if p.name.isdigit())


def hf_trainable(hf_dir) -> dict:
    """The full stage's trained parameters as the export holds them (Flax layout, scanned layers)."""
    _, params = load_pretrained(hf_dir, progress=False, scan_layers=True)
    return dict(jax.tree_util.tree_leaves_with_path(split_params(params, "full")[0]))


def checkpoint_trainable(run_dir, step: int) -> dict:
    import orbax.checkpoint as ocp
    with ocp.CheckpointManager(Path(run_dir).absolute() / "checkpoints") as m:
        st = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    return dict(jax.tree_util.tree_leaves_with_path(st["trainable"]["params"]))


def checkpoint_data(run_dir, step: int) -> dict:
    import orbax.checkpoint as ocp
    with ocp.CheckpointManager(Path(run_dir).absolute() / "checkpoints") as m:
        return m.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]


def same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


@pytest.fixture(scope="module")
def ref_run(env):
    """The uninterrupted 3-step run, under a fake clock on which every step's batch takes 3 minutes (the default
    save interval is 5 minutes)."""
    out = env[0] / "ref"
    fake = {"t": 0.0}
    real_stack = trainer_lib.stack_micro

    def slow_stack(*a, **k):
        fake["t"] += 180.0
        return real_stack(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer_lib, "_clock", lambda: fake["t"])
        mp.setattr(trainer_lib, "stack_micro", slow_stack)
        summary = train(make_cfg(env, out))
    return out, summary


def test_time_interval_saves_the_last_completed_step(ref_run):
    """5 minutes after the last save (here: once step 2's batch was read, 6 minutes in) the last completed step,
    1, is saved, with the data position after step 1 (not after the batch just read); then the final step."""
    out, summary = ref_run
    assert summary["steps"] == 3 and not summary["stopped"] and summary["checkpoint"] == str(out / "checkpoints" / "3")
    assert saved_steps(out) == [1, 3]
    assert checkpoint_data(out, 1)["processes"][0]["stats"]["batches"] == 1
    assert FIELDS["save_interval_minutes"].default == 5.0 and "save_interval_minutes" not in trainer_lib.RESUME_KEYS
    assert TrainConfig(model="m", data="d", output="o", save_interval_minutes="0").save_interval_minutes == 0.0
    with pytest.raises(ValueError, match="save_interval_minutes"):
        TrainConfig(model="m", data="d", output="o", save_interval_minutes=-1)


def test_force_resumed_extension_exports_the_final_step(env, ref_run, tmp_path):
    """A finished run extended with --force-resume: hf/ is replaced by the new final step's weights (before, the
    old step's were kept because hf/ existed)."""
    out = tmp_path / "ext"
    shutil.copytree(ref_run[0], out)
    before = hf_trainable(out / "hf")
    assert same(before, checkpoint_trainable(out, 3))
    assert json.loads((out / "hf" / MARKER).read_text())["step"] == 3
    s = train(make_cfg(env, out, max_steps=4, force_resume=True))
    assert s["steps"] == 4 and s["hf"] == str(out / "hf")
    after = hf_trainable(out / "hf")
    assert same(after, checkpoint_trainable(out, 4)) and not same(after, before)
    assert json.loads((out / "hf" / MARKER).read_text())["step"] == 4
    assert not [p for p in out.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_an_hf_path_the_run_did_not_write_is_refused_before_training(env, tmp_path, capsys):
    """A user's hf/ (a directory without the export marker, one whose marker names another run, or a file) is
    refused before anything is loaded, with one line and exit status 2 (`vipllava-jax train` and train.py), and
    left exactly as it was."""
    other = tmp_path / "other"
    cases = {"dir": lambda hf: (hf.mkdir(), (hf / "notes.txt").write_text("mine")),
             "marker": lambda hf: (hf.mkdir(), (hf / MARKER).write_text(json.dumps(
                 {"written_by": "vipllava-jax train", "run_dir": str(other), "step": 3}))),
             "file": lambda hf: hf.write_text("mine")}
    for i, (name, make) in enumerate(cases.items()):
        out = tmp_path / name
        out.mkdir()
        make(out / "hf")
        snapshot = {p: p.read_bytes() for p in [out / "hf", *(out / "hf").glob("*")] if p.is_file()}
        entry = cli_main if i % 2 == 0 else lambda argv: train_py_main(argv[1:])
        assert entry(["train"] + cli_args(make_cfg(env, out))) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert f"{out / 'hf'} is in the way" in err and "nothing was trained" in err, err
        assert {p: p.read_bytes() for p in [out / "hf", *(out / "hf").glob("*")] if p.is_file()} == snapshot
        assert not (out / "metrics.jsonl").exists()


def test_second_ctrl_c_interrupts_at_once():
    old = signal.getsignal(signal.SIGINT)
    p = preemption.Preemption()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert p.should_stop(1) and p.reason == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        p.close()
    assert signal.getsignal(signal.SIGINT) == old


def _step3_images(env) -> list[str]:
    """The image names of step 3's batch (batch 4, seed 0): the pipeline's global stream is the records shuffled
    with the seed (grain), epoch 0 first."""
    import grain
    recs = json.loads(env[2].read_text())
    order = grain.MapDataset.source(list(range(len(recs)))).shuffle(seed=0)
    return [recs[order[i]]["image"] for i in range(8, 12)]


def test_ctrl_c_and_a_bad_image_save_first_and_the_run_resumes_bitwise(env, ref_run, tmp_path, monkeypatch,
                                                                       capsys):
    """In process (the fast twin of test_cli_ctrl_c_saves_exits_zero_and_resumes_bitwise): Ctrl-C (SIGINT to this
    process while step 1's batch is read) stops after step 1, saved, no model claimed; resumed, an image of step
    3's batch that cannot be decoded stops the run after step 2 is saved, naming the image; a user's hf/ made during
    the last step is not replaced; then the run ends bitwise equal to the uninterrupted one."""
    images = tmp_path / "images"
    shutil.copytree(env[0] / "images", images)
    out = tmp_path / "run"
    cfg = make_cfg(env, out, images=images)
    real_stack = trainer_lib.stack_micro
    hooks = {"n": 0, "at": {}}

    def stack(*a, **k):
        hooks["n"] += 1
        if hooks["n"] in hooks["at"]:
            hooks["at"].pop(hooks["n"])()
        return real_stack(*a, **k)

    monkeypatch.setattr(trainer_lib, "stack_micro", stack)
    old_handler = signal.getsignal(signal.SIGINT)
    hooks["at"] = {1: lambda: os.kill(os.getpid(), signal.SIGINT)}
    s1 = train(cfg)
    assert s1["stopped"] and s1["stop_reason"] == "SIGINT" and s1["steps"] == 1 and s1["hf"] is None
    assert s1["checkpoint"] == str(out / "checkpoints" / "1") and saved_steps(out) == [1]
    assert not (out / "hf").exists()
    line = summary_line(s1)
    assert "model" not in line and "stopped at step 1 of 3" in line and str(out / "checkpoints" / "1") in line, line
    assert "Stopped at step 1 of 3 (Ctrl-C)" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGINT) == old_handler

    bad = _step3_images(env)[0]
    good = (images / bad).read_bytes()
    (images / bad).write_bytes(good[:40])  # a PNG cut short: it exists, its header reads, it does not decode
    hooks["n"] = 0
    with pytest.raises(trainer_lib.TrainError) as e:
        train(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "data of step 3" in msg and f"cannot read image {images / bad}" in msg, msg
    assert f"checkpoint of step 2, the last completed, is saved in {out / 'checkpoints' / '2'}" in msg, msg
    assert "run the same command again to resume" in msg, msg
    assert saved_steps(out) == [1, 2] and sorted(losses(out)) == [1, 2] and not (out / "hf").exists()

    (images / bad).write_bytes(good)
    hooks["n"], hooks["at"] = 0, {1: lambda: (out / "hf").mkdir() or (out / "hf" / "mine.txt").write_text("x")}
    with pytest.raises(trainer_lib.TrainError, match=r"hf is in the way.*model was not written; the final "
                                                     r"checkpoint is .*checkpoints/3\. Move it away"):
        train(cfg)
    assert os.listdir(out / "hf") == ["mine.txt"]
    shutil.rmtree(out / "hf")
    s4 = train(cfg)  # nothing left to train: writes the model
    assert s4["steps"] == 3 and not s4["stopped"] and s4["hf"] == str(out / "hf") and "model: " in summary_line(s4)
    assert losses(out) == losses(ref_run[0])
    assert same(hf_trainable(out / "hf"), hf_trainable(ref_run[0] / "hf"))


def test_train_error_exits_2(env, ref_run, tmp_path, capsys):
    """A refused resume (changed settings) is a one-line error with exit status 2 from both entry points."""
    out = tmp_path / "refused"
    shutil.copytree(ref_run[0], out)
    for entry in (cli_main, lambda argv: train_py_main(argv[1:])):
        assert entry(["train"] + cli_args(make_cfg(env, out, lr=1e-3))) == 2
        err = capsys.readouterr().err
        assert "lr=0.02" in err and "--force-resume" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow  # ~40 s; fast twin: test_ctrl_c_and_a_bad_image_save_first_and_the_run_resumes_bitwise (SIGINT to
# the training process in the middle of a run: saved, resumed bitwise)
def test_cli_ctrl_c_saves_exits_zero_and_resumes_bitwise(env, tmp_path):
    """Ctrl-C (SIGINT) to `train.py` in the middle of a run: the step finishes, a checkpoint is saved, the last line
    names it and how to resume (no model), exit 0; the same command again completes the run, bitwise equal to an
    uninterrupted one."""
    import time
    ref = tmp_path / "ref"
    train(make_cfg(env, ref, max_steps=30))
    out = tmp_path / "int"
    cfg = make_cfg(env, out, max_steps=30)
    environ = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   JAX_DEFAULT_MATMUL_PRECISION="highest")

    def start():
        return subprocess.Popen([sys.executable, str(REPO / "train" / "train.py")] + cli_args(cfg), env=environ,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    proc = start()
    try:
        t0 = time.time()
        while not ((out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3):
            assert proc.poll() is None and time.time() - t0 < 300, proc.stdout.read()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        log, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log[-3000:]
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-3000:]
    stop = max(losses(out))
    assert 3 <= stop < 30
    last = log.strip().splitlines()[-1]
    assert last.startswith(f"stopped at step {stop} of 30") and str(out / "checkpoints" / str(stop)) in last, last
    assert "run the same command again to resume" in last and "model" not in last, last
    assert not (out / "hf").exists()
    proc = start()
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-3000:]
    assert log.strip().splitlines()[-1].endswith(f"model: {out / 'hf'}"), log[-2000:]
    assert losses(out) == losses(ref)
    assert same(hf_trainable(out / "hf"), hf_trainable(ref / "hf"))
