"""CLIP preprocessing, bit-for-bit what HF's `CLIPImageProcessor` (PIL backend) gives: the settings
(`ImageConfig`, read from a checkpoint's processor files) and `preprocess_image(s)` (resize the shortest side,
centre-crop, rescale, normalise -> [3, H, W] float32; `pad_to_square` pads with the CLIP mean colour first, as
the original ViP-LLaVA training did)."""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image

from .images import load_image

__all__ = ["CLIP_MEAN", "CLIP_STD", "ImageConfig", "expand_to_square", "preprocess_image", "preprocess_images",
           "read_json"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROCESSOR_CONFIG = "processor_config.json"
PREPROCESSOR_CONFIG = "preprocessor_config.json"


def _size_dict(size, *, default_to_square: bool, name: str) -> dict:
    """transformers.image_processing_utils.get_size_dict for the cases CLIP configs use."""
    if isinstance(size, dict):
        return {k: int(v) for k, v in size.items() if v is not None}
    if isinstance(size, int):
        return {"height": size, "width": size} if default_to_square else {"shortest_edge": size}
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return {"height": int(size[0]), "width": int(size[1])}
    if isinstance(size, (list, tuple)) and len(size) == 1:
        return _size_dict(int(size[0]), default_to_square=default_to_square, name=name)
    raise ValueError(f"unsupported {name}: {size!r}")


@dataclasses.dataclass
class ImageConfig:
    """The CLIPImageProcessor settings that matter (defaults: the real VipLlava checkpoints, 336 px)."""
    do_resize: bool = True
    size: dict = dataclasses.field(default_factory=lambda: {"shortest_edge": 336})
    resample: int = 3  # PIL.Image.Resampling.BICUBIC
    do_center_crop: bool = True
    crop_size: dict = dataclasses.field(default_factory=lambda: {"height": 336, "width": 336})
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD

    @classmethod
    def from_dict(cls, d: dict) -> "ImageConfig":
        """From a preprocessor_config.json dict (unknown keys ignored, CLIPImageProcessor defaults for
        missing ones: size 224 like HF)."""
        kw: dict[str, Any] = {}
        for f in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
            if d.get(f) is not None:
                kw[f] = bool(d[f])
        kw["size"] = _size_dict(d.get("size", 224), default_to_square=False, name="size")
        kw["crop_size"] = _size_dict(d.get("crop_size", 224), default_to_square=True, name="crop_size")
        if d.get("resample") is not None:
            kw["resample"] = int(d["resample"])
        if d.get("rescale_factor") is not None:
            kw["rescale_factor"] = float(d["rescale_factor"])
        for f in ("image_mean", "image_std"):
            v = d.get(f)
            if v is not None:
                try:
                    kw[f] = tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v] * 3))
                except (TypeError, ValueError):
                    raise ValueError(f"{f}={v!r} must be numbers") from None
                if not all(math.isfinite(x) for x in kw[f]) or (f == "image_std" and 0.0 in kw[f]):
                    raise ValueError(f"{f}={v!r} must be finite" + (" and non-zero (pixels are divided by it)"
                                                                    if f == "image_std" else ""))
        if d.get("do_convert_rgb") is False:
            warnings.warn("do_convert_rgb=False is ignored: images are always converted to RGB")
        return cls(**kw)

    @classmethod
    def from_pretrained(cls, model_dir) -> "ImageConfig":
        """Read the checkpoint's image-processor settings the way HF does: `processor_config.json`'s nested
        "image_processor" first, then `preprocessor_config.json`. Without either, fall back to a square CLIP
        setup of `config.json`'s vision_config.image_size (with a warning)."""
        d = _find_image_processor_dict(Path(model_dir))
        if d is not None:
            try:
                return cls.from_dict(d)
            except ValueError as e:
                proc = read_json(Path(model_dir) / PROCESSOR_CONFIG)
                name = PROCESSOR_CONFIG if proc is not None and isinstance(proc.get("image_processor"), dict) \
                    else PREPROCESSOR_CONFIG
                raise ValueError(f"{Path(model_dir) / name}: {e}") from None
        cfg = read_json(Path(model_dir) / "config.json") or {}
        image_size = (cfg.get("vision_config") or {}).get("image_size")
        if image_size is None:
            raise FileNotFoundError(
                f"No image processor settings in {model_dir}: looked for {PREPROCESSOR_CONFIG}, "
                f"{PROCESSOR_CONFIG} (with an 'image_processor' entry) and config.json's vision_config.image_size")
        warnings.warn(f"{model_dir} has no {PREPROCESSOR_CONFIG}; using CLIP defaults at {image_size} px")
        return cls(size={"shortest_edge": int(image_size)},
                   crop_size={"height": int(image_size), "width": int(image_size)})

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of the pixel values for an input of this size."""
        if self.do_resize:
            height, width = _resize_target(height, width, self.size)
        if self.do_center_crop:
            height, width = self.crop_size["height"], self.crop_size["width"]
        return height, width


def read_json(path: Path) -> dict | None:
    """A JSON file as a dict, None if absent; unparsable -> ValueError naming it."""
    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"Cannot parse {path}: {e}") from e


def _find_image_processor_dict(model_dir: Path) -> dict | None:
    proc = read_json(model_dir / PROCESSOR_CONFIG)
    if proc is not None and isinstance(proc.get("image_processor"), dict):
        return proc["image_processor"]
    return read_json(model_dir / PREPROCESSOR_CONFIG)


def _resize_target(height: int, width: int, size: dict) -> tuple[int, int]:
    """transformers' output size for resize (shortest_edge [+ longest_edge] or height/width)."""
    if size.get("shortest_edge") and size.get("longest_edge"):  # get_size_with_aspect_ratio
        s, max_size = size["shortest_edge"], size["longest_edge"]
        raw = None
        lo, hi = float(min(height, width)), float(max(height, width))
        if hi / lo * s > max_size:
            raw = max_size * lo / hi
            s = int(round(raw))
        if (height <= width and height == s) or (width <= height and width == s):
            return height, width
        if width < height:
            return (int(raw * height / width) if raw is not None else int(s * height / width)), s
        return s, (int(raw * width / height) if raw is not None else int(s * width / height))
    if size.get("shortest_edge"):  # get_resize_output_image_size(default_to_square=False)
        s = size["shortest_edge"]
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(s * long / short)
        return (new_long, s) if width <= height else (s, new_long)
    if size.get("height") and size.get("width"):
        return size["height"], size["width"]
    raise ValueError(f"unsupported resize size {size}: need shortest_edge or height and width")


