"""Processor.apply_chat_template vs transformers' LlavaProcessor.apply_chat_template (offline, no model), and the
shipped demo model's chat template vs the prompt the demo was trained with."""
from __future__ import annotations

import base64
import io
import json
import shutil
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from vipllava_jax.data import Processor, build_prompt
from vipllava_jax.data import chat
from vipllava_jax.data import visual_prompts as vp
from vipllava_jax.data.prompts import VIPLLAVA_CHAT_TEMPLATE, llava_chat_template
from vipllava_jax.evals.demo import DEMO_SYSTEM_PROMPT, DEMO_TEMPLATE, SHIPPED_MODEL_DIR, shipped_model_available
from vipllava_jax.testing import make_tiny_processor

transformers = pytest.importorskip("transformers")

SIZE = 30  # tiny CLIP input: 30 px, patch 6 -> 25 image tokens


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat_processor")
    ids = make_tiny_processor(d, image_seq_length=25, image_size=SIZE)
    (d / "config.json").write_text(json.dumps({
        "model_type": "vipllava", "image_token_index": ids["image_token_id"], "image_seq_length": 25,
        "vision_config": {"image_size": SIZE, "patch_size": 6},
        "text_config": {"vocab_size": 128, "max_position_embeddings": 1024}}))
    return d


def _hf_processor(path):
    p = transformers.AutoProcessor.from_pretrained(str(path), local_files_only=True)
    if getattr(p.image_processor, "backend", "pil") != "pil":  # the parity target is the PIL backend
        p.image_processor = transformers.AutoImageProcessor.from_pretrained(
            str(path), local_files_only=True, backend="pil")
    return p


@pytest.fixture(scope="module")
def hf(tiny_dir):
    return _hf_processor(tiny_dir)


@pytest.fixture(scope="module")
def ours(tiny_dir):
    return Processor.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two RGB images of different sizes, as PIL images, PNG paths and data URLs."""
    d = tmp_path_factory.mktemp("chat_images")
    rng = np.random.default_rng(0)
    pil = [Image.fromarray(rng.integers(0, 256, (40, 52, 3)).astype(np.uint8)),
           Image.fromarray(rng.integers(0, 256, (31, 30, 3)).astype(np.uint8))]
    paths, urls = [], []
    for i, im in enumerate(pil):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        (d / f"{i}.png").write_bytes(buf.getvalue())
        paths.append(str(d / f"{i}.png"))
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return {"image": pil, "path": paths, "url": urls}


def _img(**kw):
    return {"type": "image", **kw}


def _text(t):
    return {"type": "text", "text": t}


CONVERSATIONS = {
    "single": [{"role": "user", "content": [_img(), _text("What is it?")]}],
    "multi": [{"role": "user", "content": [_img(), _text("q1")]},
              {"role": "assistant", "content": [_text("a1")]},
              {"role": "user", "content": [_text("q2")]}],
    "system": [{"role": "system", "content": [_text("Be brief.")]},
               {"role": "user", "content": [_img(), _text("What is it?")]}],
    "two_images": [{"role": "user", "content": [_img(), _img(), _text("Which is brighter?")]}],
    "text_only": [{"role": "user", "content": [_text("Hello there.")]},
                  {"role": "assistant", "content": [_text("Hi.")]}],
}


def test_prompt_strings_equal_hf(hf, ours):
    for name, conv in CONVERSATIONS.items():
        for gen in (True, False):
            want = hf.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False)
            assert ours.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False) == want, (name, gen)
    batch = [CONVERSATIONS["single"], CONVERSATIONS["text_only"]]
    assert ours.apply_chat_template(batch) == hf.apply_chat_template(batch)
    # the llava-hf template's known quirk, reproduced: a system message's text comes twice
    assert ours.apply_chat_template(CONVERSATIONS["system"]).startswith("Be brief.Be brief.###Human: <image>\n")


def test_plain_string_content_is_one_text_part(hf, ours):
    """HF renders a plain string as is (llava-hf's template then drops it); we make it one text part first."""
    plain = [{"role": "user", "content": "Hello there."}, {"role": "assistant", "content": "Hi."}]
    assert (ours.apply_chat_template(plain, add_generation_prompt=True)
            == hf.apply_chat_template(CONVERSATIONS["text_only"], add_generation_prompt=True)
            == "###Human: Hello there.###Assistant: Hi.###Assistant:")
    assert hf.apply_chat_template(plain) == "###Human: ###Assistant: "  # the documented difference


@pytest.mark.parametrize("key", ["image", "path", "url"])
def test_arrays_equal_hf(hf, ours, images, key):
    conv = [{"role": "user", "content": [_img(**{key: images[key][0]}), _img(**{key: images[key][1]}),
                                         _text("Which is brighter?")]},
            {"role": "assistant", "content": [_text("The first.")]},
            {"role": "user", "content": [_text("Why?")]}]
    want = hf.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                  return_tensors="np")
    got = ours.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert set(got) == {"input_ids", "attention_mask", "pixel_values"}
    for k in got:
        assert isinstance(got[k], np.ndarray) and got[k].shape == want[k].shape, k
        np.testing.assert_array_equal(got[k], want[k])
    assert (got["input_ids"] == ours.image_token_id).sum() == 2 * 25
    ids = ours.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)
    assert ids == hf.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)  # [[ids]], lists
    np.testing.assert_array_equal(
        ours.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_tensors="np"),
        got["input_ids"])


