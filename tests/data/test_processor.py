"""vipllava_jax.data vs transformers' own processor (LlavaProcessor + CLIPImageProcessor), offline."""
from __future__ import annotations

import importlib.util
import io
import json
import urllib.error
import urllib.request
import warnings

import numpy as np
import pytest
from PIL import Image

from vipllava_jax.data import (
    DEFAULT_SYSTEM_PROMPT, ImageConfig, Processor, build_prompt, load_image, preprocess_image,
)
from vipllava_jax.testing import make_tiny_processor

transformers = pytest.importorskip("transformers")

SIZE = 30  # tiny CLIP input: 30 px, patch 6 -> 25 image tokens


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_processor")
    ids = make_tiny_processor(d, image_seq_length=25, image_size=SIZE)
    # The parts of a VipLlava config.json the processor reads (the model's own checks).
    (d / "config.json").write_text(json.dumps({
        "model_type": "vipllava", "image_token_index": ids["image_token_id"], "image_seq_length": 25,
        "vision_config": {"image_size": SIZE, "patch_size": 6},
        "text_config": {"vocab_size": 128, "max_position_embeddings": 1024}}))
    return d


@pytest.fixture(scope="module")
def hf(tiny_dir):
    p = transformers.AutoProcessor.from_pretrained(str(tiny_dir), local_files_only=True)
    p.tokenizer.padding_side = "left"
    if getattr(p.image_processor, "backend", "pil") != "pil":
        # With torchvision installed AutoProcessor picks the torchvision CLIP processor, whose resize is not
        # PIL's; the parity target here is the PIL one (what AutoProcessor gives without torchvision).
        p.image_processor = transformers.AutoImageProcessor.from_pretrained(
            str(tiny_dir), local_files_only=True, backend="pil")
    return p


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed")
def test_autoprocessor_gives_the_pil_clip_processor(tiny_dir):
    p = transformers.AutoProcessor.from_pretrained(str(tiny_dir), local_files_only=True)
    assert type(p).__name__ == "LlavaProcessor"
    assert getattr(p.image_processor, "backend", "pil") == "pil"


@pytest.fixture(scope="module")
def ours(tiny_dir):
    return Processor.from_pretrained(tiny_dir)


def hf_pixels(hf, image):
    return hf.image_processor(image, return_tensors="np")["pixel_values"][0]


def assert_pixels_equal(a, b):
    assert a.shape == b.shape and a.dtype == np.float32
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def rand_image(h, w, c=3, seed=0, high=256, dtype=np.uint8):
    shape = (h, w) if c is None else (h, w, c)
    return np.random.default_rng(seed).integers(0, high, shape).astype(dtype)


def smooth_image(h, w, seed=0):
    """A smooth colourful image (so that rotations and crops visibly change the result)."""
    y, x = np.mgrid[0:h, 0:w]
    r = (255 * x / max(w - 1, 1)).astype(np.uint8)
    g = (255 * y / max(h - 1, 1)).astype(np.uint8)
    b = ((x * 7 + y * 3 + seed) % 256).astype(np.uint8)
    return np.stack([r, g, b], -1)


def assert_ids_equal(hf, ours, texts, images):
    a = hf(text=texts, images=images, return_tensors="np", padding=True)
    b = ours(texts, images)
    assert b["input_ids"].dtype == np.int32 and b["attention_mask"].dtype == np.int32
    np.testing.assert_array_equal(b["input_ids"], a["input_ids"])
    np.testing.assert_array_equal(b["attention_mask"], a["attention_mask"])
    if images:
        assert b["pixel_values"].shape == a["pixel_values"].shape
        assert_pixels_equal(b["pixel_values"], a["pixel_values"])
    return b


# ----------------------------------------------------------------------------------------------------------
# Token ids
# ----------------------------------------------------------------------------------------------------------

def test_ids_one_prompt_one_image(hf, ours):
    out = assert_ids_equal(hf, ours, build_prompt("What is shown here?"), [rand_image(40, 52)])
    ids = out["input_ids"][0]
    assert (ids == ours.image_token_id).sum() == 25 == ours.image_seq_length
    assert ids[0] == ours.bos_token_id