def _center_crop(arr: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """transformers.image_transforms.center_crop on an HWC array (zero-pads when the image is smaller)."""
    h, w = arr.shape[:2]
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    if top >= 0 and left >= 0:
        return arr[top:top + crop_h, left:left + crop_w]
    new_h, new_w = max(crop_h, h), max(crop_w, w)
    out = np.zeros((new_h, new_w) + arr.shape[2:], arr.dtype)
    top_pad, left_pad = -(-(new_h - h) // 2), -(-(new_w - w) // 2)  # ceil
    out[top_pad:top_pad + h, left_pad:left_pad + w] = arr
    top, left = top + top_pad, left + left_pad
    return out[max(0, top):min(new_h, top + crop_h), max(0, left):min(new_w, left + crop_w)]


def expand_to_square(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """The original LLaVA `expand2square`: paste `img` centred on a square canvas of `background`."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), background)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def preprocess_image(image, config: ImageConfig | None = None, *, pad_to_square: bool = False) -> np.ndarray:
    """One image (anything `load_image` takes) -> CLIP pixel values [3, H, W] float32.

    Same result as HF's `CLIPImageProcessor` (PIL backend) for the same input: PIL bicubic resize of the
    shortest side, centre crop, `x.astype(float64) * rescale_factor -> float32`, `(x - mean) / std` in float32.
    pad_to_square: first pad to a square with the mean colour `int(m * 255)` (122, 116, 104), as the original
      ViP-LLaVA training did: nothing is cropped. Not what the HF processor does.
    """
    cfg = config or ImageConfig()
    img = load_image(image)
    if pad_to_square:
        img = expand_to_square(img, tuple(int(m * 255) for m in cfg.image_mean))
    if cfg.do_resize:
        h, w = _resize_target(img.height, img.width, cfg.size)
        img = img.resize((w, h), resample=cfg.resample)
    arr = np.asarray(img)
    if cfg.do_center_crop:
        arr = _center_crop(arr, cfg.crop_size["height"], cfg.crop_size["width"])
    if cfg.do_rescale:
        arr = (arr.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    if cfg.do_normalize:
        if not np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(np.float32)
        arr = (arr - np.asarray(cfg.image_mean, arr.dtype)) / np.asarray(cfg.image_std, arr.dtype)
    return np.ascontiguousarray(np.transpose(arr, (2, 0, 1)), dtype=np.float32)


def preprocess_images(images: Iterable, config: ImageConfig | None = None, *,
                      pad_to_square: bool = False) -> np.ndarray:
    """Several images -> [N, 3, H, W] float32 (they must come out the same size, as with a centre crop)."""
    out = [preprocess_image(im, config, pad_to_square=pad_to_square) for im in images]
    if not out:
        cfg = config or ImageConfig()
        h, w = (cfg.crop_size["height"], cfg.crop_size["width"]) if cfg.do_center_crop else (0, 0)
        return np.zeros((0, 3, h, w), np.float32)
    shapes = {x.shape for x in out}
    if len(shapes) > 1:
        raise ValueError(f"images came out with different sizes {sorted(shapes)}; enable the centre crop")
    return np.stack(out)
