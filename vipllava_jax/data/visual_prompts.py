"""Visual prompts: draw the eight marker kinds ViP-LLaVA was trained on, and name them in the question.

ViP-LLaVA (arXiv 2312.00784) learned to read markers drawn straight onto the RGB image: rectangle, ellipse,
triangle, point, arrow, scribble, mask contour and filled mask, in varied colours, widths and opacities.
This module draws them with Pillow and numpy:

    from vipllava_jax.data import visual_prompts as vp
    marked = vp.draw_markers(image, [vp.Rectangle((40, 60, 200, 220)), vp.Arrow((300, 20), (230, 90), color="blue")])
    q = vp.build_question("What is the object <bbox0> holding, and what is <bbox1>?", vp.Rectangle(...), vp.Arrow(...))

API: the frozen marker dataclasses `Rectangle(box)`, `Ellipse(box)`, `Triangle(box=None, points=None, seed=0)`,
`Point(xy, radius=None)`, `Arrow(tail, head, head_size=None)`, `Scribble(points=None, box=None, seed=0)`,
`MaskContour(mask)`, `Mask(mask)`, each also taking `color="red"`, `width=None`, `alpha=1.0` (Mask: 0.35) and
`normalized=False` (coordinates as fractions of width / height) by keyword; `make_marker(kind, **kw)` for the
names in `MARKER_KINDS`; `draw_markers(image, markers, *, pad_to_square=False, warn_crop=True, crop_size=336)`
and the one-marker shortcuts `draw_rectangle(image, box, **style)` ... `draw_mask(image, mask, **style)`;
`parse_color`, `load_mask`, `kept_region`, `marker_extent`; `marker_phrase(marker)` and
`build_question(question, *markers)` for the text.

Where the drawing happens: on the image as the user gave it, before the processor resizes and crops, as
training did (markers were drawn first, then pad-to-square and the resize to 336 px). So a marker sits where
the user meant in the user's own pixel coordinates, and its line width is in the image's own pixels. HF's
processor, unlike the original training, centre-crops: whatever lies outside the centred square of side
min(width, height) is cut off. `draw_markers` warns when a marker reaches outside that square; pass
``pad_to_square=True`` to pad the image to a square with the CLIP mean colour instead (the original training's
preprocessing), so nothing is cut. (The padded image is what `preprocess_image(..., pad_to_square=True)`
would make of it anyway, so padding here and there gives the same pixels.)

How a marker is drawn: its shape is rasterised (no antialiasing) into a coverage mask, then the colour is
alpha-blended onto the image through it, like training's transparent RGBA layer alpha-composited onto the
image. An opaque marker's pixels are exactly its colour.

Defaults follow ViP-LLaVA's generator (``llava/visual_prompt_generator.py`` in github.com/WisconsinAIVision/
ViP-LLaVA): sizes scale with max(width, height) / 336; a line width of 3 and a point radius of 8 at 336 px (its
"constant" style); an arrow head in proportion to the arrow; a scribble as a cubic Bezier curve through
four random points in the region; a filled mask at lower opacity (training used 48-128 of 255). Deliberate
differences, since here the user places the marker: an ellipse is drawn on the box given (training enlarged
the object's box by U(1, 1.5)); a point, an arrow's head and a triangle's or scribble's region are exactly
where asked (training jittered them around the object); the arrow head is always filled; a mask contour is
drawn as a band just inside the mask's edge (training stroked the polygon outline, half outside).

Phrases: training text named a marker as "{preposition} the {colour} {shape}", the colour left out for an
unnamed RGB colour, with "<bbox>" / "<bbox0>", "<bbox1>"... placeholders in the questions replaced by these
phrases (``words_shape`` in ``llava/visual_prompt_generator.py`` and ``vip_conv_generator`` /
``get_all_qa`` in ``llava/visual_prompt_organizer.py`` of ViP-LLaVA): "within the red rectangle",
"within the ellipse", "with the triangle", "at the point", "with the scribble", "with the mask contour",
"with the mask", "pointed to by the arrow". (Some training questions dropped the "the"; this keeps it.)
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageColor, ImageDraw

from .clip import CLIP_MEAN, expand_to_square
from .images import to_8bit

__all__ = [
    "MARKER_KINDS", "NAMED_COLORS", "Rectangle", "Ellipse", "Triangle", "Point", "Arrow", "Scribble",
    "MaskContour", "Mask", "make_marker", "draw_markers", "parse_color", "load_mask", "marker_phrase",
    "build_question", "marker_extent", "kept_region", "draw_rectangle", "draw_ellipse", "draw_triangle",
    "draw_point", "draw_arrow", "draw_scribble", "draw_mask_contour", "draw_mask",
]

MARKER_KINDS = ("rectangle", "ellipse", "triangle", "point", "arrow", "scribble", "mask_contour", "mask")

# ViP-LLaVA's colour pool (``color_pool`` in llava/visual_prompt_generator.py): the nine colours its training
# drew and named in the text. Half the time training used a random unnamed RGB colour instead.
NAMED_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0), "lime": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
    "fuchsia": (255, 0, 255), "aqua": (0, 255, 255), "orange": (255, 165, 0), "purple": (128, 0, 128),
    "gold": (255, 215, 0),
}

# (preposition, noun) of each kind in the training text.
PHRASE_WORDS = {
    "rectangle": ("within", "rectangle"), "ellipse": ("within", "ellipse"), "triangle": ("with", "triangle"),
    "point": ("at", "point"), "scribble": ("with", "scribble"), "mask_contour": ("with", "mask contour"),
    "mask": ("with", "mask"), "arrow": ("pointed to by", "arrow"),
}

ANCHOR = 336  # sizes are given for a 336 px image and scale with max(width, height)
LINE_WIDTH = 3
POINT_RADIUS = 8


# --- colours -------------------------------------------------------------------------------------------------
def _unknown_color(color) -> ValueError:
    return ValueError(f"Unknown colour {color!r}: use one of the training colours {', '.join(NAMED_COLORS)}, "
                      "another colour name Pillow knows, '#rrggbb', 'r,g,b' or an (r, g, b) tuple of 0-255")


def parse_color(color) -> tuple[int, int, int]:
    """(r, g, b) ints of a colour: one of the nine training colours (NAMED_COLORS), any other colour name
    Pillow knows ("green", "pink"...), "#rrggbb", "r,g,b" or an (r, g, b) tuple. Anything else: ValueError."""
    values = color
    if isinstance(color, str):
        s = color.strip().lower()
        if s in NAMED_COLORS:
            return NAMED_COLORS[s]
        if "," in s:
            values = [p.strip() for p in s.split(",")]
        else:
            try:
                return tuple(ImageColor.getrgb(s)[:3])
            except ValueError:
                raise _unknown_color(color) from None
    try:
        rgb = tuple(int(c) for c in values)
    except (TypeError, ValueError):
        raise _unknown_color(color) from None
    if len(rgb) != 3 or any(not 0 <= c <= 255 for c in rgb):
        raise ValueError(f"Colour {color!r} must be three integers in 0-255 (r, g, b)")
    return rgb


def color_name(color) -> str | None:
    """The word the text uses for a colour: a colour given by name keeps its name ("red", "green"); an RGB
    value (tuple, "r,g,b", "#rrggbb") is named only when it is one of the nine training colours, and is
    otherwise None (training left the colour out of the phrase for its random unnamed colours)."""
    parse_color(color)  # validate
    if isinstance(color, str):
        s = color.strip().lower()
        if s.replace(" ", "").isalpha():
            return s
    rgb = parse_color(color)
    return next((n for n, v in NAMED_COLORS.items() if v == rgb), None)


# --- markers --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class _Marker:
    """Style shared by every marker. width None: scales with the image (3 px at 336 px). alpha: opacity in
    [0, 1]. normalized: coordinates are fractions of the width / height instead of pixels."""

    color: Any = "red"
    width: int | None = None
    alpha: float = 1.0
    normalized: bool = False
    kind = ""

    def __post_init__(self):
        parse_color(self.color)
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise ValueError(f"{self.kind}: alpha must be in [0, 1], got {self.alpha}")
        if self.width is not None:
            w = self.width
            if isinstance(w, bool) or not isinstance(w, (int, float, np.integer, np.floating)) or not math.isfinite(w):
                raise ValueError(f"{self.kind}: width must be a number of pixels, got {w!r}")
            if int(w) < 1:
                raise ValueError(f"{self.kind}: width must be >= 1 pixel, got {w}")


@dataclasses.dataclass(frozen=True)
class Rectangle(_Marker):
    box: tuple  # (x0, y0, x1, y1)
    kind = "rectangle"


@dataclasses.dataclass(frozen=True)
class Ellipse(_Marker):
    box: tuple  # the ellipse's bounding box (x0, y0, x1, y1)
    kind = "ellipse"


@dataclasses.dataclass(frozen=True)
class Triangle(_Marker):
    box: tuple | None = None  # three seeded points inside it (largest angle under 150 degrees, as in training)
    points: tuple | None = None  # or ((x, y), (x, y), (x, y))
    seed: int = 0
    kind = "triangle"


@dataclasses.dataclass(frozen=True)
class Point(_Marker):
    xy: tuple  # the dot's centre (x, y)
    radius: float | None = None  # pixels; None: 8 at 336 px, scaled with the image
    kind = "point"


@dataclasses.dataclass(frozen=True)
class Arrow(_Marker):
    tail: tuple  # (x, y) where the shaft starts
    head: tuple  # (x, y) the tip points at
    head_size: float | None = None  # pixels; None: in proportion to the arrow's length
    kind = "arrow"


@dataclasses.dataclass(frozen=True)
class Scribble(_Marker):
    points: tuple | None = None  # a polyline ((x, y), ...) smoothed through its points
    box: tuple | None = None  # or a seeded Bezier stroke through 4 random points in the box
    seed: int = 0
    kind = "scribble"


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: compared and hashed by identity (arrays inside)
class MaskContour(_Marker):
    mask: Any  # [H, W] bool / 0-1 / 0-255 (or anything load_mask takes), the image's (height, width)
    kind = "mask_contour"


@dataclasses.dataclass(frozen=True, eq=False)
class Mask(_Marker):
    mask: Any  # as MaskContour's
    alpha: float = dataclasses.field(default=0.35, kw_only=True)  # training drew filled masks at 48-128 of 255
    kind = "mask"


_KINDS = {"rectangle": Rectangle, "ellipse": Ellipse, "triangle": Triangle, "point": Point, "arrow": Arrow,
          "scribble": Scribble, "mask_contour": MaskContour, "mask": Mask}


def make_marker(kind: str, **kw) -> _Marker:
    """``make_marker("rectangle", box=(...), color="blue")``: the marker class for one of MARKER_KINDS."""
    if kind not in _KINDS:
        raise ValueError(f"Unknown marker kind {kind!r}: one of {', '.join(MARKER_KINDS)}")
    return _KINDS[kind](**kw)


# --- geometry --------------------------------------------------------------------------------------------------
def _scale(size: tuple[int, int]) -> float:
    return max(size) / ANCHOR


def _line_width(m: _Marker, size) -> int:
    """The width in pixels; at most the image's longer side (a wider line covers nothing more, and drawing
    time grows with the width squared)."""
    if m.width is None:
        return max(1, round(LINE_WIDTH * _scale(size)))
    if int(m.width) > max(size):
        raise ValueError(f"{m.kind}: width {m.width} is wider than the {size[0]}x{size[1]} image; at most "
                         f"{max(size)} pixels")
    return int(m.width)


def _numbers(m: _Marker, values, form: str, name: str, lead: str, size) -> tuple[float, ...]:
    """`values` as len(form) floats, in pixels: normalized markers' values must lie in [0, 1] and are scaled by
    the image's (w, h) per axis. form: "xy" or "xyxy" (the axis of each value); name: what they are ("point",
    "box"); lead: the errors' words before the expected shape ("point must be", "a box is")."""
    shape = "(x, y)" if form == "xy" else "(x0, y0, x1, y1)"
    try:
        vals = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{m.kind}: {lead} {shape} numbers, got {values!r}") from None
    if len(vals) != len(form):
        raise ValueError(f"{m.kind}: {lead} {shape}, got {len(vals)} numbers")
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"{m.kind}: {name} {vals} has a NaN or infinite coordinate")
    if m.normalized:
        if not all(0.0 <= v <= 1.0 for v in vals):
            raise ValueError(f"{m.kind}: normalized {name} {vals} must lie in [0, 1]")
        w, h = size
        return tuple(v * (w if axis == "x" else h) for v, axis in zip(vals, form))
    return vals


