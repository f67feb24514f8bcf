"""Two processes on localhost (jax.distributed + gloo CPU collectives, 4 CPU devices each) load the tiny
checkpoint sharded across both (from safetensors and from orbax) and get the logits and greedy tokens of the
single-process, unsharded run. Each process reads only the slices its own devices hold."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from vipllava_jax import load_pretrained
from vipllava_jax.checkpoints import save_orbax
from vipllava_jax.generation import generate
from vipllava_jax.testing import TINY_IMAGE_TOKEN, make_tiny_checkpoint
from vipllava_jax.testing.parity import rel_err

WORKER = Path(__file__).with_name("multihost_worker.py")
MESHES = ("data=2,fsdp=2,tensor=2", "fsdp=4,tensor=2")
MAX_NEW = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def inputs(rng, b=4, n_img=25):
    t = n_img + 12
    ids = rng.integers(3, 99, (b, t))
    mask = np.ones_like(ids)
    for r in range(b):
        ids[r, 4 + r:4 + r + n_img] = TINY_IMAGE_TOKEN
    mask[1, :3] = 0
    ids[1, :3] = 101
    return ids, rng.standard_normal((b, 3, 30, 30)).astype(np.float32), mask


def test_two_processes_match_single_process(tmp_path):
    ckpt, orbax_dir, out = tmp_path / "hf", tmp_path / "orbax", tmp_path / "out"
    out.mkdir()
    make_tiny_checkpoint(ckpt, num_key_value_heads=2, vocab_size=128)
    module, params = load_pretrained(ckpt, progress=False)
    save_orbax(params, module.config, orbax_dir)
    ids, pixels, mask = inputs(np.random.default_rng(0))
    np.savez(tmp_path / "inputs.npz", ids=ids, pixels=pixels, mask=mask)
    ref = np.asarray(jax.jit(module.apply)({"params": params}, ids, pixels, mask).logits)
    ref_tokens = generate(module, params, ids, pixels, mask, max_new_tokens=MAX_NEW)

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    # The workers import the package from this checkout even when it is not pip-installed.
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    procs = [subprocess.Popen(
        [sys.executable, str(WORKER), "--coordinator", f"localhost:{port}", "--num-processes", "2",
         "--process-id", str(i), "--ckpt", str(ckpt), "--orbax", str(orbax_dir), "--inputs",
         str(tmp_path / "inputs.npz"), "--out", str(out), "--max-new-tokens", str(MAX_NEW)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=400)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"process {i} failed:\n{log[-5000:]}"

    total = sum(x.nbytes for x in jax.tree.leaves(params))
    for i in range(2):
        info = json.loads((out / f"proc{i}.json").read_text())
        assert (info["process_index"], info["process_count"]) == (i, 2)
        assert (info["device_count"], info["local_device_count"]) == (8, 4)
        # data=2 spans the two processes: each holds a full replica, so each reads every byte once.
        assert info["read_bytes"]["data=2,fsdp=2,tensor=2"] == total
        # fsdp=4 spans them: each process reads about half (replicated norms/biases in full).
        assert info["read_bytes"]["fsdp=4,tensor=2"] < 0.6 * total
        res = np.load(out / f"proc{i}.npz")
        for spec in MESHES:
            for src in ("safetensors", "orbax"):
                assert rel_err(res[f"{spec}|{src}|logits"], ref) < 1e-5, (i, spec, src)
            np.testing.assert_array_equal(res[f"{spec}|safetensors|tokens"], ref_tokens)
    # the checkpoint both processes wrote restores in one process to the same parameters
    _, saved = load_pretrained(out / "saved_by_two")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_distributed_flags_and_single_process_noop(monkeypatch):
    import argparse
    from vipllava_jax.parallel import distributed
    for v in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(v, raising=False)
    ap = distributed.add_distributed_args(argparse.ArgumentParser())
    a = ap.parse_args(["--coordinator", "10.0.0.1:1234", "--num-processes", "4", "--process-id", "3",
                       "--local-device-ids", "0,1", "--mesh", "data=2,fsdp=2"])
    assert (a.coordinator, a.num_processes, a.process_id, a.local_device_ids, a.mesh) == \
        ("10.0.0.1:1234", 4, 3, [0, 1], "data=2,fsdp=2")
    if distributed.cluster_detected() is None:
        assert distributed.initialize_from_args(ap.parse_args([])) is False  # one process: nothing to do
        with pytest.raises(ValueError, match="--coordinator HOST:PORT is required"):
            distributed.initialize(num_processes=2, process_id=0)
    with pytest.raises(ValueError, match=r"--process-id 2 is out of range for --num-processes 2"):
        distributed.initialize("localhost:1", num_processes=2, process_id=2)
