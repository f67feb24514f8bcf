"""Regenerate the visual-prompt goldens: python tests/data/make_visual_prompt_goldens.py

One PNG per marker kind on a small fixed canvas (a gradient, so alpha blending shows everywhere). Look at each
one (upscaled) before committing new goldens: the test compares against them pixel for pixel (max abs diff 1).
Made with Pillow 13.0.0 (PILLOW_VERSION). No antialiasing is used, but Pillow's rasterisation of wide lines,
joints and ellipses has changed between releases, so with another Pillow version the test allows a few
stray pixels (see tests/data/test_visual_prompts.py::test_goldens); regenerate and review if it fails there."""
from pathlib import Path

import numpy as np
from PIL import Image

from vipllava_jax.data import visual_prompts as vp

OUT = Path(__file__).with_name("goldens") / "visual_prompts"
PILLOW_VERSION = "13.0.0"  # the Pillow that drew the committed goldens
W, H = 96, 64


def canvas() -> Image.Image:
    """A deterministic gradient, so alpha blending shows in every pixel."""
    y, x = np.mgrid[0:H, 0:W]
    a = np.stack([x * 255 // (W - 1), y * 255 // (H - 1), np.full_like(x, 96)], -1).astype(np.uint8)
    return Image.fromarray(a)


def golden_mask() -> np.ndarray:
    y, x = np.mgrid[0:H, 0:W]
    return ((x - 48) ** 2 / 30 ** 2 + (y - 32) ** 2 / 18 ** 2) <= 1


def golden_markers() -> dict:
    return {
        "rectangle": vp.Rectangle((20, 12, 76, 52), color="red", width=2),
        "ellipse": vp.Ellipse((16, 10, 80, 54), color="blue", width=2, alpha=0.7),
        "triangle": vp.Triangle(box=(16, 8, 80, 56), seed=1, color="lime", width=2),
        "point": vp.Point((48, 32), radius=6, color="yellow"),
        "arrow": vp.Arrow((10, 58), (60, 20), color="fuchsia", width=2),
        "scribble": vp.Scribble(box=(12, 10, 84, 54), seed=2, color="aqua", width=2),
        "mask_contour": vp.MaskContour(golden_mask(), color="orange", width=2),
        "mask": vp.Mask(golden_mask(), color="purple", alpha=0.4),
    }


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for kind, m in golden_markers().items():
        vp.draw_markers(canvas(), [m], warn_crop=False).save(OUT / f"{kind}.png")
        print("wrote", OUT / f"{kind}.png")


if __name__ == "__main__":
    main()