def test_ids_batch_left_padded(hf, ours):
    texts = [build_prompt("Short?"), build_prompt("A much longer question about the red rectangle, please?")]
    out = assert_ids_equal(hf, ours, texts, [rand_image(33, 61, seed=1), rand_image(70, 31, seed=2)])
    mask = out["attention_mask"]
    assert mask[0, 0] == 0 and mask[1].all()  # the shorter prompt is padded, on the left
    assert (out["input_ids"][0][mask[0] == 0] == ours.pad_token_id).all()
    assert np.all(np.diff(mask[0]) >= 0)


def test_ids_two_images_in_one_prompt(hf, ours):
    text = build_prompt("Compare the two pictures.", num_images=2)
    assert text.count("<image>") == 2
    out = assert_ids_equal(hf, ours, [text], [rand_image(40, 40, seed=3), rand_image(20, 90, seed=4)])
    assert (out["input_ids"] == ours.image_token_id).sum() == 50
    assert out["pixel_values"].shape == (2, 3, SIZE, SIZE)


def test_ids_images_ordered_across_batch(hf, ours):
    texts = [build_prompt("one", num_images=1), build_prompt("two", num_images=2)]
    imgs = [rand_image(31, 45, seed=s) for s in (5, 6, 7)]
    out = assert_ids_equal(hf, ours, texts, imgs)
    for i, im in enumerate(imgs):
        assert_pixels_equal(out["pixel_values"][i], preprocess_image(im, ours.image_config))


def test_ids_multi_turn(hf, ours):
    turns = [("What is in the red circle?", "A cat."), ("And what colour is it?", "Orange."), ("Is it asleep?", None)]
    text = build_prompt(turns)
    assert text == (DEFAULT_SYSTEM_PROMPT + "###Human: <image>\nWhat is in the red circle?###Assistant: A cat."
                    "###Human: And what colour is it?###Assistant: Orange.###Human: Is it asleep?###Assistant:")
    assert_ids_equal(hf, ours, [text], [rand_image(44, 36, seed=8)])


def test_text_only_prompt(hf, ours):
    text = build_prompt("No picture here.", num_images=0)
    a = hf(text=[text], return_tensors="np", padding=True)
    b = ours(text)
    np.testing.assert_array_equal(b["input_ids"], a["input_ids"])
    assert "pixel_values" not in b


def test_decode_matches_hf(hf, ours):
    out = ours(build_prompt("Describe it."), [rand_image(30, 30)])
    ids = out["input_ids"][0]
    assert ours.decode(ids) == hf.tokenizer.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids).endswith("Describe it.###Assistant:")
    assert ours.batch_decode(out["input_ids"]) == [ours.decode(ids)]


# ----------------------------------------------------------------------------------------------------------
# Prompt format
# ----------------------------------------------------------------------------------------------------------

def _messages(turns, images_first_turn=1):
    msgs = []
    for i, (q, a) in enumerate(turns):
        content = [{"type": "image"}] * (images_first_turn if i == 0 else 0) + [{"type": "text", "text": q}]
        msgs.append({"role": "user", "content": content})
        if a is not None:
            msgs.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
    return msgs


@pytest.mark.parametrize("turns,n", [
    ([("Describe the arrow.", None)], 1),
    ([("q1", "a1"), ("q2", None)], 1),
    ([("q1", "a1"), ("q2", "a2"), ("q3", None)], 2),
    ([("q1", "a1")], 1),
])
def test_build_prompt_equals_hf_chat_template(hf, turns, n):
    gen = turns[-1][1] is None
    hf_text = hf.apply_chat_template(_messages(turns, n), add_generation_prompt=gen, tokenize=False)
    assert build_prompt(turns, num_images=n, system="") == hf_text
    # The model card's prompt: the system text once, in front (the llava-hf template, given a system
    # message, repeats its text; the original llava_v0 conversation has it once).
    assert build_prompt(turns, num_images=n) == DEFAULT_SYSTEM_PROMPT + hf_text


