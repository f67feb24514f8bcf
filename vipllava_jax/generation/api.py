"""The public generation functions: `generate` (a batch, all new tokens at once), `generate_stream_tokens` (the
same, yielded chunk by chunk), `generate_stream` (one prompt, text deltas) and `sharded_generate` (on a mesh).
Their settings are one `GenerationConfig`; the work is `loop.Run`."""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
from jax.sharding import Mesh

from ..parallel.mesh import check_batch
from ..parallel.rules import LOGICAL_AXIS_RULES, Rules
from .config import GenerationConfig
from .loop import Run
from .stop_strings import StopStrings, cut_at_stop, partial_stop_len, stop_strings_for


def generate(module, params, input_ids, pixel_values=None, attention_mask=None, max_new_tokens: int = 32,
             do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, *, repetition_penalty: float = 1.0,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             stop_strings: StopStrings | None = None, mesh=None, rules=None, bucket: bool = True) -> np.ndarray:
    """New token ids [B, max_new_tokens] (int32, numpy), the pad id after a row's EOS or stop string.

    input_ids / attention_mask [B, T] in the HF processor's format, left padded (each ``<image>`` expanded to
    image_seq_length image tokens); pixel_values [I, 3, H, W], the images in the order they appear.
    Greedy by default; ``do_sample`` with ``temperature``, ``top_k``, ``top_p`` (HF's semantics) and a
    ``seed``. ``eos_token_id`` / ``pad_token_id`` default to the checkpoint's. ``stop_strings`` from
    ``StopStrings.from_tokenizer(["###"], tokenizer, vocab_size)``. With ``mesh`` (see `make_mesh`), params,
    inputs and the KV cache are sharded by the rules table; a batch that does not divide over data x fsdp is
    padded with masked rows that are dropped from the result. The settings are a `GenerationConfig`."""
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                              top_k=top_k, top_p=top_p, seed=seed, repetition_penalty=repetition_penalty,
                              eos_token_id=eos_token_id, pad_token_id=pad_token_id, stop_strings=stop_strings,
                              bucket=bucket)
    run = Run(module, params, input_ids, pixel_values, attention_mask, config, mesh=mesh, rules=rules)
    run.advance(config.max_new_tokens)  # no host sync in between: the loop does nothing if prefill already finished
    return run.tokens()


def generate_stream_tokens(module, params, input_ids, pixel_values=None, attention_mask=None, *,
                           max_new_tokens: int = 32, chunk_size: int = 4, mesh=None, rules=None,
                           **kw) -> Iterator[np.ndarray]:
    """Like `generate`, yielding the new tokens [B, k] as they are produced, ``chunk_size`` decode steps per
    device call (the same compiled loop as `generate`; the state stays on the device between calls). ``kw``:
    the other fields of `GenerationConfig` (`generate`'s keyword arguments)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    config = GenerationConfig(max_new_tokens=max_new_tokens, **kw)
    run = Run(module, params, input_ids, pixel_values, attention_mask, config, mesh=mesh, rules=rules)
    emitted = 0
    while True:
        step = run.step
        if step > emitted:
            yield run.tokens()[:, emitted:step]
            emitted = step
        if run.finished:
            return
        run.advance(step + chunk_size)


def generate_stream(module, params, input_ids, pixel_values=None, attention_mask=None, *, tokenizer,
                    max_new_tokens: int = 256, stop: Sequence[str] = ("###",), chunk_size: int = 4,
                    **kw) -> Iterator[str]:
    """Stream the answer to one prompt (batch 1) as text deltas. Generation stops at EOS, at any of ``stop``
    (matched on the device) or after ``max_new_tokens``; the stop string itself is not yielded."""
    if np.asarray(input_ids).ndim == 2 and np.shape(input_ids)[0] != 1:
        raise ValueError(f"generate_stream takes one prompt (batch 1), got a batch of {np.shape(input_ids)[0]}; "
                         f"use generate() or generate_stream_tokens() for batches")
    if kw.pop("stop_strings", None) is not None:
        raise TypeError("generate_stream matches the text stop strings of stop=: give those, not stop_strings=")
    vocab = module.config.text.vocab_size
    stop = tuple(stop)
    tables = stop_strings_for(tokenizer, stop, vocab) if stop else None
    ids: list[int] = []
    shown = ""
    pad = kw.get("pad_token_id")
    for chunk in generate_stream_tokens(module, params, input_ids, pixel_values, attention_mask,
                                        max_new_tokens=max_new_tokens, chunk_size=chunk_size,
                                        stop_strings=tables, **kw):
        ids.extend(int(t) for t in chunk[0] if pad is None or t != pad)
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        text = cut_at_stop(decoded, stop)
        stopped = len(text) < len(decoded)
        if not stopped:  # hold back a tail that may be the start of a stop string
            text = text[: len(text) - partial_stop_len(text, stop)]
        if len(text) > len(shown) and text.startswith(shown):
            yield text[len(shown):]
            shown = text
        if stopped:
            return
    text = cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), stop)
    if len(text) > len(shown) and text.startswith(shown):
        yield text[len(shown):]


def sharded_generate(module, params, input_ids, pixel_values=None, attention_mask=None, *, mesh: Mesh,
                     max_new_tokens: int, pad_batch: bool = True, rules: Rules = LOGICAL_AXIS_RULES,
                     gather: bool = True, **generate_kw) -> np.ndarray:
    """`generate` on a mesh: params on the rules' shardings, inputs as global arrays split over
    data x fsdp, the KV cache sharded by the rules (cache_batch, cache_kv_heads), traced inside the mesh and
    the rules so the model's constraints apply. Returns the new tokens [B, max_new_tokens] as numpy on every
    process (``gather`` is accepted for symmetry with `sharded_forward`; tokens are always gathered)."""
    if not pad_batch:
        check_batch(np.shape(input_ids)[0], mesh, rules)
    return generate(module, params, input_ids, pixel_values, attention_mask, max_new_tokens=max_new_tokens,
                    mesh=mesh, rules=tuple(rules), **generate_kw)
