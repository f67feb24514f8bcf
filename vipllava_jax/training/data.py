"""Fine-tuning data: LLaVA conversation records -> padded, bucketed numpy batches, through `grain`.

Records (LLaVA's format, a JSON list or JSONL, `load_records`)::

    {"id": "000001", "image": "coco/1.jpg" | ["a.jpg", "b.jpg"] | absent (text only),
     "conversations": [{"from": "human", "value": "<image>\\nWhat is <bbox0>?"},
                       {"from": "gpt", "value": "A cat."}, ...],
     "bboxes": [[x0, y0, x1, y1], ...],                      # optional, pixels of the (first) image
     "segmentations": [[[x, y, x, y, ...], ...], ...],       # optional, per region COCO polygons
     "marker_kinds": ["rectangle", "arrow"]}                 # optional, overrides DataConfig.marker_kinds

- ``<image>`` marks where each image goes (in human turns). A record with images and no ``<image>`` anywhere
  gets ``<image>\\n`` x (number of images) prepended to its first human turn, as LLaVA does. Any other
  mismatch between tags and images is a `DataError`.
- Roles: "human"/"user" and "gpt"/"assistant", alternating. A leading gpt turn is dropped and so is a
  trailing human turn without an answer (LLaVA drops the former; the latter has nothing to learn).
- Regions: ``<bboxN>`` (``<bbox>`` = ``<bbox0>``) in any turn becomes the phrase of region N's marker, drawn
  on the first image (see `markers.py` for the kinds, colours, widths, opacities and how mask kinds treat
  box-only regions). The draw comes from ``numpy.random.default_rng([seed, epoch, sha256(id)])``: the same
  (seed, epoch, record id) gives the same pixels and text, another epoch a fresh draw. Never global random.

Text (`encode_example`): the template (``llava_v1``, the training default, or ``llava_v0``, the HF model
card's) is taken from `vipllava_jax.data.build_prompt` (its text is not repeated here):

    llava_v1: ``{system} USER: <image>\\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>``
    llava_v0: ``{system}###Human: <image>\\nQ1###Assistant: A1###Human: Q2###Assistant: A2###``

The end of an assistant turn is ``</s>`` (the eos token) for v1, and for v0 the ``###`` separator (original
``conv_llava_v0``'s sep; `build_prompt` leaves it off the last answer, for generation, training puts it after
every answer so the model learns to stop there: stop generation on "###").

Ids are built piece by piece (BOS once, then the masked text -- system, human turn, "ASSISTANT:" tag --, each
answer with the space before it and its end-of-turn, each ``<image>``; neighbouring text pieces with the same
mask are one piece), each piece tokenized in the context of the text before it since the last special token
and required to extend that context's tokens, so no token straddles a human/answer boundary (the space before
an answer goes with the answer, as SentencePiece attaches it to the next word); the result is then
checked equal to tokenizing the whole prompt string at once (what inference does), and a difference is a
`DataError` ("tokenization mismatch", LLaVA issues #779/#1166) instead of a silently masked sample. Labels
(HF convention: same positions as input_ids, the loss shifts) are -100 on BOS, the system text, human turns,
image tokens and padding, and the token id on answers and their end-of-turn. Each ``<image>`` becomes
``image_seq_length`` ``image_token_index`` tokens.

Too long (> max_length): the text after the last image is cut; an example whose cut would reach an image's
tokens (or that has no answer token left) is dropped and counted, never passed on with a token/feature mismatch.

Batches (`make_train_iterator`, `make_eval_iterator`): dicts of numpy arrays

    input_ids       [B, T] int32   right padded with pad_token_id
    attention_mask  [B, T] int32   1 = token, 0 = padding
    labels          [B, T] int32   -100 = ignored
    pixel_values    [I, 3, H, W] float32  the images in row-major order of appearance, then zero padding images
    image_valid     [I] bool       True for the real images (they come first)
    num_tokens      [] int32       labels != -100 in the batch

T is the smallest of `DataConfig.length_buckets` that fits the longest row and I the smallest image bucket
that fits the batch's images, so a jitted step compiles once per (T, I) pair, a handful in all. A short last
batch (finite epochs, eval) is filled with padding rows (all masked, labels -100), so B never changes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Iterator, Sequence

import grain
import numpy as np
from absl import flags as absl_flags

from ..data import visual_prompts as vp
from ..data.clip import ImageConfig, preprocess_image
from ..data.images import load_image
from ..data.prompts import DEFAULT_SYSTEM_PROMPT, IMAGE_TOKEN, build_prompt
from .markers import MarkerError, MarkerStyle, Region, make_markers, sample_styles

__all__ = [
    "IGNORE_INDEX", "BATCH_KEYS", "TEMPLATES", "DataError", "ExampleDropped", "DataConfig", "Example",
    "load_records", "encode_example", "collate", "make_train_iterator", "make_eval_iterator", "DataIterator",
    "template_parts",
]

IGNORE_INDEX = -100
BATCH_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values", "image_valid")
TEMPLATES = ("llava_v1", "llava_v0")
V0_SEPARATOR = "###"  # conv_llava_v0's sep: the end of each v0 turn
_HUMAN = ("human", "user")
_GPT = ("gpt", "assistant")
_BBOX_RE = re.compile(r"<bbox(\d*)>")


class DataError(ValueError):
    """A bad record: missing / unreadable image, <image> tags != images, <bboxN> without region N, a
    malformed record or a tokenization mismatch. `record_id` names the record; the message says what."""

    def __init__(self, record_id, message: str):
        self.record_id = record_id
        super().__init__(f"record {record_id!r}: {message}")


class ExampleDropped(Exception):
    """A well-formed example left out on purpose: reason "too_long" (truncation would cut an image's tokens) or
    "no_labels" (no answer token left after truncation, or no answer at all)."""

    def __init__(self, record_id, reason: str, message: str):
        self.record_id, self.reason = record_id, reason
        super().__init__(f"record {record_id!r}: {message}")


# ---------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------

def _default_length_buckets(max_length: int) -> tuple[int, ...]:
    out = {max_length}
    b = 64
    while b < max_length:
        out.add(b)
        b *= 2
    return tuple(sorted(out))


def _default_image_buckets(max_images: int) -> tuple[int, ...]:
    out = {max(1, max_images)}
    b = 1
    while b < max_images:
        out.add(b)
        b *= 2
    return tuple(sorted(out))


def check_batching(length_buckets, group_by_length, max_length: int):
    """Validate the batching settings shared by `DataConfig` and `TrainConfig`; returns length_buckets as a
    tuple of ints (or None). A comma-separated string is accepted (the CLI's form)."""
    if isinstance(length_buckets, str):
        length_buckets = [x.strip() for x in length_buckets.split(",") if x.strip()]
        length_buckets = [int(x) if x.isdigit() else x for x in length_buckets]
    if length_buckets is not None:
        length_buckets = tuple(length_buckets)
        bad = [b for b in length_buckets if not isinstance(b, int) or isinstance(b, bool) or b < 1]
        if bad or not length_buckets:
            raise ValueError(f"length_buckets must be positive integers, got {list(length_buckets)}")
        if max(length_buckets) < max_length:
            raise ValueError(f"length_buckets {list(length_buckets)} must reach max_length {max_length}")
    if not isinstance(group_by_length, int) or isinstance(group_by_length, bool) or group_by_length < 0:
        raise ValueError(f"group_by_length must be a non-negative integer, got {group_by_length!r}")
    return length_buckets


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Settings of the training data. None fields are filled from the processor by `resolve(processor)`.

    template: "llava_v1" (training default) or "llava_v0".
    max_length: longest sequence in tokens (image tokens included); longer examples are truncated or dropped.
    image_seq_length / image_token_index / pad_token_id: tokens per image, the image token id, the pad id.
    pad_to_square: pad images to a square with the CLIP mean colour (the original training) instead of HF's
      centre crop.
    marker_kinds: kinds to draw for region records (None: all eight); a record's own "marker_kinds" wins.
    skip_bad_examples: count and skip a `DataError` record instead of raising.
    seed: shuffling and marker draws.
    batch_size: rows per batch (per host).
    max_images_per_example: more is a `DataError`. Sets the default image buckets.
    length_buckets: the T values a batch can take (None: powers of two from 64, and max_length).
    image_buckets: the I values (None: powers of two up to batch_size * max_images_per_example, and that).
    system_prompt: the system text of the template.
    check_tokenization: compare the piecewise ids with whole-string tokenization (a mismatch is a DataError).
    shuffle: shuffle the records (per epoch, seeded); make_eval_iterator never shuffles.
    group_by_length: k > 1 reads k batches' examples at a time (a run of the shuffled stream), sorts them by
      length and yields them as k batches in a seeded order (Hugging Face's group_by_length with mega-batches):
      rows of a batch have similar lengths, so with fine `length_buckets` far less of T is padding. Batches
      then mix less across lengths. 0 or 1: off. make_eval_iterator never groups.
    cache_examples: keep each record's encoded example (ids, labels, preprocessed images) in memory after its
      first encoding and reuse it in later epochs. Only records without regions are kept (their markers are
      drawn afresh each epoch), so a kept example is exactly what encoding the record again would give. For
      small datasets trained over many epochs: it costs the float32 images' memory (3 x H x W x 4 bytes each,
      in every worker process that encodes the record). make_eval_iterator never caches.
    """
    template: str = "llava_v1"
    max_length: int = 2048
    image_seq_length: int | None = None
    image_token_index: int | None = None
    pad_token_id: int | None = None
    pad_to_square: bool = False
    marker_kinds: tuple[str, ...] | None = None
    skip_bad_examples: bool = False
    seed: int = 0
    batch_size: int = 8
    max_images_per_example: int = 4
    length_buckets: tuple[int, ...] | None = None
    image_buckets: tuple[int, ...] | None = None
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    check_tokenization: bool = True
    shuffle: bool = True
    group_by_length: int = 0
    cache_examples: bool = False

    def __post_init__(self):
        if self.template not in TEMPLATES:
            raise ValueError(f"unknown template {self.template!r}: use one of {', '.join(TEMPLATES)}")
        object.__setattr__(self, "length_buckets",
                           check_batching(self.length_buckets, self.group_by_length, self.max_length))
        for f in ("marker_kinds", "image_buckets"):
            v = getattr(self, f)
            if isinstance(v, str):
                v = [s.strip() for s in v.split(",") if s.strip()]
            if v is not None:
                object.__setattr__(self, f, tuple(v))
        if self.marker_kinds is not None:
            bad = [k for k in self.marker_kinds if k not in vp.MARKER_KINDS]
            if bad or not self.marker_kinds:
                raise ValueError(f"unknown marker kinds {bad or '(none given)'}: use {', '.join(vp.MARKER_KINDS)}")
        if self.max_length < 1 or self.batch_size < 1 or self.max_images_per_example < 0:
            raise ValueError("max_length and batch_size must be >= 1, max_images_per_example >= 0")

    def resolve(self, processor) -> "DataConfig":
        """Fill the None ids / lengths from a `vipllava_jax.data.Processor` (checked against it)."""
        kw = {}
        if self.image_seq_length is None:
            if processor.image_seq_length is None:
                raise ValueError("the processor's image token count depends on the image size: set image_seq_length")
            kw["image_seq_length"] = int(processor.image_seq_length)
        if self.image_token_index is None:
            kw["image_token_index"] = int(processor.image_token_id)
        elif self.image_token_index != processor.image_token_id:
            raise ValueError(f"image_token_index {self.image_token_index} != the tokenizer's "
                             f"{processor.image_token!r} id {processor.image_token_id}")
        if self.pad_token_id is None:
            pad = processor.pad_token_id
            if pad is None:
                raise ValueError("the tokenizer has no pad token: set DataConfig.pad_token_id")
            kw["pad_token_id"] = int(pad)
        return dataclasses.replace(self, **kw) if kw else self

    @classmethod
    def from_train(cls, train_cfg, model_cfg=None, processor=None) -> "DataConfig":
        """From a TrainConfig-like object (same-named fields are taken) and the model config
        (image_token_index, pad_token_id when it has them); resolved against `processor` if given."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: getattr(train_cfg, k) for k in names if hasattr(train_cfg, k)}
        if hasattr(train_cfg, "micro_batch_size"):  # rows per micro-batch, not per optimizer step
            kw["batch_size"] = int(train_cfg.micro_batch_size)
        for k in ("image_token_index", "pad_token_id"):
            v = getattr(model_cfg, k, None) if model_cfg is not None else None
            if v is not None and kw.get(k) is None:
                kw[k] = int(v)
        cfg = cls(**kw)
        return cfg.resolve(processor) if processor is not None else cfg

    @property
    def lengths(self) -> tuple[int, ...]:
        return self.length_buckets or _default_length_buckets(self.max_length)

    def images_buckets(self, batch_size: int | None = None) -> tuple[int, ...]:
        if self.image_buckets:
            return self.image_buckets
        return _default_image_buckets((batch_size or self.batch_size) * self.max_images_per_example)


# ---------------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------------

def load_records(path) -> list[dict]:
    """LLaVA records from a JSON file (a list of records) or JSONL (one record a line; blank lines skipped).
    Errors name the file (and line). Each record must be a dict with a "conversations" list."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise FileNotFoundError(f"Cannot read data file {p}: {e.strerror or e}") from None
    stripped = text.lstrip()
    records: list
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p} is not valid JSON: {e}") from None
    else:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{p} line {n} is not valid JSON: {e}") from None
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("conversations"), list):
            raise ValueError(f"{p}: record {i} (id {r.get('id') if isinstance(r, dict) else None!r}) must be an "
                             "object with a 'conversations' list")
    return records


def record_id(record: dict) -> str:
    """The record's "id" as a string; without one, a digest of its content (stable across runs)."""
    if record.get("id") is not None:
        return str(record["id"])
    return "sha256:" + hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]


def example_rng(seed: int, epoch: int, rid: str) -> np.random.Generator:
    """The generator of one example's random draws: seeded by (seed, epoch, sha256(record id))."""
    h = int.from_bytes(hashlib.sha256(str(rid).encode()).digest()[:8], "little")
    return np.random.default_rng([int(seed) & (2 ** 63 - 1), int(epoch), h])


def _turns(record: dict, rid) -> list[list[str]]:
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise DataError(rid, "has no 'conversations' list")
    msgs = []
    for i, t in enumerate(conv):
        if not isinstance(t, dict) or not isinstance(t.get("value"), str):
            raise DataError(rid, f"conversations[{i}] must be {{'from': ..., 'value': str}}")
        role = str(t.get("from", "")).lower()
        if role not in _HUMAN + _GPT:
            raise DataError(rid, f"conversations[{i}] has role {t.get('from')!r}: use 'human' or 'gpt'")
        msgs.append((role in _GPT, t["value"]))
    if msgs and msgs[0][0]:
        msgs = msgs[1:]  # LLaVA skips a conversation's leading gpt turn
    turns = []
    for j in range(0, len(msgs) - 1, 2):
        (g0, q), (g1, a) = msgs[j], msgs[j + 1]
        if g0 or not g1:
            raise DataError(rid, f"turns must alternate human, gpt (conversations[{j}] onwards)")
        turns.append([q, a])
    if not turns:
        raise DataError(rid, "has no human turn followed by a gpt answer")
    return turns


def _image_paths(record: dict, rid) -> list[str]:
    img = record.get("image")
    if img is None:
        return []
    paths = img if isinstance(img, list) else [img]
    if not all(isinstance(p, str) and p for p in paths):
        raise DataError(rid, f"'image' must be a path or a list of paths, got {img!r}")
    return list(paths)


def _regions(record: dict, rid) -> list[Region]:
    boxes = record.get("bboxes") or []
    segs = record.get("segmentations") or []
    if not isinstance(boxes, list) or not isinstance(segs, list):
        raise DataError(rid, "'bboxes' and 'segmentations' must be lists")
    if boxes and segs and len(boxes) != len(segs):
        raise DataError(rid, f"{len(boxes)} bboxes but {len(segs)} segmentations: one of each per region")
    out = []
    for i in range(max(len(boxes), len(segs))):
        box = boxes[i] if boxes else None
        if box is not None:
            try:
                box = tuple(float(v) for v in box)
            except (TypeError, ValueError):
                box = ()
            if len(box) != 4:
                raise DataError(rid, f"bboxes[{i}] must be [x0, y0, x1, y1], got {boxes[i]!r}")
        polys = segs[i] if segs else None
        if polys is not None:
            if polys and not isinstance(polys[0], (list, tuple)):
                polys = [polys]  # one flat polygon
            try:
                polys = tuple(tuple(float(v) for v in p) for p in polys)
            except (TypeError, ValueError):
                raise DataError(rid, f"segmentations[{i}] must be polygons (flat [x, y, ...] lists)") from None
            polys = polys or None
        if box is None and polys is None:
            raise DataError(rid, f"region {i} has neither a bbox nor a segmentation")
        out.append(Region(box, polys))
    return out


# ---------------------------------------------------------------------------------------------------------
# Templates and tokenization
# ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TemplateParts:
    system: str  # masked: the system text and what follows it before the first user tag
    user_tag: str  # "USER: " / "Human: "
    assistant_tag: str  # " ASSISTANT:" / "###Assistant:" (masked, part of the human turn)
    answer_prefix: str  # " ": the space before an answer belongs to the answer's first token
    end_of_turn: str  # "</s>" / "###" (kept)


def template_parts(template: str, system: str = DEFAULT_SYSTEM_PROMPT) -> TemplateParts:
    """The pieces of `template`, read off `processing.build_prompt` (so the template text lives in one place)."""
    u0, a0, u1, a1 = "\x00U0\x00", "\x00A0\x00", "\x00U1\x00", "\x00A1\x00"
    s = build_prompt([(u0, a0), (u1, a1)], num_images=0, system=system, style=template)
    head, rest = s.split(u0)
    mid, rest = rest.split(a0)
    sep, rest = rest.split(u1)
    mid2, tail = rest.split(a1)
    eot = tail or V0_SEPARATOR  # build_prompt ends a v0 prompt's last answer without its "###"
    if mid != mid2 or not sep.startswith(eot) or not head.endswith(sep[len(eot):]):
        raise ValueError(f"template {template!r} does not have the expected shape: {s!r}")
    user_tag = sep[len(eot):]
    assistant_tag = mid.rstrip(" ")
    return TemplateParts(system=head[:len(head) - len(user_tag)], user_tag=user_tag, assistant_tag=assistant_tag,
                         answer_prefix=mid[len(assistant_tag):], end_of_turn=eot)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def _tokenize_pieces(tokenizer, pieces, rid) -> tuple[list[int], list[int]]:
    """pieces: [(text, keep, is_special)], -> (ids, labels) with the tokenizer's BOS prefix. Each text piece is
    tokenized after the text of its segment so far (a segment starts at a special token), and must extend
    that tokenization: a token across a piece boundary is a DataError."""
    prefix = list(tokenizer("", add_special_tokens=True)["input_ids"])
    ids, labels = list(prefix), [IGNORE_INDEX] * len(prefix)
    ctx, ctx_ids = "", []
    for text, keep, special in pieces:
        if special:
            ctx, ctx_ids = text, _encode(tokenizer, text)
            new = ctx_ids
            if len(new) != 1:
                raise DataError(rid, f"the special token {text!r} is not one token ({new})")
        else:
            full = _encode(tokenizer, ctx + text)
            if full[:len(ctx_ids)] != ctx_ids:
                raise DataError(rid, f"tokenization mismatch: a token spans the boundary before {text[:40]!r}")
            new = full[len(ctx_ids):]
            ctx, ctx_ids = ctx + text, full
        ids += new
        labels += new if keep else [IGNORE_INDEX] * len(new)
    return ids, labels


@dataclasses.dataclass
class Example:
    """One encoded example. input_ids / labels [L] int32 (L <= max_length, images expanded);
    pixel_values [n_images, 3, H, W] float32; text: the prompt string (one <image> per image);
    markers: [(kind, colour, phrase)] per region; epoch: the epoch it was drawn for."""
    record_id: str
    input_ids: np.ndarray
    labels: np.ndarray
    pixel_values: np.ndarray
    text: str
    markers: list
    epoch: int
    truncated: bool = False


def encode_example(record: dict, processor, cfg: DataConfig, *, image_folder=None, epoch: int = 0,
                   image_config: ImageConfig | None = None) -> Example:
    """One record -> an `Example` (text with marker phrases, ids, labels, marked and preprocessed images).

    processor: a `vipllava_jax.data.Processor` (its tokenizer and image settings; `image_config`
      overrides the latter). cfg: a DataConfig (resolved against the processor here if needed).
    image_folder: image paths are relative to it (absolute paths are taken as they are).
    epoch: with cfg.seed and the record id, seeds the marker draw.
    Raises DataError (bad record) or ExampleDropped (too long / nothing to learn).
    """
    cfg = cfg.resolve(processor)
    tok = processor.tokenizer
    rid = record_id(record)
    turns = _turns(record, rid)
    paths = _image_paths(record, rid)
    for q, a in turns:
        if IMAGE_TOKEN in a:
            raise DataError(rid, f"an answer contains {IMAGE_TOKEN}: images go in human turns")
    n_tags = sum(q.count(IMAGE_TOKEN) for q, _ in turns)
    if n_tags == 0 and paths:
        turns[0][0] = (IMAGE_TOKEN + "\n") * len(paths) + turns[0][0]
    elif n_tags != len(paths):
        raise DataError(rid, f"{n_tags} {IMAGE_TOKEN} tag(s) but {len(paths)} image(s) "
                             f"({', '.join(paths) if paths else 'no image field'})")
    if len(paths) > cfg.max_images_per_example:
        raise DataError(rid, f"{len(paths)} images, more than max_images_per_example={cfg.max_images_per_example}")

    # Markers: kind and colours first (they make the text), geometry once the image size is known.
    rng = example_rng(cfg.seed, epoch, rid)
    regions = _regions(record, rid)
    used = sorted({int(m or 0) for q, a in turns for m in _BBOX_RE.findall(q + "\x00" + a)})
    if used and used[-1] >= len(regions):
        raise DataError(rid, f"placeholder <bbox{used[-1]}> but the record has {len(regions)} region(s)")
    if regions and not paths:
        raise DataError(rid, "has bboxes / segmentations but no image to draw them on")
    kinds = record.get("marker_kinds") or cfg.marker_kinds or vp.MARKER_KINDS
    if any(k not in vp.MARKER_KINDS for k in kinds):
        raise DataError(rid, f"marker_kinds {kinds!r}: use {', '.join(vp.MARKER_KINDS)}")
    styles: list[MarkerStyle] = sample_styles(rng, kinds, len(regions)) if regions else []
    if styles:
        sub = lambda m: styles[int(m.group(1) or 0)].phrase  # noqa: E731
        turns = [[_BBOX_RE.sub(sub, q), _BBOX_RE.sub(sub, a)] for q, a in turns]

    # Text pieces -> ids and labels.
    tp = template_parts(cfg.template, cfg.system_prompt)
    eos = tok.eos_token
    pieces: list[tuple[str, bool, bool]] = [(tp.system, False, False)]
    for q, a in turns:
        parts = (tp.user_tag + q + tp.assistant_tag).split(IMAGE_TOKEN)
        pieces.append((parts[0], False, False))
        for p in parts[1:]:
            pieces += [(IMAGE_TOKEN, False, True), (p, False, False)]
        pieces.append((tp.answer_prefix + a, True, False))
        pieces.append((tp.end_of_turn, True, tp.end_of_turn == eos))
    merged: list[tuple[str, bool, bool]] = []
    for p in pieces:  # only boundaries where the label mask changes (or a special token) need to be token edges
        if merged and not p[2] and not merged[-1][2] and merged[-1][1] == p[1]:
            merged[-1] = (merged[-1][0] + p[0], p[1], False)
        elif p[0]:
            merged.append(p)
    pieces = merged
    text = "".join(p[0] for p in pieces)
    whole = build_prompt([tuple(t) for t in turns], num_images=0, system=cfg.system_prompt, style=cfg.template)
    if cfg.template == "llava_v0":
        whole += V0_SEPARATOR
    if text != whole:  # the pieces must spell exactly build_prompt's prompt
        raise DataError(rid, f"internal: pieces {text[:80]!r} != prompt {whole[:80]!r}")
    ids, labels = _tokenize_pieces(tok, pieces, rid)
    if cfg.check_tokenization:
        ref = list(tok(text, add_special_tokens=True)["input_ids"])
        if ref != ids:
            k = next((i for i, (x, y) in enumerate(zip(ref, ids)) if x != y), min(len(ref), len(ids)))
            raise DataError(rid, f"tokenization mismatch at token {k}: piecewise {ids[k:k + 5]} vs whole-string "
                                 f"{ref[k:k + 5]} (set check_tokenization=False to train on the piecewise ids)")
    n_img_tokens = sum(1 for x in ids if x == cfg.image_token_index)
    if n_img_tokens != len(paths):
        raise DataError(rid, f"{len(paths)} images but {n_img_tokens} image tokens after tokenization (is "
                             f"{IMAGE_TOKEN} in the text outside the placeholders?)")

    # Expand each image token, then truncate / drop.
    ids_a, labels_a = np.asarray(ids, np.int64), np.asarray(labels, np.int64)
    is_img = ids_a == cfg.image_token_index
    reps = np.where(is_img, cfg.image_seq_length, 1)
    ids_a, labels_a, is_img = np.repeat(ids_a, reps), np.repeat(labels_a, reps), np.repeat(is_img, reps)
    truncated = False
    if len(ids_a) > cfg.max_length:
        last_img = int(np.nonzero(is_img)[0][-1]) if is_img.any() else -1
        if last_img >= cfg.max_length:
            raise ExampleDropped(rid, "too_long", f"{len(ids_a)} tokens, and max_length={cfg.max_length} would cut "
                                                  f"into image tokens (the last ends at {last_img + 1})")
        ids_a, labels_a, truncated = ids_a[:cfg.max_length], labels_a[:cfg.max_length], True
    if not (labels_a != IGNORE_INDEX).any():
        raise ExampleDropped(rid, "no_labels", f"no answer token within max_length={cfg.max_length}")

    # Images: load, draw the markers on the first, preprocess.
    icfg = image_config or processor.image_config
    pixels = []
    markers_info = [(s.kind, s.color, s.phrase) for s in styles]
    folder = Path(image_folder) if image_folder is not None else None
    for i, rel in enumerate(paths):
        path = Path(rel) if folder is None or os.path.isabs(rel) else folder / rel
        try:
            img = load_image(os.fspath(path))
        except FileNotFoundError:
            raise DataError(rid, f"image not found: {path}") from None
        except (ValueError, OSError) as e:
            raise DataError(rid, f"cannot read image {path}: {e}") from None
        if i == 0 and styles:
            try:
                marks = make_markers(rng, styles, regions, img.size)
                img = vp.draw_markers(img, marks, warn_crop=False)
            except (MarkerError, ValueError) as e:
                raise DataError(rid, f"cannot draw the regions on {path}: {e}") from None
        pixels.append(preprocess_image(img, icfg, pad_to_square=cfg.pad_to_square))
    if pixels:
        pixel_values = np.stack(pixels).astype(np.float32)
    else:
        h, w = icfg.crop_size["height"], icfg.crop_size["width"]
        pixel_values = np.zeros((0, 3, h, w), np.float32)
    return Example(rid, ids_a.astype(np.int32), labels_a.astype(np.int32), pixel_values, text, markers_info,
                   int(epoch), truncated)


# ---------------------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------------------

def _bucket(n: int, buckets: Sequence[int], what: str) -> int:
    for b in sorted(buckets):
        if b >= n:
            return b
    raise ValueError(f"{n} {what} exceed the largest bucket {max(buckets)}")


def collate(examples: Sequence[Example], cfg: DataConfig, batch_size: int | None = None,
            image_shape: tuple[int, int, int] | None = None) -> dict[str, np.ndarray]:
    """Examples -> one batch dict (see the module docstring for keys, shapes and dtypes). Rows beyond the
    examples (up to batch_size) are padding rows; T and I are rounded up to cfg's buckets."""
    b = batch_size or cfg.batch_size
    if len(examples) > b:
        raise ValueError(f"{len(examples)} examples for a batch of {b}")
    t = _bucket(max([len(e.input_ids) for e in examples] + [1]), cfg.lengths, "tokens")
    n_img = sum(e.pixel_values.shape[0] for e in examples)
    i = _bucket(max(n_img, 1), cfg.images_buckets(b), "images")
    if image_shape is None:
        image_shape = next((e.pixel_values.shape[1:] for e in examples), (3, 0, 0))
    input_ids = np.full((b, t), cfg.pad_token_id, np.int32)
    attention_mask = np.zeros((b, t), np.int32)
    labels = np.full((b, t), IGNORE_INDEX, np.int32)
    pixel_values = np.zeros((i,) + tuple(image_shape), np.float32)
    image_valid = np.zeros((i,), bool)
    k = 0
    for r, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[r, :n], attention_mask[r, :n], labels[r, :n] = e.input_ids, 1, e.labels
        m = e.pixel_values.shape[0]
        if m:
            pixel_values[k:k + m] = e.pixel_values
            image_valid[k:k + m] = True
            k += m
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "pixel_values": pixel_values, "image_valid": image_valid,
            "num_tokens": np.asarray((labels != IGNORE_INDEX).sum(), np.int32)}