def _xy(m: _Marker, p, size, what: str) -> tuple[float, float]:
    """One (x, y) in pixels, checked to lie on the image."""
    p = _numbers(m, p, "xy", what, f"{what} must be", size)
    w, h = size
    if not m.normalized and not (0 <= p[0] <= w and 0 <= p[1] <= h):
        raise ValueError(f"{m.kind}: {what} {p} is outside the {w}x{h} image")
    return p


def _box(m: _Marker, box, size) -> tuple[float, float, float, float]:
    box = _numbers(m, box, "xyxy", "box", "a box is", size)
    w, h = size
    if not m.normalized and not (0 <= box[0] <= w and 0 <= box[2] <= w and 0 <= box[1] <= h and 0 <= box[3] <= h):
        raise ValueError(f"{m.kind}: box {box} is outside the {w}x{h} image")
    if box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(f"{m.kind}: box {box} needs x1 > x0 and y1 > y0")
    return box


def _max_angle(pts) -> float:
    a, b, c = (np.asarray(p, float) for p in pts)
    angles = []
    for p, q, r in ((a, b, c), (b, c, a), (c, a, b)):
        u, v = q - p, r - p
        nu, nv = np.linalg.norm(u), np.linalg.norm(v)
        if nu == 0 or nv == 0:
            return 180.0
        angles.append(math.degrees(math.acos(np.clip(u @ v / (nu * nv), -1, 1))))
    return max(angles)