def test_build_prompt_model_card_and_v1():
    assert build_prompt("What is this?") == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions.###Human: <image>\nWhat is this?###Assistant:")
    assert build_prompt([("q1", "a1"), ("q2", None)], style="llava_v1", system="S") == (
        "S USER: <image>\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT:")
    assert build_prompt([("q1", "a1"), ("q2", None)], num_images=[0, 1], system="") == (
        "###Human: q1###Assistant: a1###Human: <image>\nq2###Assistant:")
    with pytest.raises(ValueError, match="only the last turn"):
        build_prompt([("q1", None), ("q2", None)])
    with pytest.raises(ValueError, match="unknown prompt style"):
        build_prompt("q", style="chatml")


# ----------------------------------------------------------------------------------------------------------
# Pixels: every kind of image, through each route HF has (PIL object, file path, numpy array)
# ----------------------------------------------------------------------------------------------------------

def _exif_jpeg(path, orientation=6):
    img = Image.fromarray(smooth_image(24, 40))
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, "JPEG", exif=exif, quality=95)
    return path


def _pil_kinds():
    rgb = Image.fromarray(smooth_image(41, 57))
    rgba_arr = np.concatenate([smooth_image(41, 57), rand_image(41, 57, c=1, seed=9)], -1)
    p = rgb.quantize(16)
    p_t = p.copy()
    p_t.info["transparency"] = 3
    la = Image.fromarray(np.stack([rand_image(45, 38, c=None, seed=10), rand_image(45, 38, c=None, seed=11)], -1),
                         "LA")
    return {
        "RGB": rgb,
        "L": Image.fromarray(rand_image(41, 57, c=None, seed=12)),
        "P": p,
        "P+transparency": p_t,
        "RGBA": Image.fromarray(rgba_arr, "RGBA"),
        "CMYK": Image.fromarray(rand_image(39, 50, c=4, seed=13), "CMYK"),
        "LA": la,
        "tall": Image.fromarray(rand_image(90, 17, seed=15)),
        "wide": Image.fromarray(rand_image(17, 90, seed=16)),
        "tiny": Image.fromarray(rand_image(5, 7, seed=17)),
        "big": Image.fromarray(rand_image(300, 451, seed=18)),
    }


@pytest.mark.parametrize("kind", list(_pil_kinds()))
def test_pixels_pil_input(hf, ours, kind):
    img = _pil_kinds()[kind]
    assert_pixels_equal(preprocess_image(img, ours.image_config), hf_pixels(hf, img))


@pytest.mark.parametrize("kind", list(_pil_kinds()))
def test_pixels_file_input(hf, ours, kind, tmp_path):
    img = _pil_kinds()[kind]
    path = tmp_path / ("img.jpg" if kind == "CMYK" else "img.png")
    img.save(path)
    assert_pixels_equal(preprocess_image(str(path), ours.image_config), hf_pixels(hf, str(path)))
    assert_pixels_equal(preprocess_image(path, ours.image_config), hf_pixels(hf, str(path)))  # pathlib too


def test_pixels_exif_rotated_jpeg(hf, ours, tmp_path):
    path = _exif_jpeg(tmp_path / "rot.jpg")
    # Path (HF load_image): EXIF orientation applied.
    assert load_image(path).size == (24, 40)
    assert_pixels_equal(preprocess_image(str(path), ours.image_config), hf_pixels(hf, str(path)))
    # PIL object (HF image processor): no EXIF transpose, as HF.
    pil = Image.open(path)
    assert load_image(pil).size == (40, 24)
    assert_pixels_equal(preprocess_image(pil, ours.image_config), hf_pixels(hf, pil))
    assert not np.allclose(preprocess_image(pil, ours.image_config), preprocess_image(path, ours.image_config))
    # Through the whole processor, path string in both.
    assert_ids_equal(hf, ours, [build_prompt("Which way is up?")], [str(path)])


