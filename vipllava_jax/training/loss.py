"""The training loss: HF's causal-LM cross entropy, normalised by the supervised tokens of the global batch.

Einsum letters: B batch, T length, V vocab, I images.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

IGNORE_INDEX = -100  # HF's ignore_index: positions whose label is this carry no loss


def num_supervised(labels) -> Array:
    """How many positions carry loss: labels are shifted inside the loss, so position 0's label never does."""
    return jnp.sum(jnp.asarray(labels)[..., 1:] != IGNORE_INDEX)


def token_nll_sum(logits: Array, labels: Array) -> tuple[Array, Array]:
    """Sum of the next-token negative log-likelihoods over supervised positions, and their count.

    logits [B, T, V] (any float dtype; the loss is taken in fp32, as HF upcasts); labels [B, T], the same
    positions as input_ids, IGNORE_INDEX where ignored. Position t predicts labels[t + 1]."""
    target = labels[:, 1:]
    lg = logits[:, :-1].astype(jnp.float32)
    valid = target != IGNORE_INDEX
    lse = jax.nn.logsumexp(lg, axis=-1)
    picked = jnp.take_along_axis(lg, jnp.where(valid, target, 0)[..., None], axis=-1)[..., 0]
    nll = jnp.where(valid, lse - picked, 0.0)
    return jnp.sum(nll), jnp.sum(valid)


def check_labels(labels, vocab_size: int) -> None:
    """Host-side check of concrete labels: every kept label is a token id in [0, vocab)."""
    if isinstance(labels, jax.core.Tracer):
        return
    lab = np.asarray(labels)
    bad = (lab != IGNORE_INDEX) & ((lab < 0) | (lab >= vocab_size))
    if bad.any():
        r, t = map(int, np.argwhere(bad)[0])
        raise ValueError(f"labels[{r}, {t}] = {int(lab[r, t])} is neither {IGNORE_INDEX} (ignored) nor a token id "
                         f"in [0, {vocab_size})")


def loss_fn(module, params, batch: Mapping[str, Any], *, num_tokens=None, lora=None) -> tuple[Array, dict]:
    """``(loss, metrics)`` of one batch, equal to ``VipLlavaForConditionalGeneration(..., labels=labels).loss``.

    batch: ``input_ids`` [B, T], ``attention_mask`` [B, T], ``pixel_values`` [I, 3, H, W] (absent or None for
    text only), ``labels`` [B, T] (HF convention: same positions as input_ids, -100 where ignored; shifted
    here). Optional ``image_valid`` [I] bool marks real images when the image count is padded to a bucket
    (padding images have no image tokens; the real ones are taken in order wherever the padding sits).

    The loss is the mean over supervised tokens. ``num_tokens`` (traced or not) replaces this batch's own
    count as the denominator: with gradient accumulation pass the whole global batch's count to every
    micro-batch, so the sum of micro-batch losses equals the big batch's loss exactly (not a mean of means).
    With no supervised token the loss is 0 (HF's mean over nothing is NaN).
    ``lora``: the model's "lora" variable collection (`training.lora.lora_collection`), adapters added unmerged.
    metrics: ``loss``, ``nll_sum`` (sum over this batch), ``num_tokens`` (this batch's supervised count)."""
    labels = batch["labels"]
    check_labels(labels, module.config.text.vocab_size)
    pixels, valid = batch.get("pixel_values"), batch.get("image_valid")
    if valid is not None:
        # Real images first, in order (each host pads its own images, so padding can sit between hosts' images).
        order = jnp.argsort(~jnp.asarray(valid, bool), stable=True)
        pixels, valid = jnp.asarray(pixels)[order], jnp.asarray(valid, bool)[order]
    variables = {"params": params} if not lora else {"params": params, "lora": lora}
    out = module.apply(variables, batch["input_ids"], pixels, batch.get("attention_mask"),
                       image_valid=valid)
    nll_sum, count = token_nll_sum(out.logits, jnp.asarray(labels))
    denom = count if num_tokens is None else num_tokens
    loss = nll_sum / jnp.maximum(denom, 1).astype(jnp.float32)
    return loss, {"loss": loss, "nll_sum": nll_sum, "num_tokens": count}
