"""Conversion never loses a checkpoint: --overwrite swaps the new output in atomically (killed at any moment,
the output directory is the old checkpoint or the new one, whole), nothing the run did not create is deleted,
--to-hf honours --overwrite, and a full disk is one clear line with the previous output kept."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vipllava_jax import load_pretrained

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def src(tiny_hf):
    """The shared tiny checkpoint (tests/conftest.py): every conversion reads it, none writes into it."""
    return tiny_hf


def convert(*args) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "vipllava_jax.cli", "convert", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def whole_dtype(out: Path) -> str:
    """The checkpoint's dtype, after checking it loads completely and holds the source's weights."""
    dtypes = json.loads((out / "config.json").read_text())["vipllava_jax"]["dtypes"]
    _, params = load_pretrained(out, dtype=None, progress=False)
    leaves = [np.asarray(x, np.float32) for x in __import__("jax").tree.leaves(params)]
    assert all(np.isfinite(x).all() for x in leaves) and len(leaves) > 30
    assert len(dtypes) == 1
    return dtypes[0]


@pytest.mark.slow  # ~1 min of random kills; test_overwrite_killed_at_each_step_of_the_swap covers every step
def test_overwrite_killed_at_any_moment_leaves_old_or_new_whole(src, tmp_path):
    out = tmp_path / "out"
    p = convert(src, out, "--dtype", "float32")
    assert p.wait(timeout=300) == 0, p.stdout.read()
    t0 = time.perf_counter()
    p = convert(src, out, "--dtype", "bfloat16", "--overwrite")
    assert p.wait(timeout=300) == 0, p.stdout.read()
    duration = time.perf_counter() - t0
    assert whole_dtype(out) == "bfloat16"
    seen = set()
    for i, frac in enumerate((0.5, 0.75, 0.85, 0.92, 0.97, 1.0, 1.03)):
        new = ("float32", "bfloat16")[i % 2]
        p = convert(src, out, "--dtype", new, "--overwrite")
        time.sleep(duration * frac)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
        got = whole_dtype(out)  # the old or the new one, whole
        seen.add(got == new)
    # every leftover is a temporary of ours, never the output's own name
    assert all(".tmp-" in q.name or ".old-" in q.name for q in tmp_path.iterdir() if q.name != "out")


def test_user_directories_beside_the_output_are_never_deleted(src, tmp_path):
    out = tmp_path / "x"
    for name in ("x.partial", "x.tmp", "x.old"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "keep.txt").write_text("mine")
    p = convert(src, out)
    assert p.wait(timeout=300) == 0, p.stdout.read()
    for name in ("x.partial", "x.tmp", "x.old"):
        assert (tmp_path / name / "keep.txt").read_text() == "mine"
    assert sorted(q.name for q in tmp_path.iterdir()) == ["x", "x.old", "x.partial", "x.tmp"]


def test_to_hf_honours_overwrite(src, tmp_path):
    out = tmp_path / "hf"
    p = convert(src, out, "--to-hf")
    assert p.wait(timeout=300) == 0, p.stdout.read()
    before = (out / "model.safetensors").stat().st_mtime_ns
    p = convert(src, out, "--to-hf")
    assert p.wait(timeout=300) == 2 and "already exists" in p.stdout.read()
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    p = convert(src, out, "--to-hf", "--overwrite", "--dtype", "bfloat16")
    assert p.wait(timeout=300) == 0, p.stdout.read()
    assert json.loads((out / "model.safetensors").read_bytes()[8:8 + int.from_bytes(
        (out / "model.safetensors").read_bytes()[:8], "little")])["lm_head.weight" if False else
        "language_model.lm_head.weight"]["dtype"] == "BF16"


def test_full_disk_is_one_line_and_keeps_the_previous_output(src, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=480k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        p = convert(src, mnt / "out", "--dtype", "bfloat16")  # ~240 kB on disk: fits
        assert p.wait(timeout=300) == 0, p.stdout.read()
        p = convert(src, mnt / "out", "--dtype", "float32", "--overwrite")  # ~360 kB more: does not
        log = p.stdout.read()
        assert p.wait(timeout=300) == 2, log
        # the clear line is there, whole (orbax's background threads may still print around it under load, even
        # on the same line: stdout and stderr share the pipe)
        assert any("vipllava-jax convert: error: Disk full while writing" in ln and "kept" in ln
                   for ln in log.strip().splitlines()), log[-3000:]
        assert sorted(q.name for q in mnt.iterdir()) == ["out"]  # the partial output is gone
        assert whole_dtype(mnt / "out") == "bfloat16"
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


# Deterministic kill points: a subprocess runs `convert --overwrite` with one step of the swap patched to
# SIGKILL the process there. Every time, the output is the old checkpoint or the new one, whole.
_KILL_SCRIPT = r"""
import os, signal, sys
import shutil
from vipllava_jax.checkpoints import atomic
from vipllava_jax.cli import main
stage = sys.argv[1]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
real_exchange, real_rmtree, real_replace = atomic.exchange_paths, shutil.rmtree, os.replace
if stage == "before swap":
    atomic.exchange_paths = lambda a, b: die()
elif stage == "after swap":
    def rmtree(p, *a, **k):
        if ".tmp-" in str(p):
            die()
        return real_rmtree(p, *a, **k)
    shutil.rmtree = rmtree
elif stage == "during the orbax write":
    import orbax.checkpoint as ocp
    ocp.StandardCheckpointer.wait_until_finished = lambda self: die()
elif stage == "fallback after both renames":  # a filesystem without RENAME_EXCHANGE
    atomic.exchange_paths = lambda a, b: False
    def rmtree(p, *a, **k):
        if ".old-" in str(p):
            die()
        return real_rmtree(p, *a, **k)
    shutil.rmtree = rmtree
sys.exit(main(["convert", *sys.argv[2:]]))
"""

STAGES = {"during the orbax write": "old", "before swap": "old", "after swap": "new",
          "fallback after both renames": "new"}


@pytest.fixture(scope="module")
def float32_out(src, tmp_path_factory):
    """`convert SRC OUT --dtype float32`, once: each kill test overwrites a copy of it."""
    out = tmp_path_factory.mktemp("atomic_f32") / "out"
    p = convert(src, out, "--dtype", "float32")
    assert p.wait(timeout=300) == 0, p.stdout.read()
    return out


# Two kill points in the default suite (one leaving the old output, one the new); the other two are slow.
@pytest.mark.parametrize("stage", [pytest.param(s, marks=pytest.mark.slow) if s in ("before swap", "after swap")
                                   else s for s in STAGES])
def test_overwrite_killed_at_each_step_of_the_swap(src, float32_out, tmp_path, stage):
    out = tmp_path / "out"
    shutil.copytree(float32_out, out)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, stage, str(src), str(out), "--dtype", "bfloat16",
                        "--overwrite"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert whole_dtype(out) == {"old": "float32", "new": "bfloat16"}[STAGES[stage]]
    # what is left beside it is only this run's temporaries (the other of old / new, or a partial write)
    assert all(".tmp-" in q.name or ".old-" in q.name for q in tmp_path.iterdir() if q.name != "out")
    # and a later run still succeeds beside those leftovers
    p = convert(src, out, "--dtype", "bfloat16", "--overwrite")
    assert p.wait(timeout=300) == 0, p.stdout.read()
    assert whole_dtype(out) == "bfloat16"
