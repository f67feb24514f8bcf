"""VipLlava: CLIP vision tower + VipLlava projector + Llama decoder + lm_head.

Einsum letters: B batch, T length, I images, P patches per image (CLS dropped),
D text model dim, V vocab.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from flax import struct

from .config import Runtime, VipLlavaConfig, check_runtime
from .layers import dense
from .llama import DecoderOutput, KVCache, LlamaModel
from .projector import VipLlavaMultiModalProjector, select_vision_features
from .vision import CLIPVisionTransformer

Array = jax.Array

@struct.dataclass
class VipLlavaOutput:
    logits: Array  # [B, T, V]
    cache: KVCache | None = None
    image_features: Array | None = None  # [I, P, D] projector output
    vision_hidden_states: Array | None = None  # [Lv+1, I, P+1, Dv]
    hidden_states: Array | None = None  # [L+1, B, T, D]


def image_token_mismatch(input_ids, num_images: int, image_token_index: int, image_seq_length: int) -> str | None:
    """Host-side check (concrete ids only). Returns HF's error wording or None."""
    n_tokens = int(np.sum(np.asarray(input_ids) == image_token_index))
    n_features = num_images * image_seq_length
    if n_tokens != n_features:
        return (f"Image features and image tokens do not match, tokens: {n_tokens}, features: {n_features} "
                f"({num_images} image(s) x {image_seq_length} tokens each; each <image> in the prompt must be "
                f"expanded to image_seq_length={image_seq_length} tokens of id {image_token_index}, and "
                f"pixel_values must hold one image per <image>)")
    return None


def check_token_ids(input_ids, vocab_size: int, name: str = "input_ids") -> None:
    """Host-side check (concrete ids only, before any cast that could wrap an int64): every id in
    [0, vocab_size). An id outside would silently index a clamped or garbage embedding row."""
    a = np.asarray(input_ids)
    if a.size == 0:
        raise ValueError(f"{name} is empty (shape {a.shape}): give at least one token per row")
    if a.dtype.kind not in "iu":
        return
    bad = (a < 0) | (a >= vocab_size)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        row, pos = (idx[0], idx[1]) if len(idx) == 2 else (0, idx[-1])
        raise ValueError(f"{name} row {row} position {pos} holds token id {int(a[idx])}, outside the vocabulary "
                         f"[0, {vocab_size}) ({int(bad.sum())} such id(s) in all)")


def default_positions(attention_mask: Array | None, b: int, t: int) -> Array:
    """RoPE positions [B, T]: count only real tokens, so a left-padded row gets the positions it would have alone."""
    if attention_mask is None:
        return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    pos = jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1
    return jnp.maximum(pos, 0)