def _triangle_points(m: Triangle, size):
    if (m.box is None) == (m.points is None):
        raise ValueError("triangle: give a box or three points, not both")
    if m.points is not None:
        pts = [_xy(m, p, size, "point") for p in m.points]
        if len(pts) != 3:
            raise ValueError(f"triangle: needs 3 points, got {len(pts)}")
        return pts
    x0, y0, x1, y1 = _box(m, m.box, size)
    rng = np.random.default_rng(m.seed)
    for _ in range(1000):
        pts = [(float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1))) for _ in range(3)]
        if _max_angle(pts) < 150:
            return pts
    return [(x0, y1), ((x0 + x1) / 2, y0), (x1, y1)]


def _bezier(ctrl, n: int = 100):
    t = np.linspace(0, 1, n)[:, None]
    p0, p1, p2, p3 = (np.asarray(c, float) for c in ctrl)
    return (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t ** 2 * p2 + t ** 3 * p3


def _catmull_rom(pts, per_segment: int = 16):
    """A smooth curve through every point (centripetal-free, uniform Catmull-Rom)."""
    p = np.asarray(pts, float)
    if len(p) < 3:
        return p
    p = np.vstack([p[:1], p, p[-1:]])
    t = np.linspace(0, 1, per_segment, endpoint=False)[:, None]
    out = []
    for i in range(1, len(p) - 2):
        a, b, c, d = p[i - 1], p[i], p[i + 1], p[i + 2]
        out.append(0.5 * (2 * b + (c - a) * t + (2 * a - 5 * b + 4 * c - d) * t ** 2
                          + (3 * b - a - 3 * c + d) * t ** 3))
    out.append(p[-2:-1])
    return np.vstack(out)


def _scribble_points(m: Scribble, size):
    if (m.box is None) == (m.points is None):
        raise ValueError("scribble: give a box or polyline points, not both")
    if m.points is not None:
        pts = [_xy(m, p, size, "point") for p in m.points]
        if len(pts) < 2:
            raise ValueError(f"scribble: needs at least 2 points, got {len(pts)}")
        return _catmull_rom(pts)
    x0, y0, x1, y1 = _box(m, m.box, size)
    rng = np.random.default_rng(m.seed)
    ctrl = [(rng.uniform(x0, x1), rng.uniform(y0, y1)) for _ in range(4)]
    return _bezier(ctrl)


def _mask_array(m, size) -> np.ndarray:
    a = load_mask(m.mask) if m.mask is not None else None
    if a is None:
        raise ValueError(f"{m.kind}: give a mask array")
    w, h = size
    if a.shape != (h, w):
        raise ValueError(f"{m.kind}: mask shape {a.shape} does not match the image's (height, width) {(h, w)}")
    if not a.any():
        raise ValueError(f"{m.kind}: the mask is empty")
    return a


def _erode(a: np.ndarray) -> np.ndarray:
    """One step of 4-neighbour erosion; the image border counts as outside."""
    p = np.pad(a, 1)
    return p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def _contour(a: np.ndarray, width: int) -> np.ndarray:
    """The band of the mask within `width` pixels of its edge (the outline drawn inside the region)."""
    inner = a
    for _ in range(width):
        inner = _erode(inner)
    return a & ~inner


def _coverage(m: _Marker, size) -> np.ndarray:
    """bool [H, W]: the pixels the marker covers."""
    w, h = size
    if isinstance(m, (Mask, MaskContour)):
        a = _mask_array(m, size)
        return a if isinstance(m, Mask) else _contour(a, _line_width(m, size))
    img = Image.new("L", size, 0)
    d = ImageDraw.Draw(img)
    lw = _line_width(m, size)
    if isinstance(m, Rectangle):
        d.rectangle(_box(m, m.box, size), outline=255, width=lw)
    elif isinstance(m, Ellipse):
        d.ellipse(_box(m, m.box, size), outline=255, width=lw)
    elif isinstance(m, Triangle):
        pts = _triangle_points(m, size)
        d.line(pts + [pts[0], pts[1]], fill=255, width=lw, joint="curve")
    elif isinstance(m, Point):
        x, y = _xy(m, m.xy, size, "xy")
        r = float(m.radius) if m.radius is not None else POINT_RADIUS * _scale(size)
        if not r > 0:  # NaN too
            raise ValueError(f"point: radius must be > 0, got {m.radius}")
        if r > max(size):
            raise ValueError(f"point: radius {m.radius} is larger than the {size[0]}x{size[1]} image; at most "
                             f"{max(size)} pixels")
        d.ellipse((x - r, y - r, x + r, y + r), fill=255)
    elif isinstance(m, Arrow):
        (tx, ty), (hx, hy) = _xy(m, m.tail, size, "tail"), _xy(m, m.head, size, "head")
        length = math.hypot(hx - tx, hy - ty)
        if length < 1:
            raise ValueError(f"arrow: tail {m.tail} and head {m.head} are the same point")
        # training: head size max(U(0.2, 0.5) x length, 6 px at 336 px); here 0.3 x length, and never much
        # narrower than the shaft
        hs = float(m.head_size) if m.head_size is not None else max(0.3 * length, 4 * lw, 6 * _scale(size))
        if not (hs > 0 and math.isfinite(hs)):  # NaN too
            raise ValueError(f"arrow: head_size must be a finite number > 0, got {m.head_size}")
        hs = min(hs, length)
        ux, uy = (hx - tx) / length, (hy - ty) / length
        bx, by = hx - ux * hs, hy - uy * hs  # the base of the head
        half = 0.5 * hs
        d.line([(tx, ty), (bx + ux, by + uy)], fill=255, width=lw)
        d.polygon([(hx, hy), (bx - uy * half, by + ux * half), (bx + uy * half, by - ux * half)], fill=255)
    elif isinstance(m, Scribble):
        pts = [tuple(p) for p in _scribble_points(m, size)]
        d.line(pts, fill=255, width=lw, joint="curve")
    else:
        raise TypeError(f"not a marker: {m!r}")
    return np.asarray(img) > 0


def marker_extent(m: _Marker, size) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) pixel bounds of what the marker draws on an image of `size` (width, height)."""
    ys, xs = np.nonzero(_coverage(m, size))
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


# --- drawing -----------------------------------------------------------------------------------------------------
def _as_image(image) -> Image.Image:
    if isinstance(image, Image.Image):  # 16-bit / float grey scaled to 8 bits first, as load_image does
        return to_8bit(image).convert("RGB") if image.mode != "RGB" else image.copy()
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] not in (3, 4) or a.dtype != np.uint8:
        raise ValueError(f"image must be a PIL image or a [H, W, 3] uint8 array, got {a.dtype} {a.shape}")
    return Image.fromarray(np.ascontiguousarray(a[..., :3]))


def kept_region(size: tuple[int, int], crop_size: int = 336) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) in original pixels of what HF's CLIP processor keeps of an image of `size` (width,
    height): the shortest side resized to `crop_size` (the long side to int(crop_size * long / short), as
    transformers rounds), then a centre crop of crop_size x crop_size (offset (new_long - crop_size) // 2).
    That is the centred square of side min(width, height), up to a fraction of a pixel."""
    w, h = size
    short, long = min(w, h), max(w, h)
    new_long = int(crop_size * long / short)
    off = (new_long - crop_size) // 2
    lo, hi = off * long / new_long, (off + crop_size) * long / new_long
    return (lo, 0.0, hi, float(h)) if w > h else (0.0, lo, float(w), hi)


