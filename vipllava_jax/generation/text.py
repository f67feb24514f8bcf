"""Text in, text out: prompts and images through the processor, `generate` / `generate_stream` with the
processor's pad and EOS ids and the stop strings matched on the device, and the answers decoded and cut at the
first stop string. The one front half that the CLI, the demo, evaluation and the notebooks share."""
from __future__ import annotations

from typing import Iterator, Mapping, Sequence

import numpy as np

from .api import generate, generate_stream
from .inputs import check_count, max_new_tokens_limit
from .stop_strings import cut_at_stop, stop_strings_for


def generate_text(module, params, processor, prompts: Sequence[str], images=None, *, max_new_tokens: int = 32,
                  stop: Sequence[str] = ("###",), fit_context: bool = False, **kw) -> list[str]:
    """The answer to each of B prompts, in order: `generate` on ``processor(prompts, images)`` (left padded),
    each row decoded, cut at its first stop string (`cut_at_stop`) and stripped.

    module, params: from `load_pretrained`. processor: a `data.Processor` (left padding; its pad and EOS ids are
      generate's, None meaning the checkpoint's).
    prompts: B whole prompts (`data.build_prompt`), each ``<image>`` taking the next image; or the processor's
      output for them (a dict with input_ids, attention_mask and pixel_values, e.g.
      ``processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)``),
      used as it is.
    images: None, or the images in the order of their placeholders (nested lists per prompt are flattened);
      None when `prompts` is already encoded.
    max_new_tokens: new tokens per row; with ``fit_context``, a cap lowered to what fits in the model's context
      after the longest prompt (at least 1) rather than refused.
    stop: stop strings, matched on the device (none: only EOS and max_new_tokens end a row).
    kw: `generate`'s other keyword arguments (sampling, seed, mesh, ...)."""
    enc = _encode(processor, prompts, images)
    toks = generate(module, params, enc["input_ids"], enc.get("pixel_values"), enc["attention_mask"],
                    max_new_tokens=_new_tokens(module, enc, max_new_tokens, fit_context),
                    stop_strings=stop_strings_for(processor.tokenizer, stop, module.config.text.vocab_size)
                    if stop else None,
                    pad_token_id=processor.pad_token_id, eos_token_id=processor.eos_token_id, **kw)
    return [cut_at_stop(processor.decode(row.tolist()), stop).strip() for row in toks]


def generate_text_stream(module, params, processor, prompt: str, images=None, *, max_new_tokens: int = 256,
                         stop: Sequence[str] = ("###",), fit_context: bool = False, **kw) -> Iterator[str]:
    """The answer to one prompt as text pieces while it is generated: `generate_stream` on
    ``processor([prompt], images)`` (or `prompt` already encoded, one row), leading whitespace dropped, the stop
    string not yielded. The arguments are `generate_text`'s; kw also takes `generate_stream`'s ``chunk_size``."""
    enc = _encode(processor, [prompt] if isinstance(prompt, str) else prompt, images)
    pieces = generate_stream(module, params, enc["input_ids"], enc.get("pixel_values"), enc["attention_mask"],
                             tokenizer=processor.tokenizer, stop=stop,
                             max_new_tokens=_new_tokens(module, enc, max_new_tokens, fit_context),
                             pad_token_id=processor.pad_token_id, eos_token_id=processor.eos_token_id, **kw)
    started = False
    for piece in pieces:
        piece = piece if started else piece.lstrip()
        if piece:
            started = True
            yield piece


def _encode(processor, prompts, images) -> Mapping:
    if not isinstance(prompts, Mapping):
        return processor(prompts, images)
    if images is not None:
        raise ValueError("the prompts are already encoded (their pixel_values are in them): give images=None")
    return prompts


def _new_tokens(module, enc, max_new_tokens: int, fit_context: bool) -> int:
    if not fit_context:
        return max_new_tokens
    room = max_new_tokens_limit(module.config, int(np.asarray(enc["attention_mask"]).sum(-1).max()))
    return max(1, min(check_count(max_new_tokens, "max_new_tokens"), room))
