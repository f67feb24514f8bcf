import jax

# Parity tests compare against PyTorch at fp32: XLA's default CPU/TPU matmul precision is lower.
jax.config.update("jax_default_matmul_precision", "highest")
