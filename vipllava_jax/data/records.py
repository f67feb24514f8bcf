"""LLaVA conversation records: the one schema that fine-tuning (`vipllava_jax.training`) and evaluation
(`vipllava_jax.evals`) read.

Records (LLaVA's format, a JSON list or JSONL, `load_records`)::

    {"id": "000001", "image": "coco/1.jpg" | ["a.jpg", "b.jpg"] | absent (text only),
     "conversations": [{"from": "human", "value": "<image>\\nWhat is <bbox0>?"},
                       {"from": "gpt", "value": "A cat."}, ...],
     "bboxes": [[x0, y0, x1, y1], ...],                      # optional, pixels of the (first) image
     "segmentations": [[[x, y, x, y, ...], ...], ...],       # optional, per region COCO polygons
     "marker_kinds": ["rectangle", "arrow"]}                 # optional, the marker kinds to draw

- Ids (`record_id`): "id" as a string; without one, a digest of the record's content (stable across runs).
- Roles: "human"/"user" and "gpt"/"assistant" (`HUMAN_ROLES`, `GPT_ROLES`), alternating (`parse_turns`). A leading
  gpt turn is dropped and so is a trailing human turn without an answer (LLaVA drops the former; the latter has
  nothing to learn).
- Images (`image_paths`): a path or a list of paths, relative to an image folder the reader is given.
- Regions (`parse_regions`): region N is ``bboxes[N]`` and / or ``segmentations[N]`` (one of each per region when
  both are given); ``<bboxN>`` (``<bbox>`` = ``<bbox0>``) in a turn names region N, and the phrase of the marker
  drawn for it replaces the placeholder (`fill_placeholders`). `polygon_mask` rasterises a segmentation.

A malformed record is a `RecordError` naming the record (``record '<id>': ...``): each reader raises its own
subclass (training's `DataError`, evaluation's `EvalError`), passed as ``error``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["HUMAN_ROLES", "GPT_ROLES", "BBOX_RE", "RecordError", "Region", "read_json_or_jsonl", "load_records",
           "record_id", "role", "parse_turns", "image_paths", "parse_regions", "fill_placeholders", "polygon_mask"]

HUMAN_ROLES = ("human", "user")
GPT_ROLES = ("gpt", "assistant")
BBOX_RE = re.compile(r"<bbox(\d*)>")  # group 1: the region index ("" for <bbox>, region 0)


class RecordError(ValueError):
    """A bad record: `record_id` names it, the message says what (and the path)."""

    def __init__(self, record_id, message: str):
        self.record_id, self.message = record_id, message
        super().__init__(f"record {record_id!r}: {message}")

    def __reduce__(self):  # picklable as itself: grain's worker processes send it back to the loop
        if "message" not in self.__dict__:  # a subclass built with other arguments
            return super().__reduce__()
        return type(self), (self.record_id, self.message), self.__dict__


@dataclasses.dataclass(frozen=True)
class Region:
    box: tuple | None  # (x0, y0, x1, y1) pixels
    polygons: tuple | None = None  # ((x0, y0, x1, y1, ...), ...) pixels, COCO style


def read_json_or_jsonl(path) -> list:
    """The items of a JSON file holding a list, or of a JSONL file (one item a line; blank lines skipped).
    Errors name the file (and line)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise FileNotFoundError(f"Cannot read data file {p}: {e.strerror or e}") from None
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p} is not valid JSON: {e}") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{p} line {n} is not valid JSON: {e}") from None
    return out


def load_records(path) -> list[dict]:
    """LLaVA records from a JSON file (a list of records) or JSONL (one record a line; blank lines skipped).
    Errors name the file (and line). Each record must be a dict with a "conversations" list."""
    p = Path(path)
    records = read_json_or_jsonl(p)
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


def role(turn: dict) -> str:
    """A conversation turn's "from", lower case ("" when absent): one of HUMAN_ROLES / GPT_ROLES when valid."""
    return str(turn.get("from", "")).lower()


def parse_turns(record: dict, rid, error: type[RecordError] = RecordError) -> list[list[str]]:
    """[[question, answer], ...]: the record's human / gpt exchanges, checked (see the module docstring)."""
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise error(rid, "has no 'conversations' list")
    msgs = []
    for i, t in enumerate(conv):
        if not isinstance(t, dict) or not isinstance(t.get("value"), str):
            raise error(rid, f"conversations[{i}] must be {{'from': ..., 'value': str}}")
        r = role(t)
        if r not in HUMAN_ROLES + GPT_ROLES:
            raise error(rid, f"conversations[{i}] has role {t.get('from')!r}: use 'human' or 'gpt'")
        msgs.append((r in GPT_ROLES, t["value"]))
    if msgs and msgs[0][0]:
        msgs = msgs[1:]  # LLaVA skips a conversation's leading gpt turn
    out = []
    for j in range(0, len(msgs) - 1, 2):
        (g0, q), (g1, a) = msgs[j], msgs[j + 1]
        if g0 or not g1:
            raise error(rid, f"turns must alternate human, gpt (conversations[{j}] onwards)")
        out.append([q, a])
    if not out:
        raise error(rid, "has no human turn followed by a gpt answer")
    return out


