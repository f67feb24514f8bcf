"""Shared fixtures: the tiny random checkpoint and its processor, the tiny model loaded once, the shipped demo model
loaded once, and a runner for Python in a fresh process with N CPU devices.

Session-scoped fixtures are built once per test process (once per xdist worker). Tests must not write into the
directories they return: copy first (`shutil.copytree(tiny_hf, tmp_path / "m")`).
"""
import dataclasses
import gc
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

# Parity tests compare against PyTorch at fp32: XLA's default CPU/TPU matmul precision is lower.
jax.config.update("jax_default_matmul_precision", "highest")

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class TinyCheckpoint:
    path: Path  # an HF directory: config.json, model.safetensors, tokenizer and processor files
    torch_model: object  # transformers' VipLlavaForConditionalGeneration it was saved from (eval mode, fp32)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> TinyCheckpoint:
    """`make_tiny_checkpoint`'s defaults (seed 0) with `make_tiny_processor`'s (30 px, 25 image tokens)."""
    from vipllava_jax.testing import make_tiny_checkpoint, make_tiny_processor
    d = tmp_path_factory.mktemp("tiny") / "hf"
    tm = make_tiny_checkpoint(d)
    make_tiny_processor(d, image_seq_length=25, image_size=30)
    return TinyCheckpoint(d, tm)


@pytest.fixture(scope="session")
def tiny_hf(tiny_checkpoint) -> Path:
    return tiny_checkpoint.path


@pytest.fixture(scope="session")
def tiny_model(tiny_hf):
    """(module, params) of the tiny checkpoint, fp32, loaded once."""
    from vipllava_jax import load_pretrained
    return load_pretrained(tiny_hf, progress=False)


@pytest.fixture(scope="session")
def demo_model():
    """(module, params, processor) of the shipped demo model, fp32, loaded once; skips where none is shipped."""
    import jax.numpy as jnp

    from vipllava_jax import load_pretrained
    from vipllava_jax.data import Processor
    from vipllava_jax.evals.demo import demo_model_path, shipped_model_available
    if not shipped_model_available():
        pytest.skip("no trained demo model is shipped")
    path = demo_model_path()
    module, params = load_pretrained(path, jnp.float32, progress=False)
    return module, params, Processor.from_pretrained(path)


def subprocess_env(devices: int | None = None, **extra) -> dict:
    """The environment for a child Python: this checkout first on the path (also when it is not pip-installed),
    JAX on the CPU with `devices` host devices (None: XLA_FLAGS left out, so one device)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env["JAX_PLATFORMS"] = "cpu"
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def run_python():
    """run_python(args, devices=None, timeout=600, **env) -> CompletedProcess: `python *args` in a fresh process
    with `devices` CPU devices (see `subprocess_env`), output captured as text, never raising on a non-zero exit."""
    def run(args, devices: int | None = None, timeout: float = 600, **env):
        return subprocess.run([sys.executable, *map(str, args)], env=subprocess_env(devices, **env),
                              capture_output=True, text=True, timeout=timeout)
    return run


def pytest_sessionfinish(session, exitstatus):
    """Finalize the suite's garbage here, before the terminal summary: tests that break orbax's reads and writes
    leave coroutines and tasks holding errors, and a plugin's summary hook (hypothesis's) imports a module under
    assertion rewriting. On Python 3.11 a finalizer that formats a traceback while an ``ast.parse`` runs makes that
    parse fail ("SystemError: AST constructor recursion depth mismatch"), which crashed a CI run."""
    gc.collect()
