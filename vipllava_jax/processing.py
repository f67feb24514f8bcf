"""Images and text -> VipLlava model inputs, exactly as Hugging Face's processor makes them (numpy, no torch).

VipLlava checkpoints (llava-hf/vip-llava-7b-hf, -13b-hf) use transformers' `LlavaProcessor`: a
`CLIPImageProcessor` plus the checkpoint's Llama tokenizer, with every `<image>` in the text expanded to one
`<image>` token per image feature (576 for the real checkpoints). This module reproduces it:

- `load_image(src)`: a path, URL, `data:` URI, bytes, PIL image or numpy array -> an RGB PIL image, converted
  the way HF converts that kind of input (see the function's docstring).
- `preprocess_image(image, config)`: resize the shortest side (bicubic, through PIL like HF's PIL backend),
  centre-crop, rescale by 1/255, normalise with the CLIP mean/std -> [3, H, W] float32, bit-for-bit what
  `CLIPImageProcessor` gives. `pad_to_square=True` pads with the CLIP mean colour first, as the original
  ViP-LLaVA training did (not what HF does).
- `build_prompt(turns)`: the llava_v0 chat format the HF checkpoints expect
  (`<system>###Human: <image>\\n{prompt}###Assistant:`), multi-turn too.
- `Processor.from_pretrained(model_dir)(texts, images)`: numpy `input_ids` / `attention_mask` (int32, left
  padded) and `pixel_values` [num_images, 3, H, W] float32, with ids equal to
  `AutoProcessor.from_pretrained(model_dir)(text=..., images=..., padding=True)` with left padding.

The image parity target is the processor `AutoProcessor` builds. In transformers 5 that is the torchvision
("fast") `CLIPImageProcessor` when torchvision is installed and the PIL backend (`CLIPImageProcessorPil`)
otherwise; this module matches the PIL one (to the bit). The torchvision backend resizes with torchvision's
bicubic kernel, not PIL's, so its pixels can differ slightly from both (not measured here: torchvision is
not installed).
"""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "DEFAULT_SYSTEM_PROMPT", "IMAGE_TOKEN",
    "ImageConfig", "load_image", "expand_to_square", "preprocess_image", "preprocess_images",
    "build_prompt", "Processor",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_TOKEN = "<image>"
DEFAULT_SYSTEM_PROMPT = ("A chat between a curious human and an artificial intelligence assistant. "
                         "The assistant gives helpful, detailed, and polite answers to the human's questions.")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # the vocabulary: one of these must exist
PROCESSOR_CONFIG = "processor_config.json"
PREPROCESSOR_CONFIG = "preprocessor_config.json"


# ---------------------------------------------------------------------------------------------------------
# Loading images
# ---------------------------------------------------------------------------------------------------------

def _describe(src: Any) -> str:
    if isinstance(src, (bytes, bytearray)):
        return f"<{len(src)} bytes>"
    s = os.fspath(src) if isinstance(src, os.PathLike) else str(src)
    return s if len(s) <= 200 else s[:100] + "..." + s[-40:]