class VipLlavaForConditionalGeneration(nn.Module):
    """The whole model. ``config`` says what the checkpoint is, ``runtime`` how the modules are laid out and run
    (read it back as ``module.runtime.scan_layers``), ``dtype`` the compute dtype."""

    config: VipLlavaConfig
    runtime: Runtime = Runtime()
    dtype: Any = jnp.float32

    def setup(self):
        check_runtime(self.runtime, "VipLlavaForConditionalGeneration")
        c, rt = self.config, self.runtime
        q = c.quantization  # weight-only int8/int4 (models.quantize): the decoder's linears, the rest on request
        self.vision_tower = CLIPVisionTransformer(c.vision, rt, self.dtype, q if q and q.vision_tower else None)
        self.multi_modal_projector = VipLlavaMultiModalProjector(
            c.text.hidden_size, c.projector_layernorm_eps, c.projector_hidden_act, self.dtype,
            q if q and q.projector else None)
        self.language_model = LlamaModel(c.text, rt, self.dtype, q)
        if not c.tie_word_embeddings:
            self.lm_head = dense(c.text.vocab_size, ("embed", "vocab"), use_bias=False, dtype=self.dtype, name="lm_head",
                                 quant=q if q and q.lm_head else None)

    def encode_images(self, pixel_values: Array) -> tuple[Array, Array]:
        """pixel_values [I, C, H, W] -> (features [I, P, D], vision hidden states [Lv+1, I, P+1, Dv])."""
        vis = self.vision_tower(pixel_values)
        feats = select_vision_features(vis.hidden_states, self.config.vision_feature_layers)
        return self.multi_modal_projector(feats), vis.hidden_states

    def logits(self, h: Array) -> Array:
        if self.config.tie_word_embeddings:
            return self.language_model.attend(h)
        return self.lm_head(h)

    def __call__(self, input_ids: Array, pixel_values: Array | None = None, attention_mask: Array | None = None,
                 *, position_ids: Array | None = None, cache: KVCache | None = None,
                 image_features: Array | None = None, image_valid: Array | None = None,
                 return_hidden_states: bool = False, last_token_only: bool = False) -> VipLlavaOutput:
        """input_ids [B, T] with each image placeholder expanded to image_seq_length image tokens;
        pixel_values [I, 3, H, W], the images in the order they appear in the batch (row-major);
        attention_mask [B, T] (1 = token, 0 = padding; pad on the left).
        ``image_features`` [I, P, D] may be given instead of pixel_values (already projected).
        ``image_valid`` [I] bool marks the real images when the image count is padded to a fixed bucket (so a
        jitted train step compiles once): padding images come last and have no image tokens.
        ``last_token_only`` computes logits for the last position only ([B, 1, V])."""
        c = self.config
        b, t = input_ids.shape
        vision_hs = None
        if pixel_values is not None:
            if image_features is not None:
                raise ValueError("Give pixel_values or image_features, not both")
            image_features, vision_hs = self.encode_images(pixel_values)
        if not isinstance(input_ids, jax.core.Tracer):
            check_token_ids(input_ids, c.text.vocab_size)
        embeds = self.language_model.embed(input_ids)
        ok = None
        if image_features is not None:
            n_img = image_features.shape[0] if image_valid is None else jnp.sum(image_valid)
            if not isinstance(input_ids, jax.core.Tracer) and not isinstance(n_img, jax.core.Tracer):
                err = image_token_mismatch(input_ids, int(n_img), c.image_token_index, image_features.shape[1])
                if err:
                    raise ValueError(err)
            embeds, ok = merge_image_features(embeds, input_ids, image_features, c.image_token_index, n_img)
        if position_ids is None:
            position_ids = default_positions(attention_mask, b, t)
        out: DecoderOutput = self.language_model(embeds, position_ids, attention_mask, cache, return_hidden_states)
        h = out.last_hidden_state[:, -1:] if last_token_only else out.last_hidden_state
        logits = self.logits(h)
        if ok is not None:
            # Under jit the count can't be checked on the host: poison the output rather than be silently wrong.
            logits = jnp.where(ok, logits, jnp.nan)
        return VipLlavaOutput(logits=logits, cache=out.cache, image_features=image_features,
                              vision_hidden_states=vision_hs, hidden_states=out.hidden_states)


def merge_image_features(embeds: Array, input_ids: Array, features: Array, image_token: int,
                         num_images=None) -> tuple[Array, Array]:
    """Put features [I, P, D] into the image-token positions of embeds [B, T, D], in row-major order
    (HF's masked_scatter). ``num_images`` (may be traced): how many of the I images are real (the first ones).
    Returns (embeds, counts_match)."""
    b, t, d = embeds.shape
    is_img = (input_ids == image_token).reshape(-1)
    flat = features.reshape(-1, features.shape[-1]).astype(embeds.dtype)
    idx = jnp.cumsum(is_img.astype(jnp.int32)) - 1
    gathered = jnp.take(flat, jnp.clip(idx, 0, flat.shape[0] - 1), axis=0)
    merged = jnp.where(is_img[:, None], gathered, embeds.reshape(-1, d)).reshape(b, t, d)
    n_features = flat.shape[0] if num_images is None else num_images * features.shape[1]
    ok = jnp.sum(is_img) == n_features
    return merged, ok