@dataclasses.dataclass
class _Skip:
    record_id: str
    reason: str  # "too_long", "no_labels", "bad"
    message: str
    epoch: int


class _Encode:
    """The grain map: (index in the repeated, shuffled stream, record) -> Example or _Skip. A class, so it
    pickles to worker processes."""

    def __init__(self, processor, cfg: DataConfig, image_folder, n_records: int, start_epoch: int):
        self.processor, self.cfg, self.image_folder = processor, cfg, image_folder
        self.n, self.start_epoch = n_records, start_epoch
        # cache_examples: id(record) -> (record, Example or _Skip); the record is kept to check identity.
        self._cache: dict | None = {} if cfg.cache_examples else None

    def __getstate__(self):  # a worker process starts with an empty cache
        state = dict(self.__dict__)
        if state["_cache"] is not None:
            state["_cache"] = {}
        return state

    def __call__(self, index: int, record: dict):
        epoch = self.start_epoch + index // self.n
        if self._cache is not None:
            hit = self._cache.get(id(record))
            if hit is not None and hit[0] is record:
                return dataclasses.replace(hit[1], epoch=epoch)
        out = self._encode(record, epoch)
        # A record without regions has one example whatever the epoch (no marker is drawn); a bad one is not
        # kept (its error is raised, or counted each time it comes).
        if self._cache is not None and not (isinstance(out, _Skip) and out.reason == "bad") \
                and not (record.get("bboxes") or record.get("segmentations")):
            self._cache[id(record)] = (record, out)
        return out

    def _encode(self, record: dict, epoch: int):
        try:
            return encode_example(record, self.processor, self.cfg, image_folder=self.image_folder, epoch=epoch)
        except ExampleDropped as e:
            return _Skip(e.record_id, e.reason, str(e), epoch)
        except DataError as e:
            if not self.cfg.skip_bad_examples:
                raise
            return _Skip(e.record_id, "bad", str(e), epoch)


