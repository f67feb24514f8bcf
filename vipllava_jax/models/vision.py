"""CLIP ViT vision tower that keeps every hidden state.

Einsum letters: B images, P patches (+1 for CLS), D width, N heads, H head dim.
Hidden state 0 is the embedding output after the pre-layernorm, then one per layer,
exactly as HF's ``CLIPVisionModel(output_hidden_states=True)``.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn
from flax import struct

from .config import CLIPVisionConfig, Runtime, check_runtime
from .layers import ACTIVATIONS, REMAT_POLICIES, attention, dense, layer_norm, logical
from .quantize import QuantConfig

Array = jax.Array


@struct.dataclass
class VisionOutput:
    hidden_states: Array  # [L+1, B, P+1, D]: index 0 = embeddings after pre-layernorm
    pooled: Array  # [B, D]: post_layernorm(CLS of the last layer), as HF's pooler_output


class CLIPEmbeddings(nn.Module):
    config: CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: Array) -> Array:
        """pixel_values [B, C, H, W] (HF layout) -> [B, P+1, D]."""
        c = self.config
        p, d = c.patch_size, c.hidden_size
        b, ch, hh, ww = pixel_values.shape
        if (ch, hh, ww) != (c.num_channels, c.image_size, c.image_size):
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}; expected [num_images, {c.num_channels}, "
                f"{c.image_size}, {c.image_size}]")
        # Same layout as a flax Conv kernel: [p, p, C, D].
        kernel = self.param("patch_embedding", logical(nn.initializers.lecun_normal(), ("vis_patch", "vis_patch", None, "vis_embed")),
                            (p, p, c.num_channels, d))
        x = pixel_values.astype(self.dtype)
        g = hh // p
        x = x.reshape(b, ch, g, p, g, p)  # b c gy py gx px
        patches = jnp.einsum("bcypxq,pqcd->byxd", x, kernel.astype(self.dtype)).reshape(b, g * g, d)
        cls = self.param("class_embedding", logical(nn.initializers.normal(0.02), ("vis_embed",)), (d,))
        pos = self.param("position_embedding", logical(nn.initializers.normal(0.02), ("vis_pos", "vis_embed")),
                         (c.num_patches + 1, d))
        cls = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, d))
        return jnp.concatenate([cls, patches], axis=1) + pos.astype(self.dtype)[None]


class CLIPAttention(nn.Module):
    config: CLIPVisionConfig
    dtype: Any = jnp.float32
    quant: QuantConfig | None = None  # the linear kernels quantized (models.quantize; only on request)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        n, h, d = c.num_attention_heads, c.head_dim, c.hidden_size
        b, t, _ = x.shape
        proj = lambda name: dense(d, ("vis_embed", "vis_heads"), use_bias=True, dtype=self.dtype, name=name,
                                  quant=self.quant)
        q = proj("q_proj")(x).reshape(b, t, n, h)
        k = proj("k_proj")(x).reshape(b, t, n, h)
        v = proj("v_proj")(x).reshape(b, t, n, h)
        o = attention(q, k, v, None, h**-0.5).reshape(b, t, d)
        return dense(d, ("vis_heads", "vis_embed"), use_bias=True, dtype=self.dtype, name="out_proj", quant=self.quant)(o)


class CLIPMLP(nn.Module):
    config: CLIPVisionConfig
    dtype: Any = jnp.float32
    quant: QuantConfig | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        x = dense(c.intermediate_size, ("vis_embed", "vis_mlp"), use_bias=True, dtype=self.dtype, name="fc1",
                  quant=self.quant)(x)
        x = ACTIVATIONS[c.hidden_act](x)
        return dense(c.hidden_size, ("vis_mlp", "vis_embed"), use_bias=True, dtype=self.dtype, name="fc2",
                     quant=self.quant)(x)


class CLIPEncoderLayer(nn.Module):
    config: CLIPVisionConfig
    dtype: Any = jnp.float32
    quant: QuantConfig | None = None

    @nn.compact
    def __call__(self, x: Array, _=None):
        c = self.config
        ln = lambda name: layer_norm(c.layer_norm_eps, "vis_embed", dtype=self.dtype, name=name)
        x = x + CLIPAttention(c, self.dtype, self.quant, name="self_attn")(ln("layer_norm1")(x))
        x = x + CLIPMLP(c, self.dtype, self.quant, name="mlp")(ln("layer_norm2")(x))
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        return x, x  # (carry, per-layer output) so the same layer works under nn.scan


class CLIPEncoder(nn.Module):
    config: CLIPVisionConfig
    runtime: Runtime = Runtime()
    dtype: Any = jnp.float32
    quant: QuantConfig | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x [B, P+1, D] -> hidden states [L, B, P+1, D], one per layer."""
        c, rt = self.config, self.runtime
        layer_cls = CLIPEncoderLayer
        policy = REMAT_POLICIES[rt.remat_policy]
        if rt.remat_policy != "none":
            layer_cls = nn.remat(layer_cls, policy=policy, prevent_cse=not rt.scan_layers)
        if rt.scan_layers:
            scanned = nn.scan(layer_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                              length=c.num_hidden_layers, metadata_params={nn.PARTITION_NAME: "layers"})
            _, hs = scanned(c, self.dtype, self.quant, name="layers")(x, None)
            return hs
        hs = []
        for i in range(c.num_hidden_layers):
            x, _ = layer_cls(c, self.dtype, self.quant, name=f"layers_{i}")(x)
            hs.append(x)
        return jnp.stack(hs)


class CLIPVisionTransformer(nn.Module):
    """HF ``CLIPVisionTransformer``; param names follow HF's (``pre_layrnorm`` included)."""

    config: CLIPVisionConfig
    runtime: Runtime = Runtime()
    dtype: Any = jnp.float32
    quant: QuantConfig | None = None  # the encoder's linear kernels quantized

    @nn.compact
    def __call__(self, pixel_values: Array) -> VisionOutput:
        check_runtime(self.runtime, "CLIPVisionTransformer")
        c = self.config
        ln = lambda name: layer_norm(c.layer_norm_eps, "vis_embed", dtype=self.dtype, name=name)
        x = CLIPEmbeddings(c, self.dtype, name="embeddings")(pixel_values)
        x = ln("pre_layrnorm")(x)
        hs = CLIPEncoder(c, self.runtime, self.dtype, self.quant, name="encoder")(x)
        hidden_states = jnp.concatenate([x[None], hs], axis=0)
        # post_layernorm is unused by VipLlava but is part of the checkpoint; computing the
        # pooled output keeps it in the parameter tree (XLA drops it when unused).
        pooled = ln("post_layernorm")(hs[-1][:, 0])
        return VisionOutput(hidden_states=hidden_states, pooled=pooled)