def draw_markers(image, markers: Sequence[_Marker] | _Marker, *, pad_to_square: bool = False,
                 warn_crop: bool = True, crop_size: int = 336) -> Image.Image:
    """A new RGB image with `markers` drawn in order (later ones on top), before any resize or crop.

    image: a PIL image or an [H, W, 3] uint8 array; it is not modified.
    pad_to_square: after drawing, pad the result to a square with the CLIP mean colour (the original
      training's preprocessing): nothing will be cropped, so no crop warning.
    warn_crop: warn (UserWarning, naming the marker) when any part of a marker lies outside the region HF's
      processor keeps: the shortest side resized to `crop_size`, then centre-cropped (see `kept_region`).
    """
    img = _as_image(image)
    if isinstance(markers, _Marker):
        markers = [markers]
    markers = list(markers)
    out = np.asarray(img).astype(np.float32)
    check = warn_crop and not pad_to_square and img.size[0] != img.size[1]
    kx0, ky0, kx1, ky1 = kept_region(img.size, crop_size) if check else (0, 0, 0, 0)
    for i, m in enumerate(markers):
        if not isinstance(m, _Marker):
            raise TypeError(f"markers[{i}] is not a marker: {m!r}")
        cov = _coverage(m, img.size)
        a = float(m.alpha)
        color = np.asarray(parse_color(m.color), np.float32)
        out[cov] = out[cov] * (1 - a) + color * a
        if check:
            ys, xs = np.nonzero(cov)
            eps = 1e-6
            if len(xs) and (xs.min() < kx0 - eps or ys.min() < ky0 - eps or xs.max() + 1 > kx1 + eps
                            or ys.max() + 1 > ky1 + eps):
                which = f" (marker {i + 1} of {len(markers)})" if len(markers) > 1 else ""
                warnings.warn(
                    f"{m.kind} marker{which} spans x {xs.min()}-{xs.max() + 1}, y {ys.min()}-{ys.max() + 1}, beyond "
                    f"the centre square x {kx0:.4g}-{kx1:.4g}, y {ky0:.4g}-{ky1:.4g} that the processor's centre "
                    f"crop keeps of this {img.size[0]}x{img.size[1]} image: the model will not see all of it (use "
                    f"pad_to_square=True, or --pad-to-square)", UserWarning, stacklevel=2)
    res = Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))
    if pad_to_square:
        res = expand_to_square(res, tuple(int(c * 255) for c in CLIP_MEAN))
    return res


