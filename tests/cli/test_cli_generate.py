"""`vipllava-jax generate` end to end on a tiny converted checkpoint with a tiny tokenizer built here."""
import io

import numpy as np
import pytest
from PIL import Image

from vipllava_jax import load_pretrained
from vipllava_jax.cli import main
from vipllava_jax.generation import generate, stop_strings_for
from vipllava_jax.data import Processor, build_prompt
from vipllava_jax.testing import make_tiny_checkpoint
from vipllava_jax.testing import make_tiny_processor

NEW = 12
QUESTION = "What is in the red box?"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_gen")
    hf = root / "hf"
    make_tiny_checkpoint(hf, seed=5)
    make_tiny_processor(hf, image_seq_length=25, image_size=30)
    orbax = root / "orbax"
    assert main(["convert", str(hf), str(orbax)]) == 0
    img = root / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((36, 48, 3)) * 255).astype(np.uint8)).save(img)
    return hf, orbax, img


def expected_answer(model_dir, img, turns, system=""):
    """What the library gives for the same inputs: greedy tokens, decoded, cut at the stop string."""
    module, params = load_pretrained(model_dir, progress=False)
    proc = Processor.from_pretrained(model_dir)
    enc = proc([build_prompt(turns, [1] + [0] * (len(turns) - 1), system=system)], [[Image.open(img)]])
    tables = stop_strings_for(proc.tokenizer, ("###",), module.config.text.vocab_size)
    toks = generate(module, params, enc["input_ids"], enc["pixel_values"], enc["attention_mask"],
                    max_new_tokens=NEW, stop_strings=tables, eos_token_id=proc.eos_token_id,
                    pad_token_id=proc.pad_token_id)
    text = proc.decode(toks[0].tolist())
    return (text[:text.find("###")] if "###" in text else text).strip()


def run_cli(capsys, *args):
    rc = main(["generate", *map(str, args), "--max-new-tokens", str(NEW), "--compilation-cache", "",
               "--system", ""])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("which", ["hf", "orbax"])
def test_generate_streams_the_answer(ckpt, capsys, which):
    hf, orbax, img = ckpt
    model = hf if which == "hf" else orbax
    rc, out, err = run_cli(capsys, "--model", model, "--image", img, "--prompt", QUESTION)
    assert rc == 0, err
    want = expected_answer(hf, img, [(QUESTION, None)])
    assert want  # the random model says something
    assert out.strip() == want


def test_no_stream_and_batch_of_prompts(ckpt, capsys):
    hf, _, img = ckpt
    rc, out, err = run_cli(capsys, "--model", hf, "--image", img, "--prompt", QUESTION, "--no-stream")
    assert rc == 0, err
    assert out.strip() == expected_answer(hf, img, [(QUESTION, None)])
    rc, out, err = run_cli(capsys, "--model", hf, "--image", img, "--prompt", QUESTION, "--prompt", "Why?")
    assert rc == 0, err
    assert f"### {QUESTION}\n{expected_answer(hf, img, [(QUESTION, None)])}\n" in out
    assert f"### Why?\n{expected_answer(hf, img, [('Why?', None)])}\n" in out


def test_chat_keeps_the_conversation(ckpt, capsys, monkeypatch):
    hf, _, img = ckpt
    monkeypatch.setattr("sys.stdin", io.StringIO("And the colour?\n"))
    rc, out, err = run_cli(capsys, "--model", hf, "--image", img, "--prompt", QUESTION, "--chat")
    assert rc == 0, err
    first = expected_answer(hf, img, [(QUESTION, None)])
    second = expected_answer(hf, img, [(QUESTION, first), ("And the colour?", None)])
    assert out.strip().split("\n") == [first, second]


def test_sampling_flags_are_seeded(ckpt, capsys):
    hf, _, img = ckpt
    flags = ("--model", hf, "--image", img, "--prompt", QUESTION, "--do-sample", "--temperature", "3",
             "--top-k", "50", "--top-p", "0.95")
    a = run_cli(capsys, *flags, "--seed", "1")
    b = run_cli(capsys, *flags, "--seed", "1")
    assert a[0] == 0 and a[1] == b[1]