def test_no_template_warns_and_uses_llava_hf(tiny_dir, tmp_path, ours):
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    (d / "chat_template.jinja").unlink()
    p = Processor.from_pretrained(d)
    assert p.chat_template is None
    conv = CONVERSATIONS["multi"]
    with pytest.warns(UserWarning, match="no chat template"):
        got = p.apply_chat_template(conv, add_generation_prompt=True)
    assert got == ours.apply_chat_template(conv, add_generation_prompt=True, chat_template=VIPLLAVA_CHAT_TEMPLATE)
    assert got == build_prompt([("q1", "a1"), ("q2", None)], system="")
    # tokenizer_config.json's template (transformers' processor does not read it; its tokenizer does)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": "T{{ messages | length }}"}))
    assert chat.read_chat_template(d)[0] == "T{{ messages | length }}"
    # chat_template.json wins over chat_template.jinja, as in transformers
    (d / "chat_template.jinja").write_text("J")
    (d / "chat_template.json").write_text(json.dumps({"chat_template": "L"}))
    assert chat.read_chat_template(d) == ("L", str(d / "chat_template.json"))


def test_chat_template_override_and_variables(ours):
    conv = CONVERSATIONS["two_images"]
    tpl = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}|{{ m['content'] | length }}"
           "{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>{% endif %}{% endfor %}]"
           "{% endfor %}{% if add_generation_prompt %}{{ suffix }}{% endif %}{{ messages | tojson }}")
    got = ours.apply_chat_template(conv, add_generation_prompt=True, chat_template=tpl, suffix="GO")
    assert got.startswith('<s>[user|3<image><image>]GO[{"role": "user", "content": [{"type": "image"}')
    # a template that starts with bos: no second bos when tokenized (as HF)
    hf_tpl = "{{ bos_token }}{% for m in messages %}{{ m['content'][0]['text'] }}{% endfor %}"
    ids = ours.apply_chat_template(CONVERSATIONS["text_only"], chat_template=hf_tpl, tokenize=True)
    assert ids[0][:2] == [ours.bos_token_id, ours.tokenizer.convert_tokens_to_ids("H")]
    with pytest.raises(Exception, match="takes the roles"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}], chat_template=llava_chat_template())