def _sixteen_bit_grey(h=41, w=57):
    """(16-bit data whose high byte is a grey image with mean 128.9, that 8-bit grey image)."""
    rng = np.random.default_rng(14)
    v8 = np.clip(rng.normal(128.9, 40, (h, w)), 0, 255).round().astype(np.uint8)
    v8[0, 0] = 255  # so the 16-bit values reach the top of the range
    return v8.astype(np.uint16) * 256 + rng.integers(0, 256, (h, w), dtype=np.uint16), v8


def test_high_bit_depth_grey_is_scaled_to_8_bits_not_clipped(hf, ours, tmp_path):
    """A documented deviation from HF: 16-bit (I;16), 32-bit integer (I) and float (F) grey images are scaled to
    8 bits (16 bit: the high byte) before RGB conversion, where HF's convert("RGB") clips them to 0..255 and so
    turns a 16-bit image almost white. The rest of the pipeline is HF's on the scaled 8-bit image."""
    v16, v8 = _sixteen_bit_grey()
    assert abs(v8.mean() - 128.9) < 1
    as_8bit = Image.fromarray(v8)  # mode L
    path = tmp_path / "grey16.png"
    Image.fromarray(v16).save(path)
    assert Image.open(path).mode == "I;16"
    # HF's load_image / convert_to_rgb: PIL's convert("RGB"), which clips: almost white.
    assert np.asarray(Image.open(path).convert("RGB")).mean() > 250
    assert hf_pixels(hf, str(path)).mean() > 0.9 * hf_pixels(hf, Image.new("L", (57, 41), 255)).mean()
    inputs = {"png file": str(path), "I;16": Image.open(path),
              "I;16B": Image.frombytes("I;16B", (57, 41), v16.astype(">u2").tobytes()),
              "I": Image.fromarray(v16.astype(np.int32)), "F 0..1": Image.fromarray((v8 / 255).astype(np.float32)),
              "F 0..255": Image.fromarray(v8.astype(np.float32))}
    ref = hf_pixels(hf, as_8bit)
    for name, src in inputs.items():
        rgb = np.asarray(load_image(src))
        assert rgb.shape == (41, 57, 3) and (rgb == v8[..., None]).all(), name
        assert abs(rgb.mean() - 128.9) < 1, name  # not 254.8
        assert_pixels_equal(preprocess_image(src, ours.image_config), ref)
    # "I" holding 8-bit values (all within 0..255) is kept as it is.
    assert (np.asarray(load_image(Image.fromarray(v8.astype(np.int32))))[..., 0] == v8).all()


def test_alpha_conversions_match_hf_semantics(tmp_path):
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[..., 0] = 200  # red under fully transparent alpha
    rgba = Image.fromarray(arr, "RGBA")
    # PIL object: composited onto white.
    assert np.asarray(load_image(rgba))[0, 0].tolist() == [255, 255, 255]
    # File path: HF's load_image converts with convert("RGB"), dropping alpha.
    rgba.save(tmp_path / "a.png")
    assert np.asarray(load_image(tmp_path / "a.png"))[0, 0].tolist() == [200, 0, 0]
    # numpy RGBA: HF's float composite onto white.
    assert np.asarray(load_image(arr))[0, 0].tolist() == [255, 255, 255]


@pytest.mark.parametrize("kind", ["HWC", "HW", "HW1", "RGBA", "CHW"])
def test_pixels_numpy_input(hf, ours, kind):
    base = rand_image(43, 29, seed=20)
    if kind == "HWC":
        ours_in, hf_in = base, base
    elif kind == "HW":  # HF rejects a 2-D array; its HW1 and PIL "L" forms are the same image
        ours_in, hf_in = base[..., 0], base[..., :1]
        assert_pixels_equal(preprocess_image(ours_in, ours.image_config), hf_pixels(hf, Image.fromarray(ours_in)))
    elif kind == "HW1":
        ours_in, hf_in = base[..., :1], base[..., :1]
    elif kind == "RGBA":
        ours_in = hf_in = rand_image(43, 29, c=4, seed=21)
    else:
        ours_in = hf_in = np.ascontiguousarray(np.moveaxis(base, -1, 0))
    assert_pixels_equal(preprocess_image(ours_in, ours.image_config), hf_pixels(hf, hf_in))


