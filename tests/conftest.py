import gc

import jax

# Parity tests compare against PyTorch at fp32: XLA's default CPU/TPU matmul precision is lower.
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_sessionfinish(session, exitstatus):
    """Finalize the suite's garbage here, before the terminal summary: tests that break orbax's reads and writes
    leave coroutines and tasks holding errors, and a plugin's summary hook (hypothesis's) imports a module under
    assertion rewriting. On Python 3.11 a finalizer that formats a traceback while an ``ast.parse`` runs makes that
    parse fail ("SystemError: AST constructor recursion depth mismatch"), which crashed a CI run."""
    gc.collect()