def test_http_url_without_network_is_a_clear_error(ours, images, monkeypatch):
    url = "https://example.com/cat.png"
    conv = [{"role": "user", "content": [_img(url=url), _text("What is it?")]}]
    assert ours.apply_chat_template(conv) == "###Human: <image>\nWhat is it?"  # no fetch for the string

    def no_network(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(ValueError, match=r"Cannot fetch image https://example\.com/cat\.png: .*name resolution"):
        ours.apply_chat_template(conv, tokenize=True, return_dict=True)

    png = base64.b64decode(images["url"][0].split(",", 1)[1])

    class Response(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    monkeypatch.setattr(urllib.request, "urlopen", lambda req, timeout: Response(png))
    got = ours.apply_chat_template(conv, tokenize=True, return_dict=True)
    want = ours("###Human: <image>\nWhat is it?", [images["image"][0]])
    np.testing.assert_array_equal(got["pixel_values"], want["pixel_values"])


@pytest.mark.parametrize("url,match", [
    ("data:image/png,iVBORw0KGgo=", "expected data:image/<type>;base64"),
    ("data:image/png;base64,", "no data"),
    ("data:image/png;base64,not*base64!", "not valid base64"),
    ("data:image/png;base64,aGVsbG8gd29ybGQ=", "Cannot read the image"),  # valid base64, not an image
])
def test_malformed_data_url(ours, url, match):
    conv = [{"role": "user", "content": [_img(url=url), _text("q")]}]
    with pytest.raises(ValueError, match=match):
        ours.apply_chat_template(conv, tokenize=True, return_dict=True)


def test_visual_prompt_drawn_and_named(ours, images):
    box = (10, 5, 30, 25)  # inside the centre square the crop keeps
    conv = [{"role": "user", "content": [
        _img(image=images["image"][0], visual_prompt={"kind": "rectangle", "box": list(box), "color": "blue"}),
        _text("What is <bbox>?")]}]
    assert ours.apply_chat_template(conv, add_generation_prompt=True) == (
        "###Human: <image>\nWhat is within the blue rectangle?###Assistant:")
    got = ours.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True)
    marked = vp.draw_markers(images["image"][0], [vp.Rectangle(box, color="blue")])
    want = ours("###Human: <image>\nWhat is within the blue rectangle?###Assistant:", [marked])
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    assert not np.array_equal(got["pixel_values"], ours.preprocess_images([images["image"][0]]))
    bad = [{"role": "user", "content": [_img(image=images["image"][0], visual_prompt={"box": [0, 0, 5, 5]}),
                                        _text("q")]}]
    with pytest.raises(ValueError, match="needs 'kind'"):
        ours.apply_chat_template(bad)


@pytest.mark.parametrize("style", ["llava_v1", "llava_v0"])
def test_llava_chat_template_renders_build_prompt(ours, style):
    turns = [("q1", "a1"), ("q2", "a2"), ("q3", None)]
    conv = []
    for i, (q, a) in enumerate(turns):
        conv.append({"role": "user", "content": [_img()] * (2 if i == 0 else 0) + [_text(q)]})
        if a is not None:
            conv.append({"role": "assistant", "content": a})
    for system in ("", "It's a \"chat\" \\ é"):
        tpl = llava_chat_template(style, system)
        assert (ours.apply_chat_template(conv, add_generation_prompt=True, chat_template=tpl)
                == build_prompt(turns, 2, system=system, style=style))
        with_system = [{"role": "system", "content": "S"}] + conv[:2]
        assert (ours.apply_chat_template(with_system, chat_template=tpl)
                == build_prompt(turns[:1], 2, system="S", style=style))


@pytest.mark.skipif(not shipped_model_available(), reason="no trained demo model is shipped")
def test_shipped_demo_template_renders_the_demo_prompt():
    """The shipped model's chat_template.jinja gives, in transformers and here, exactly the prompt the demo
    trained with and asks (evals/demo.py: build_prompt(question, 1, system=DEMO_SYSTEM_PROMPT,
    style=DEMO_TEMPLATE): llava_v1, no system text)."""
    assert (SHIPPED_MODEL_DIR / "chat_template.jinja").read_text() == llava_chat_template(DEMO_TEMPLATE,
                                                                                          DEMO_SYSTEM_PROMPT)
    hf = _hf_processor(SHIPPED_MODEL_DIR)
    ours = Processor.from_pretrained(SHIPPED_MODEL_DIR)
    q = "What colour is the shape within the red rectangle?"
    conv = [{"role": "user", "content": [_img(), _text(q)]}]
    want = build_prompt(q, 1, system=DEMO_SYSTEM_PROMPT, style=DEMO_TEMPLATE)
    assert want == " USER: <image>\n" + q + " ASSISTANT:"
    assert hf.apply_chat_template(conv, add_generation_prompt=True) == want
    assert ours.apply_chat_template(conv, add_generation_prompt=True) == want
    multi = conv + [{"role": "assistant", "content": [_text("red")]}, {"role": "user", "content": [_text("And?")]}]
    want = build_prompt([(q, "red"), ("And?", None)], 1, system=DEMO_SYSTEM_PROMPT, style=DEMO_TEMPLATE)
    assert hf.apply_chat_template(multi, add_generation_prompt=True) == want
    assert ours.apply_chat_template(multi, add_generation_prompt=True) == want
    image = Image.new("RGB", (96, 96), (200, 30, 30))
    conv[0]["content"][0] = _img(image=image)
    got = ours.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True)
    ref = ours(build_prompt(q, 1, system=DEMO_SYSTEM_PROMPT, style=DEMO_TEMPLATE), [image])
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k])