def test_pixels_real_size_defaults():
    """The real checkpoints' settings (336 px) vs HF's CLIP processor with the same settings."""
    ip_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    hf_ip = ip_cls(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    img = Image.fromarray(rand_image(375, 500, seed=22))
    ref = hf_ip(img, return_tensors="np")["pixel_values"][0]
    assert_pixels_equal(preprocess_image(img), ref)


def test_pixels_config_without_resize_pads_like_hf(hf, tiny_dir):
    """do_resize=False with a small image: HF's centre crop zero-pads; so must we."""
    cfg = ImageConfig.from_pretrained(tiny_dir)
    cfg.do_resize = False
    img = Image.fromarray(rand_image(21, 44, seed=23))
    ref = hf.image_processor(img, do_resize=False, return_tensors="np")["pixel_values"][0]
    assert_pixels_equal(preprocess_image(img, cfg), ref)


def test_pad_to_square_like_original_llava(hf, ours):
    img = Image.fromarray(smooth_image(20, 50))
    # The original LLaVA recipe: expand2square with the CLIP mean colour, then the CLIP processor.
    mean_colour = tuple(int(m * 255) for m in ours.image_config.image_mean)
    assert mean_colour == (122, 116, 104)
    square = Image.new("RGB", (50, 50), mean_colour)
    square.paste(img, (0, 15))
    got = preprocess_image(img, ours.image_config, pad_to_square=True)
    assert_pixels_equal(got, hf_pixels(hf, square))
    # Nothing was cropped: the left- and right-most image columns survive (the centre crop loses them).
    assert not np.allclose(got, preprocess_image(img, ours.image_config))
    out = ours([build_prompt("x")], [img], pad_to_square=True)
    assert_pixels_equal(out["pixel_values"][0], got)


def test_url_loading_without_network(monkeypatch, tmp_path):
    buf = io.BytesIO()
    Image.fromarray(smooth_image(12, 20)).save(buf, "PNG")

    class _Resp(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: _Resp(buf.getvalue()))
    assert np.array_equal(np.asarray(load_image("https://example.invalid/cat.png")), smooth_image(12, 20))

    def _fail(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", _fail)
    with pytest.raises(ValueError, match=r"Cannot download image https://example.invalid/cat.png"):
        load_image("https://example.invalid/cat.png")


# ----------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------

def test_error_missing_model_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="Model directory not found: .*nope"):
        Processor.from_pretrained(tmp_path / "nope")


def test_error_missing_tokenizer_files(tmp_path, tiny_dir):
    d = tmp_path / "no_tok"
    d.mkdir()
    (d / "config.json").write_text((tiny_dir / "config.json").read_text())
    (d / "preprocessor_config.json").write_text((tiny_dir / "preprocessor_config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"No tokenizer files in .*no_tok: looked for tokenizer\.json, "
                                                r"tokenizer\.model"):
        Processor.from_pretrained(d)


def test_error_unreadable_image(tmp_path, ours):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match=r"Cannot read image .*broken\.png"):
        load_image(bad)
    with pytest.raises(ValueError, match=r"broken\.png"):
        ours(build_prompt("?"), [str(bad)])
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="uint8"):
        load_image(np.zeros((4, 4, 3), np.float32))


