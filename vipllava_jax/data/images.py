"""Loading images: a path, URL, ``data:`` URI, bytes, PIL image or numpy array -> an RGB PIL image, converted the
way Hugging Face converts that kind of input (`load_image`), except that 16-bit, 32-bit integer and float images
are scaled to 8 bits (`to_8bit`) where HF clips them to 0..255."""
from __future__ import annotations

import base64
import io
import os
import re
import urllib.error
import urllib.request
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["load_image", "to_8bit", "HIGH_BIT_DEPTH_MODES"]


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
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "vipllava-jax"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ValueError(f"Cannot download image {url}: {e} (is there a network connection?)") from e


HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_8bit(img: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float grey image (PIL modes I;16*, I, F) -> an 8-bit "L" image, scaled to
    0..255; any other image is returned as it is. A documented deviation from Hugging Face, whose
    `convert("RGB")` clips these modes to 0..255, so that a 16-bit PNG comes in almost white.

      - I;16, I;16L, I;16B, I;16N (unsigned 16 bit): ``v >> 8`` (the high byte), as Pillow itself reads
        16-bit RGB / RGBA / LA PNGs, so a grey and a colour 16-bit image of the same values agree, and 8-bit
        data stored as 16 bit (v * 257) comes back exactly.
      - I (signed 32 bit; some readers give 16-bit files this mode): if every value is within 0..255 the image
        is taken as 8-bit data and kept as it is; otherwise as 16-bit data: clipped to 0..65535, then ``>> 8``.
      - F (32-bit float): if every finite value is within [0, 1] the image is taken as unit-range data and
        scaled by 255; otherwise as 0..255 data, clipped to it. Either way rounded to the nearest integer;
        NaN becomes 0.
    """
    if img.mode not in HIGH_BIT_DEPTH_MODES:
        return img
    a = np.asarray(img)
    if img.mode == "F":
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=np.inf, neginf=-np.inf)
        finite = a[np.isfinite(a)]
        if finite.size == 0 or (finite.min() >= 0.0 and finite.max() <= 1.0):
            a = a * 255.0
        out = np.rint(np.clip(a, 0.0, 255.0))
    else:
        a = a.astype(np.int64)
        if img.mode == "I" and a.size and a.min() >= 0 and a.max() <= 255:
            out = a
        else:
            out = np.clip(a, 0, 65535) >> 8
    res = Image.fromarray(np.ascontiguousarray(out.astype(np.uint8)), mode="L")
    res.info.update({k: v for k, v in img.info.items() if k != "transparency"})
    return res


def _hf_convert_to_rgb(img: Image.Image) -> Image.Image:
    """transformers.image_transforms.convert_to_rgb for PIL input: what CLIPImageProcessor does to a PIL image,
    except for 16-bit, 32-bit integer and float images (I;16*, I, F), which are scaled to 8 bits first
    (`to_8bit`) where HF clips them to 0..255.

    Any alpha band (RGBA, LA, PA) or a `transparency` key in `img.info` (P/L/RGB with tRNS) is
    alpha-composited onto white; everything else goes through PIL's `convert("RGB")` (L and P expand, CMYK
    and YCbCr use PIL's conversions).
    """
    img = to_8bit(img)
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
        (L/P expand; CMYK uses PIL's formula).
      - Except (all inputs): 16-bit, 32-bit integer and float grey images (PIL modes I;16*, I, F) are scaled to
        8 bits (`to_8bit`: 16-bit ``v >> 8``) where HF clips them to 0..255 and so turns most 16-bit images
        white: a documented deviation.
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
    return _hf_convert_to_rgb(to_8bit(img).convert("RGB"))
