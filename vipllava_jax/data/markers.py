"""Random visual prompts for training, drawn as ViP-LLaVA's training drew them, from an explicit numpy Generator.

ViP-LLaVA's loader (``llava/visual_prompt_generator.py``) drew one marker kind per example, a colour per
region and a random width / opacity with Python's global ``random``. Here the same draw comes from the
``numpy.random.Generator`` the caller passes in (seeded by (seed, epoch, record id) in
`vipllava_jax.training.encoding`), so a rerun or a resumed run draws the same pixels. The drawing itself is
`visual_prompts`.

Two steps, so the text can be built (and a too-long example dropped) before any image is read:

- `sample_styles(rng, kinds, n_regions)` -> `MarkerStyle`s: the kind (one per example, as training), and per
  region the colour: half the examples use distinct named training colours (red, lime, ... gold; the phrase
  says "the red rectangle"), the other half a random RGB colour that is none of the nine (the phrase has no
  colour word, "the rectangle", as `visual_prompts.marker_phrase` does for an unnamed colour). Their
  `.phrase` is what replaces ``<bboxN>`` in the text.
- `make_markers(rng, styles, regions, size)` -> `visual_prompts` marker objects for an image of `size`
  (width, height), with width / alpha / geometry random within training's ranges (../shared facts table),
  sizes scaled by max(width, height) / 336:

  ========== ====================================================================================
  rectangle  the box; width 2-8
  ellipse    the box scaled about its centre by U(1, 1.5) (clipped to the image); width 2-8
  triangle   3 seeded points in the box, largest angle under 150 degrees; width 2-8
  point      a dot near the box centre (+-10% of the box); radius 5-20 (round: no aspect jitter)
  scribble   a seeded cubic Bezier through 4 points in the box; width 2-12
  arrow      head at the box centre +-25%, tail in a random direction, length 0.5-1.5 x the box's larger
             side (clipped to the image); head size max(U(0.2, 0.5) x length, 6); shaft width 1-6
  mask_contour  the region's polygon(s) outlined; width 1-2
  mask       the region's polygon(s) filled; opacity 48-128 of 255
  ========== ====================================================================================

  Opacity is 96-255 of 255 for every kind but the filled mask.

Regions: `records.Region(box, polygons)`; box (x0, y0, x1, y1) in pixels, polygons COCO style (a list of flat
[x0, y0, x1, y1, ...] lists) or None. **Mask kinds on a box-only region use the box as the polygon** (a filled or
outlined rectangle) rather than being excluded, so every kind stays available for box-only data; restrict
the kinds (``marker_kinds``) to exclude them. The kinds that training placed inside the mask (point,
triangle, scribble) use the box here.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from . import visual_prompts as vp
from .records import Region, polygon_mask

__all__ = ["MarkerStyle", "MarkerError", "sample_styles", "make_markers", "ANCHOR"]

ANCHOR = 336  # sizes are for a 336 px image and scale with max(width, height) / 336, as in training

WIDTH_RANGE = {"rectangle": (2, 8), "ellipse": (2, 8), "triangle": (2, 8), "scribble": (2, 12),
               "arrow": (1, 6), "mask_contour": (1, 2)}
POINT_RADIUS_RANGE = (5, 20)
ALPHA_RANGE = (96, 255)  # of 255
MASK_ALPHA_RANGE = (48, 128)
ELLIPSE_SCALE_RANGE = (1.0, 1.5)
ARROW_HEAD_RANGE = (0.2, 0.5)
NAMED_PROBABILITY = 0.5  # training: half the time a random unnamed RGB colour


class MarkerError(ValueError):
    """A region that cannot be drawn (a degenerate or off-image box, a polygon without area)."""


@dataclasses.dataclass(frozen=True)
class MarkerStyle:
    kind: str
    color: Any  # a NAMED_COLORS name (str) or an unnamed (r, g, b) tuple

    @property
    def color_word(self) -> str | None:
        return vp.color_name(self.color)

    @property
    def phrase(self) -> str:
        """The words that replace the region's placeholder: "within the red rectangle", "with the mask"."""
        return vp.marker_phrase(self)  # reads .kind and .color only


def _random_unnamed_rgb(rng: np.random.Generator) -> tuple[int, int, int]:
    named = set(vp.NAMED_COLORS.values())
    while True:
        rgb = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if rgb not in named:
            return rgb


def sample_styles(rng: np.random.Generator, kinds: Sequence[str], n_regions: int) -> list[MarkerStyle]:
    """One kind for the example (drawn from `kinds`), one colour per region (named and distinct while the nine
    last, or unnamed random RGB, each with probability 1/2 per example)."""
    kinds = list(kinds)
    if not kinds:
        raise ValueError("no marker kinds to draw from")
    kind = kinds[int(rng.integers(len(kinds)))]
    if n_regions <= 0:
        return []
    names = list(vp.NAMED_COLORS)
    if rng.random() < NAMED_PROBABILITY:
        idx = rng.permutation(len(names)).tolist()
        while len(idx) < n_regions:  # more regions than colours: repeat the pool
            idx += rng.permutation(len(names)).tolist()
        colors: list[Any] = [names[i] for i in idx[:n_regions]]
    else:
        colors = [_random_unnamed_rgb(rng) for _ in range(n_regions)]
    return [MarkerStyle(kind, c) for c in colors]


