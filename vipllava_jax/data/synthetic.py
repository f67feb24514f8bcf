"""A seeded synthetic visual-prompt task: coloured shapes, one of them marked, a question about the marked one.

Each scene is a plain or noisy light background with 3-5 filled shapes (circle, square, triangle, star, cross,
diamond, hexagon) in a few colours, apart from each other. Exactly one shape, the target, is marked with a
visual prompt of one of the eight ViP-LLaVA kinds (drawn by `visual_prompts`), and the question names the
marker with its training phrase ("within the red rectangle", "pointed to by the arrow", ...). Answers are one
word. Question types:

  ==========  =========================================================================  ======================
  shape       "What shape is within the red rectangle?"                                   circle, square, ...
  color       "What colour is the object pointed to by the blue arrow?"                  black, gray, ...
  count       "How many shapes in the image have the same colour as the object at the     1, 2, 3
              lime point?" (or "the same shape as"; the marked one counts)
  left_right  "Is the object with the gold scribble left or right of the pink star?"      left, right
  ==========  =========================================================================  ======================

One more type is defined but not in the default mix (`EXTRA_QUESTION_TYPES`; the demo model never saw it, so it
is the new task the fine-tuning notebook teaches): above_below, "Is the object within the red ellipse above or
below the gray circle?" (above, below), built as left_right is, on the vertical axis.

The marker is needed: in a shape question every shape has another kind, in a colour question every shape has
another colour, a count scene has groups of different sizes (another group would give another answer), and a
left/right scene has another shape on the other side of the reference. The answer is drawn first (uniform
over its type's answers) and the scene built around it, so `chance_accuracy` (the best answer-blind guess) is
1 / number of answers of the type: 1/7, 1/6, 1/3, 1/2, about 0.29 for the even mix.

Shape colours (black, gray, brown, green, pink, teal) are none of the nine marker colours (red, lime, blue,
yellow, fuchsia, aqua, orange, purple, gold), so a colour word in a question's marker phrase is never an answer
and a marker's pixels never look like a shape's.

    from vipllava_jax.data.synthetic import make_scene, write_dataset
    scene = make_scene(7)                      # scene.image (marked), .question, .answer, .metadata
    write_dataset("data/synth", 1000, seed=0)  # data/synth/images/*.png + data/synth/data.json

Images are 96-192 px on a side (square half the time); with ``crop_safe`` (the default) every shape and the
marker lie in the centred square that HF's centre crop keeps, so both the processor's crop and pad-to-square
see everything.
"""
from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from . import visual_prompts as vp

__all__ = [
    "SHAPES", "SHAPE_COLORS", "QUESTION_TYPES", "EXTRA_QUESTION_TYPES", "ALL_QUESTION_TYPES", "MARKER_KINDS", "Shape", "Scene", "make_scene", "render", "write_dataset",
    "answer_vocabulary", "chance_accuracy", "QUESTION_TEMPLATES", "DEMO_SCENE", "LIST_QUESTION", "MARKED_TAG",
]

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon")
# Shape colours, named so that no word (and no RGB value) is one of visual_prompts.NAMED_COLORS (the markers').
SHAPE_COLORS: dict[str, tuple[int, int, int]] = {
    "black": (25, 25, 25), "gray": (128, 128, 128), "brown": (140, 80, 30), "green": (20, 130, 40),
    "pink": (250, 150, 200), "teal": (0, 128, 128),
}
BACKGROUNDS = ((236, 236, 230), (226, 232, 242), (242, 234, 220), (250, 250, 250), (222, 236, 224))
QUESTION_TYPES = ("shape", "color", "count", "left_right")  # the default mix (the demo model's training)
EXTRA_QUESTION_TYPES = ("above_below",)  # defined, asked only when named
ALL_QUESTION_TYPES = QUESTION_TYPES + EXTRA_QUESTION_TYPES
MARKER_KINDS = vp.MARKER_KINDS
# The demo model's scenes (`make_scene(seed, **DEMO_SCENE)`): 96 px squares, 3-4 shapes in distinct cells of a
# 4 x 4 grid, the demo model's 24 px patch grid, so each shape lies within one patch.
DEMO_SCENE: dict[str, Any] = {"size": (96, 96), "num_shapes": (3, 4), "layout": "grid", "grid": 4}
COUNT_ANSWERS = ("1", "2", "3")
SIDES = ("left", "right")
VERTICAL_SIDES = ("above", "below")