STAT_KEYS = ("batches", "examples", "dropped_too_long", "dropped_no_labels", "skipped_bad", "truncated")


class DataIterator:
    """Batches (dicts, see the module docstring) from a grain pipeline, with exact save / restore.

    `get_state()` -> a JSON-serialisable dict (grain's iterator state and the counters) taken between batches;
    `set_state(state)` on a new iterator built with the same arguments continues with exactly the next batches.
    `stats()` -> {"batches", "examples", "dropped_too_long", "dropped_no_labels", "skipped_bad", "truncated",
    "dropped" (the three drops together), "epoch" (of the last example read), "last_skips" (the last few skip
    messages)}.
    """

    def __init__(self, dataset: grain.IterDataset, cfg: DataConfig, batch_size: int, image_shape,
                 num_batches: int | None = None, group: int = 0):
        self._ds, self._cfg, self._b, self._image_shape = dataset, cfg, batch_size, image_shape
        self._it = iter(dataset)
        self._num_batches = num_batches  # eval: exactly this many batches (padding batches at the end)
        self._stats = {k: 0 for k in STAT_KEYS}
        self._stats["epoch"] = 0
        self._last_skips: list[str] = []
        self._exhausted = False
        # group_by_length: the batches of the current group not yet yielded, and what get_state needs to
        # rebuild the group exactly (grain's state and our counters before it was read, and how many of its
        # batches were already yielded): a group is re-read and re-sorted rather than saved.
        self._group = group if group > 1 else 0
        self._pending: list[list[Example]] = []
        self._group_start: dict | None = None
        self._group_index = 0
        self._yielded = 0

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def _read(self, n: int) -> list[Example]:
        """Up to n examples from the stream (skips counted), fewer only at its end."""
        examples: list[Example] = []
        while len(examples) < n and not self._exhausted:
            try:
                item = next(self._it)
            except StopIteration:
                self._exhausted = True
                break
            self._stats["epoch"] = item.epoch
            if isinstance(item, _Skip):
                key = {"too_long": "dropped_too_long", "no_labels": "dropped_no_labels"}.get(item.reason,
                                                                                             "skipped_bad")
                self._stats[key] += 1
                self._last_skips = (self._last_skips + [item.message])[-5:]
                continue
            self._stats["truncated"] += int(item.truncated)
            examples.append(item)
        return examples

    def _read_group(self) -> None:
        """Read the next group_by_length x B examples, sort them by length (stable: ties keep stream order)
        and queue them as batches in an order drawn from (seed, group index)."""
        self._group_start = {"grain": self._it.get_state(), "stats": dict(self._stats),
                             "last_skips": list(self._last_skips), "exhausted": self._exhausted,
                             "group_index": self._group_index}
        examples = sorted(self._read(self._group * self._b), key=lambda e: len(e.input_ids))
        chunks = [examples[i:i + self._b] for i in range(0, len(examples), self._b)]
        order = np.random.default_rng([self._cfg.seed, self._group_index]).permutation(len(chunks))
        self._pending = [chunks[i] for i in order]
        self._group_index += 1
        self._yielded = 0

    def __next__(self) -> dict[str, np.ndarray]:
        if self._num_batches is not None and self._stats["batches"] >= self._num_batches:
            raise StopIteration
        if self._group:
            if not self._pending:
                self._read_group()
            examples = self._pending.pop(0) if self._pending else []
            self._yielded += 1
        else:
            examples = self._read(self._b)
        if not examples and (self._num_batches is None or self._stats["batches"] >= self._num_batches):
            raise StopIteration
        self._stats["batches"] += 1
        self._stats["examples"] += len(examples)
        return collate(examples, self._cfg, self._b, self._image_shape)

    def get_state(self) -> dict:
        if self._group and self._pending:
            start = self._group_start
            return {"grain": start["grain"], "stats": start["stats"], "exhausted": start["exhausted"],
                    "group": {"index": start["group_index"], "yielded": self._yielded,
                              "last_skips": start["last_skips"]}}
        state = {"grain": self._it.get_state(), "stats": dict(self._stats), "exhausted": self._exhausted}
        if self._group:
            state["group"] = {"index": self._group_index, "yielded": 0, "last_skips": list(self._last_skips)}
        return state

    def set_state(self, state: dict) -> None:
        group = state.get("group")
        if bool(group) != bool(self._group):
            raise ValueError("this data state was saved with group_by_length "
                             f"{'on' if group else 'off'}; the iterator has it {'on' if self._group else 'off'}")
        self._it.set_state(state["grain"])
        self._stats = {**{k: 0 for k in STAT_KEYS}, "epoch": 0, **state.get("stats", {})}
        self._exhausted = bool(state.get("exhausted", False))
        self._pending, self._yielded = [], 0
        if group:
            self._group_index = int(group["index"])
            self._last_skips = list(group.get("last_skips", []))
            if group["yielded"]:  # the save fell inside a group: read it again and skip what was yielded
                self._read_group()
                for _ in range(int(group["yielded"])):
                    examples = self._pending.pop(0)
                    self._yielded += 1
                    self._stats["batches"] += 1
                    self._stats["examples"] += len(examples)

    def close(self) -> None:
        """Stop grain's worker processes / threads now (otherwise they stop when the iterator is collected)."""
        close = getattr(self._it, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "DataIterator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> dict:
        s = dict(self._stats)
        s["dropped"] = s["dropped_too_long"] + s["dropped_no_labels"] + s["skipped_bad"]
        s["last_skips"] = list(self._last_skips)
        return s


def _pipeline(records, processor, cfg, image_folder, *, shard_index, shard_count, num_epochs, start_epoch,
              shuffle, num_workers, num_threads, allow_empty=False):
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} must be in [0, {shard_count})")
    share = list(records)[shard_index::shard_count]
    if not share and not allow_empty:
        raise ValueError(f"host {shard_index} of {shard_count} gets no records ({len(records)} in all)")
    ds = grain.MapDataset.source(share)
    if shuffle:
        ds = ds.shuffle(seed=cfg.seed)  # grain reshuffles each repetition: another (seeded) order per epoch
    ds = ds.repeat(num_epochs)
    ds = ds.map_with_index(_Encode(processor, cfg, image_folder, max(len(share), 1), start_epoch))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(2 * num_threads, 1)))
    if num_workers > 0:
        if not absl_flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app, use defaults
            absl_flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return it, len(share)


