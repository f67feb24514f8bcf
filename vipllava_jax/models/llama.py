"""Llama decoder: GQA, RoPE (default, linear, dynamic, llama3), RMSNorm, SwiGLU.

Einsum letters: B batch, T query length, S kv length (cache slots), N query heads,
K kv heads, H head dim, D model dim, F mlp dim, L layers.

The KV cache is an explicit pytree (`KVCache`) passed in and returned. All rows
share one write position (`index`): prompts are left padded so every row ends at
the same slot, and each row's RoPE position comes from its own `positions`.
A ring cache (``KVCache.ring``, the serving engine's) wraps that position modulo
the cache length and attends to every slot its mask marks, in any order.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn
from flax import struct

from .config import LlamaConfig, Runtime, check_runtime
from .layers import ACTIVATIONS, LORA_COLLECTION, REMAT_POLICIES, RMSNorm, attention, dense, logical
from .quantize import QuantConfig

Array = jax.Array

def rope_inv_freq(cfg: LlamaConfig, seq_len: Array | None = None) -> Array:
    """[H/2] inverse frequencies, as transformers' ROPE_INIT_FUNCTIONS compute them (fp32)."""
    dim = cfg.head_dim
    rs = cfg.rope_scaling
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    base = jnp.float32(cfg.rope_theta)
    if rs.rope_type == "dynamic" and seq_len is not None:
        # Stateless form of HF's dynamic NTK: rescale the base once the sequence
        # outgrows max_position_embeddings.
        mp = cfg.max_position_embeddings
        seq = jnp.maximum(seq_len.astype(jnp.float32), mp)
        base = base * ((rs.factor * seq / mp) - (rs.factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** exponents)
    if rs.rope_type == "linear":
        inv_freq = inv_freq / rs.factor
    elif rs.rope_type == "llama3":
        old = rs.original_max_position_embeddings
        low_wl, high_wl = old / rs.low_freq_factor, old / rs.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > low_wl, inv_freq / rs.factor, inv_freq)
        smooth = (old / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        inv_freq = jnp.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(cfg: LlamaConfig, positions: Array) -> tuple[Array, Array]:
    """positions [B, T] -> cos, sin [B, T, H] in fp32 (HF's cat(freqs, freqs) layout)."""
    inv_freq = rope_inv_freq(cfg, jnp.max(positions) + 1)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x [B, T, N, H]; cos/sin [B, T, H]."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    h = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)
    return x * cos + rot * sin


@struct.dataclass
class KVCache:
    """k, v: one [B, K, S, H] array per layer (a tuple), or stacked [L, B, K, S, H] when layers are scanned.
    mask [B, S]: the slot holds a real token. index: int32 scalar, the next slot to write, shared by all rows.

    ring (static, default False): a ring buffer for one token per row per call (T = 1), as the serving engine
    (`generation.engine`) uses it: the index wraps modulo S, and a query attends to every slot its row's mask
    marks (not only slots below the index), so a row's tokens may sit anywhere in the ring. RoPE is applied
    before caching, so the slot order does not matter."""

    k: Any
    v: Any
    mask: Array
    index: Array
    ring: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def init(cls, cfg: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32, *,
             scan_layers: bool = False) -> "KVCache":
        """Zeros for ``batch`` rows of ``max_len`` slots; stacked when the layers are (``Runtime.scan_layers``)."""
        # [B, K, S, H]: kv heads before slots, so decode attention is a matmul batched over (B, K) reading the
        # cache in place. With [B, S, K, H] XLA wrote a transposed copy of every layer's whole cache per decode
        # step (on CPU 70% of the demo model's step at 16 rows; bench/README.md).
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        if scan_layers:
            k = jnp.zeros((cfg.num_hidden_layers,) + shape, dtype)
            v = jnp.zeros((cfg.num_hidden_layers,) + shape, dtype)
        else:
            k = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers))
            v = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers))
        return cls(k=k, v=v, mask=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.mask.shape[1]


@struct.dataclass
class DecoderOutput:
    last_hidden_state: Array  # [B, T, D] after the final norm
    cache: KVCache | None = None
    hidden_states: Array | None = None  # [L+1, B, T, D]: embeddings, then each layer (HF's convention)


# Logical axes of a KVCache's k / v arrays ([B, K, S, H]) and mask ([B, S]); the rules table (parallel.rules)
# maps them to the mesh.
CACHE_KV_AXES = ("cache_batch", "cache_kv_heads", "cache_length", "head_dim")
CACHE_MASK_AXES = ("cache_batch", "cache_length")


class LlamaAttention(nn.Module):
    config: LlamaConfig
    runtime: Runtime = Runtime()
    dtype: Any = jnp.float32
    quant: QuantConfig | None = None  # the projections' kernels quantized (models.quantize)

    @nn.compact
    def __call__(self, x, cos, sin, mask, layer_cache, index):
        c = self.config
        n, k_, h, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size
        b, t, _ = x.shape
        lin = functools.partial(dense, use_bias=c.attention_bias, dtype=self.dtype, lora=True, quant=self.quant)  # adapter-aware
        q = lin(n * h, ("embed", "heads"), name="q_proj")(x)
        k = lin(k_ * h, ("embed", "kv_heads"), name="k_proj")(x)
        v = lin(k_ * h, ("embed", "kv_heads"), name="v_proj")(x)
        q = apply_rope(q.reshape(b, t, n, h), cos, sin)
        k = apply_rope(k.reshape(b, t, k_, h), cos, sin)
        v = v.reshape(b, t, k_, h)
        q = nn.with_logical_constraint(q, ("batch", "length", "act_heads", "head_dim"))
        if layer_cache is not None:
            ck, cv = layer_cache
            # One scalar write position for the whole batch keeps this an in-place update. The new [B, T, K, H]
            # rows are turned to the cache's [B, K, T, H] (small); the cache itself is read as it lies.
            ck = jax.lax.dynamic_update_slice(ck, k.swapaxes(1, 2).astype(ck.dtype), (0, 0, index, 0))
            cv = jax.lax.dynamic_update_slice(cv, v.swapaxes(1, 2).astype(cv.dtype), (0, 0, index, 0))
            ck = nn.with_logical_constraint(ck, CACHE_KV_AXES)
            cv = nn.with_logical_constraint(cv, CACHE_KV_AXES)
            k, v, layer_cache = ck.astype(self.dtype), cv.astype(self.dtype), (ck, cv)
        o = attention(q, k, v, mask, h**-0.5, self.runtime.attn_impl, kv_heads_first=layer_cache is not None)
        o = o.reshape(b, t, n * h)
        o = lin(d, ("heads", "embed"), name="o_proj")(o)
        return o, layer_cache


class LlamaMLP(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32
    quant: QuantConfig | None = None

    @nn.compact
    def __call__(self, x):
        c = self.config
        lin = functools.partial(dense, use_bias=c.mlp_bias, dtype=self.dtype, lora=True, quant=self.quant)  # adapter-aware
        g = lin(c.intermediate_size, ("embed", "mlp"), name="gate_proj")(x)
        u = lin(c.intermediate_size, ("embed", "mlp"), name="up_proj")(x)
        y = nn.with_logical_constraint(ACTIVATIONS[c.hidden_act](g) * u, ("batch", "length", "act_mlp"))
        return lin(c.hidden_size, ("mlp", "embed"), name="down_proj")(y)


class LlamaDecoderLayer(nn.Module):
    config: LlamaConfig
    runtime: Runtime = Runtime()
    dtype: Any = jnp.float32
    quant: QuantConfig | None = None

    @nn.compact
    def __call__(self, x, layer_cache, cos, sin, mask, index):
        """x [B, T, D]; layer_cache (k, v) [B, K, S, H] or None. Returns (x, (x, layer_cache))."""
        c = self.config
        a, layer_cache = LlamaAttention(c, self.runtime, self.dtype, self.quant, name="self_attn")(
            RMSNorm(c.rms_norm_eps, self.dtype, name="input_layernorm")(x), cos, sin, mask, layer_cache, index)
        x = x + a
        x = x + LlamaMLP(c, self.dtype, self.quant, name="mlp")(RMSNorm(c.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x))
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        return x, (x, layer_cache)


def causal_mask(attention_mask: Array | None, cache: KVCache | None, b: int, t: int) -> tuple[Array, Array | None]:
    """bool [B, T, S] mask and the cache's updated slot mask ([B, S] or None)."""
    am = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    if cache is None:
        q_slot = jnp.arange(t)
        return (jnp.arange(t)[None, :] <= q_slot[:, None])[None] & am[:, None, :], None
    slot_mask = jax.lax.dynamic_update_slice(cache.mask, am, (0, cache.index))
    if cache.ring:
        if t != 1:
            raise ValueError(f"a ring KVCache takes one token per row per call, got {t}")
        return slot_mask[:, None, :], slot_mask
    q_slot = cache.index + jnp.arange(t)
    causal = jnp.arange(cache.max_len)[None, :] <= q_slot[:, None]  # [T, S]
    return causal[None] & slot_mask[:, None, :], slot_mask


class LlamaModel(nn.Module):
    """HF ``LlamaModel`` without the lm_head (which VipLlava keeps at the top level). ``quant``: the decoder
    layers' linear kernels quantized (`models.quantize`)."""

    config: LlamaConfig
    runtime: Runtime = Runtime()
    dtype: Any = jnp.float32
    quant: QuantConfig | None = None

    def setup(self):
        check_runtime(self.runtime, "LlamaModel")
        c, rt = self.config, self.runtime
        self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype,
                                     embedding_init=logical(nn.initializers.normal(0.02), ("vocab", "embed")))
        layer_cls = LlamaDecoderLayer
        if rt.remat_policy != "none":
            layer_cls = nn.remat(layer_cls, policy=REMAT_POLICIES[rt.remat_policy], prevent_cse=not rt.scan_layers)
        if rt.scan_layers:
            self.layers = nn.scan(
                layer_cls, variable_axes={"params": 0, LORA_COLLECTION: 0}, split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=c.num_hidden_layers, metadata_params={nn.PARTITION_NAME: "layers"})(c, rt, self.dtype, self.quant)
        else:
            self.layers = [layer_cls(c, rt, self.dtype, self.quant, name=f"layers_{i}") for i in range(c.num_hidden_layers)]
        self.norm = RMSNorm(c.rms_norm_eps, self.dtype)

    def embed(self, input_ids: Array) -> Array:
        return self.embed_tokens(input_ids)

    def attend(self, x: Array) -> Array:
        """Tied lm_head: x [B, T, D] -> [B, T, V]."""
        return self.embed_tokens.attend(x)

    def __call__(self, inputs_embeds: Array, positions: Array, attention_mask: Array | None = None,
                 cache: KVCache | None = None, return_hidden_states: bool = False) -> DecoderOutput:
        """inputs_embeds [B, T, D]; positions [B, T] RoPE positions; attention_mask [B, T] (1 = token)."""
        c = self.config
        b, t, _ = inputs_embeds.shape
        x = nn.with_logical_constraint(inputs_embeds.astype(self.dtype), ("batch", "length", "act_embed"))
        cos, sin = rope_cos_sin(c, positions)
        mask, slot_mask = causal_mask(attention_mask, cache, b, t)
        index = None if cache is None else cache.index
        if self.runtime.scan_layers:
            layer_cache = None if cache is None else (cache.k, cache.v)
            x, (hs, layer_cache) = self.layers(x, layer_cache, cos, sin, mask, index)
            new_k, new_v = (None, None) if cache is None else layer_cache
        else:
            hs, new_k, new_v = [], [], []
            for i, layer in enumerate(self.layers):
                lc = None if cache is None else (cache.k[i], cache.v[i])
                x, (h, lc) = layer(x, lc, cos, sin, mask, index)
                hs.append(h)
                if lc is not None:
                    new_k.append(lc[0])
                    new_v.append(lc[1])
            hs = jnp.stack(hs) if return_hidden_states else None
            new_k, new_v = tuple(new_k), tuple(new_v)
        new_cache = None
        if cache is not None:
            index = (cache.index + t) % cache.max_len if cache.ring else cache.index + t
            new_cache = KVCache(k=new_k, v=new_v, mask=slot_mask, index=index, ring=cache.ring)
        hidden_states = None
        if return_hidden_states:
            hidden_states = jnp.concatenate([inputs_embeds.astype(self.dtype)[None], hs], axis=0)
        return DecoderOutput(last_hidden_state=self.norm(x), cache=new_cache, hidden_states=hidden_states)
