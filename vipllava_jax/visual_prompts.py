"""Visual prompts: draw the eight marker kinds ViP-LLaVA was trained on, and name them in the question.

ViP-LLaVA (arXiv 2312.00784) learned to read markers drawn straight onto the RGB image: rectangle, ellipse,
triangle, point, arrow, scribble, mask contour and filled mask, in varied colours, widths and opacities.
This module draws them with Pillow and numpy:

    from vipllava_jax import visual_prompts as vp
    marked = vp.draw_markers(image, [vp.Rectangle((40, 60, 200, 220)), vp.Arrow((300, 20), (230, 90), color="blue")])
    q = vp.build_question("What is the object <bbox0> holding, and what is <bbox1>?", vp.Rectangle(...), vp.Arrow(...))

Where the drawing happens: on the image as the user gave it, before the processor resizes and crops, as
training did (markers were drawn first, then pad-to-square and the resize to 336 px). So a marker sits where
the user meant, and its line width is in the image's own pixels. HF's processor, unlike the original training,
centre-crops: whatever lies outside the centred square of side min(width, height) is cut off.
`draw_markers` warns when a marker reaches outside that square; pass ``pad_to_square=True`` to pad the image
to a square with the CLIP mean colour instead (the original training's preprocessing), so nothing is cut.

How a marker is drawn: its shape is rasterised (no antialiasing) into a coverage mask, then the colour is
alpha-blended onto the image through it, like training's transparent RGBA layer alpha-composited onto the
image. An opaque marker's pixels are exactly its colour.

Defaults follow ViP-LLaVA's generator (``llava/visual_prompt_generator.py`` in github.com/WisconsinAIVision/
ViP-LLaVA): sizes scale with max(width, height) / 336; a line width of 3 and a point radius of 8 at 336 px (its
"constant" style); an arrow head in proportion to the arrow; a scribble as a cubic Bezier curve through
four random points in the region; a filled mask at lower opacity (training used 48-128 of 255).

Phrases: training text named a marker as "{preposition} the {colour} {shape}", the colour left out for an
unnamed RGB colour, with "<bbox>" / "<bbox0>", "<bbox1>"... placeholders in the questions replaced by these
phrases (``words_shape`` in ``llava/visual_prompt_generator.py`` and ``vip_conv_generator`` /
``get_all_qa`` in ``llava/visual_prompt_organizer.py`` of ViP-LLaVA): "within the red rectangle",
"within the ellipse", "with the triangle", "at the point", "with the scribble", "with the mask contour",
"with the mask", "pointed to by the arrow".
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageColor, ImageDraw

from .processing import CLIP_MEAN, expand_to_square

__all__ = [
    "MARKER_KINDS", "NAMED_COLORS", "Rectangle", "Ellipse", "Triangle", "Point", "Arrow", "Scribble",
    "MaskContour", "Mask", "make_marker", "draw_markers", "parse_color", "load_mask", "marker_phrase",
    "build_question", "marker_extent", "draw_rectangle", "draw_ellipse", "draw_triangle", "draw_point",
    "draw_arrow", "draw_scribble", "draw_mask_contour", "draw_mask",
]

MARKER_KINDS = ("rectangle", "ellipse", "triangle", "point", "arrow", "scribble", "mask_contour", "mask")

# The named colours of ViP-LLaVA's colour pool; training named the first nine in its text.
NAMED_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0), "lime": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
    "fuchsia": (255, 0, 255), "aqua": (0, 255, 255), "orange": (255, 165, 0), "purple": (128, 0, 128),
    "gold": (255, 215, 0), "pink": (255, 192, 203), "green": (0, 128, 0), "brown": (165, 42, 42),
    "olive": (128, 128, 0), "teal": (0, 128, 128),
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
def parse_color(color) -> tuple[int, int, int]:
    """A colour name (the training colours, or any name Pillow knows), "#rrggbb", "r,g,b" or an (r, g, b)
    tuple -> (r, g, b) ints."""
    if isinstance(color, str):
        s = color.strip().lower()
        if s in NAMED_COLORS:
            return NAMED_COLORS[s]
        if "," in s:
            color = tuple(p.strip() for p in s.split(","))
        else:
            try:
                return tuple(ImageColor.getrgb(s)[:3])
            except ValueError:
                raise ValueError(f"Unknown colour {color!r}: use one of {', '.join(NAMED_COLORS)}, another "
                                 f"colour name Pillow knows, '#rrggbb' or 'r,g,b'") from None
    try:
        rgb = tuple(int(c) for c in color)
    except (TypeError, ValueError):
        raise ValueError(f"Unknown colour {color!r}: give a name, '#rrggbb' or three integers 0-255") from None
    if len(rgb) != 3 or any(not 0 <= c <= 255 for c in rgb):
        raise ValueError(f"Colour {color!r} must be three integers in 0-255")
    return rgb


def color_name(color) -> str | None:
    """The training colour name of a colour, or None for an unnamed RGB colour."""
    if isinstance(color, str) and color.strip().lower() in NAMED_COLORS:
        return color.strip().lower()
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
        if self.width is not None and int(self.width) < 1:
            raise ValueError(f"{self.kind}: width must be >= 1 pixel, got {self.width}")


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
    xy: tuple = (0.0, 0.0)
    radius: float | None = None  # pixels; None: 8 at 336 px, scaled with the image
    kind = "point"


@dataclasses.dataclass(frozen=True)
class Arrow(_Marker):
    tail: tuple = (0.0, 0.0)
    head: tuple = (0.0, 0.0)  # the tip points here
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
    mask: Any = None  # [H, W] bool / 0-1 / 0-255, the image's size
    kind = "mask_contour"


@dataclasses.dataclass(frozen=True, eq=False)
class Mask(_Marker):
    mask: Any = None
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
    return int(m.width) if m.width is not None else max(1, round(LINE_WIDTH * _scale(size)))


def _xy(m: _Marker, p, size, what: str) -> tuple[float, float]:
    """One (x, y) in pixels, checked to lie on the image."""
    p = tuple(float(v) for v in p)
    if len(p) != 2:
        raise ValueError(f"{m.kind}: {what} must be (x, y), got {len(p)} numbers")
    w, h = size
    if m.normalized:
        if not all(0.0 <= v <= 1.0 for v in p):
            raise ValueError(f"{m.kind}: normalized {what} {p} must lie in [0, 1]")
        return p[0] * w, p[1] * h
    if not (0 <= p[0] <= w and 0 <= p[1] <= h):
        raise ValueError(f"{m.kind}: {what} {p} is outside the {w}x{h} image")
    return p


def _box(m: _Marker, box, size) -> tuple[float, float, float, float]:
    box = tuple(float(v) for v in box)
    if len(box) != 4:
        raise ValueError(f"{m.kind}: a box is (x0, y0, x1, y1), got {len(box)} numbers")
    w, h = size
    if m.normalized:
        if not all(0.0 <= v <= 1.0 for v in box):
            raise ValueError(f"{m.kind}: normalized box {box} must lie in [0, 1]")
        box = (box[0] * w, box[1] * h, box[2] * w, box[3] * h)
    elif not (0 <= box[0] <= w and 0 <= box[2] <= w and 0 <= box[1] <= h and 0 <= box[3] <= h):
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
        if r <= 0:
            raise ValueError(f"point: radius must be > 0, got {m.radius}")
        d.ellipse((x - r, y - r, x + r, y + r), fill=255)
    elif isinstance(m, Arrow):
        (tx, ty), (hx, hy) = _xy(m, m.tail, size, "tail"), _xy(m, m.head, size, "head")
        length = math.hypot(hx - tx, hy - ty)
        if length < 1:
            raise ValueError(f"arrow: tail {m.tail} and head {m.head} are the same point")
        hs = float(m.head_size) if m.head_size is not None else max(0.3 * length, 4 * lw, 6)
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
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image.copy()
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] not in (3, 4) or a.dtype != np.uint8:
        raise ValueError(f"image must be a PIL image or a [H, W, 3] uint8 array, got {a.dtype} {a.shape}")
    return Image.fromarray(np.ascontiguousarray(a[..., :3]))


def _kept_square(size) -> tuple[float, float, float, float]:
    """The region of the original image that a shortest-side resize + centre crop keeps."""
    w, h = size
    s = min(w, h)
    return (w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2


def draw_markers(image, markers: Sequence[_Marker] | _Marker, *, pad_to_square: bool = False,
                 warn_crop: bool = True) -> Image.Image:
    """A new RGB image with `markers` drawn in order (later ones on top). `image`: PIL or [H, W, 3] uint8;
    it is not modified. pad_to_square: pad the result to a square with the CLIP mean colour (no crop then).
    warn_crop: warn when a marker reaches outside the centre square HF's processor keeps."""
    img = _as_image(image)
    if isinstance(markers, _Marker):
        markers = [markers]
    out = np.asarray(img).astype(np.float32)
    kx0, ky0, kx1, ky1 = _kept_square(img.size)
    for m in markers:
        if not isinstance(m, _Marker):
            raise TypeError(f"not a marker: {m!r}")
        cov = _coverage(m, img.size)
        a = float(m.alpha)
        color = np.asarray(parse_color(m.color), np.float32)
        out[cov] = out[cov] * (1 - a) + color * a
        if warn_crop and not pad_to_square and img.size[0] != img.size[1]:
            ys, xs = np.nonzero(cov)
            if len(xs) and (xs.min() < kx0 or ys.min() < ky0 or xs.max() + 1 > kx1 or ys.max() + 1 > ky1):
                warnings.warn(
                    f"{m.kind} marker spans x {xs.min()}-{xs.max() + 1}, y {ys.min()}-{ys.max() + 1}, beyond the "
                    f"centre square x {kx0:g}-{kx1:g}, y {ky0:g}-{ky1:g} that the processor's centre crop keeps of "
                    f"this {img.size[0]}x{img.size[1]} image: the model will not see all of it (use "
                    f"pad_to_square=True, or --pad-to-square)", UserWarning, stacklevel=2)
    res = Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))
    if pad_to_square:
        res = expand_to_square(res, tuple(int(c * 255) for c in CLIP_MEAN))
    return res


def _one(cls):
    def draw(image, *args, pad_to_square: bool = False, warn_crop: bool = True, **kw) -> Image.Image:
        return draw_markers(image, [cls(*args, **kw)], pad_to_square=pad_to_square, warn_crop=warn_crop)
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