def _clip_box(box, size) -> tuple[float, float, float, float]:
    w, h = size
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = min(max(x0, 0.0), w), min(max(x1, 0.0), w)
    y0, y1 = min(max(y0, 0.0), h), min(max(y1, 0.0), h)
    if x1 - x0 < 1 or y1 - y0 < 1:
        raise MarkerError(f"box {tuple(box)} has no area on the {w}x{h} image")
    return x0, y0, x1, y1


def _scaled(rng, lo_hi, scale) -> int:
    lo, hi = lo_hi
    return max(1, int(round(int(rng.integers(lo, hi + 1)) * scale)))


def _arrow(rng, box, size, scale, width, color, alpha) -> vp.Arrow:
    w, h = size
    x0, y0, x1, y1 = box
    bw, bh = x1 - x0, y1 - y0
    hx = min(max((x0 + x1) / 2 + rng.uniform(-0.25, 0.25) * bw, 0.0), w)
    hy = min(max((y0 + y1) / 2 + rng.uniform(-0.25, 0.25) * bh, 0.0), h)
    want = rng.uniform(0.5, 1.5) * max(bw, bh)
    min_len = max(8.0 * scale, 2.0)
    tail = None
    for _ in range(8):
        t = rng.uniform(0, 2 * math.pi)
        tx = min(max(hx + want * math.cos(t), 0.0), w)
        ty = min(max(hy + want * math.sin(t), 0.0), h)
        if math.hypot(tx - hx, ty - hy) >= min_len:
            tail = (tx, ty)
            break
    if tail is None:  # cramped: from the farthest image corner
        tail = max(((0.0, 0.0), (w, 0.0), (0.0, h), (w, h)), key=lambda c: math.hypot(c[0] - hx, c[1] - hy))
    length = math.hypot(tail[0] - hx, tail[1] - hy)
    head_size = max(rng.uniform(*ARROW_HEAD_RANGE) * length, 6.0 * scale)
    return vp.Arrow(tail=tail, head=(hx, hy), head_size=head_size, color=color, width=width, alpha=alpha)


def make_markers(rng: np.random.Generator, styles: Sequence[MarkerStyle], regions: Sequence[Region],
                 size: tuple[int, int]) -> list:
    """`visual_prompts` markers, one per region, for an image of `size` (width, height). Raises MarkerError."""
    if len(styles) != len(regions):
        raise ValueError(f"{len(styles)} styles for {len(regions)} regions")
    scale = max(size) / ANCHOR
    out = []
    for i, (st, reg) in enumerate(zip(styles, regions)):
        mask = None
        if reg.polygons:
            mask = polygon_mask(reg.polygons, size)
            if not mask.any():
                raise MarkerError(f"region {i}: its segmentation has no area on the {size[0]}x{size[1]} image")
        if reg.box is not None:
            box = _clip_box(reg.box, size)
        else:  # the polygons' bounds
            ys, xs = np.nonzero(mask)
            box = _clip_box((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), size)
        k = st.kind
        alpha = int(rng.integers(MASK_ALPHA_RANGE[0], MASK_ALPHA_RANGE[1] + 1)) / 255 if k == "mask" else \
            int(rng.integers(ALPHA_RANGE[0], ALPHA_RANGE[1] + 1)) / 255
        style = dict(color=st.color, alpha=alpha)
        if k in WIDTH_RANGE:
            style["width"] = _scaled(rng, WIDTH_RANGE[k], scale)
        if k == "rectangle":
            m = vp.Rectangle(box, **style)
        elif k == "ellipse":
            f = rng.uniform(*ELLIPSE_SCALE_RANGE)
            cx, cy, hw, hh = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, (box[2] - box[0]) / 2 * f, \
                (box[3] - box[1]) / 2 * f
            m = vp.Ellipse(_clip_box((cx - hw, cy - hh, cx + hw, cy + hh), size), **style)
        elif k == "triangle":
            m = vp.Triangle(box=box, seed=int(rng.integers(2 ** 31)), **style)
        elif k == "point":
            bw, bh = box[2] - box[0], box[3] - box[1]
            x = min(max((box[0] + box[2]) / 2 + rng.uniform(-0.1, 0.1) * bw, 0.0), size[0])
            y = min(max((box[1] + box[3]) / 2 + rng.uniform(-0.1, 0.1) * bh, 0.0), size[1])
            m = vp.Point((x, y), radius=rng.uniform(*POINT_RADIUS_RANGE) * scale, **style)
        elif k == "scribble":
            m = vp.Scribble(box=box, seed=int(rng.integers(2 ** 31)), **style)
        elif k == "arrow":
            m = _arrow(rng, box, size, scale, **style)
        elif k in ("mask", "mask_contour"):
            if mask is None:  # box-only region: the box as the polygon
                x0, y0, x1, y1 = box
                mask = polygon_mask([[x0, y0, x1, y0, x1, y1, x0, y1]], size)
            m = vp.Mask(mask, **style) if k == "mask" else vp.MaskContour(mask, **style)
        else:
            raise ValueError(f"unknown marker kind {k!r}")
        out.append(m)
    return out