@pytest.mark.parametrize("w,h", [(12, 10), (40, 40)])  # 1x-2x the limit (Pillow warns) and > 2x (Pillow raises)
def test_error_oversized_image(monkeypatch, tmp_path, w, h):
    path = tmp_path / "huge.png"
    Image.new("RGB", (w, h)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an error, not a warning
        with pytest.raises(ValueError, match=rf"huge\.png is too large: .*{w * h} pixels.*MAX_IMAGE_PIXELS=100"):
            load_image(str(path))
    if w * h <= 200:
        with pytest.raises(ValueError, match=rf"{w}x{h}"):
            load_image(path)


def test_error_placeholder_image_count(ours):
    img = rand_image(30, 30)
    with pytest.raises(ValueError, match=r"2 <image> placeholder\(s\).*but 1 image\(s\)"):
        ours(build_prompt("two?", num_images=2), [img])
    with pytest.raises(ValueError, match=r"0 <image> placeholder\(s\).*but 1 image\(s\)"):
        ours(build_prompt("none", num_images=0), [img])
    with pytest.raises(ValueError, match=r"1 <image> placeholder\(s\).*but 0 image\(s\)"):
        ours(build_prompt("one"))


def test_error_prompt_too_long(ours, tiny_dir):
    text = build_prompt("What is in the picture?")
    with pytest.raises(ValueError, match=r"Prompt 0 is too long: \d+ tokens \(25 of them image tokens\) "
                                         r"but max_length is 40"):
        ours(text, [rand_image(30, 30)], max_length=40)
    # The default limit is config.json's max_position_embeddings.
    assert ours.max_length == 1024
    with pytest.raises(ValueError, match="max_length is 1024"):
        ours("x" * 1100)
    short = Processor.from_pretrained(tiny_dir, max_length=40)
    with pytest.raises(ValueError, match="too long"):
        short(text, [rand_image(30, 30)])


def test_error_inconsistent_checkpoint(tmp_path):
    d = tmp_path / "bad_ckpt"
    make_tiny_processor(d, image_seq_length=25, image_size=SIZE)
    (d / "config.json").write_text(json.dumps({"image_token_index": 100,
                                               "vision_config": {"image_size": 36, "patch_size": 6}}))
    with pytest.raises(ValueError, match="gives 25 <image> tokens per image but the vision tower"):
        Processor.from_pretrained(d)
    (d / "config.json").write_text(json.dumps({"image_token_index": 7}))
    with pytest.raises(ValueError, match="image_token_index is 7"):
        Processor.from_pretrained(d)


# ----------------------------------------------------------------------------------------------------------
# The tiny processor
# ----------------------------------------------------------------------------------------------------------

def test_tiny_processor_ids_and_offline_load(tiny_dir, hf):
    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_dir), local_files_only=True)
    assert len(tok) <= 128
    assert tok.convert_tokens_to_ids("<image>") == 100 and tok.pad_token_id == 101
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok("Hi <image>!").input_ids == [1] + tok.convert_tokens_to_ids(["H", "i", " "]) + [100] + \
        tok.convert_tokens_to_ids(["!"])
    assert tok.decode(tok("Hello, world?\n").input_ids, skip_special_tokens=True) == "Hello, world?\n"
    assert type(hf).__name__ == "LlavaProcessor" and hf.image_token_id == 100


def test_tiny_processor_options(tmp_path):
    ids = make_tiny_processor(tmp_path / "a", image_size=28, patch_size=7, image_token_id=120, pad_token_id=3)
    assert ids["image_seq_length"] == 16 and ids["vocab_size"] == 121
    p = Processor.from_pretrained(tmp_path / "a")
    assert (p.image_token_id, p.pad_token_id, p.image_seq_length) == (120, 3, 16)
    assert p("<image>", [rand_image(9, 9)])["pixel_values"].shape == (1, 3, 28, 28)
    with pytest.raises(ValueError, match="image_seq_length=24"):
        make_tiny_processor(tmp_path / "b", image_seq_length=24, image_size=30)
    with pytest.raises(ValueError, match="max_vocab_size"):
        make_tiny_processor(tmp_path / "c", image_token_id=200)


def test_tiny_processor_with_tiny_checkpoint_config(tmp_path):
    """The tiny model config of vipllava_jax.testing (image token 100, pad 101, 25 image tokens) fits."""
    testing = pytest.importorskip("vipllava_jax.testing")
    d = tmp_path / "ckpt"
    testing.tiny_hf_config().save_pretrained(d)
    make_tiny_processor(d, image_seq_length=25, image_size=30)
    p = Processor.from_pretrained(d)
    out = p(build_prompt("hi"), [rand_image(30, 30)])
    assert (out["input_ids"] == testing.TINY_IMAGE_TOKEN).sum() == 25
    assert p.pad_token_id == testing.TINY_PAD_TOKEN
