"""Logits processors with HF's semantics and order (``RepetitionPenaltyLogitsProcessor``, then for sampling
``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper``), tested against them, and the token
choice (argmax or a sample)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array


# --- logits processors (HF semantics) ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Static decoding settings (hashable: part of the compiled functions' cache key)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_k is not None and (int(self.top_k) != self.top_k or self.top_k < 0):
            raise ValueError(f"top_k must be a non-negative integer or None, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def uses_seen(self) -> bool:
        return self.repetition_penalty != 1.0


def apply_repetition_penalty(logits: Array, seen: Array, penalty: float) -> Array:
    """HF's RepetitionPenaltyLogitsProcessor: for tokens already in the sequence, divide positive logits by the
    penalty and multiply negative ones by it. logits [B, V] float, seen [B, V] bool."""
    penalized = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalized, logits)


def apply_temperature(logits: Array, temperature: float) -> Array:
    return logits / temperature


def apply_top_k(logits: Array, k: int) -> Array:
    """Keep the k largest logits (ties with the k-th are kept, as in HF), set the rest to -inf."""
    k = min(int(k), logits.shape[-1])
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def apply_top_p(logits: Array, p: float) -> Array:
    """Nucleus filtering as HF does it: sort ascending, drop the tokens whose cumulative probability is at most
    1 - p, always keep the most likely one."""
    order = jnp.argsort(logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = (cum <= 1.0 - p).at[..., -1].set(False)
    remove = jnp.take_along_axis(remove_sorted, jnp.argsort(order, axis=-1), axis=-1)
    return jnp.where(remove, -jnp.inf, logits)


def process_logits(logits: Array, seen: Array | None, sc: SamplingConfig) -> Array:
    """The processor chain HF's generate builds for these settings. logits [B, V] -> [B, V] float32."""
    logits = logits.astype(jnp.float32)
    if sc.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, sc.repetition_penalty)
    if sc.do_sample:
        if sc.temperature != 1.0:
            logits = apply_temperature(logits, sc.temperature)
        if sc.top_k:
            logits = apply_top_k(logits, sc.top_k)
        if sc.top_p is not None and sc.top_p < 1.0:
            logits = apply_top_p(logits, sc.top_p)
    return logits


def select_tokens(logits: Array, seen: Array | None, key: Array, sc: SamplingConfig) -> Array:
    """[B, V] logits -> [B] int32 token ids (argmax, or a sample from the processed distribution)."""
    logits = process_logits(logits, seen, sc)
    if sc.do_sample:
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