# A question without a marker, for training data: every shape named, left to right (`Scene.caption`). It teaches
# the tower to see shapes and colours from many answer words per image (as LLaVA's stage 1 aligns on captions).
LIST_QUESTION = "List the shapes from left to right."
# Put after the marked shape in a marked list (`Scene.marked_caption`, `write_dataset(mark_listed=True)`): the
# list then also says which shape the marker is on, a supervised word in every training example. (Short probes of
# the demo model, 750 steps of a 1500-step schedule: 52% first-answer accuracy on held-out scenes with the tag,
# 42% in an earlier probe without it whose grid scenes were drawn by a near-identical scratch generator.)
MARKED_TAG = "(marked)"
# <bbox> is the marker's phrase (visual_prompts.marker_phrase); {ref} names the reference shape.
QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "shape": ("What shape is <bbox>?", "What is the shape of the object <bbox>?"),
    "color": ("What colour is the object <bbox>?", "What is the colour of the shape <bbox>?"),
    "count_color": ("How many shapes in the image have the same colour as the object <bbox>?",),
    "count_shape": ("How many shapes in the image have the same shape as the object <bbox>?",),
    "left_right": ("Is the object <bbox> left or right of the {ref}?",),
    "above_below": ("Is the object <bbox> above or below the {ref}?",),
}


_COUNT_TEMPLATES = QUESTION_TEMPLATES["count_color"] + QUESTION_TEMPLATES["count_shape"]


def answer_vocabulary(question_type: str | None = None) -> list[str]:
    """Every answer a question of `question_type` (None: any type of the default mix) can have, sorted."""
    per = {"shape": list(SHAPES), "color": list(SHAPE_COLORS), "count": list(COUNT_ANSWERS),
           "left_right": list(SIDES), "above_below": list(VERTICAL_SIDES)}
    if question_type is None:
        return sorted({a for t in QUESTION_TYPES for a in per[t]})
    if question_type not in per:
        raise ValueError(f"unknown question type {question_type!r}: use one of {', '.join(ALL_QUESTION_TYPES)}")
    return sorted(per[question_type])


def chance_accuracy(question_type: str | None = None, question_types: Sequence[str] = QUESTION_TYPES) -> float:
    """Accuracy of the best guess that ignores the image (answers are uniform within a type by construction):
    1 / len(answer_vocabulary(type)); for None, the mean over `question_types` (an even mix, as
    `write_dataset` makes)."""
    if question_type is None:
        types = list(question_types)
        return float(np.mean([chance_accuracy(t) for t in types]))
    return 1.0 / len(answer_vocabulary(question_type))


# --------------------------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------------------------

def _regular(cx, cy, r, n, phase):
    return [(cx + r * math.cos(phase + 2 * math.pi * k / n), cy + r * math.sin(phase + 2 * math.pi * k / n))
            for k in range(n)]


