"""What guards a run directory: a resume on changed data or base weights at the same path is refused (naming the
file; --force-resume goes on and records the new fingerprint), one run at a time per directory (a lock naming its
holder; a dead holder's lock taken over), a damaged latest checkpoint falls back to the newest whole one, and an
unusable --output is one line."""
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from colour_runs import write_dataset  # tests/training/colour_runs.py
from vipllava_jax.cli import main as cli_main
from vipllava_jax.training import TrainConfig, train
from vipllava_jax.training import checkpointing
from vipllava_jax.training.run_lock import RunLock
from vipllava_jax.training.trainer import TrainError

REPO = Path(__file__).resolve().parents[2]
RUN_LOCK = REPO / "vipllava_jax" / "training" / "run_lock.py"
# The module's run is shared by its tests: one xdist worker.
# Damaged checkpoints leave orbax coroutines whose errors are finalized while stderr is held: pytest reports those.
pytestmark = [pytest.mark.xdist_group("run_guard"),
              pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("run_guard")
    model = root / "model"
    shutil.copytree(tiny_checkpoint.path, model)  # tests replace its weights (and put them back)
    data = write_dataset(root, n=8)
    return root, model, data


def cfg_for(env, out, **kw) -> TrainConfig:
    root, model, data = env
    d = dict(model=str(model), data=str(data), image_folder=str(root / "images"), output=str(out), stage="projector",
             max_steps=2, batch_size=2, max_length=64, length_buckets=(64,), devices=1, seed=0, progress=False,
             system_prompt="", save_every=1)
    d.update(kw)
    return TrainConfig(**d)


@pytest.fixture(scope="module")
def run(env):
    """A finished 2-step run saved at steps 1 and 2 (tests copy it before resuming)."""
    out = env[0] / "run"
    train(cfg_for(env, out))
    return out


def copy_run(run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


@pytest.fixture
def restore_file():
    """restore_file(path): the file's bytes are put back after the test."""
    saved = {}

    def keep(path):
        saved.setdefault(Path(path), Path(path).read_bytes())
    yield keep
    for p, b in saved.items():
        p.write_bytes(b)


# --- A. changed data or base weights ---

def test_changed_data_file_is_refused_and_force_resume_goes_on(env, run, tmp_path, restore_file):
    out = copy_run(run, tmp_path)
    data = env[2]
    restore_file(data)
    original = data.read_text()
    data.write_text(json.dumps(json.loads(original)[:3]))
    t0 = time.perf_counter()
    with pytest.raises(TrainError, match=rf"data file {data} changed since the run started \(8 -> 3 records\); "
                                         r"use a new --output, or --force-resume"):
        train(cfg_for(env, out))
    assert time.perf_counter() - t0 < 5  # refused before any weights are loaded
    # --force-resume goes on (the run is complete: restored, nothing to train; a run with steps left records the
    # new fingerprint with its next checkpoint: see the fallback test, which saves one)
    assert train(cfg_for(env, out, force_resume=True))["steps"] == 2
    # the same size and other bytes: named too
    data.write_text(original.replace("red", "ted", 1))
    with pytest.raises(TrainError, match=r"changed since the run started \(same size, different contents\)"):
        train(cfg_for(env, out))


def test_replaced_base_weights_are_refused_naming_the_file(env, run, tmp_path, restore_file):
    out = copy_run(run, tmp_path)
    f = env[1] / "model.safetensors"
    restore_file(f)
    b = bytearray(f.read_bytes())  # other weights in place: the same names, shapes, dtypes and header
    (n,) = struct.unpack("<Q", b[:8])
    header = json.loads(b[8:8 + n])
    k = sorted(k for k in header if "layers.0" in k and header[k]["dtype"] == "F32")[0]
    a, z = (8 + n + o for o in header[k]["data_offsets"])
    b[a:z] = (np.frombuffer(bytes(b[a:z]), np.float32) + np.float32(1e-3)).tobytes()
    f.write_bytes(bytes(b))
    with pytest.raises(TrainError, match=rf"base model {env[1]} changed since the run started: model.safetensors "
                                         r"differs \(same size, other contents\)"):
        train(cfg_for(env, out))
    assert train(cfg_for(env, out, force_resume=True))["steps"] == 2  # nothing left to train: restored only


def test_run_saved_before_fingerprints_resumes(env, run, tmp_path, monkeypatch, restore_file):
    """A checkpoint without a fingerprint (saved before they existed) is not checked: it resumes."""
    out = copy_run(run, tmp_path)
    real = checkpointing.RunCheckpoints.read_run
    monkeypatch.setattr(checkpointing.RunCheckpoints, "read_run", lambda self, step: {
        k: v for k, v in real(self, step).items() if k != "fingerprint"})
    restore_file(env[2])
    env[2].write_text(json.dumps(json.loads(env[2].read_text())[:3]))
    assert train(cfg_for(env, out))["steps"] == 2


# --- B. one run per directory ---

_HOLD = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("run_lock", sys.argv[1])
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
start, hold = float(sys.argv[3]), float(sys.argv[4])
time.sleep(max(0.0, start - time.time()))
try:
    lock = m.RunLock(sys.argv[2])
except m.RunInUse as e:
    print("refused:", e, flush=True)
    sys.exit(3)
print("got", flush=True)
time.sleep(hold)
lock.release()
"""


def hold_lock(run_dir, *, start: float = 0.0, hold: float = 60.0) -> subprocess.Popen:
    """A cheap child process (no JAX) that takes the lock at time ``start`` and holds it ``hold`` s."""
    return subprocess.Popen([sys.executable, "-S", "-c", _HOLD, str(RUN_LOCK), str(run_dir), str(start), str(hold)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_second_run_refuses_at_once_naming_the_holder(env, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    holder = hold_lock(out)
    try:
        assert holder.stdout.readline().strip() == "got"
        t0 = time.perf_counter()
        with pytest.raises(TrainError, match=rf"{out} is in use by another run \(host {socket.gethostname()}, pid "
                                             rf"{holder.pid}, since .*\); wait for it to end, or use another --output"):
            train(cfg_for(env, out))
        assert time.perf_counter() - t0 < 2
        assert not (out / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died (SIGKILL): its lock file is left, naming it, and the next run takes it over
    assert json.loads((out / ".lock").read_text())["pid"] == holder.pid
    with RunLock(out):
        assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()
    RunLock(out).release()  # released: taken again


def test_stale_lock_is_taken_over_and_released_after_the_run(env, run, tmp_path):
    out = copy_run(run, tmp_path)
    (out / ".lock").write_text(json.dumps({"host": "gone", "pid": 999999, "started": "earlier"}))
    assert train(cfg_for(env, out))["steps"] == 2  # a resume of the finished run: restored, nothing to train
    RunLock(out).release()  # released at the end
    with pytest.raises(TrainError, match="max_steps=2.*max_steps=5"):
        train(cfg_for(env, out, max_steps=5))
    RunLock(out).release()  # and after an error


def test_two_processes_racing_for_the_lock_one_wins_in_20_tries(tmp_path):
    """Fast twin of test_two_concurrent_runs_one_refused_one_whole: 20 pairs of cheap processes (no JAX), each pair
    taking one directory's lock at the same instant: every time one holds it and the other is refused, naming it."""
    start = time.time() + 1.0
    pairs = []
    for i in range(20):
        d = tmp_path / str(i)
        d.mkdir()
        pairs.append([hold_lock(d, start=start, hold=0.5) for _ in range(2)])
    for a, b in pairs:
        outs = [p.communicate(timeout=60)[0] for p in (a, b)]
        codes = sorted(p.returncode for p in (a, b))
        assert codes == [0, 3], outs
        winner = (a, b)[[p.returncode for p in (a, b)].index(0)]
        refusal = [o for o in outs if o.startswith("refused")][0]
        assert f"pid {winner.pid}" in refusal and socket.gethostname() in refusal, refusal


# --- C. a damaged latest checkpoint ---

def _data_files(step_dir: Path) -> list[Path]:
    return sorted((step_dir / "state" / "ocdbt.process_0" / "d").iterdir(), key=lambda f: -f.stat().st_size)


def test_damaged_latest_checkpoint_falls_back_to_the_newest_whole_one(env, run, tmp_path, capfd):
    out = copy_run(run, tmp_path)
    f = _data_files(out / "checkpoints" / "2")[0]
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated
    with pytest.warns(UserWarning, match=r"Damaged checkpoint\(s\) in .*checkpoints: step 2 \(state/\S+ cannot be "
                                         r"read .*\); moved to .*damaged_checkpoints; resuming from step 1"):
        s = train(cfg_for(env, out))
    assert s["steps"] == 2
    assert (out / "damaged_checkpoints" / "2").is_dir()
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]  # 2 saved anew
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception ignored" not in err, err[-2000:]
    # the step saved anew holds the fingerprint of what this run read
    saved = checkpointing.RunCheckpoints(out / "checkpoints").read_run(2)["fingerprint"]
    assert saved["data"]["records"] == 8 and saved["data"]["path"] == str(env[2])
    assert "model.safetensors" in saved["model"]["files"]


def test_no_whole_checkpoint_is_one_line(env, run, tmp_path, capfd):
    out = copy_run(run, tmp_path)
    f = _data_files(out / "checkpoints" / "2")[0]
    f.write_bytes(f.read_bytes()[:100])  # truncated
    _data_files(out / "checkpoints" / "1")[0].unlink()  # deleted
    capfd.readouterr()
    with pytest.raises(TrainError, match=r"No checkpoint in .*checkpoints reads back whole \(step\(s\) 2, 1; step 2: "
                                         r"state/\S+ cannot be read .*\); move that directory away"):
        train(cfg_for(env, out))
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception ignored" not in err, err[-2000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]  # left as is


# --- D. an unusable --output ---

def test_output_under_a_file_or_a_file_is_one_line(env, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    with pytest.raises(TrainError, match=rf"--output {tmp_path}/f/run cannot be created: {tmp_path}/f is a file"):
        train(cfg_for(env, tmp_path / "f" / "run"))
    with pytest.raises(TrainError, match=rf"--output {tmp_path}/f is a file, not a directory"):
        train(cfg_for(env, tmp_path / "f"))
    root, model, data = env
    rc = cli_main(["train", "--model", str(model), "--data", str(data), "--output", str(tmp_path / "f"),
                   "--max-steps", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "is a file, not a directory" in err, err


def test_output_in_a_read_only_directory_is_one_line(env, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: the error chmod would give, made by hand
        real = Path.mkdir

        def mkdir(self, *a, **kw):
            if self.parent == ro:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self, *a, **kw)
        monkeypatch.setattr(Path, "mkdir", mkdir)
    else:
        ro.chmod(0o500)
    try:
        with pytest.raises(TrainError, match=rf"--output {ro}/run: permission denied on {ro}/run"):
            train(cfg_for(env, ro / "run"))
    finally:
        ro.chmod(0o700)


# --- E. no orbax traceback after an early error ---

def test_early_error_closes_the_checkpoint_manager(env, tmp_path, monkeypatch):
    """Fast twin of test_early_errors_print_one_line_every_time: a run failing early (a missing data file) closes
    its checkpoint manager, whose background cleanup is already done, so nothing of orbax runs at exit."""
    made = []
    real = checkpointing.RunCheckpoints.__init__

    def init(self, *a, **kw):
        real(self, *a, **kw)
        made.append(self)
    monkeypatch.setattr(checkpointing.RunCheckpoints, "__init__", init)
    with pytest.raises(FileNotFoundError):
        train(cfg_for(env, tmp_path / "o", data=str(tmp_path / "missing.json")))
    assert len(made) == 1 and made[0]._closed
    assert getattr(made[0].manager, "_cleanup_tmp_directory_future", None) is None


@pytest.mark.slow  # ~15 s; fast twin: test_early_error_closes_the_checkpoint_manager
def test_early_errors_print_one_line_every_time(env, tmp_path, run_python):
    """The CLI failing early (a missing data file) six times: stderr is the one error line each time (orbax's
    "cannot schedule new futures after interpreter shutdown" traceback followed it about half the time)."""
    root, model, data = env
    for i in range(6):
        r = run_python(["-m", "vipllava_jax.cli", "train", "--model", model, "--data", tmp_path / "missing.json",
                        "--output", tmp_path / f"o{i}", "--max-steps", "1", "--no-progress"])
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "missing.json" in r.stderr, r.stderr[-3000:]


@pytest.mark.slow  # ~3 min; fast twin: test_two_processes_racing_for_the_lock_one_wins_in_20_tries (the same race on
# the lock alone) and test_second_run_refuses_at_once_naming_the_holder (a train() refused by a live holder)
def test_two_concurrent_runs_one_refused_one_whole(env, tmp_path, run_python):
    """Two CLI runs on one --output started together, 20 times: one is refused in one line naming the other (exit
    2), the other ends whole (its model exported, every step logged)."""
    root, model, data = env
    child_env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                     JAX_PLATFORMS="cpu")
    for i in range(20):
        out = tmp_path / f"o{i}"
        args = [sys.executable, "-m", "vipllava_jax.cli", "train", "--model", str(model), "--data", str(data),
                "--image-folder", str(root / "images"), "--output", str(out), "--stage", "projector",
                "--max-steps", "2", "--batch-size", "2", "--max-length", "64", "--length-buckets", "64",
                "--devices", "1", "--system-prompt", "", "--no-progress"]
        procs = [subprocess.Popen(args, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
        outs = [p.communicate(timeout=300) for p in procs]
        codes = [p.returncode for p in procs]
        assert sorted(codes) == [0, 2], outs
        loser = codes.index(2)
        err = outs[loser][1]
        assert err.count("\n") == 1 and f"pid {procs[1 - loser].pid}" in err and "is in use" in err, err
        assert (out / "hf" / "model.safetensors").exists()
        assert [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()
                if "loss" in json.loads(ln)] == [1, 2]