class _HostRows:
    """Index k of one host's stream -> index in the global stream. Host i of p takes rows [i*b, (i+1)*b) of
    every global batch of p*b rows, so the global batches are the same whatever the number of hosts."""

    def __init__(self, source: grain.MapDataset, rows: int, hosts: int, host: int):
        self.source, self.rows, self.hosts, self.host = source, rows, hosts, host

    def global_index(self, k: int) -> int:
        return (k // self.rows) * self.rows * self.hosts + self.host * self.rows + k % self.rows

    def __call__(self, k: int):
        return self.source[self.global_index(k)]


def _host_length(total: int, rows: int, hosts: int, host: int) -> int:
    """How many of a global stream of `total` items host `host` gets under `_HostRows`."""
    blocks, rem = divmod(total, rows)
    n = (blocks // hosts + (1 if blocks % hosts > host else 0)) * rows
    return n + (rem if blocks % hosts == host else 0)


def _train_pipeline(records, processor, cfg, image_folder, *, rows, shard_index, shard_count, num_epochs,
                    start_epoch, num_workers, num_threads):
    """The global stream (every record, shuffled per epoch with cfg.seed, repeated), of which this host
    encodes only its own rows of each global batch."""
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} must be in [0, {shard_count})")
    if not records:
        raise ValueError("no training records")
    ds = grain.MapDataset.source(list(records))
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)  # grain reshuffles each repetition: another (seeded) order per epoch
    ds = ds.repeat(num_epochs)
    ds = ds.map_with_index(_Encode(processor, cfg, image_folder, len(records), start_epoch))
    total = len(records) * num_epochs if num_epochs is not None else sys.maxsize // 2
    local = grain.MapDataset.range(_host_length(total, rows, shard_count, shard_index))
    local = local.map(_HostRows(ds, rows, shard_count, shard_index))
    it = local.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                 prefetch_buffer_size=max(2 * num_threads, 1)))
    if num_workers > 0:
        if not absl_flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app, use defaults
            absl_flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return it