def _one(cls):
    def draw(image, *args, pad_to_square: bool = False, warn_crop: bool = True, crop_size: int = 336,
             **style) -> Image.Image:
        return draw_markers(image, [cls(*args, **style)], pad_to_square=pad_to_square, warn_crop=warn_crop,
                            crop_size=crop_size)
    draw.__name__ = f"draw_{cls.kind}"
    draw.__doc__ = f"draw_markers(image, [{cls.__name__}(*args, **kw)]): a new image with one {cls.kind}."
    return draw


draw_rectangle = _one(Rectangle)
draw_ellipse = _one(Ellipse)
draw_triangle = _one(Triangle)
draw_point = _one(Point)
draw_arrow = _one(Arrow)
draw_scribble = _one(Scribble)
draw_mask_contour = _one(MaskContour)
draw_mask = _one(Mask)


def load_mask(src, size: tuple[int, int] | None = None) -> np.ndarray:
    """A bool [H, W] mask (nonzero = inside) from a path, a PIL image or an array; `size` (width, height)
    checks it against an image."""
    if isinstance(src, (str, bytes)) or hasattr(src, "__fspath__"):
        try:
            with Image.open(src) as im:
                a = np.asarray(im.convert("L"))
        except FileNotFoundError:
            raise FileNotFoundError(f"Mask file not found: {src}") from None
        except OSError as e:
            raise ValueError(f"Cannot read mask {src}: {e}") from e
    elif isinstance(src, Image.Image):
        a = np.asarray(src.convert("L"))
    else:
        a = np.asarray(src)
        if a.ndim == 3 and a.shape[-1] in (1, 3, 4):
            a = a[..., :3].max(axis=-1)
    if a.ndim != 2:
        raise ValueError(f"A mask must be 2-D [H, W], got shape {a.shape}")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ValueError(f"A mask must hold finite values (nonzero = inside), got {int((~np.isfinite(a)).sum())} "
                         f"NaN or infinite value(s)")
    if a.dtype.kind not in "biuf":
        raise ValueError(f"A mask must hold numbers or booleans, got dtype {a.dtype}")
    a = a != 0
    if size is not None and a.shape != (size[1], size[0]):
        raise ValueError(f"Mask shape {a.shape} does not match the image's (height, width) {(size[1], size[0])}")
    return a


