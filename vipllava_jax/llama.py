"""Llama decoder: GQA, RoPE (default, linear, dynamic, llama3), RMSNorm, SwiGLU.

Einsum letters: B batch, T query length, S kv length (cache slots), N query heads,
K kv heads, H head dim, D model dim, F mlp dim, L layers.

The KV cache is an explicit pytree (`KVCache`) passed in and returned. All rows
share one write position (`index`): prompts are left padded so every row ends at
the same slot, and each row's RoPE position comes from its own `positions`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn
from flax import struct

from .layers import (ACTIVATIONS, REMAT_POLICIES, RMSNorm, attention, check_activation, check_attn_impl,
                     check_field_types, check_remat,
                     dense, logical)

Array = jax.Array

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float | None = None  # llama3
    high_freq_factor: float | None = None  # llama3
    original_max_position_embeddings: int | None = None  # llama3

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"Unsupported rope type {self.rope_type!r}; supported: {list(ROPE_TYPES)}")
        if self.rope_type == "llama3" and None in (self.low_freq_factor, self.high_freq_factor,
                                                   self.original_max_position_embeddings):
            raise ValueError("rope type 'llama3' needs factor, low_freq_factor, high_freq_factor and "
                             "original_max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32064
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    # Not HF fields: how the JAX module is laid out and run.
    scan_layers: bool = False
    remat_policy: str = "none"
    attn_impl: str = "auto"

    def __post_init__(self):
        check_activation(self.hidden_act, "text_config.hidden_act")
        check_remat(self.remat_policy)
        check_attn_impl(self.attn_impl)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"text_config.num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")

    _HF_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "attention_bias",
                  "mlp_bias", "hidden_act", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")

    @classmethod
    def from_hf(cls, d: dict, **overrides) -> "LlamaConfig":
        mt = d.get("model_type", "llama")
        if mt != "llama":
            raise ValueError(f"text_config has model_type {mt!r}; only Llama decoders ('llama') are supported")
        check_field_types(d, "text_config.", positive=(
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings"), ints=("num_key_value_heads", "head_dim", "bos_token_id", "eos_token_id",
                                              "pad_token_id"),
            floats=("rms_norm_eps", "rope_theta"), bools=("attention_bias", "mlp_bias"))
        for f in ("num_key_value_heads", "head_dim"):
            if d.get(f) is not None and d[f] < 1:
                raise ValueError(f"text_config.{f}={d[f]!r} must be a positive integer")
        kw = {f: d[f] for f in cls._HF_FIELDS if f in d}
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = tuple(kw["eos_token_id"])
        if "num_key_value_heads" not in kw or kw["num_key_value_heads"] is None:
            kw["num_key_value_heads"] = d.get("num_attention_heads", cls.num_attention_heads)
        # transformers 5 writes `rope_parameters`; 4.x writes `rope_theta` + `rope_scaling`.
        rp = dict(d.get("rope_parameters") or {})
        rs = dict(d.get("rope_scaling") or {})
        theta = rp.pop("rope_theta", d.get("rope_theta", cls.rope_theta))
        spec = rp or rs
        rope_type = spec.pop("rope_type", spec.pop("type", "default"))
        if float(spec.pop("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError("partial_rotary_factor != 1 is not supported")
        known = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
        if rope_type != "default":
            unknown = set(spec) - known
            if unknown:
                raise ValueError(f"Unsupported rope_scaling fields {sorted(unknown)} for rope type {rope_type!r}")
        kw["rope_theta"] = float(theta)
        kw["rope_scaling"] = RopeScaling(rope_type=rope_type, **{k: v for k, v in spec.items() if k in known}) \
            if rope_type != "default" else RopeScaling()
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self) -> dict:
        out = {f: getattr(self, f) for f in self._HF_FIELDS}
        if isinstance(out["eos_token_id"], tuple):
            out["eos_token_id"] = list(out["eos_token_id"])
        rs = self.rope_scaling
        out["rope_theta"] = self.rope_theta
        if rs.rope_type == "default":
            out["rope_scaling"] = None
        else:
            out["rope_scaling"] = {k: v for k, v in dataclasses.asdict(rs).items() if v is not None}
        out["model_type"] = "llama"
        return out


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
    """k, v: one [B, S, K, H] array per layer (a tuple), or stacked [L, B, S, K, H] when layers are scanned.
    mask [B, S]: the slot holds a real token. index: int32 scalar, the next slot to write, shared by all rows."""

    k: Any
    v: Any
    mask: Array
    index: Array

    @classmethod
    def init(cls, cfg: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        shape = (batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
        if cfg.scan_layers:
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


class LlamaAttention(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, mask, layer_cache, index):
        c = self.config
        n, k_, h, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size
        b, t, _ = x.shape
        q = dense(n * h, ("embed", "heads"), use_bias=c.attention_bias, dtype=self.dtype, name="q_proj")(x)
        k = dense(k_ * h, ("embed", "kv_heads"), use_bias=c.attention_bias, dtype=self.dtype, name="k_proj")(x)
        v = dense(k_ * h, ("embed", "kv_heads"), use_bias=c.attention_bias, dtype=self.dtype, name="v_proj")(x)
        q = apply_rope(q.reshape(b, t, n, h), cos, sin)
        k = apply_rope(k.reshape(b, t, k_, h), cos, sin)
        v = v.reshape(b, t, k_, h)
        q = nn.with_logical_constraint(q, ("batch", "length", "act_heads", "head_dim"))
        if layer_cache is not None:
            ck, cv = layer_cache
            # One scalar write position for the whole batch keeps this an in-place update.
            ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, index, 0, 0))
            cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, index, 0, 0))
            ck = nn.with_logical_constraint(ck, ("cache_batch", "cache_length", "cache_kv_heads", "head_dim"))
            cv = nn.with_logical_constraint(cv, ("cache_batch", "cache_length", "cache_kv_heads", "head_dim"))
            k, v, layer_cache = ck.astype(self.dtype), cv.astype(self.dtype), (ck, cv)
        o = attention(q, k, v, mask, h**-0.5, c.attn_impl).reshape(b, t, n * h)
        o = dense(d, ("heads", "embed"), use_bias=c.attention_bias, dtype=self.dtype, name="o_proj")(o)
        return o, layer_cache


class LlamaMLP(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        g = dense(c.intermediate_size, ("embed", "mlp"), use_bias=c.mlp_bias, dtype=self.dtype, name="gate_proj")(x)
        u = dense(c.intermediate_size, ("embed", "mlp"), use_bias=c.mlp_bias, dtype=self.dtype, name="up_proj")(x)
        y = nn.with_logical_constraint(ACTIVATIONS[c.hidden_act](g) * u, ("batch", "length", "act_mlp"))
        return dense(c.hidden_size, ("mlp", "embed"), use_bias=c.mlp_bias, dtype=self.dtype, name="down_proj")(y)


class LlamaDecoderLayer(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, layer_cache, cos, sin, mask, index):
        """x [B, T, D]; layer_cache (k, v) [B, S, K, H] or None. Returns (x, (x, layer_cache))."""
        c = self.config
        a, layer_cache = LlamaAttention(c, self.dtype, name="self_attn")(
            RMSNorm(c.rms_norm_eps, self.dtype, name="input_layernorm")(x), cos, sin, mask, layer_cache, index)
        x = x + a
        x = x + LlamaMLP(c, self.dtype, name="mlp")(RMSNorm(c.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x))
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        return x, (x, layer_cache)


def causal_mask(attention_mask: Array | None, cache: KVCache | None, b: int, t: int) -> tuple[Array, Array | None]:
    """bool [B, T, S] mask and the cache's updated slot mask ([B, S] or None)."""
    am = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    if cache is None:
        q_slot = jnp.arange(t)
        return (jnp.arange(t)[None, :] <= q_slot[:, None])[None] & am[:, None, :], None
    slot_mask = jax.lax.dynamic_update_slice(cache.mask, am, (0, cache.index))
    q_slot = cache.index + jnp.arange(t)
    causal = jnp.arange(cache.max_len)[None, :] <= q_slot[:, None]  # [T, S]
    return causal[None] & slot_mask[:, None, :], slot_mask


class LlamaModel(nn.Module):
    """HF ``LlamaModel`` without the lm_head (which VipLlava keeps at the top level)."""

    config: LlamaConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype,
                                     embedding_init=logical(nn.initializers.normal(0.02), ("vocab", "embed")))
        layer_cls = LlamaDecoderLayer
        if c.remat_policy != "none":
            layer_cls = nn.remat(layer_cls, policy=REMAT_POLICIES[c.remat_policy], prevent_cse=not c.scan_layers)
        if c.scan_layers:
            self.layers = nn.scan(
                layer_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=c.num_hidden_layers, metadata_params={nn.PARTITION_NAME: "layers"})(c, self.dtype)
        else:
            self.layers = [layer_cls(c, self.dtype, name=f"layers_{i}") for i in range(c.num_hidden_layers)]
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
        if c.scan_layers:
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
            new_cache = KVCache(k=new_k, v=new_v, mask=slot_mask, index=cache.index + t)
        hidden_states = None
        if return_hidden_states:
            hidden_states = jnp.concatenate([inputs_embeds.astype(self.dtype)[None], hs], axis=0)
        return DecoderOutput(last_hidden_state=self.norm(x), cache=new_cache, hidden_states=hidden_states)