@dataclasses.dataclass(frozen=True)
class Shape:
    """A filled shape: `kind` of SHAPES, `color` of SHAPE_COLORS, centre (cx, cy) and radius r in pixels."""
    kind: str
    color: str
    cx: float
    cy: float
    r: float

    @property
    def polygon(self) -> list[tuple[float, float]]:
        """The outline as a polygon (a circle as a 48-gon): what is filled, and the record's segmentation."""
        cx, cy, r = self.cx, self.cy, self.r
        k = self.kind
        if k == "circle":
            return _regular(cx, cy, r, 48, 0.0)
        if k == "square":
            s = 0.82 * r
            return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
        if k == "triangle":
            return _regular(cx, cy + 0.15 * r, 1.1 * r, 3, -math.pi / 2)
        if k == "star":
            out = []
            for i in range(10):
                rr = r * (1.08 if i % 2 == 0 else 0.45)
                a = -math.pi / 2 + math.pi * i / 5
                out.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
            return out
        if k == "cross":
            a, b = 0.95 * r, 0.34 * r
            return [(cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b), (cx + a, cy + b),
                    (cx + b, cy + b), (cx + b, cy + a), (cx - b, cy + a), (cx - b, cy + b), (cx - a, cy + b),
                    (cx - a, cy - b), (cx - b, cy - b)]
        if k == "diamond":
            return [(cx, cy - 1.05 * r), (cx + 0.8 * r, cy), (cx, cy + 1.05 * r), (cx - 0.8 * r, cy)]
        if k == "hexagon":
            return _regular(cx, cy, r, 6, 0.0)
        raise ValueError(f"unknown shape {k!r}: one of {', '.join(SHAPES)}")

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1): integer pixel bounds of the polygon (x1, y1 exclusive)."""
        p = np.asarray(self.polygon)
        return (int(math.floor(p[:, 0].min())), int(math.floor(p[:, 1].min())),
                int(math.floor(p[:, 0].max())) + 1, int(math.floor(p[:, 1].max())) + 1)

    @property
    def rgb(self) -> tuple[int, int, int]:
        return SHAPE_COLORS[self.color]

    @property
    def description(self) -> str:
        return f"{self.color} {self.kind}"

    def draw(self, d: ImageDraw.ImageDraw, fill) -> None:
        # outline too, as records.polygon_mask fills a segmentation: the same pixels
        d.polygon(self.polygon, fill=fill, outline=fill)

    def mask(self, size: tuple[int, int]) -> np.ndarray:
        """bool [H, W]: the pixels this shape fills on an image of `size` (width, height)."""
        img = Image.new("L", size, 0)
        self.draw(ImageDraw.Draw(img), 255)
        return np.asarray(img) > 0

    def as_dict(self) -> dict:
        return {"kind": self.kind, "color": self.color, "center": [self.cx, self.cy], "radius": self.r,
                "box": list(self.box)}

    @classmethod
    def from_dict(cls, d: dict) -> "Shape":
        """Back from `as_dict` (metadata["shapes"]): the same shape, to the pixel."""
        return cls(d["kind"], d["color"], float(d["center"][0]), float(d["center"][1]), float(d["radius"]))


def render(shapes: Sequence[Shape], size: tuple[int, int], background: tuple[int, int, int],
           noise: float = 0.0, noise_seed: int = 0) -> Image.Image:
    """The unmarked image: background (plus gaussian noise of std `noise`, seeded), shapes filled flat."""
    w, h = size
    bg = np.broadcast_to(np.asarray(background, np.float32), (h, w, 3)).copy()
    if noise > 0:
        bg += np.random.default_rng(noise_seed).normal(0.0, noise, (h, w, 3)).astype(np.float32)
    img = Image.fromarray(np.clip(np.rint(bg), 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for s in shapes:
        s.draw(d, s.rgb)
    return img


# --------------------------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Scene:
    """One synthetic example.

    image: the marked RGB image; clean_image: the same without the marker.
    question: the text with the marker's phrase (no <image> tag); question_template: with "<bbox>" instead.
    answer: one word. question_type: one of QUESTION_TYPES (count's variant in `count_of`: "color"/"shape").
    shapes / target (index into shapes) / reference (left_right: the named shape's index, else None).
    marker: the `visual_prompts` marker drawn; marker_kind / marker_color / marker_phrase describe it.
    background, noise, noise_seed: `render(shapes, image.size, background, noise, noise_seed)` is clean_image.
    """
    image: Image.Image
    clean_image: Image.Image
    question: str
    question_template: str
    answer: str
    question_type: str
    marker_kind: str
    marker_color: Any
    marker_phrase: str
    marker: Any
    shapes: tuple[Shape, ...]
    target: int
    reference: int | None = None
    count_of: str | None = None
    background: tuple[int, int, int] = (0, 0, 0)
    noise: float = 0.0
    noise_seed: int = 0
    seed: Any = None

    @property
    def target_shape(self) -> Shape:
        return self.shapes[self.target]

    @property
    def metadata(self) -> dict:
        """JSON-serialisable description of the scene (kept in each written record under "metadata")."""
        c = self.marker_color
        return {
            "question_type": self.question_type, "count_of": self.count_of, "answer": self.answer,
            "marker_kind": self.marker_kind, "marker_color": list(c) if isinstance(c, tuple) else c,
            "marker_phrase": self.marker_phrase, "target": self.target, "reference": self.reference,
            "target_shape": self.target_shape.kind, "target_color": self.target_shape.color,
            "target_box": list(self.target_shape.box), "shapes": [s.as_dict() for s in self.shapes],
            "image_size": list(self.image.size), "background": list(self.background), "noise": self.noise,
            "noise_seed": self.noise_seed, "seed": self.seed,
        }

    @property
    def caption(self) -> str:
        """Every shape, left to right: "black circle, green star, pink cross" (the answer to LIST_QUESTION)."""
        return self._listed(tag_target=False)

    @property
    def marked_caption(self) -> str:
        """The caption with MARKED_TAG after the marked shape: "black circle, green star (marked), pink cross"."""
        return self._listed(tag_target=True)

    def _listed(self, tag_target: bool) -> str:
        order = sorted(range(len(self.shapes)), key=lambda i: self.shapes[i].cx)
        return ", ".join(self.shapes[i].description + (f" {MARKED_TAG}" if tag_target and i == self.target else "")
                         for i in order)

    def other_questions(self) -> list[tuple[str, str]]:
        """(question template with "<bbox>", answer) for the other questions this scene answers without doubt:
        the marked object's shape and colour, and how many share its colour / its shape (when that is 1-3).
        Training data may ask several (`write_dataset(questions_per_scene=...)`): more answers per image."""
        t = self.target_shape
        out = [(QUESTION_TEMPLATES["shape"][0], t.kind), (QUESTION_TEMPLATES["color"][0], t.color)]
        for attr, field in (("color", "color"), ("shape", "kind")):
            n = sum(getattr(x, field) == getattr(t, field) for x in self.shapes)
            if str(n) in COUNT_ANSWERS:
                out.append((QUESTION_TEMPLATES[f"count_{attr}"][0], str(n)))
        own_type = {"count": f"count_{self.count_of}"}.get(self.question_type, self.question_type)
        return [(q, a) for q, a in out if q not in QUESTION_TEMPLATES.get(own_type, ())]

    def record(self, record_id: str, image_path: str, *, pre_marked: bool = True,
               fix_marker_kind: bool = False, more_questions: Sequence[tuple[str, str]] = ()) -> dict:
        """A LLaVA-format training record. pre_marked: the marker is in the image (save `image`) and the
        question carries its phrase; otherwise (save `clean_image`) the record has the target's region as
        `bboxes` / `segmentations` and "<bbox0>" in the question, drawn and phrased by the training pipeline
        (`fix_marker_kind`: restrict that draw to this scene's kind via "marker_kinds").
        more_questions: (template, answer) turns asked after the scene's own question (`other_questions`)."""
        q = self.question if pre_marked else self.question_template.replace("<bbox>", "<bbox0>")
        turns = [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": self.answer}]
        for template, answer in more_questions:
            if "<bbox>" not in template:
                more = template
            else:
                more = vp.build_question(template, self.marker) if pre_marked else template.replace("<bbox>", "<bbox0>")
            turns += [{"from": "human", "value": more}, {"from": "gpt", "value": answer}]
        rec: dict[str, Any] = {"id": record_id, "image": image_path, "conversations": turns}
        if not pre_marked:
            t = self.target_shape
            rec["bboxes"] = [list(t.box)]
            rec["segmentations"] = [[[float(v) for xy in t.polygon for v in xy]]]
            if fix_marker_kind:
                rec["marker_kinds"] = [self.marker_kind]
        rec["metadata"] = {**self.metadata, "pre_marked": pre_marked}
        return rec


class _Retry(Exception):
    pass


def _rng(seed) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, (list, tuple)):
        return np.random.default_rng([int(s) for s in seed])
    return np.random.default_rng(int(seed))


def _image_size(rng, min_size, max_size, square_probability) -> tuple[int, int]:
    w = int(rng.integers(min_size, max_size + 1))
    if rng.random() < square_probability:
        return w, w
    h = int(rng.integers(min_size, max_size + 1))
    return w, h


def _place(rng, n: int, area: tuple[float, float, float, float], side: float) -> list[tuple[float, float, float]]:
    """n (cx, cy, r) apart from each other (centre distance >= 1.45 (r_i + r_j)) inside `area`."""
    x0, y0, x1, y1 = area
    # Large enough that a shape spans a few of a small vision tower's patches (a 16 px patch on a 112 px crop).
    lo, hi = (0.13, 0.17) if n <= 4 else (0.115, 0.145)
    for _ in range(60):
        out: list[tuple[float, float, float]] = []
        for _ in range(n):
            r = float(rng.uniform(lo, hi)) * side
            m = 1.35 * r + 2
            for _ in range(200):
                cx, cy = float(rng.uniform(x0 + m, x1 - m)), float(rng.uniform(y0 + m, y1 - m))
                if all(math.hypot(cx - a, cy - b) >= 1.45 * (r + c) for a, b, c in out):
                    out.append((cx, cy, r))
                    break
            else:
                break
        if len(out) == n:
            return out
        lo, hi = lo * 0.95, hi * 0.95
    raise _Retry("cannot place the shapes")


def _place_grid(rng, n: int, area: tuple[float, float, float, float], grid: int) -> list[tuple[float, float, float]]:
    """n (cx, cy, r) in n distinct random cells of a grid x grid layout of `area`: radius 0.3-0.4 of a cell,
    centre jittered, each shape inside its own cell (so shapes never touch). With the grid equal to a vision
    tower's patch grid every shape lies within one patch: what the demo model sees best."""
    if n > grid * grid:
        raise ValueError(f"{n} shapes do not fit a {grid}x{grid} grid")
    x0, y0, x1, y1 = area
    cw, ch = (x1 - x0) / grid, (y1 - y0) / grid
    out = []
    for c in rng.permutation(grid * grid)[:n]:
        r = float(rng.uniform(0.3, 0.4)) * min(cw, ch)
        room = 0.5 * max(0.0, 0.5 * min(cw, ch) - 1.1 * r - 1.0)
        jx, jy = rng.uniform(-room, room, size=2)
        out.append((x0 + (c % grid + 0.5) * cw + float(jx), y0 + (c // grid + 0.5) * ch + float(jy), r))
    return out


def _dilate(a: np.ndarray, k: int) -> np.ndarray:
    for _ in range(k):
        p = np.pad(a, 1)
        a = p[1:-1, 1:-1] | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
    return a


def _make_marker(rng, kind: str, t: Shape, size, color, scale: float):
    """A marker of `kind` on the target shape `t` (geometry near training's, sized for clear pre-marked data)."""
    w, h = size
    x0, y0, x1, y1 = t.box
    alpha = float(rng.uniform(0.8, 1.0))
    lw = max(1, int(round(rng.uniform(1.5, 3.5) * scale)))
    style = dict(color=color, alpha=alpha, width=lw)

    def clip(b):
        return (max(0.0, b[0]), max(0.0, b[1]), min(float(w), b[2]), min(float(h), b[3]))

    if kind == "rectangle":
        pad = float(rng.uniform(0.15, 0.3)) * t.r + lw
        return vp.Rectangle(clip((x0 - pad, y0 - pad, x1 + pad, y1 + pad)), **style)
    if kind == "ellipse":
        fx, fy = rng.uniform(1.4, 1.6, size=2)
        hw, hh = (x1 - x0) / 2 * fx + lw, (y1 - y0) / 2 * fy + lw
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        return vp.Ellipse(clip((cx - hw, cy - hh, cx + hw, cy + hh)), **style)
    if kind == "triangle":
        pad = 0.25 * t.r
        return vp.Triangle(box=clip((x0 - pad, y0 - pad, x1 + pad, y1 + pad)), seed=int(rng.integers(2 ** 31)), **style)
    if kind == "point":
        r = max(2.0, float(rng.uniform(0.3, 0.45)) * t.r)
        return vp.Point((t.cx, t.cy), radius=r, color=color, alpha=alpha)
    if kind == "arrow":
        a = float(rng.uniform(0, 2 * math.pi))
        length = float(rng.uniform(2.0, 3.0)) * t.r
        hx, hy = t.cx + 0.35 * t.r * math.cos(a), t.cy + 0.35 * t.r * math.sin(a)
        tx, ty = hx + length * math.cos(a), hy + length * math.sin(a)
        if not (0 <= tx <= w and 0 <= ty <= h):
            raise _Retry("arrow tail off the image")
        return vp.Arrow((tx, ty), (hx, hy), head_size=max(0.8 * t.r, 4 * lw), **style)
    if kind == "scribble":
        ys, xs = np.nonzero(t.mask(size))
        idx = rng.choice(len(xs), size=4, replace=False)
        return vp.Scribble(points=tuple((float(xs[i]) + 0.5, float(ys[i]) + 0.5) for i in idx), **style)
    if kind == "mask_contour":
        return vp.MaskContour(_dilate(t.mask(size), lw + 1), **style)
    if kind == "mask":
        return vp.Mask(t.mask(size), color=color, alpha=float(rng.uniform(0.3, 0.45)))
    raise ValueError(f"unknown marker kind {kind!r}: one of {', '.join(MARKER_KINDS)}")


def _marker_color(rng, named_color_probability: float):
    if rng.random() < named_color_probability:
        names = list(vp.NAMED_COLORS)
        return names[int(rng.integers(len(names)))]
    avoid = set(vp.NAMED_COLORS.values()) | set(SHAPE_COLORS.values())
    while True:  # an unnamed colour, saturated enough to stand out from the light background
        rgb = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if rgb not in avoid and min(rgb) < 90:
            return rgb


def _attributes(rng, qtype: str, n: int, answer: str, count_of: str | None):
    """(kinds, colours, target index) for a scene of n shapes with the given answer (drawn by the caller)."""
    kinds_all, colors_all = list(SHAPES), list(SHAPE_COLORS)
    if qtype == "shape":  # every kind once: only the marker tells which
        rest = [k for k in kinds_all if k != answer]
        kinds = [answer] + [rest[i] for i in rng.permutation(len(rest))[:n - 1]]
        colors = [colors_all[int(rng.integers(len(colors_all)))] for _ in range(n)]
        return kinds, colors, 0
    if qtype == "color":  # every colour once
        rest = [c for c in colors_all if c != answer]
        colors = [answer] + [rest[i] for i in rng.permutation(len(rest))[:n - 1]]
        kinds = [kinds_all[int(rng.integers(len(kinds_all)))] for _ in range(n)]
        return kinds, colors, 0
    if qtype == "count":
        a = int(answer)
        pool = colors_all if count_of == "color" else kinds_all
        for _ in range(100):
            # groups of the counted attribute: the target's (size a) and others, at least one of another size
            # (else the answer would follow from the image without the marker)
            rest = n - a
            sizes = []
            while rest > 0:
                s = int(rng.integers(1, min(rest, 3) + 1))
                sizes.append(s)
                rest -= s
            if sizes and any(s != a for s in sizes) and len(sizes) + 1 <= len(pool):
                break
        else:
            raise _Retry("no count grouping")
        vals = [pool[i] for i in rng.permutation(len(pool))[:len(sizes) + 1]]
        attr = [vals[0]] * a + [v for v, s in zip(vals[1:], sizes) for _ in range(s)]
        other_pool = kinds_all if count_of == "color" else colors_all
        other = [other_pool[int(rng.integers(len(other_pool)))] for _ in range(n)]
        kinds, colors = (other, attr) if count_of == "color" else (attr, other)
        return kinds, colors, 0
    if qtype in ("left_right", "above_below"):
        kinds = [kinds_all[int(rng.integers(len(kinds_all)))] for _ in range(n)]
        colors = [colors_all[int(rng.integers(len(colors_all)))] for _ in range(n)]
        return kinds, colors, None
    raise ValueError(f"unknown question type {qtype!r}: use one of {', '.join(ALL_QUESTION_TYPES)}")


def _pick_left_right(rng, shapes: list[Shape], answer: str, vertical: bool = False) -> tuple[int, int]:
    """(target, reference): the reference's colour + kind is unique in the scene, the target lies clearly on
    the `answer` side of it, and some third shape lies clearly on the other side (so the marker matters).
    vertical: above/below (image y grows downwards) instead of left/right."""
    desc = [s.description for s in shapes]
    pairs = []
    for ri, ref in enumerate(shapes):
        if desc.count(ref.description) != 1:
            continue
        def side(s):
            gap = 0.5 * (s.r + ref.r)
            if vertical:
                return "above" if s.cy < ref.cy - gap else "below" if s.cy > ref.cy + gap else None
            return "left" if s.cx < ref.cx - gap else "right" if s.cx > ref.cx + gap else None
        sides = {i: side(s) for i, s in enumerate(shapes) if i != ri}
        for ti, sd in sides.items():
            if sd == answer and any(v is not None and v != answer for j, v in sides.items() if j != ti):
                pairs.append((ti, ri))
    if not pairs:
        raise _Retry("no above/below pair" if vertical else "no left/right pair")
    return pairs[int(rng.integers(len(pairs)))]


def make_scene(seed, *, question_type: str | None = None, marker_kind: str | None = None,
               question_types: Sequence[str] = QUESTION_TYPES, marker_kinds: Sequence[str] = MARKER_KINDS,
               size: tuple[int, int] | None = None, min_size: int = 96, max_size: int = 192,
               square_probability: float = 0.5, noise_probability: float = 0.5,
               named_color_probability: float = 1.0, num_shapes: tuple[int, int] = (3, 5),
               crop_safe: bool = True, layout: str = "free", grid: int = 4) -> Scene:
    """One scene, a pure function of `seed` (an int or a sequence of ints) and the options.

    question_type / marker_kind: fixed, or None to draw from `question_types` / `marker_kinds`.
    size: (width, height), or None for a random size in [min_size, max_size] (square with square_probability).
    noise_probability: chance of a noisy (gaussian) background instead of a plain one.
    named_color_probability: chance the marker has one of the nine named colours (its phrase names it);
      otherwise an unnamed RGB colour and a phrase without a colour word, as half of training's.
    num_shapes: (min, max) shapes in the scene (3-5 by default; at least 3).
    crop_safe: keep shapes and marker inside the centred square HF's centre crop keeps.
    layout: "free" (random places, apart from each other) or "grid" (random distinct cells of a grid x grid
      layout of the kept square, centres jittered, radius 0.3-0.4 of a cell; `DEMO_SCENE` uses it).
    """
    rng = _rng(seed)
    qtype = question_type or question_types[int(rng.integers(len(question_types)))]
    kind = marker_kind or marker_kinds[int(rng.integers(len(marker_kinds)))]
    if qtype not in ALL_QUESTION_TYPES:
        raise ValueError(f"unknown question type {qtype!r}: use one of {', '.join(ALL_QUESTION_TYPES)}")
    if kind not in MARKER_KINDS:
        raise ValueError(f"unknown marker kind {kind!r}: use one of {', '.join(MARKER_KINDS)}")
    if layout not in ("free", "grid"):
        raise ValueError(f"layout must be 'free' or 'grid', got {layout!r}")
    lo_n, hi_n = num_shapes
    if lo_n < 3 or hi_n < lo_n:
        raise ValueError(f"num_shapes must be (min, max) with 3 <= min <= max, got {num_shapes}")
    # The answer is drawn once, before any layout retry, so answers stay uniform within a type.
    answers = answer_vocabulary(qtype)
    answer = answers[int(rng.integers(len(answers)))]
    count_of = ("color" if rng.random() < 0.5 else "shape") if qtype == "count" else None
    if qtype == "count" and int(answer) + 1 > hi_n:
        raise ValueError(f"num_shapes {num_shapes} is too few for a count of {answer} (and another group)")
    for _ in range(100):
        try:
            return _try_scene(rng, qtype, kind, answer, count_of, size, min_size, max_size, square_probability,
                              noise_probability, named_color_probability, lo_n, hi_n, crop_safe, seed,
                              grid if layout == "grid" else None)
        except _Retry:
            continue
    raise RuntimeError(f"could not build a {qtype} scene with a {kind} marker for seed {seed!r}")


def _try_scene(rng, qtype, kind, answer, count_of, size, min_size, max_size, square_probability, noise_probability,
               named_color_probability, lo_n, hi_n, crop_safe, seed, grid=None) -> Scene:
    w, h = size if size is not None else _image_size(rng, min_size, max_size, square_probability)
    area = vp.kept_region((w, h)) if crop_safe else (0.0, 0.0, float(w), float(h))
    side = min(area[2] - area[0], area[3] - area[1])
    if qtype == "count":  # room for the target's group and another one
        lo_n = max(lo_n, int(answer) + 1)
    n = int(rng.integers(lo_n, hi_n + 1))
    kinds, colors, target = _attributes(rng, qtype, n, answer, count_of)
    spots = _place(rng, n, area, side) if grid is None else _place_grid(rng, n, area, grid)
    shapes = [Shape(k, c, x, y, r) for k, c, (x, y, r) in zip(kinds, colors, spots)]
    reference = None
    if qtype in ("left_right", "above_below"):
        target, reference = _pick_left_right(rng, shapes, answer, vertical=qtype == "above_below")
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    noise = float(rng.uniform(4, 14)) if rng.random() < noise_probability else 0.0
    noise_seed = int(rng.integers(2 ** 31))
    clean = render(shapes, (w, h), background, noise, noise_seed)

    color = _marker_color(rng, named_color_probability)
    t = shapes[target]
    others = np.zeros((h, w), bool)
    for i, s in enumerate(shapes):
        if i != target:
            others |= s.mask((w, h))
    others = _dilate(others, 1)
    scale = side / 96.0
    for _ in range(20):
        try:
            marker = _make_marker(rng, kind, t, (w, h), color, scale)
        except _Retry:
            continue
        cov = vp._coverage(marker, (w, h))
        if cov[others].any():
            continue
        if crop_safe:
            ys, xs = np.nonzero(cov)
            if xs.min() < area[0] or ys.min() < area[1] or xs.max() + 1 > area[2] or ys.max() + 1 > area[3]:
                continue
        break
    else:
        raise _Retry("the marker touches another shape")
    image = vp.draw_markers(clean, [marker], warn_crop=False)

    if qtype == "count":
        template = QUESTION_TEMPLATES[f"count_{count_of}"][0]
    else:
        options = QUESTION_TEMPLATES[qtype]
        template = options[int(rng.integers(len(options)))]
    if reference is not None:
        template = template.replace("{ref}", shapes[reference].description)
    question = vp.build_question(template, marker)
    return Scene(image=image, clean_image=clean, question=question, question_template=template, answer=answer,
                 question_type=qtype, marker_kind=kind, marker_color=color, marker_phrase=vp.marker_phrase(marker),
                 marker=marker, shapes=tuple(shapes), target=target, reference=reference, count_of=count_of,
                 background=background, noise=noise, noise_seed=noise_seed,
                 seed=list(seed) if isinstance(seed, (list, tuple)) else seed)


# --------------------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------------------

def _balanced_counts(others: list[tuple[str, str]], rng) -> list[tuple[str, str]]:
    """`write_dataset(balance_counts=True)`'s order of a scene's other questions: counts first (a count of 1
    kept with probability 1/4), then the rest, each group in seeded order."""
    counts = [qa for qa in others if qa[0] in _COUNT_TEMPLATES and (qa[1] != "1" or rng.random() < 0.25)]
    rest = [qa for qa in others if qa[0] not in _COUNT_TEMPLATES]
    return [counts[j] for j in rng.permutation(len(counts))] + [rest[j] for j in rng.permutation(len(rest))]


def _schedule(rng, n: int, question_types, marker_kinds) -> list[tuple[str, str]]:
    """n (question type, marker kind) pairs: every combination equally often (seeded order), so short sets
    are balanced too."""
    combos = [(q, k) for q in question_types for k in marker_kinds]
    out: list[tuple[str, str]] = []
    while len(out) < n:
        out += [combos[i] for i in rng.permutation(len(combos))]
    return out[:n]


class _SceneWriter:
    """Draw, save and describe scene i of `write_dataset` (a class, so a process pool can pickle it)."""

    def __init__(self, out, seed, image_dir, id_prefix, pre_marked, fix_marker_kind, questions_per_scene,
                 list_shapes, mark_listed, balance_counts, scene_kw):
        self.out, self.seed, self.image_dir, self.id_prefix = out, seed, image_dir, id_prefix
        self.pre_marked, self.fix_marker_kind, self.qps = pre_marked, fix_marker_kind, questions_per_scene
        self.list_shapes, self.mark_listed, self.balance_counts = list_shapes, mark_listed, balance_counts
        self.scene_kw = scene_kw

    def __call__(self, task) -> dict:
        i, (q, k) = task
        seed = self.seed
        scene = make_scene((seed, i), question_type=q, marker_kind=k, **self.scene_kw)
        rel = f"{self.image_dir}/{self.id_prefix}_{seed}_{i:06d}.png"
        (scene.image if self.pre_marked else scene.clean_image).save(self.out / rel)
        more = []
        if self.qps > 1:
            others = scene.other_questions()
            rng_more = np.random.default_rng([seed, i, 7])
            order = rng_more.permutation(len(others))  # drawn either way: balance_counts's draws come after it
            if self.balance_counts:
                others = _balanced_counts(others, rng_more)
                order = range(len(others))
            more = [others[j] for j in order[:self.qps - 1]]
        if self.list_shapes:
            more.append((LIST_QUESTION, scene.marked_caption if self.mark_listed else scene.caption))
        return scene.record(f"{self.id_prefix}-{seed}-{i:06d}", rel, pre_marked=self.pre_marked,
                            fix_marker_kind=self.fix_marker_kind, more_questions=more)


def write_dataset(out_dir, n: int, seed: int = 0, *, question_types: Sequence[str] = QUESTION_TYPES,
                  marker_kinds: Sequence[str] = MARKER_KINDS, pre_marked: bool = True,
                  fix_marker_kind: bool = False, json_name: str = "data.json", image_dir: str = "images",
                  id_prefix: str = "synth", questions_per_scene: int = 1, list_shapes: bool = False,
                  mark_listed: bool = False, balance_counts: bool = False, num_workers: int = 0,
                  **scene_kw) -> Path:
    """Write `n` scenes: PNG images under out_dir/image_dir and a LLaVA-format JSON list out_dir/json_name
    (paths relative to out_dir, so pass out_dir as the image folder). Returns the JSON path.

    Scene i is `make_scene((seed, i), question_type=..., marker_kind=...)`, its type and kind from a seeded
    schedule that covers every (type, kind) pair equally. pre_marked=True saves the marked image and the phrased
    question; False saves the clean image with the target's bbox / segmentation and "<bbox0>" for the training
    pipeline to draw and phrase (`Scene.record`). Each record keeps the scene's `metadata`.
    questions_per_scene: ask up to this many questions of each scene, the scene's own first and then others
    it answers (`Scene.other_questions`, seeded order): more supervised answers per image for training.
    list_shapes: end each conversation with LIST_QUESTION and the scene's caption (training data).
    mark_listed: that caption tags the marked shape (`Scene.marked_caption`): a supervised word on where the
      marker is, beside the shape it marks, in every example (the demo recipe learns the task in fewer steps).
    balance_counts: the more questions are the count ones first (then the rest, seeded order), and a count whose
      answer is 1 is kept only a quarter of the time: in most scenes no other shape shares the marked one's colour
      or shape, so without this the counts asked would be mostly 1, unlike the held-out count questions (1-3
      evenly); a scene may then have fewer than questions_per_scene questions. With the marked list telling the
      marked shape's kind and colour, counting is what most needs the extra questions.
    num_workers: > 1 draws the scenes in that many processes (the same files and records: each scene is seeded
      by its index alone).
    `scene_kw`: more `make_scene` options (size, noise_probability, named_color_probability, ...).
    """
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
        raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}")
    if mark_listed and not list_shapes:
        raise ValueError("mark_listed=True tags the shape list: give list_shapes=True too")
    if not isinstance(questions_per_scene, int) or questions_per_scene < 1:
        raise ValueError(f"questions_per_scene must be a positive integer, got {questions_per_scene!r}")
    for q in question_types:
        if q not in ALL_QUESTION_TYPES:
            raise ValueError(f"unknown question type {q!r}: use one of {', '.join(ALL_QUESTION_TYPES)}")
    for k in marker_kinds:
        if k not in MARKER_KINDS:
            raise ValueError(f"unknown marker kind {k!r}: use one of {', '.join(MARKER_KINDS)}")
    out = Path(out_dir)
    (out / image_dir).mkdir(parents=True, exist_ok=True)
    schedule = _schedule(np.random.default_rng([int(seed), 2 ** 31 - 1]), n, list(question_types),
                         list(marker_kinds))
    job = _SceneWriter(out, int(seed), image_dir, id_prefix, pre_marked, fix_marker_kind, questions_per_scene,
                       list_shapes, mark_listed, balance_counts, scene_kw)
    tasks = list(enumerate(schedule))
    if num_workers > 1 and n > 1:
        # spawned, not forked: the caller may have JAX's threads running; chunks keep the per-scene overhead small
        with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
            records = pool.map(job, tasks, chunksize=max(1, n // (8 * num_workers)))
    else:
        records = [job(t) for t in tasks]
    path = out / json_name
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(records, f, indent=1)
    os.replace(tmp, path)
    return path
