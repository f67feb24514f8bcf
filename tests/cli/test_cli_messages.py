"""`vipllava-jax generate` through the checkpoint's chat template: `--messages FILE.json` (HF chat messages), and
`--prompt` formatted by the template by default (`--prompt-style` as the override); the shipped demo model
answering with no flags. On the shared tiny checkpoint (llava-hf's template) and the shipped demo model
(llava_v1 with an empty system prompt, the format it was trained on)."""
import base64
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

import vipllava_jax.cli.generate as cg
from vipllava_jax.cli import main
from vipllava_jax.data import Processor
from vipllava_jax.data.prompts import DEFAULT_SYSTEM_PROMPT
from vipllava_jax.generation import ImageTextToTextPipeline

NEW = 6
QUESTION = "What is it?"


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    p = tmp_path_factory.mktemp("cli_messages") / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((36, 48, 3)) * 255).astype(np.uint8)).save(p)
    return p


def cli(capsys, *args):
    rc = main(["generate", *map(str, args), "--compilation-cache", ""])
    out = capsys.readouterr()
    return rc, out.out, out.err


def write_messages(path, messages):
    path.write_text(json.dumps(messages))
    return path


def user_turn(image_part, text=QUESTION):
    return [{"role": "user", "content": [{"type": "image", **image_part}, {"type": "text", "text": text}]}]


def test_messages_file_is_answered_as_the_pipeline_answers(tiny_hf, tiny_model, photo, capsys, tmp_path):
    """An image part by path, and the same image as base64: both answers are the pipeline's for those messages."""
    want = ImageTextToTextPipeline(*tiny_model, Processor.from_pretrained(tiny_hf))(
        text=user_turn({"image": Image.open(photo)}), max_new_tokens=NEW, return_full_text=False)[0]["generated_text"]
    assert want
    by_path = write_messages(tmp_path / "path.json", user_turn({"path": str(photo)}))
    rc, out, err = cli(capsys, "--model", tiny_hf, "--messages", by_path, "--max-new-tokens", NEW)
    assert rc == 0, err
    assert out.strip() == want
    b64 = base64.b64encode(photo.read_bytes()).decode()
    by_b64 = write_messages(tmp_path / "b64.json", {"messages": user_turn({"url": f"data:image/png;base64,{b64}"})})
    rc, out, err = cli(capsys, "--model", tiny_hf, "--messages", by_b64, "--max-new-tokens", NEW, "--no-stream")
    assert rc == 0, err
    assert out.strip() == want


def test_messages_errors_are_one_line(tiny_hf, photo, capsys, tmp_path):
    good = write_messages(tmp_path / "m.json", user_turn({"path": str(photo)}))
    rc, _, err = cli(capsys, "--model", tiny_hf, "--messages", good, "--prompt", "x", "--image", photo)
    assert rc == 2 and "--messages holds the whole conversation" in err and "drop --prompt, --image" in err
    rc, _, err = cli(capsys, "--model", tiny_hf, "--messages", tmp_path / "none.json")
    assert rc == 2 and "none.json: no such file" in err
    (tmp_path / "bad.json").write_text("[{")
    rc, _, err = cli(capsys, "--model", tiny_hf, "--messages", tmp_path / "bad.json")
    assert rc == 2 and "bad.json: cannot read it as JSON" in err
    rc, _, err = cli(capsys, "--model", tiny_hf, "--messages", write_messages(tmp_path / "o.json", {"a": 1}))
    assert rc == 2 and "o.json: expected a JSON list of messages" in err
    ends = write_messages(tmp_path / "a.json", user_turn({"path": str(photo)}) + [{"role": "assistant",
                                                                                    "content": "It"}])
    rc, _, err = cli(capsys, "--model", tiny_hf, "--messages", ends)
    assert rc == 2 and "a.json: the conversation ends with an assistant message" in err
    missing = write_messages(tmp_path / "i.json", user_turn({"path": str(tmp_path / "gone.png")}))
    rc, _, err = cli(capsys, "--model", tiny_hf, "--messages", missing)
    assert rc == 2 and "i.json" in err and "gone.png" in err
    assert err.count("\n") == 1


@pytest.fixture
def prompts(monkeypatch):
    """The prompts generate hands to generation (answered "ok" without running the model)."""
    seen = []

    def recording(module, params, proc, text, images, **kw):
        seen.append((text, kw["stop"]))
        yield "ok"
    monkeypatch.setattr(cg, "generate_text_stream", recording)
    return seen


def test_prompt_goes_through_the_checkpoint_template_by_default(tiny_hf, photo, capsys, tmp_path, prompts,
                                                                 monkeypatch):
    """No flags: the template's prompt (a user turn with the image, then the text; --system as a system message);
    --prompt-style: that format with its default system prompt; --chat: the turns as messages. A checkpoint
    without a template falls back to llava-hf's, with one warning line."""
    q = "--prompt", QUESTION
    assert cli(capsys, "--model", tiny_hf, "--image", photo, *q)[0] == 0
    assert cli(capsys, "--model", tiny_hf, "--image", photo, *q, "--system", "Be brief.")[0] == 0
    assert cli(capsys, "--model", tiny_hf, "--image", photo, *q, "--prompt-style", "llava_v0")[0] == 0
    assert cli(capsys, "--model", tiny_hf, "--image", photo, *q, "--prompt-style", "llava_v1")[0] == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("And?\n"))
    assert cli(capsys, "--model", tiny_hf, "--image", photo, *q, "--chat")[0] == 0
    assert prompts == [
        (f"###Human: <image>\n{QUESTION}###Assistant:", ("###",)),
        # llava-hf's template renders a system message's text twice, as transformers does with it
        (f"Be brief.Be brief.###Human: <image>\n{QUESTION}###Assistant:", ("###",)),
        (f"{DEFAULT_SYSTEM_PROMPT}###Human: <image>\n{QUESTION}###Assistant:", ("###",)),
        (f"{DEFAULT_SYSTEM_PROMPT} USER: <image>\n{QUESTION} ASSISTANT:", ("</s>",)),
        (f"###Human: <image>\n{QUESTION}###Assistant:", ("###",)),
        (f"###Human: <image>\n{QUESTION}###Assistant: ok###Human: And?###Assistant:", ("###",)),
    ]
    bare = tmp_path / "no_template"
    shutil.copytree(tiny_hf, bare)
    (bare / "chat_template.jinja").unlink()
    prompts.clear()
    rc, out, err = cli(capsys, "--model", bare, "--image", photo, *q)
    assert rc == 0 and prompts == [(f"###Human: <image>\n{QUESTION}###Assistant:", ("###",))]
    assert err.count("warning: This checkpoint has no chat template") == 1, err


def test_shipped_demo_model_answers_with_no_flags(capsys, tmp_path):
    """The shipped demo model carries the template it was trained with (llava_v1, empty system prompt): with no
    format flags it answers the demo's seed-0 question right (the old llava_v0 default gave an empty answer)."""
    from vipllava_jax.evals import demo_model_path
    from vipllava_jax.evals.demo import demo_scene
    scene = demo_scene(0)
    scene.image.save(tmp_path / "scene.png")
    rc, out, err = cli(capsys, "--model", demo_model_path(), "--image", tmp_path / "scene.png",
                       "--prompt", scene.question)
    assert rc == 0, err
    assert out.strip() == scene.answer
