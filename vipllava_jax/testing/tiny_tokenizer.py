"""A tiny, fully offline VipLlava processor (tokenizer + CLIP image processor) for tests and demos.

`make_tiny_processor(out_dir)` writes what `transformers.AutoProcessor.from_pretrained(out_dir)` and
`transformers.AutoTokenizer.from_pretrained(out_dir)` need, without touching the network:

- `tokenizer.json` / `tokenizer_config.json`: a character-level, Llama-style fast tokenizer built with the
  `tokenizers` library. `<unk>`=0, `<s>`=1, `</s>`=2; every printable ASCII character plus newline and tab
  is one token; `<image>` and `<pad>` are special tokens (ids 100 and 101 by default, matching
  `vipllava_jax.testing.TINY_IMAGE_TOKEN` / `TINY_PAD_TOKEN`). Like Llama it prepends `<s>` and does not
  append `</s>`; padding side is left. The vocabulary has 102 entries by default (fits a vocab-128 model).
- `processor_config.json`: a `LlavaProcessor` (the class VipLlava checkpoints use) holding a
  `CLIPImageProcessor` with `size={"shortest_edge": image_size}` and a square `crop_size` of
  `image_size`, plus `patch_size`, `num_additional_image_tokens=1` and
  `vision_feature_select_strategy="default"`, set like the real llava-hf/vip-llava checkpoints, so HF
  expands each `<image>` to `(image_size // patch_size) ** 2 == image_seq_length` tokens.
- `chat_template.jinja`: the llava-hf VipLlava chat template (`...###Human: <image>\\n...###Assistant:`,
  `vipllava_jax.data.prompts.VIPLLAVA_CHAT_TEMPLATE`).

Example (the tiny checkpoint of `vipllava_jax.testing`: 30 px images, 6 px patches, vocab 128)::

    from vipllava_jax.testing import make_tiny_processor
    ids = make_tiny_processor(ckpt_dir, image_size=30, image_seq_length=25)
    # ids == {"image_token_id": 100, "pad_token_id": 101, "eos_token_id": 2, "bos_token_id": 1,
    #         "unk_token_id": 0, "vocab_size": 102, "image_seq_length": 25, "patch_size": 6, "image_size": 30}
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..data.prompts import VIPLLAVA_CHAT_TEMPLATE

__all__ = ["make_tiny_processor", "save_processor", "TINY_CHARS"]

# Newline, tab and printable ASCII: 97 characters, one token each.
TINY_CHARS = ["\n", "\t"] + [chr(c) for c in range(32, 127)]


def _resolve_geometry(image_size: int, image_seq_length: int | None, patch_size: int | None) -> tuple[int, int]:
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if patch_size is None and image_seq_length is None:
        patch_size = 6
    if patch_size is None:
        side = math.isqrt(image_seq_length)
        if side * side != image_seq_length or side == 0 or image_size % side:
            raise ValueError(
                f"image_seq_length={image_seq_length} must be n*n with image_size={image_size} divisible by n "
                "(VipLlava drops CLS, so it sees (image_size // patch_size) ** 2 patches)")
        patch_size = image_size // side
    expected = (image_size // patch_size) ** 2
    if image_seq_length is None:
        image_seq_length = expected
    if expected != image_seq_length:
        raise ValueError(f"image_size={image_size} and patch_size={patch_size} give {expected} image tokens, "
                         f"not image_seq_length={image_seq_length}")
    return image_seq_length, patch_size


def make_tiny_processor(out_dir, image_seq_length: int | None = None, image_size: int = 30, *,
                        patch_size: int | None = None, image_token_id: int = 100, pad_token_id: int = 101,
                        max_vocab_size: int = 128) -> dict:
    """Write a tiny offline VipLlava processor (tokenizer + CLIP image processor) into `out_dir`.

    Args:
      out_dir: directory to write into (created if missing); may already hold a checkpoint's config.json.
      image_seq_length: image tokens per `<image>` (a square number n*n, image_size divisible by n).
        `None` derives it from `patch_size`.
      image_size: side of the square CLIP input (resize shortest edge to it, then centre-crop it).
      patch_size: vision patch size; `None` derives it from image_seq_length. Must agree with it if both given.
        With neither given, patch_size is 6 (the defaults: 30 px, patch 6, 25 image tokens).
      image_token_id, pad_token_id: ids of `<image>` and `<pad>` (distinct, >= 3, < max_vocab_size).
      max_vocab_size: the vocabulary must fit a model with this many embedding rows.

    Returns a dict: image_token_id, pad_token_id, eos_token_id (2), bos_token_id (1), unk_token_id (0),
    vocab_size (number of ids used: max id + 1), image_seq_length, patch_size, image_size.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    image_seq_length, patch_size = _resolve_geometry(image_size, image_seq_length, patch_size)
    reserved = {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": image_token_id, "<pad>": pad_token_id}
    if image_token_id == pad_token_id or min(image_token_id, pad_token_id) < 3:
        raise ValueError(f"image_token_id={image_token_id} and pad_token_id={pad_token_id} must be distinct "
                         "and >= 3 (0, 1, 2 are <unk>, <s>, </s>)")
    vocab_size = max(len(TINY_CHARS) + len(reserved), image_token_id + 1, pad_token_id + 1)
    if vocab_size > max_vocab_size:
        raise ValueError(f"the tiny vocabulary needs {vocab_size} ids (image_token_id={image_token_id}, "
                         f"pad_token_id={pad_token_id}, {len(TINY_CHARS)} characters) but max_vocab_size is "
                         f"{max_vocab_size}")
    vocab = dict(reserved)
    free = (i for i in range(vocab_size) if i not in reserved.values())
    for ch in TINY_CHARS:
        vocab[ch] = next(free)
    for i, idx in enumerate(free):  # ids left between the characters and a large <image>/<pad> id
        vocab[f"<unused{i}>"] = idx

    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: one token per char
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in reserved])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    save_processor(out_dir, tok, image_size=image_size, patch_size=patch_size, model_max_length=4096)
    return {"image_token_id": image_token_id, "pad_token_id": pad_token_id, "eos_token_id": 2,
            "bos_token_id": 1, "unk_token_id": 0, "vocab_size": vocab_size,
            "image_seq_length": image_seq_length, "patch_size": patch_size, "image_size": image_size}


def save_processor(out_dir, tok, *, image_size: int, patch_size: int, model_max_length: int) -> None:
    """Write a `LlavaProcessor` around the `tokenizers.Tokenizer` ``tok`` (ids <unk> 0, <s> 1, </s> 2; <pad>
    and <image> special) and a CLIP image processor (shortest edge and square crop ``image_size``), set like
    the llava-hf VipLlava checkpoints, into out_dir; plus the legacy preprocessor_config.json."""
    from transformers import LlavaProcessor, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        padding_side="left", model_max_length=model_max_length)
    try:  # transformers 5 without torchvision: name the PIL backend directly (same saved config)
        from transformers import CLIPImageProcessorPil as _ImageProcessor
    except ImportError:  # transformers 4
        from transformers import CLIPImageProcessor as _ImageProcessor
    image_processor = _ImageProcessor(size={"shortest_edge": image_size},
                                      crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=VIPLLAVA_CHAT_TEMPLATE, image_token="<image>")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(os.fspath(out_dir))
    # Also the legacy file real checkpoints ship, so tools reading only preprocessor_config.json work.
    with open(out_dir / "preprocessor_config.json", "w", encoding="utf-8") as f:
        json.dump({**image_processor.to_dict(), "processor_class": "LlavaProcessor"}, f, indent=2, sort_keys=True)
