"""VipLlava multi-modal projector: LayerNorm -> Linear -> act -> Linear.

Input is the concatenation, on the feature axis, of the vision hidden states at
``vision_feature_layers`` with CLS dropped: [I, P, F*Dv] -> [I, P, D].
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from .layers import ACTIVATIONS, dense, layer_norm
from .quantize import QuantConfig

Array = jax.Array


def select_vision_features(hidden_states: Array, layers: int | tuple[int, ...]) -> Array:
    """hidden_states [L+1, I, P+1, Dv] -> [I, P, F*Dv] (HF's indexing: negative counts from the end)."""
    if isinstance(layers, int):
        return hidden_states[layers][:, 1:]
    return jnp.concatenate([hidden_states[i][:, 1:] for i in layers], axis=-1)


class VipLlavaMultiModalProjector(nn.Module):
    text_hidden_size: int
    layernorm_eps: float = 1e-5
    hidden_act: str = "gelu"
    dtype: Any = jnp.float32
    quant: QuantConfig | None = None  # both linear kernels quantized (models.quantize; only on request)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = layer_norm(self.layernorm_eps, "vis_concat", dtype=self.dtype, name="projector_layernorm")(x)
        x = dense(self.text_hidden_size, ("vis_concat", "proj_hidden"), use_bias=True, dtype=self.dtype, name="linear_1",
                  quant=self.quant)(x)
        x = ACTIVATIONS[self.hidden_act](x)
        x = dense(self.text_hidden_size, ("proj_hidden", "embed"), use_bias=True, dtype=self.dtype, name="linear_2",
                  quant=self.quant)(x)
        return x
