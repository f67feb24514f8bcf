"""Building blocks shared by the vision tower and the decoder.

Einsum letters: B batch, T query length, S key/value length, N query heads,
K kv heads, G query heads per kv head (N = K * G), H head dim, D model dim.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import flax.linen as nn

from .quantize import QuantConfig, with_quantized_kernel

Array = jax.Array

# HF activation names -> functions. Exactly the math of transformers.activations.
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
}


def check_activation(name: str, field: str) -> str:
    if name not in ACTIVATIONS:
        raise ValueError(f"Unsupported activation {field}={name!r}; supported: {sorted(ACTIVATIONS)}")
    return name


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def check_remat(policy: str) -> str:
    if policy not in REMAT_POLICIES:
        raise ValueError(f"Unknown remat_policy {policy!r}; choose from {sorted(REMAT_POLICIES)}")
    return policy


def logical(init, names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(init, names)


# The variable collection of low-rank adapters (`LoraDense`): beside "params", never in it.
LORA_COLLECTION = "lora"


class LoraDense(nn.Dense):
    """nn.Dense (the same "kernel" / "bias" params) that adds a low-rank adapter when the "lora" collection holds
    one at this module's path: ``y = x W + b + (x A) B`` with ``lora_a`` A [in, r] and ``lora_b`` B [r, out], the
    LoRA scale alpha / r already folded into B by whoever passes the collection (training.lora). The adapter is
    never merged into W: a gradient taken with respect to A and B only never forms a full-size [in, out] weight
    gradient, and W may stay frozen, bf16 or quantized. Without a "lora" collection it is exactly nn.Dense.
    A and B are cast to the compute dtype (fp32 master copies, bf16 compute)."""

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        y = super().__call__(inputs)
        if not self.has_variable(LORA_COLLECTION, "lora_a"):
            return y
        a = self.get_variable(LORA_COLLECTION, "lora_a")
        b = self.get_variable(LORA_COLLECTION, "lora_b")
        x, a, b = nn.dtypes.promote_dtype(inputs, a, b, dtype=self.dtype)
        return y + jnp.dot(jnp.dot(x, a), b).astype(y.dtype)


def dense(features: int, names: tuple[str, str], *, use_bias: bool, dtype, name: str,
          lora: bool = False, quant: QuantConfig | None = None) -> nn.Dense:
    """A Dense whose kernel [in, out] and bias [out] carry logical axis names; ``lora``: a `LoraDense`, which
    also adds the adapter the "lora" collection holds for it (if any); ``quant``: the kernel quantized
    (`quantize.QuantDense`; with ``lora`` the adapter sits on the quantized kernel: QLoRA)."""
    cls = LoraDense if lora else nn.Dense
    if quant is not None:
        return with_quantized_kernel(cls)(features, use_bias=use_bias, dtype=dtype, quant=quant, names=tuple(names),
                                          bias_init=logical(nn.initializers.zeros_init(), (names[1],)), name=name)
    return cls(
        features,
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=logical(nn.initializers.lecun_normal(), names),
        bias_init=logical(nn.initializers.zeros_init(), (names[1],)),
        name=name,
    )


def layer_norm(eps: float, axis_name: str, *, dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        scale_init=logical(nn.initializers.ones_init(), (axis_name,)),
        bias_init=logical(nn.initializers.zeros_init(), (axis_name,)),
        name=name,
    )


class RMSNorm(nn.Module):
    """Llama RMSNorm: normalise in fp32, cast back, then scale (HF's order)."""

    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", logical(nn.initializers.ones_init(), ("norm",)), (x.shape[-1],))
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * xf.astype(self.dtype)


ATTN_IMPLS = ("auto", "cudnn", "xla", "jax")


def check_attn_impl(impl: str) -> str:
    if impl not in ATTN_IMPLS:
        raise ValueError(f"Unknown attn_impl={impl!r}; choose from {ATTN_IMPLS}")
    return impl


def _use_cudnn(q: Array, t: int) -> bool:
    return (
        jax.default_backend() == "gpu"
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and t > 1
    )


def attention(q: Array, k: Array, v: Array, mask: Array | None, scale: float, impl: str = "auto", *,
              kv_heads_first: bool = False) -> Array:
    """Scaled dot-product attention with grouped kv heads.

    q: [B, T, N, H]; k, v: [B, S, K, H], or [B, K, S, H] with ``kv_heads_first`` (the KV cache's layout);
    mask: bool [B, T, S] (True = attend) or None.
    Returns [B, T, N, H]. ``impl``: "auto" (cuDNN on GPU for bf16/fp16 prefill,
    the einsum path otherwise), "cudnn", "xla" (the einsum path below) or "jax"
    (``jax.nn.dot_product_attention`` choosing its own implementation; it takes
    the same arguments as the cuDNN call, so CPU tests check that call's layout).
    """
    b, t, n, h = q.shape
    kh = k.shape[1 if kv_heads_first else 2]
    check_attn_impl(impl)
    if impl in ("cudnn", "jax") or (impl == "auto" and _use_cudnn(q, t)):
        if kv_heads_first:  # the fused kernel takes [B, S, K, H]; a prefill pays this copy once
            k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)
        m = None if mask is None else mask[:, None, :, :]  # [B, 1, T, S], broadcast over heads
        return jax.nn.dot_product_attention(q, k, v, mask=m, scale=scale,
                                            implementation=None if impl == "jax" else "cudnn")
    g = n // kh
    qg = q.reshape(b, t, kh, g, h)
    kv = "bksh" if kv_heads_first else "bskh"
    logits = jnp.einsum(f"btkgh,{kv}->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        # A large finite value, not -inf: a fully masked row (a left-pad query)
        # then gives a uniform row instead of NaN, as HF does.
        logits = jnp.where(mask[:, None, None, :, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum(f"bkgts,{kv}->btkgh", probs, v)
    return out.reshape(b, t, n, h)