def test_clear_errors(ckpt, capsys, tmp_path, monkeypatch):
    hf, _, img = ckpt
    rc, _, err = run_cli(capsys, "--model", tmp_path / "nope", "--image", img, "--prompt", "hi")
    assert rc == 2 and "does not exist" in err
    bare = tmp_path / "bare"
    make_tiny_checkpoint(bare)  # weights and config.json, no tokenizer
    rc, _, err = run_cli(capsys, "--model", bare, "--image", img, "--prompt", "hi")
    assert rc == 2 and "No tokenizer files" in err
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    rc, _, err = run_cli(capsys, "--model", hf, "--image", bad, "--prompt", "hi")
    assert rc == 2 and "Cannot read image" in err and "bad.png" in err
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    rc, _, err = run_cli(capsys, "--model", hf, "--image", img, "--prompt", "hi")
    assert rc == 2 and "too large" in err and "photo.png" in err
    monkeypatch.undo()
    rc, _, err = run_cli(capsys, "--model", hf, "--image", img, "--prompt", "word " * 60)
    assert rc == 2 and "too long" in err and "256" in err


def test_markers_are_drawn_saved_and_named(ckpt, capsys, tmp_path):
    """--box/--arrow draw on the image before preprocessing; --save-marked shows exactly that image; the answer is
    the library's for the marked image; <bbox> becomes the first marker's phrase."""
    from vipllava_jax.data import visual_prompts as vp
    from vipllava_jax.data import load_image
    hf, _, img = ckpt
    out_png = tmp_path / "marked.png"
    rc, out, err = run_cli(capsys, "--model", hf, "--image", img, "--prompt", "What is <bbox>?",
                           "--box", "14,6,34,30", "--arrow", "2,34,20,20", "--color", "red", "--color", "blue",
                           "--width", "2", "--save-marked", out_png)
    assert rc == 0, err
    want_img = vp.draw_markers(load_image(img), [vp.Rectangle((14, 6, 34, 30), width=2),
                                                 vp.Arrow((2, 34), (20, 20), color="blue", width=2)])
    np.testing.assert_array_equal(np.asarray(Image.open(out_png)), np.asarray(want_img))
    assert not np.array_equal(np.asarray(want_img), np.asarray(load_image(img)))
    want_img.save(tmp_path / "expected_input.png")
    assert out.strip() == expected_answer(hf, tmp_path / "expected_input.png",
                                          [("What is within the red rectangle?", None)])
    # the arrow reaches outside the centre crop of this 48x36 image: a warning says so
    assert "beyond the centre square" in err


def test_marker_flag_errors(ckpt, capsys, tmp_path):
    hf, _, img = ckpt
    rc, _, err = run_cli(capsys, "--model", hf, "--image", img, "--prompt", "hi", "--box", "10,10,90,20")
    assert rc == 2 and "outside the 48x36 image" in err
    rc, _, err = run_cli(capsys, "--model", hf, "--image", img, "--prompt", "hi", "--box", "1,1,9,9",
                         "--color", "nocolour")
    assert rc == 2 and "Unknown colour 'nocolour'" in err
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "m.png")
    rc, _, err = run_cli(capsys, "--model", hf, "--image", img, "--prompt", "hi", "--mask", tmp_path / "m.png")
    assert rc == 2 and "does not match the image's" in err


@pytest.mark.slow  # two CLI processes; its fast twin: tests/test_bench.py's generate benchmark times a load
# from the persistent cache (cached_compile_s)
def test_persistent_compilation_cache_on_by_default(ckpt, tmp_path):
    """With no --compilation-cache flag the CLI writes JAX's persistent cache (in a fresh process, since the
    setting is global), and a second run that reads it gives the same answer."""
    import os
    import subprocess
    import sys

    hf, _, img = ckpt
    # Every program is cached (a fast machine compiles the tiny decode loop in under the default 0.5 s floor).
    env = {**os.environ, "VIPLLAVA_JAX_CACHE": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu",
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    cmd = [sys.executable, "-m", "vipllava_jax.cli", "generate", "--model", str(hf), "--image", str(img),
           "--prompt", QUESTION, "--max-new-tokens", "4", "--system", "", "--no-stream"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    entries = list((tmp_path / "cache" / "xla").iterdir())
    assert any("prefill" in e.name for e in entries) and any("decode" in e.name for e in entries), entries
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout and first.stdout.strip()