def _image_shape(processor, cfg) -> tuple[int, int, int]:
    ic = processor.image_config
    return 3, ic.crop_size["height"], ic.crop_size["width"]


def make_train_iterator(records: Sequence[dict], processor, cfg: DataConfig, *, image_folder=None,
                        num_epochs: int | None = None, start_epoch: int = 0, batch_size: int | None = None,
                        shard_index: int = 0, shard_count: int = 1, num_workers: int = 0,
                        num_threads: int = 2) -> DataIterator:
    """Training batches: this host's share of `records`, shuffled per epoch, encoded, batched.

    records: all records (every host passes the same list). They form one global stream, shuffled per epoch;
      host `shard_index` of `shard_count` (pass jax.process_index() / jax.process_count()) reads and encodes
      only its own rows of each global batch of shard_count x batch_size rows: the hosts' shares are disjoint
      and together complete, and the global batches do not depend on the number of hosts (as long as no
      example is dropped: a host replaces a dropped example with its next one).
    num_epochs: None repeats forever (the train loop stops at its step count); epoch e (from start_epoch)
      shuffles with grain's per-repetition permutation of cfg.seed and seeds the markers with e.
    batch_size: rows per batch on this host (default cfg.batch_size).
    num_workers: >0 runs encoding (image decode, markers, preprocessing) in that many grain worker
      processes (`mp_prefetch`), overlapping with the device; 0 runs it in `num_threads` threads of this process.
    cfg.group_by_length > 1 sorts each run of that many of this host's batches by length (each host its own
      rows, so with grouping the global batches do depend on the number of hosts).
    Returns a `DataIterator` (get_state / set_state / stats); each batch has the keys of the module docstring.
    """
    cfg = cfg.resolve(processor)
    b = batch_size or cfg.batch_size
    it = _train_pipeline(records, processor, cfg, image_folder, rows=b, shard_index=shard_index,
                         shard_count=shard_count, num_epochs=num_epochs, start_epoch=start_epoch,
                         num_workers=num_workers, num_threads=num_threads)
    return DataIterator(it, cfg, b, _image_shape(processor, cfg), group=cfg.group_by_length)


def make_eval_iterator(records: Sequence[dict], processor, cfg: DataConfig, *, image_folder=None,
                       batch_size: int | None = None, shard_index: int = 0, shard_count: int = 1,
                       num_workers: int = 0, num_threads: int = 2) -> DataIterator:
    """One pass over this host's share, in order, markers drawn for epoch 0. Every host yields the same number
    of batches, ceil(ceil(len(records) / shard_count) / batch_size), the last ones filled with padding rows
    (labels -100), so hosts never wait on each other's collectives."""
    cfg = dataclasses.replace(cfg.resolve(processor), shuffle=False, cache_examples=False)  # one pass: no reuse
    b = batch_size or cfg.batch_size
    it, _ = _pipeline(records, processor, cfg, image_folder, shard_index=shard_index, shard_count=shard_count,
                      num_epochs=1, start_epoch=0, shuffle=False, num_workers=num_workers, num_threads=num_threads,
                      allow_empty=True)
    per_host = -(-len(records) // shard_count)
    return DataIterator(it, cfg, b, _image_shape(processor, cfg), num_batches=-(-per_host // b))
