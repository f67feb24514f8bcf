"""`vipllava-jax eval` end to end: a tiny checkpoint, synthetic records -> answers file (model_vqa's keys)
equal to the library's `evaluate`, the printed score, ViP-Bench's results JSON, and bad inputs."""
import json

import pytest

from vipllava_jax.evals import evaluation as ev
from vipllava_jax.data import synthetic as syn
from vipllava_jax import load_pretrained
from vipllava_jax.cli import main
from vipllava_jax.data import Processor
from vipllava_jax.testing import make_tiny_checkpoint
from vipllava_jax.testing import make_tiny_processor


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_eval")
    model = d / "model"
    make_tiny_checkpoint(model, max_position_embeddings=512)
    make_tiny_processor(model, image_size=30, image_seq_length=25)
    data = syn.write_dataset(d / "synth", 3, seed=5)
    return model, data


def test_eval_cli_matches_library_and_writes_grader_files(setup, tmp_path, capsys):
    model, data = setup
    out, res = tmp_path / "answers.jsonl", tmp_path / "results.json"
    rc = main(["eval", "--model", str(model), "--data", str(data), "--image-folder", str(data.parent),
               "--output", str(out), "--batch-size", "2", "--max-new-tokens", "4", "--metric", "exact",
               "--vipbench-results", str(res), "--compilation-cache", ""])
    assert rc == 0
    lines = [json.loads(ln) for ln in out.read_text().splitlines()]
    module, params = load_pretrained(model, progress=False)
    ref, score, _ = ev.evaluate(module, params, Processor.from_pretrained(model), ev.load_eval_records(data),
                                image_folder=data.parent, batch_size=2, max_new_tokens=4, progress=False)
    assert [ln["text"] for ln in lines] == [a["text"] for a in ref] and len(lines) == 3
    assert list(lines[0]) == ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]
    assert json.loads(res.read_text()) == {f"v1_{a['question_id']}": a["text"] for a in ref}
    assert f"exact: {100 * score:.1f}% (3 scored)" in capsys.readouterr().out


def test_eval_cli_bad_inputs(setup, tmp_path, capsys):
    model, data = setup
    recs = json.loads(data.read_text())
    recs[1]["image"] = "missing.png"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(recs))
    args = ["eval", "--model", str(model), "--data", str(bad), "--image-folder", str(data.parent),
            "--output", str(tmp_path / "a.jsonl"), "--max-new-tokens", "2", "--compilation-cache", ""]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert recs[1]["id"] in err and "missing.png" in err
    assert main(args + ["--skip-bad-examples"]) == 0
    assert len((tmp_path / "a.jsonl").read_text().splitlines()) == 2
    assert "1 record(s) skipped" in capsys.readouterr().err
    assert main(["eval", "--model", str(model), "--data", str(tmp_path / "none.json"), "--output",
                 str(tmp_path / "b.jsonl")]) == 2
    assert "none.json" in capsys.readouterr().err
