"""Shared fixtures: the tiny random checkpoint and its processor, the tiny model loaded once, and a runner for Python
in a fresh process with N CPU devices.

Session-scoped fixtures are built once per test process (once per xdist worker). Tests must not write into the
directories they return: copy first (`shutil.copytree(tiny_hf, tmp_path / "m")`).
"""
import dataclasses
import gc
import os
import subprocess
import sys
from pathlib import Path

# The suite compiles hundreds of small programs and runs each a few times: LLVM at -O0 compiles them about 30%
# faster (measured on the generation tests: 56 s -> 39 s of CPU). Set before JAX starts its CPU backend; child
# processes inherit it. Tests that train for hundreds of steps run them in a child without it (FULL_OPT_ENV).
O0_FLAG = "--xla_backend_optimization_level=0"
if O0_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {O0_FLAG}".strip()

import jax  # noqa: E402
import pytest  # noqa: E402

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
def tiny_processor(tiny_hf):
    """The tiny checkpoint's `Processor` (its tokenizer, image settings and chat template), loaded once."""
    from vipllava_jax.data import Processor
    return Processor.from_pretrained(tiny_hf)


@pytest.fixture(scope="session")
def tiny_model(tiny_hf):
    """(module, params) of the tiny checkpoint, fp32, loaded once."""
    from vipllava_jax import load_pretrained
    return load_pretrained(tiny_hf, progress=False)


def subprocess_env(devices: int | None = None, *, full_opt: bool = False, **extra) -> dict:
    """The environment for a child Python: this checkout first on the path (also when it is not pip-installed),
    JAX on the CPU with `devices` host devices (None: one), compiled at -O0 unless `full_opt` (XLA's default
    optimization, for children that run many steps of a program rather than compile many programs)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env["JAX_PLATFORMS"] = "cpu"
    flags = ([] if full_opt else [O0_FLAG]) + \
        ([f"--xla_force_host_platform_device_count={devices}"] if devices is not None else [])
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def run_python():
    """run_python(args, devices=None, full_opt=False, timeout=600, **env) -> CompletedProcess: `python *args` in a
    fresh process (see `subprocess_env`), output captured as text, never raising on a non-zero exit."""
    def run(args, devices: int | None = None, full_opt: bool = False, timeout: float = 600, **env):
        return subprocess.run([sys.executable, *map(str, args)], env=subprocess_env(devices, full_opt=full_opt, **env),
                              capture_output=True, text=True, timeout=timeout)
    return run


def pytest_collection_modifyitems(config, items):
    """Tests marked ``long`` (a minute or more) first: with xdist they then start at once, on both workers,
    instead of running alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)  # stable: otherwise as collected


def pytest_sessionfinish(session, exitstatus):
    """Finalize the suite's garbage here, before the terminal summary: tests that break orbax's reads and writes
    leave coroutines and tasks holding errors, and a plugin's summary hook (hypothesis's) imports a module under
    assertion rewriting. On Python 3.11 a finalizer that formats a traceback while an ``ast.parse`` runs makes that
    parse fail ("SystemError: AST constructor recursion depth mismatch"), which crashed a CI run."""
    gc.collect()