def _open_checked(fp, name: str) -> Image.Image:
    """Image.open + full decode; unreadable -> ValueError, too many pixels -> ValueError (never a warning)."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            img = Image.open(fp)
        if any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught):
            w, h = img.size
            img.close()
            raise ValueError(
                f"Image {name} is too large: {w}x{h} = {w * h} pixels exceeds Pillow's limit "
                f"PIL.Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS} (decompression-bomb protection). "
                "Raise PIL.Image.MAX_IMAGE_PIXELS if you trust this image.")
        img.load()
        return img
    except Image.DecompressionBombError as e:
        m = re.search(r"\((\d+) pixels\)", str(e))
        pixels = f"{m.group(1)} pixels" if m else "its pixel count"
        raise ValueError(
            f"Image {name} is too large: {pixels} exceeds twice Pillow's limit "
            f"PIL.Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS} (decompression-bomb protection). "
            "Raise PIL.Image.MAX_IMAGE_PIXELS if you trust this image.") from e
    except (UnidentifiedImageError, OSError, SyntaxError) as e:  # SyntaxError: some truncated formats
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"Cannot read image {name}: {type(e).__name__}: {e}") from e


def _download(url: str, timeout: float) -> bytes:
    import urllib.error
    import urllib.request
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "vipllava-jax"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ValueError(f"Cannot download image {url}: {e} (is there a network connection?)") from e


def _hf_convert_to_rgb(img: Image.Image) -> Image.Image:
    """transformers.image_transforms.convert_to_rgb for PIL input: what CLIPImageProcessor does to a PIL image.

    Any alpha band (RGBA, LA, PA) or a `transparency` key in `img.info` (P/L/RGB with tRNS) is
    alpha-composited onto white; everything else goes through PIL's `convert("RGB")` (L and P expand, CMYK
    and YCbCr use PIL's conversions, I;16 / I / F are clipped to 0..255 by PIL).
    """
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _array_to_rgb(arr: np.ndarray) -> Image.Image:
    """A uint8 numpy image -> RGB PIL image, as HF's processor converts an array.

    HW or HW1 -> the grey value repeated in R, G, B; HWC with C=3 as is; C=4 (RGBA) -> composited onto white
    with HF's float formula `round(a/255 * rgb + (1 - a/255) * 255)`. Channels-last is assumed; a
    channels-first CHW array is accepted only when its last axis cannot be a channel axis.
    """
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"expected a numpy array, got {type(arr)}")
    if arr.dtype != np.uint8:
        raise ValueError(f"numpy images must be uint8 (0..255), got dtype {arr.dtype}; convert first, e.g. "
                         "(x * 255).round().astype(np.uint8) for floats in [0, 1]")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ValueError(f"numpy images must be HW or HWC, got shape {arr.shape}")
    if arr.shape[-1] not in (1, 3, 4) and arr.shape[0] in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # CHW
    c = arr.shape[-1]
    if c == 1:
        arr = np.repeat(arr, 3, axis=-1)
    elif c == 4:
        alpha = arr[..., 3:4] / 255
        arr = np.round(alpha * arr[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    elif c != 3:
        raise ValueError(f"numpy images need 1, 3 or 4 channels (last axis), got shape {arr.shape}")
    return Image.fromarray(np.ascontiguousarray(arr), mode="RGB")


def load_image(src, *, exif_transpose: bool | None = None, timeout: float = 10.0) -> Image.Image:
    """Load `src` as an RGB PIL image, converting it exactly as Hugging Face does for that kind of input.

    src: a path (str or os.PathLike), an http(s) URL, a `data:image/...;base64,` URI, raw encoded bytes,
      a PIL image, or a uint8 numpy array (HWC with 1, 3 or 4 channels, or HW grayscale).

    What HF does, and so what this does:
      - Files, URLs, data URIs, bytes (HF: `transformers.image_utils.load_image`, which the processor
        uses for strings): `ImageOps.exif_transpose` (EXIF orientation applied), then `convert("RGB")`,
        which DROPS alpha (RGBA, LA: the colour under transparent pixels shows) and turns a palette or grey
        `transparency` key into an RGB colour key; then the processor's `convert_to_rgb` composites that
        colour key onto white.
      - PIL images (HF: the image processor's `convert_to_rgb`): NO EXIF transpose; alpha bands and
        `transparency` keys are alpha-composited onto WHITE; other modes via PIL's `convert("RGB")`
        (L/P expand; CMYK uses PIL's formula; I;16/I/F are clipped to 0..255, so most 16-bit images turn white).
      - numpy arrays: see `_array_to_rgb` (grey repeated, RGBA composited onto white with HF's formula).
    exif_transpose: None = as HF (True for encoded inputs, False for PIL images); True/False to force it.

    Errors: missing file -> FileNotFoundError; unreadable data -> ValueError naming the source; more pixels
    than `PIL.Image.MAX_IMAGE_PIXELS` -> ValueError naming the image and its size (Pillow itself only warns
    between 1x and 2x the limit); no network for a URL -> ValueError.
    """
    if isinstance(src, Image.Image):
        img = ImageOps.exif_transpose(src) if exif_transpose else src
        return _hf_convert_to_rgb(img)
    if isinstance(src, np.ndarray):
        return _array_to_rgb(src)
    if isinstance(src, (bytes, bytearray)):
        data, name = bytes(src), _describe(src)
    elif isinstance(src, (str, os.PathLike)):
        s = os.fspath(src)
        name = _describe(s)
        if isinstance(s, bytes):
            s = s.decode()
        if s.startswith(("http://", "https://")):
            data = _download(s, timeout)
        elif s.startswith("data:image/"):
            try:
                data = base64.b64decode(s.split(",", 1)[1], validate=False)
            except (IndexError, ValueError) as e:
                raise ValueError(f"Cannot decode base64 data URI {name}: {e}") from e
        else:
            if not os.path.exists(s):
                raise FileNotFoundError(f"Image file not found: {s}")
            if os.path.isdir(s):
                raise ValueError(f"Cannot read image {s}: it is a directory")
            with open(s, "rb") as f:
                data = f.read()
    else:
        raise TypeError(f"Unsupported image type {type(src).__name__}: expected a path, URL, bytes, "
                        "PIL.Image.Image or numpy array")
    img = _open_checked(io.BytesIO(data), name)
    if exif_transpose is None or exif_transpose:
        img = ImageOps.exif_transpose(img)
    return _hf_convert_to_rgb(img.convert("RGB"))


# ---------------------------------------------------------------------------------------------------------
# CLIP preprocessing
# ---------------------------------------------------------------------------------------------------------

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
                proc = _read_json(Path(model_dir) / PROCESSOR_CONFIG)
                name = PROCESSOR_CONFIG if proc is not None and isinstance(proc.get("image_processor"), dict) \
                    else PREPROCESSOR_CONFIG
                raise ValueError(f"{Path(model_dir) / name}: {e}") from None
        cfg = _read_json(Path(model_dir) / "config.json") or {}
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


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"Cannot parse {path}: {e}") from e


def _find_image_processor_dict(model_dir: Path) -> dict | None:
    proc = _read_json(model_dir / PROCESSOR_CONFIG)
    if proc is not None and isinstance(proc.get("image_processor"), dict):
        return proc["image_processor"]
    return _read_json(model_dir / PREPROCESSOR_CONFIG)


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


# ---------------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------------

def build_prompt(turns: Sequence[tuple[str, str | None]] | str, num_images: int | Sequence[int] = 1, *,
                 system: str = DEFAULT_SYSTEM_PROMPT, style: str = "llava_v0") -> str:
    """The chat prompt VipLlava expects.

    turns: [(user_text, assistant_text_or_None), ...], oldest first; a plain string is one turn. Only the
      last answer may be None: then the prompt ends with the assistant cue for generation.
    num_images: `<image>\\n` placeholders put before the user text: an int for the first turn, or one count
      per turn.
    style:
      "llava_v0" (default; HF model card, HF chat template, original conv_llava_v0):
        `{system}###Human: <image>\\n{q1}###Assistant: {a1}###Human: {q2}###Assistant:`
        Equal to the llava-hf chat template's output (user turns `###Human: `, images first as `<image>\\n`,
        assistant turns `###Assistant: `, generation cue `###Assistant:`) with the system text put in front
        once. A final given answer is not followed by `###`, as in the HF template.
      "llava_v1" (original ViP-LLaVA training and ViP-Bench, conv_llava_v1):
        `{system} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:`
    """
    if isinstance(turns, str):
        turns = [(turns, None)]
    turns = [tuple(t) for t in turns]
    if not turns:
        raise ValueError("build_prompt needs at least one turn")
    for i, t in enumerate(turns):
        if len(t) != 2 or not isinstance(t[0], str):
            raise ValueError(f"turn {i} must be (user_text, answer_or_None), got {t!r}")
        if t[1] is None and i != len(turns) - 1:
            raise ValueError(f"turn {i} has no answer: only the last turn's answer may be None")
    counts = [num_images] + [0] * (len(turns) - 1) if isinstance(num_images, int) else list(num_images)
    if len(counts) != len(turns) or any(c < 0 for c in counts):
        raise ValueError(f"num_images must be an int or one non-negative count per turn, got {num_images!r}")
    if style == "llava_v0":
        out = [system]
        for (user, answer), n in zip(turns, counts):
            out.append("###Human: " + "<image>\n" * n + user)
            out.append("###Assistant:" if answer is None else "###Assistant: " + answer)
        return "".join(out)
    if style == "llava_v1":
        out = [system, " "]
        for (user, answer), n in zip(turns, counts):
            out.append("USER: " + "<image>\n" * n + user + " ")
            out.append("ASSISTANT:" if answer is None else "ASSISTANT: " + answer + "</s>")
        return "".join(out)
    raise ValueError(f"unknown prompt style {style!r}: use 'llava_v0' or 'llava_v1'")


# ---------------------------------------------------------------------------------------------------------
# Processor
# ---------------------------------------------------------------------------------------------------------

def _flatten_images(images) -> list:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        out = []
        for im in images:
            out.extend(_flatten_images(im) if isinstance(im, (list, tuple)) else [im])
        return out
    return [images]


class Processor:
    """Texts + images -> VipLlava inputs, like HF's `LlavaProcessor` with left padding, in numpy.

    Build it with `Processor.from_pretrained(model_dir)`. Calling it returns a dict with
    `input_ids` [B, L] int32, `attention_mask` [B, L] int32 (left padded with the tokenizer's pad id) and,
    when images are given, `pixel_values` [num_images, 3, H, W] float32 in the order the `<image>`
    placeholders appear across the texts.
    """

    def __init__(self, tokenizer, image_config: ImageConfig | None = None, *, image_seq_length: int | None = None,
                 patch_size: int | None = None, num_additional_image_tokens: int = 0,
                 vision_feature_select_strategy: str | None = None, image_token: str = IMAGE_TOKEN,
                 max_length: int | None = None, pad_to_square: bool = False):
        """image_seq_length: fixed image tokens per image; or give patch_size (+ num_additional_image_tokens,
        vision_feature_select_strategy) to count them like HF from the pixel size:
        (H // p) * (W // p) + num_additional_image_tokens - (1 if strategy == "default")."""
        self.tokenizer = tokenizer
        self.image_config = image_config or ImageConfig()
        self.patch_size = patch_size
        self.num_additional_image_tokens = num_additional_image_tokens
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.image_token = getattr(tokenizer, "image_token", None) or image_token
        ids = tokenizer.encode(self.image_token, add_special_tokens=False)
        if len(ids) != 1 or (tokenizer.unk_token_id is not None and ids[0] == tokenizer.unk_token_id):
            raise ValueError(f"the tokenizer does not have {self.image_token!r} as a single token "
                             f"(it encodes to {ids})")
        self.image_token_id = ids[0]
        if patch_size is None and image_seq_length is None:
            raise ValueError("give image_seq_length or patch_size")
        self._fixed_seq_length = image_seq_length
        self.max_length = max_length
        self.pad_to_square = pad_to_square

    # -- construction ----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model_dir, *, max_length: int | None = None, pad_to_square: bool = False,
                        image_seq_length: int | None = None) -> "Processor":
        """Load the checkpoint's own tokenizer (`AutoTokenizer`, local files only) and image settings.

        Image tokens per image: as HF, from processor_config.json's patch_size, num_additional_image_tokens
        and vision_feature_select_strategy; without those, config.json's image_seq_length (or
        (image_size // patch_size)**2 of its vision_config); `image_seq_length=` overrides both. The count is
        checked against config.json's vision tower when it is there.
        max_length: longest allowed prompt in tokens; None = config.json's max_position_embeddings, if any.
        """
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"Model directory not found: {model_dir}")
        present = [f for f in TOKENIZER_FILES if (model_dir / f).is_file()]
        if not present:
            raise FileNotFoundError(
                f"No tokenizer files in {model_dir}: looked for {', '.join(TOKENIZER_FILES)} "
                "(and tokenizer_config.json)")
        from transformers import AutoTokenizer
        try:
            tokenizer = AutoTokenizer.from_pretrained(os.fspath(model_dir), local_files_only=True)
        except Exception as e:  # noqa: BLE001 - give the directory in the message
            raise ValueError(f"Cannot load the tokenizer in {model_dir} ({', '.join(present)}): {e}") from e

        image_config = ImageConfig.from_pretrained(model_dir)
        proc = _read_json(model_dir / PROCESSOR_CONFIG) or {}
        cfg = _read_json(model_dir / "config.json") or {}
        text_cfg = cfg.get("text_config") or {}
        vision_cfg = cfg.get("vision_config") or {}
        if max_length is None:
            max_length = text_cfg.get("max_position_embeddings")

        kw: dict[str, Any] = {}
        if image_seq_length is not None:
            kw["image_seq_length"] = int(image_seq_length)
        elif proc.get("patch_size"):
            kw.update(patch_size=int(proc["patch_size"]),
                      num_additional_image_tokens=int(proc.get("num_additional_image_tokens") or 0),
                      vision_feature_select_strategy=proc.get("vision_feature_select_strategy"))
        elif cfg.get("image_seq_length"):
            kw["image_seq_length"] = int(cfg["image_seq_length"])
        elif vision_cfg.get("image_size") and vision_cfg.get("patch_size"):
            kw["image_seq_length"] = (int(vision_cfg["image_size"]) // int(vision_cfg["patch_size"])) ** 2
        else:
            raise ValueError(f"Cannot tell how many tokens an image takes for {model_dir}: no patch_size in "
                             f"{PROCESSOR_CONFIG}, no image_seq_length or vision_config in config.json; pass "
                             "image_seq_length=")
        self = cls(tokenizer, image_config, image_token=proc.get("image_token") or IMAGE_TOKEN,
                   max_length=max_length, pad_to_square=pad_to_square, **kw)

        # The model must see as many <image> tokens as its vision tower gives features.
        if vision_cfg.get("image_size") and vision_cfg.get("patch_size") and image_config.do_center_crop:
            n_model = (int(vision_cfg["image_size"]) // int(vision_cfg["patch_size"])) ** 2
            n_proc = self.image_seq_length
            if n_proc != n_model:
                raise ValueError(
                    f"{model_dir}: the processor gives {n_proc} <image> tokens per image but the vision tower "
                    f"({vision_cfg['image_size']} px, patch {vision_cfg['patch_size']}) gives {n_model} features")
        if cfg.get("image_token_index") is not None and int(cfg["image_token_index"]) != self.image_token_id:
            raise ValueError(f"{model_dir}: config.json's image_token_index is {cfg['image_token_index']} but the "
                             f"tokenizer maps {self.image_token!r} to {self.image_token_id}")
        return self

    # -- ids ---------------------------------------------------------------------------------------------
    @property
    def pad_token_id(self) -> int | None:
        return self.tokenizer.pad_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def bos_token_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    def num_image_tokens(self, height: int, width: int) -> int:
        """Image tokens for pixel values of this size (HF's LlavaProcessor.replace_image_token count)."""
        if self.patch_size is None:
            return self._fixed_seq_length
        n = (height // self.patch_size) * (width // self.patch_size) + self.num_additional_image_tokens
        return n - 1 if self.vision_feature_select_strategy == "default" else n

    @property
    def image_seq_length(self) -> int | None:
        """Image tokens per image for the configured crop size (None when it depends on the input size)."""
        if self.patch_size is None:
            return self._fixed_seq_length
        if not self.image_config.do_center_crop:
            return None
        return self.num_image_tokens(self.image_config.crop_size["height"], self.image_config.crop_size["width"])

    # -- call ----------------------------------------------------------------------------------------------
    def preprocess_images(self, images, *, pad_to_square: bool | None = None) -> np.ndarray:
        pts = self.pad_to_square if pad_to_square is None else pad_to_square
        return preprocess_images(_flatten_images(images), self.image_config, pad_to_square=pts)

    def __call__(self, texts: str | Sequence[str], images=None, *, max_length: int | None = None,
                 pad_to_square: bool | None = None) -> dict[str, np.ndarray]:
        """texts: one prompt or a batch; each `<image>` in them takes the next image.
        images: None, one image, or a list (nested lists per prompt are flattened), anything `load_image`
          takes. max_length / pad_to_square override the processor's settings for this call.
        Raises ValueError when placeholders and images differ in number or a prompt is longer than max_length.
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("texts must be a string or a non-empty list of strings")
        images = _flatten_images(images)
        per_text = [t.count(self.image_token) for t in texts]
        if sum(per_text) != len(images):
            raise ValueError(
                f"The text has {sum(per_text)} {self.image_token} placeholder(s) (per prompt: {per_text}) but "
                f"{len(images)} image(s) were given; they must match, one image per {self.image_token}")

        out: dict[str, np.ndarray] = {}
        replacements: list[str] = []
        if images:
            pixel_values = self.preprocess_images(images, pad_to_square=pad_to_square)
            out["pixel_values"] = pixel_values
            h, w = pixel_values.shape[-2:]
            replacements = [self.image_token * self.num_image_tokens(h, w)] * len(images)

        it = iter(replacements)
        expanded = []
        for t in texts:
            parts = t.split(self.image_token)
            expanded.append(parts[0] + "".join(next(it) + p for p in parts[1:]))
        ids = self.tokenizer(expanded, add_special_tokens=True)["input_ids"]

        for i, (row, t) in enumerate(zip(ids, expanded)):
            want = t.count(self.image_token)
            got = sum(1 for x in row if x == self.image_token_id)
            if got != want:
                raise ValueError(f"prompt {i}: {want} image tokens in the text became {got} {self.image_token_id} "
                                 "ids: the tokenizer does not split the image token cleanly")
        limit = self.max_length if max_length is None else max_length
        if limit is not None:
            for i, row in enumerate(ids):
                if len(row) > limit:
                    n_img = sum(1 for x in row if x == self.image_token_id)
                    raise ValueError(f"Prompt {i} is too long: {len(row)} tokens ({n_img} of them image tokens) "
                                     f"but max_length is {limit}")

        longest = max(len(r) for r in ids)
        if any(len(r) != longest for r in ids) and self.pad_token_id is None:
            raise ValueError("The prompts have different lengths and the tokenizer has no pad token to pad them")
        input_ids = np.full((len(ids), longest), self.pad_token_id if self.pad_token_id is not None else 0, np.int32)
        attention_mask = np.zeros((len(ids), longest), np.int32)
        for i, row in enumerate(ids):
            if row:
                input_ids[i, longest - len(row):] = row
                attention_mask[i, longest - len(row):] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, **out}

    def decode(self, ids, skip_special_tokens: bool = True, **kw) -> str:
        """Token ids (list or 1-D array) -> text, via the checkpoint's tokenizer."""
        return self.tokenizer.decode(np.asarray(ids).tolist(), skip_special_tokens=skip_special_tokens, **kw)

    def batch_decode(self, ids, skip_special_tokens: bool = True, **kw) -> list[str]:
        return [self.decode(row, skip_special_tokens=skip_special_tokens, **kw) for row in ids]
