"""Fine-tuning text: one LLaVA record (`vipllava_jax.data.records`) -> an `Example`: input ids, labels and marked,
preprocessed images.

- ``<image>`` marks where each image goes (in human turns). A record with images and no ``<image>`` anywhere
  gets ``<image>\\n`` x (number of images) prepended to its first human turn, as LLaVA does. Any other
  mismatch between tags and images is a `DataError`.
- Regions: ``<bboxN>`` (``<bbox>`` = ``<bbox0>``) in any turn becomes the phrase of region N's marker, drawn
  on the first image (see `vipllava_jax.data.markers` for the kinds, colours, widths, opacities and how mask
  kinds treat box-only regions). The draw comes from ``numpy.random.default_rng([seed, epoch, sha256(id)])``:
  the same (seed, epoch, record id) gives the same pixels and text, another epoch a fresh draw. Never global
  random.

Text (`encode_example`): the template (``llava_v1``, the training default, or ``llava_v0``, the HF model
card's) is taken from `vipllava_jax.data.build_prompt` (its text is not repeated here):

    llava_v1: ``{system} USER: <image>\\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>``
    llava_v0: ``{system}###Human: <image>\\nQ1###Assistant: A1###Human: Q2###Assistant: A2###``

The end of an assistant turn is ``</s>`` (the eos token) for v1, and for v0 the ``###`` separator (see
`vipllava_jax.data.prompts`: training puts it after every answer so the model learns to stop there).

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

Before training (`validate_records`, `check_records`; the trainer's setup calls the latter): every record goes
through the same parsing and checks as `encode_example` except tokenization and image decoding (structure,
``<image>`` tags against images, regions and their coordinates, marker kinds), its image files must exist, and a
region must have area on its image (size from the file header). Every bad record is reported in one error, or,
with skip_bad_examples, left out up front and counted in one log line.

Too long (> max_length): the text after the last image is cut; an example whose cut would reach an image's
tokens (or that has no answer token left) is dropped and counted, never passed on with a token/feature mismatch.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..data import visual_prompts as vp
from ..data.clip import ImageConfig, preprocess_image
from ..data.images import load_image
from ..data.markers import MarkerError, MarkerStyle, _clip_box, make_markers, sample_styles
from ..data.prompts import IMAGE_TOKEN, V0_SEPARATOR, build_prompt, template_parts
from ..data.records import (RecordError, fill_placeholders, image_paths, parse_regions, parse_turns,
                            polygon_mask, record_id)
from .config import DataConfig
from .loss import IGNORE_INDEX

__all__ = ["DataError", "BadRecordsError", "ExampleDropped", "Example", "encode_example", "example_rng",
           "validate_records", "check_records"]


class DataError(RecordError):
    """A bad record: missing / unreadable image, <image> tags != images, <bboxN> without region N, a
    malformed record or a tokenization mismatch. `record_id` names the record; the message says what."""


class ExampleDropped(Exception):
    """A well-formed example left out on purpose: reason "too_long" (truncation would cut an image's tokens) or
    "no_labels" (no answer token left after truncation, or no answer at all)."""

    def __init__(self, record_id, reason: str, message: str):
        self.record_id, self.reason = record_id, reason
        super().__init__(f"record {record_id!r}: {message}")


def example_rng(seed: int, epoch: int, rid: str) -> np.random.Generator:
    """The generator of one example's random draws: seeded by (seed, epoch, sha256(record id))."""
    h = int.from_bytes(hashlib.sha256(str(rid).encode()).digest()[:8], "little")
    return np.random.default_rng([int(seed) & (2 ** 63 - 1), int(epoch), h])


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


def _parse_record(record: dict, cfg: DataConfig) -> tuple[str, list[list[str]], list[str], list, Sequence]:
    """(record id, turns, image paths, regions, marker kinds) of a record, every check on its structure that
    needs neither the tokenizer nor the images' pixels: turns, image paths, <image> tags against images (a
    record with images and no tag gets them prepended to its first turn), <bboxN> against regions, region
    values, marker kinds. Raises DataError. Shared by `encode_example` and `validate_records`."""
    if not isinstance(record, dict):
        raise DataError(None, f"must be an object with a 'conversations' list, got {type(record).__name__}")
    rid = record_id(record)
    turns = parse_turns(record, rid, DataError)
    paths = image_paths(record, rid, DataError)
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
    regions, _ = parse_regions(record, rid, [t for qa in turns for t in qa], bool(paths), DataError)
    kinds = record.get("marker_kinds") or cfg.marker_kinds or vp.MARKER_KINDS
    if not isinstance(kinds, (list, tuple)) or any(k not in vp.MARKER_KINDS for k in kinds):
        raise DataError(rid, f"marker_kinds {kinds!r}: use {', '.join(vp.MARKER_KINDS)}")
    return rid, turns, paths, regions, kinds


def _image_path(image_folder, rel: str) -> Path:
    """Where an image path of a record points: relative to `image_folder` unless absolute."""
    return Path(rel) if image_folder is None or os.path.isabs(rel) else Path(image_folder) / rel


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
    rid, turns, paths, regions, kinds = _parse_record(record, cfg)

    # Markers: kind and colours first (they make the text), geometry once the image size is known.
    rng = example_rng(cfg.seed, epoch, rid)
    styles: list[MarkerStyle] = sample_styles(rng, kinds, len(regions)) if regions else []
    if styles:
        phrases = [s.phrase for s in styles]
        turns = [[fill_placeholders(q, phrases), fill_placeholders(a, phrases)] for q, a in turns]

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
    for i, rel in enumerate(paths):
        path = _image_path(image_folder, rel)
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


# --- the check before training -----------------------------------------------------------------------------------
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height (load_image applies them)


class BadRecordsError(DataError):
    """Bad records found before training (`check_records`): one line naming each (up to a limit) by index and id.
    problems: [(index, DataError)], every one found."""

    def __init__(self, message: str, problems=()):
        self.problems = list(problems)
        self.record_id = self.problems[0][1].record_id if self.problems else None
        ValueError.__init__(self, message)


class _Images:
    """What `validate_records` learns about each image path, asked once per path: does it exist (a stat), and
    for region records the size from the file's header (no pixel decoding)."""

    def __init__(self, image_folder):
        self.folder = image_folder
        self._exists: dict[str, str | None] = {}
        self._size: dict[str, tuple | str] = {}

    def missing(self, rel: str) -> str | None:
        """None when the image file is there, else what encode_example would say."""
        if rel not in self._exists:
            path = _image_path(self.folder, rel)
            if path.is_file():
                self._exists[rel] = None
            elif path.exists():
                self._exists[rel] = f"cannot read image {path}: it is a directory"
            else:
                self._exists[rel] = f"image not found: {path}"
        return self._exists[rel]

    def size(self, rel: str):
        """(width, height) as load_image will see it (EXIF orientation applied), or an error message."""
        if rel not in self._size:
            path = _image_path(self.folder, rel)
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", Image.DecompressionBombWarning)
                    im = Image.open(path)
                with im:
                    w, h = im.size
                    if im.getexif().get(0x0112) in _ROTATED:
                        w, h = h, w
                if any(issubclass(c.category, Image.DecompressionBombWarning) for c in caught):
                    raise ValueError(f"{w}x{h} = {w * h} pixels exceeds Pillow's limit PIL.Image.MAX_IMAGE_PIXELS="
                                     f"{Image.MAX_IMAGE_PIXELS}")
                self._size[rel] = (w, h)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                self._size[rel] = f"cannot read image {path}: {type(e).__name__}: {e}"
        return self._size[rel]


def _polygons_have_area(polygons, size) -> bool:
    """polygon_mask(polygons, size).any(), without drawing when a vertex of a drawn polygon lies on the image
    (polygon_mask draws its outline too, so at least that pixel)."""
    w, h = size
    for p in polygons:
        if len(p) >= 6 and len(p) % 2 == 0 and any(0 <= x <= w - 1 and 0 <= y <= h - 1
                                                     for x, y in zip(p[0::2], p[1::2])):
            return True
    return bool(polygon_mask(polygons, size).any())


def _check_regions(rid, regions, size, path) -> None:
    """The geometry checks `make_markers` makes once the image size is known (a segmentation or box with no
    area on the image), with its own functions."""
    for i, reg in enumerate(regions):
        try:
            if reg.polygons and not _polygons_have_area(reg.polygons, size):
                raise MarkerError(f"region {i}: its segmentation has no area on the {size[0]}x{size[1]} image")
            if reg.box is not None:
                _clip_box(reg.box, size)
        except (MarkerError, ValueError) as e:
            raise DataError(rid, f"cannot draw the regions on {path}: {e}") from None


def validate_records(records, cfg: DataConfig, *, image_folder=None, progress: bool = False,
                     desc: str = "checking records") -> tuple[list, list]:
    """A fast pass over every record before training: (good records, problems) where problems is
    [(index, DataError)] in record order.

    Checks what `encode_example` checks, with its own functions, except what needs the tokenizer or the
    pixels: the record's structure and turns, <image> tags against images, max_images_per_example,
    <bboxN> placeholders against regions, region coordinates (NaN / infinite refused), marker kinds; that
    every image file exists; and for records with regions, that each region has area on the first image (its
    size read from the file header). Not checked here (found, as before, when the example is encoded):
    images that exist but cannot be decoded (unless a region record's header is unreadable), tokenization
    mismatches, and too-long examples (dropped and counted, not errors).
    progress: a tqdm bar (shown only when the pass takes over a second).
    """
    images = _Images(image_folder)
    good, problems = [], []
    for i, record in enumerate(tqdm(records, desc=desc, unit=" records", disable=not progress, delay=1.0,
                                    mininterval=0.5)):
        try:
            rid, _, paths, regions, _ = _parse_record(record, cfg)
            for rel in paths:
                msg = images.missing(rel)
                if msg is not None:
                    raise DataError(rid, msg)
            if regions:
                size = images.size(paths[0])
                if isinstance(size, str):
                    raise DataError(rid, size)
                _check_regions(rid, regions, size, _image_path(image_folder, paths[0]))
        except DataError as e:
            problems.append((i, e))
        else:
            good.append(record)
    return good, problems


def check_records(records, cfg: DataConfig, *, image_folder=None, source: str = "the data",
                  progress: bool = False, log=print, limit: int = 20) -> list:
    """`validate_records`, then: no bad record -> `records`; bad ones and not cfg.skip_bad_examples -> one
    `BadRecordsError` naming the first `limit` (index and id, what is wrong) and how many more; with
    skip_bad_examples -> the good records, after one `log` line counting the bad ones. Every record bad is an
    error either way."""
    good, problems = validate_records(records, cfg, image_folder=image_folder, progress=progress,
                                      desc=f"checking {Path(source).name}" if source else "checking records")
    if not problems:
        return list(records)
    n, total = len(problems), len(records)
    listed = "; ".join(f"#{i} {e}" for i, e in problems[:limit])
    more = f"; and {n - limit} more" if n > limit else ""
    if not good:
        raise BadRecordsError(f"all {total} record(s) of {source} are bad: {listed}{more}", problems)
    if not cfg.skip_bad_examples:
        raise BadRecordsError(f"{n} bad record(s) of {total} in {source}, found before training (fix them, or "
                              f"pass --skip-bad-examples to leave them out): {listed}{more}", problems)
    log(f"Left out {n} bad record(s) of {total} in {source} (skip_bad_examples); the first: #{problems[0][0]} "
        f"{problems[0][1]}")
    return good