def image_paths(record: dict, rid, error: type[RecordError] = RecordError) -> list[str]:
    """The record's image paths as given ([] when it has no "image")."""
    img = record.get("image")
    if img is None:
        return []
    paths = img if isinstance(img, list) else [img]
    if not all(isinstance(p, str) and p for p in paths):
        raise error(rid, f"'image' must be a path or a list of paths, got {img!r}")
    return list(paths)


def parse_regions(record: dict, rid, texts: Sequence[str], has_image: bool,
                  error: type[RecordError] = RecordError) -> tuple[list[Region], list[int]]:
    """(regions, used): the record's regions, and the region indices the ``<bboxN>`` placeholders in `texts`
    name (sorted, distinct). A placeholder without its region, regions and no image to draw them on, or a NaN or
    infinite coordinate (in a bbox or a polygon) is an error."""
    boxes = record.get("bboxes") or []
    segs = record.get("segmentations") or []
    if not isinstance(boxes, list) or not isinstance(segs, list):
        raise error(rid, "'bboxes' and 'segmentations' must be lists")
    if boxes and segs and len(boxes) != len(segs):
        raise error(rid, f"{len(boxes)} bboxes but {len(segs)} segmentations: one of each per region")
    regions = []
    for i in range(max(len(boxes), len(segs))):
        box = boxes[i] if boxes else None
        if box is not None:
            try:
                box = tuple(float(v) for v in box)
            except (TypeError, ValueError):
                box = ()
            if len(box) != 4:
                raise error(rid, f"bboxes[{i}] must be [x0, y0, x1, y1], got {boxes[i]!r}")
            if not all(math.isfinite(v) for v in box):
                raise error(rid, f"bboxes[{i}] (region {i}) has a NaN or infinite coordinate: {list(boxes[i])!r}")
        polys = segs[i] if segs else None
        if polys is not None:
            try:
                if polys and not isinstance(polys[0], (list, tuple)):
                    polys = [polys]  # one flat polygon
                polys = tuple(tuple(float(v) for v in p) for p in polys)
            except (TypeError, ValueError):
                raise error(rid, f"segmentations[{i}] must be polygons (flat [x, y, ...] lists)") from None
            bad = next((j for j, p in enumerate(polys) if not all(math.isfinite(v) for v in p)), None)
            if bad is not None:
                raise error(rid, f"segmentations[{i}] (region {i}), polygon {bad}, has a NaN or infinite coordinate")
            polys = polys or None
        if box is None and polys is None:
            raise error(rid, f"region {i} has neither a bbox nor a segmentation")
        regions.append(Region(box, polys))
    used = sorted({int(m or 0) for t in texts for m in BBOX_RE.findall(t)})
    if used and used[-1] >= len(regions):
        raise error(rid, f"placeholder <bbox{used[-1]}> but the record has {len(regions)} region(s)")
    if regions and not has_image:
        raise error(rid, "has bboxes / segmentations but no image to draw them on")
    return regions, used


def fill_placeholders(text: str, phrases: Sequence[str]) -> str:
    """`text` with each ``<bboxN>`` replaced by phrases[N]."""
    return BBOX_RE.sub(lambda m: phrases[int(m.group(1) or 0)], text)


def polygon_mask(polygons, size: tuple[int, int]) -> np.ndarray:
    """bool [H, W]: the union of COCO-style polygons (flat [x, y, ...] lists) on an image of size (w, h).
    A NaN or infinite coordinate is a ValueError (Pillow would draw a wrong, larger shape)."""
    img = Image.new("L", size, 0)
    d = ImageDraw.Draw(img)
    for poly in polygons:
        pts = [float(v) for v in poly]
        if not all(math.isfinite(v) for v in pts):
            raise ValueError(f"polygon {pts} has a NaN or infinite coordinate")
        if len(pts) >= 6 and len(pts) % 2 == 0:
            d.polygon(list(zip(pts[0::2], pts[1::2])), fill=1, outline=1)
    return np.asarray(img) > 0
