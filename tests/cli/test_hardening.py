"""Issue 26's one-line cases outside training: eval's duplicate question_ids, its output paths and temporary
file, its --meta; an empty or [] config.json named; plan --dtype int3; the demo's --seed -1 and a non-demo model.
Each runs the CLI as a user would and stops before any weights load (cheap: no compile)."""
import json
import shutil

import numpy as np
import pytest

from vipllava_jax.cli import main
from vipllava_jax.evals import demo
from vipllava_jax.evals import evaluation as ev


def _run(capsys, *args):
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err.strip()


@pytest.fixture
def vipbench(tmp_path):
    """A ViP-Bench questions file whose question_id 2 appears twice (as 2 and "2"), its meta beside it."""
    lines = [{"image": "a.png", "text": "q?", "question_id": q} for q in (1, 2, 3, "2")]
    p = tmp_path / "questions.jsonl"
    p.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return p


def test_duplicate_question_ids_refused_naming_both_records(tiny_hf, vipbench, tmp_path, capsys):
    rc, _, err = _run(capsys, "eval", "--model", tiny_hf, "--data", vipbench, "--output", tmp_path / "a.jsonl",
                      "--vipbench-results", tmp_path / "r.json", "--compilation-cache", "")
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "question_id '2' appears twice (records 2 and 4" in err
    assert not (tmp_path / "a.jsonl").exists()
    # the library's writer refuses too: all four answers kept or none
    answers = [{"question_id": q, "text": t} for q, t in ((1, "a"), (2, "b"), (3, "c"), ("2", "d"))]
    with pytest.raises(ValueError, match="question_id '2' appears twice"):
        ev.write_vipbench_results(answers, tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()


def test_eval_output_directory_refused_before_any_work(tiny_hf, vipbench, tmp_path, capsys):
    out = tmp_path / "outdir"
    out.mkdir()
    rc, _, err = _run(capsys, "eval", "--model", tmp_path / "no-such-model", "--data", vipbench, "--output", out)
    assert rc == 2 and err == f"vipllava-jax eval: error: --output {out} is a directory: give a file name"


def test_eval_never_touches_a_users_tmp_file(tmp_path):
    """The answers are written through a fresh unique name: a user's <output>.tmp is left as it was."""
    out = tmp_path / "answers.jsonl"
    mine = tmp_path / "answers.jsonl.tmp"
    mine.write_text("the user's own file")
    ev.write_answers([{"question_id": 1, "text": "x"}], out)
    assert mine.read_text() == "the user's own file"
    assert [json.loads(x) for x in out.read_text().splitlines()] == [{"question_id": 1, "text": "x"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answers.jsonl", "answers.jsonl.tmp"]


@pytest.mark.parametrize("meta, words", [
    ("[1, 2]", "a JSON list, not ViP-Bench's meta-data"),
    ('{"v1_1": "yes"}', "entry 'v1_1' is a JSON str, not an object"),
    ("{oops", "not valid JSON"),
])
def test_eval_meta_that_is_not_vipbench_meta(tiny_hf, vipbench, tmp_path, capsys, meta, words):
    m = tmp_path / "meta.json"
    m.write_text(meta)
    rc, _, err = _run(capsys, "eval", "--model", tiny_hf, "--data", vipbench, "--output", tmp_path / "a.jsonl",
                      "--meta", m, "--compilation-cache", "")
    assert rc == 2 and len(err.splitlines()) == 1 and str(m) in err and words in err, err


@pytest.mark.parametrize("text", ["", "  \n", "[]"])
@pytest.mark.parametrize("command", ["generate", "eval"])
def test_empty_or_list_config_json_is_named(tiny_hf, tmp_path, capsys, text, command):
    d = tmp_path / "m"
    shutil.copytree(tiny_hf, d)
    (d / "config.json").write_text(text)
    args = ["--prompt", "hi"] if command == "generate" else ["--data", tmp_path / "x.json", "--output",
                                                             tmp_path / "o.jsonl"]
    rc, _, err = _run(capsys, command, "--model", d, *args, "--compilation-cache", "")
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert f"{d / 'config.json'}" in err and "tokenizer" not in err.lower(), err


@pytest.mark.parametrize("flag", ["--dtype", "--cache-dtype"])
def test_plan_unknown_dtype_is_one_line(capsys, flag):
    rc, _, err = _run(capsys, "plan", flag, "int3")
    assert rc == 2 and err == ("vipllava-jax plan: error: dtype 'int3' is not one the model computes in: give one "
                               "of float32, bfloat16, float16 (or bf16, fp16, fp32)")
    rc, out, _ = _run(capsys, "plan", "--dtype", "bf16", "--json")
    assert rc == 0 and json.loads(out)["dtype"] == "bfloat16"


def test_demo_negative_seed_is_a_scene_of_its_own():
    """--seed help says any integer: -1 draws a scene, deterministic and not seed 1's."""
    a, b, c = demo.demo_scene(-1), demo.demo_scene(-1), demo.demo_scene(1)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and a.question == b.question
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))
    assert demo.demo_scene(3).question == demo.make_scene(3, **demo.DEMO_SCENE).question


def test_demo_names_the_model_from_its_files_and_refuses_a_non_demo_tokenizer(tiny_hf, tmp_path, capsys):
    assert "the shipped demo model" in demo.describe_model(demo.demo_model_path())
    d = tmp_path / "hf"
    shutil.copytree(demo.demo_model_path(), d)
    assert "not written by vipllava-jax train" in demo.describe_model(d)
    assert "trained from scratch" not in demo.describe_model(d)
    (d / "vipllava_jax_export.json").write_text(json.dumps(
        {"written_by": "vipllava-jax train", "run_dir": "/runs/x", "step": 40}))
    assert demo.describe_model(d).endswith("written by vipllava-jax train (run /runs/x, step 40)")
    # the tiny random checkpoint's tokenizer has none of the demo's answer words: refused before loading weights
    rc, _, err = _run(capsys, "demo", "--model", tiny_hf, "--n-eval", "0")
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert f"{tiny_hf} is not a demo-task model: its tokenizer lacks" in err