# --- prompt text ---------------------------------------------------------------------------------------------------
def marker_phrase(marker: _Marker) -> str:
    """How training text named this marker: "within the red rectangle", "pointed to by the blue arrow",
    "with the scribble" (no colour word for an unnamed RGB colour)."""
    prep, noun = PHRASE_WORDS[marker.kind]
    name = color_name(marker.color)
    return f"{prep} the {name + ' ' if name else ''}{noun}"


def build_question(question: str, *markers: _Marker) -> str:
    """Put the markers' phrases into a question. "<bbox>" (one marker) or "<bbox0>", "<bbox1>", ... are replaced
    as in ViP-LLaVA's training data; a question without placeholders gets the first marker's phrase before its
    final punctuation: build_question("What is the object?", Rectangle(...)) -> "What is the object within the
    red rectangle?"."""
    if not markers:
        raise ValueError("build_question needs at least one marker")
    q = question
    if "<bbox>" in q:
        return q.replace("<bbox>", marker_phrase(markers[0]))
    if any(f"<bbox{i}>" in q for i in range(len(markers))):
        for i, m in enumerate(markers):
            q = q.replace(f"<bbox{i}>", marker_phrase(m))
        if "<bbox" in q:
            raise ValueError(f"question {question!r} has more <bboxN> placeholders than the {len(markers)} markers")
        return q
    stripped = q.rstrip()
    end = len(stripped)
    while end and stripped[end - 1] in "?.!":
        end -= 1
    return f"{stripped[:end]} {marker_phrase(markers[0])}{stripped[end:]}"
