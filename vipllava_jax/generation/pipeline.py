"""`pipeline(model=...)`: chat messages (or prompts and images) in, answers out, in the form of Hugging Face's
``image-text-to-text`` pipeline (transformers' `ImageTextToTextPipeline`).

    pipe = pipeline(model="llava-hf/vip-llava-7b-hf", dtype=jnp.bfloat16)       # a directory, hub id or orbax dir
    messages = [{"role": "user", "content": [{"type": "image", "path": "photo.jpg"},
                                             {"type": "text", "text": "What is in the image?"}]}]
    pipe(text=messages, max_new_tokens=64)
    # [{"input_text": messages, "generated_text": messages + [{"role": "assistant", "content": "A dog ..."}]}]
    pipe(text=messages, return_full_text=False)     # [{"input_text": messages, "generated_text": "A dog ..."}]
    for piece in pipe.stream(text=messages):         # the answer as text pieces while it is generated
        print(piece, end="")

It is the package's own pieces, nothing repeated: `Processor.apply_chat_template` turns messages into model inputs
(the checkpoint's template; image parts by "image" / "path" / "url" / "base64"; visual prompts drawn),
`generate_text` / `generate_text_stream` generate and decode (greedy by default, cut at the stop strings), and
`load_pretrained` loads the model.

Inputs and outputs follow HF's pipeline (transformers 5, checked against it):

- ``pipe(text=messages)`` (one conversation) -> ``[record]``; ``pipe(text=[messages, messages])`` (a batch) ->
  ``[[record], [record]]``. ``pipe(messages)`` (the conversation as the first argument) works too. Images go
  inside the messages; giving ``images=`` with messages is an error, as in HF.
- ``pipe(images=image, text=prompt)`` -> ``[record]``: the prompt is used as it is, no template (each ``<image>``
  in it takes the next image; a count that differs is a ValueError). ``pipe(images=[a, b], text=[p, q])`` ->
  ``[record, record]``; ``pipe(text=[p, q])`` (no images) -> ``[[record], [record]]``, as HF returns them.
- A record is ``{"input_text": the input as given, "generated_text": ...}``. ``return_full_text=True`` (the
  default): for messages, the messages given with ``{"role": "assistant", "content": answer}`` appended; for a
  prompt, the prompt and the answer joined by one space (the space the answer's first token carries after these
  templates' ``ASSISTANT:`` / ``###Assistant:`` cue; none when the prompt ends in whitespace).
  ``return_full_text=False``: the answer alone.
- Every input of one call is one batch on the device (left padded; a greedy row equals that input alone).

Differences from HF, on purpose: the answer is stripped of surrounding whitespace (as `generate_text` gives it);
generation also stops at the template's turn separator (``###`` for llava-hf's template; the default
``stop_sequence``, see `chat_stop_strings`), which is cut from the answer; a conversation that ends with an
assistant message (HF's "continue_final_message" prefill) is refused; ``max_new_tokens`` by default is 256 lowered
to what fits in the model's context after the prompt (an explicit value that does not fit is an error).
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Iterator, Mapping, Sequence

import jax.numpy as jnp

from ..checkpoints.load import load_config, load_pretrained, resolve_model_path
from ..data.processor import Processor
from ..data.prompts import V0_SEPARATOR
from .text import generate_text, generate_text_stream

__all__ = ["TASK", "ImageTextToTextPipeline", "pipeline", "chat_prompt", "chat_stop_strings"]

TASK = "image-text-to-text"
DEFAULT_MAX_NEW_TOKENS = 256  # HF's pipeline default; lowered to what fits after the prompt
GENERATE_OPTIONS = ("do_sample", "temperature", "top_k", "top_p", "seed", "repetition_penalty")


def chat_prompt(processor: Processor, messages, *, chat_template: str | None = None) -> str:
    """The prompt `generate_text` takes for a conversation: ``processor.apply_chat_template(messages,
    add_generation_prompt=True)``, with a leading bos token taken off (the processor adds it when it tokenizes,
    as apply_chat_template's own tokenize=True does not add a second one). Image parts need no data here: the
    images are given to `generate_text` beside the prompt."""
    text = processor.apply_chat_template(messages, add_generation_prompt=True, chat_template=chat_template)
    bos = getattr(processor.tokenizer, "bos_token", None)
    return text[len(bos):] if bos and text.startswith(bos) else text


def chat_stop_strings(processor: Processor, *, chat_template: str | None = None) -> tuple[str, ...]:
    """The stop strings of generation through the checkpoint's chat template: ``("###",)`` when the template
    separates turns with llava_v0's ``###`` (llava-hf's VipLlava template, the fallback for a checkpoint
    without one), else ``()`` (EOS ends a turn: the llava_v1 template of the shipped demo model ends an answer
    with ``</s>``). Read off the template rendered for a short user / assistant / user conversation."""
    probe = [{"role": "user", "content": "\x00q"}, {"role": "assistant", "content": "\x00a"},
             {"role": "user", "content": "\x00r"}]
    try:
        with warnings.catch_warnings():  # the no-template warning comes when the prompt is made, not here
            warnings.simplefilter("ignore", UserWarning)
            text = processor.apply_chat_template(probe, chat_template=chat_template)
    except Exception:  # noqa: BLE001 - a template that refuses the probe: the package's default stop
        return (V0_SEPARATOR,)
    between = text.partition("\x00a")[2].partition("\x00r")[0]
    return (V0_SEPARATOR,) if V0_SEPARATOR in between else ()


def _is_chat(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and isinstance(x[0], (list, tuple, Mapping))


def _flatten(images) -> list:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return [im for x in images for im in _flatten(x)]
    return [images]


def _join(prompt: str, answer: str) -> str:
    return prompt + (" " if answer and prompt and not prompt[-1].isspace() else "") + answer


class ImageTextToTextPipeline:
    """A loaded model with its processor, called like HF's ``image-text-to-text`` pipeline (see the module
    docstring for the inputs and the records returned). Build it with `pipeline`."""

    task = TASK

    def __init__(self, module, params, processor: Processor, *, mesh=None, model_dir=None,
                 stop_sequence: Sequence[str] | None = None):
        """module, params: from `load_pretrained`; processor: the checkpoint's `Processor`; mesh: the mesh the
        params are on (None: one device); stop_sequence: default stop strings (None: `chat_stop_strings`)."""
        self.module, self.params, self.processor, self.mesh = module, params, processor, mesh
        self.model_dir = model_dir
        self.stop = tuple(stop_sequence) if stop_sequence is not None else chat_stop_strings(processor)

    def __repr__(self) -> str:
        return f"ImageTextToTextPipeline(model={str(self.model_dir)!r}, stop={self.stop!r})"

    # -- inputs ----------------------------------------------------------------------------------------------
    def _parse(self, images, text):
        """(kind, items, images, nested): ("chat", conversations, None, nested) or ("text", prompts, images or
        None, nested); nested: each record is returned in a list of its own (HF's shape for a batch of
        conversations, and of prompts without images)."""
        if text is None and _is_chat(images):  # pipe(messages): the conversation as the first argument
            images, text = None, images
        if text is None:
            raise ValueError("Give text=: chat messages [{'role': 'user', 'content': [...]}, ...], a prompt, or a "
                             "list of either (a batch)" + (" (images alone are not a question)" if images else ""))
        if isinstance(text, (list, tuple)) and not text:
            raise ValueError("text= is an empty list: give at least one prompt or conversation")
        if _is_chat(text):
            if images is not None:
                raise ValueError("Invalid input: chat messages and images= given separately. Put the images in "
                                 "the messages' content: {'role': 'user', 'content': [{'type': 'image', 'path': "
                                 "'a.jpg'}, {'type': 'text', 'text': 'Describe the image.'}]}")
            batched = not isinstance(text[0], Mapping)
            convs = list(text) if batched else [text]
            for i, c in enumerate(convs):
                where = f"conversation {i}" if batched else "the conversation"
                if not isinstance(c, (list, tuple)) or not c or not all(isinstance(m, Mapping) for m in c):
                    raise ValueError(f"{where} must be a non-empty list of {{'role': ..., 'content': ...}} dicts "
                                     f"(a batch is a list of such lists), got {c!r:.120}")
                if c[-1].get("role") == "assistant":
                    raise ValueError(f"{where} ends with an assistant message: continuing it (HF's "
                                     "continue_final_message) is not supported; end with the user's message")
            return "chat", convs, None, batched
        prompts = [text] if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else None
        if prompts is None or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"text= must be a prompt string, a list of prompts, or chat messages, got {text!r:.120}")
        flat = _flatten(images)
        tok = self.processor.image_token
        per = [p.count(tok) for p in prompts]
        if sum(per) != len(flat):
            raise ValueError(f"The prompt(s) have {sum(per)} {tok} placeholder(s) (per prompt: {per}) but "
                             f"{len(flat)} image(s) were given: a prompt is used as it is, so write {tok} where "
                             "each image goes, or pass chat messages (text=[{'role': 'user', 'content': "
                             "[{'type': 'image', ...}, {'type': 'text', ...}]}]), which the checkpoint's "
                             "template formats")
        return "text", prompts, flat or None, not isinstance(text, str) and images is None

    def _options(self, max_new_tokens, stop_sequence, generate_kwargs, gen) -> dict[str, Any]:
        gen = {**(generate_kwargs or {}), **gen}
        if "max_new_tokens" in gen:
            if max_new_tokens is not None:
                raise ValueError("'max_new_tokens' is given twice, in generate_kwargs and as an argument: give one")
            max_new_tokens = gen.pop("max_new_tokens")
        unknown = sorted(set(gen) - set(GENERATE_OPTIONS))
        if unknown:
            raise TypeError(f"unknown generation option(s) {unknown}: this pipeline takes max_new_tokens, "
                            f"return_full_text, stop_sequence and {', '.join(GENERATE_OPTIONS)}")
        stop = self.stop if stop_sequence is None else \
            (stop_sequence,) if isinstance(stop_sequence, str) else tuple(stop_sequence)
        return dict(gen, max_new_tokens=DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens,
                    fit_context=max_new_tokens is None, stop=stop, mesh=self.mesh)

    def _encode_chats(self, convs) -> dict:
        return self.processor.apply_chat_template(convs, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)

    # -- calls ------------------------------------------------------------------------------------------------
    def __call__(self, images=None, text=None, *, max_new_tokens: int | None = None, return_full_text: bool = True,
                 stop_sequence: str | Sequence[str] | None = None, generate_kwargs: Mapping | None = None,
                 **gen) -> list:
        """Answer `text` (messages, a prompt, or a list of either) about `images` (prompts only), all as one batch.

        max_new_tokens: new tokens per answer (None: 256, lowered to what fits after the longest prompt).
        return_full_text: True: messages with the answer appended / the prompt followed by the answer; False:
          the answer alone.
        stop_sequence: stop string(s) (None: the template's, `chat_stop_strings`; [] for EOS only).
        generate_kwargs / gen: do_sample, temperature, top_k, top_p, seed, repetition_penalty (`generate`'s).
        Returns HF's records (see the module docstring): ``[record]`` for one input, ``[[record], ...]`` for a
        batch of conversations or of prompts without images, ``[record, ...]`` for prompts with images.
        """
        kind, items, imgs, nested = self._parse(images, text)
        opts = self._options(max_new_tokens, stop_sequence, generate_kwargs, gen)
        if kind == "chat":
            answers = generate_text(self.module, self.params, self.processor, self._encode_chats(items), **opts)
            records = [{"input_text": c, "generated_text": list(c) + [{"role": "assistant", "content": a}]
                        if return_full_text else a} for c, a in zip(items, answers)]
        else:
            answers = generate_text(self.module, self.params, self.processor, items, imgs, **opts)
            records = [{"input_text": p, "generated_text": _join(p, a) if return_full_text else a}
                       for p, a in zip(items, answers)]
        return [[r] for r in records] if nested else records

    def stream(self, images=None, text=None, *, max_new_tokens: int | None = None,
               stop_sequence: str | Sequence[str] | None = None, generate_kwargs: Mapping | None = None,
               chunk_size: int = 8, **gen) -> Iterator[str]:
        """The answer to one input (a conversation, or one prompt with its images) as text pieces while it is
        generated; joined and stripped they are `__call__`'s answer. The options are `__call__`'s; chunk_size:
        decode steps per device call."""
        kind, items, imgs, _ = self._parse(images, text)
        if len(items) != 1:
            raise ValueError(f"stream() answers one input, got a batch of {len(items)}: call the pipeline for "
                             "batches")
        opts = self._options(max_new_tokens, stop_sequence, generate_kwargs, gen)
        prompt = self._encode_chats(items) if kind == "chat" else items[0]
        yield from generate_text_stream(self.module, self.params, self.processor, prompt, imgs,
                                        chunk_size=chunk_size, **opts)


def pipeline(task: str | None = None, model: str | os.PathLike | None = None, *, dtype=jnp.float32, mesh=None,
             verify: bool = True, progress: bool = False) -> ImageTextToTextPipeline:
    """Load `model` for answering chat messages like HF's ``pipeline("image-text-to-text", model=...)``.

    task: None or "image-text-to-text" (the one task; HF's first argument, so either call form works).
    model: an HF directory, a hub id (downloaded where a network exists) or an orbax directory from
      ``vipllava-jax convert``; its tokenizer, processor files and chat template are read from it.
    dtype: parameter and compute dtype (a jnp dtype or its name; None keeps the checkpoint's), as
      `load_pretrained`. mesh: a `make_mesh` mesh to shard the params and generation over (None: one device).
    verify: check an orbax directory's checksums first (`load_pretrained`). progress: show loading progress.
    """
    if task is not None and task != TASK:
        raise ValueError(f"vipllava_jax.pipeline runs the {TASK!r} task, not {task!r} (give the model as model=)")
    if model is None:
        raise ValueError("pipeline() needs model=: a checkpoint directory or hub id")
    model_dir = resolve_model_path(model)
    load_config(model_dir)  # config.json first: a bad one is named, not blamed on the tokenizer
    processor = Processor.from_pretrained(model_dir)  # before the weights: a missing tokenizer fails at once
    module, params = load_pretrained(model_dir, dtype=None if dtype is None else jnp.dtype(dtype), mesh=mesh,
                                     progress=progress, verify=verify)
    return ImageTextToTextPipeline(module, params, processor, mesh=mesh, model_dir=model_dir)
