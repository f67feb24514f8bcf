"""vipllava_jax.evals.evaluation: metrics, batched answers equal one-at-a-time generation, ViP-Bench files, bad records."""
import json

import numpy as np
import pytest
from PIL import Image

from vipllava_jax.evals import evaluation as ev
from vipllava_jax.data import synthetic as syn
from vipllava_jax.data.records import Region


# --- metrics ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pred,gt,want", [
    ("Circle", "circle", 1), ("  circle.  ", "Circle", 1), ("'circle!'", "circle", 1), ("a circle", "circle", 0),
    ("circles", "circle", 0), ("2", "2", 1), ("two", "2", 0), ("Left", "left<OR>on the left", 1),
    ("on the  left", "left<OR>on the left", 1), ("right", "left<OR>on the left", 0),
])
def test_exact(pred, gt, want):
    assert ev.score_answer(pred, gt, "exact") == want


@pytest.mark.parametrize("pred,gt,want", [
    ("x = -1 or x = -5", "-1<AND>-5", 1), ("x = -1", "-1<AND>-5", 0), ("x = -5 or 5", "-1<AND>-5", 0),
    ("The answer is 0.75.", "0.75<OR>x=0.75<OR>3/4", 1), ("it is 3/4", "0.75<OR>x=0.75<OR>3/4", 1),
    ("10", "1", 0), ("1 apple", "1", 1), ("A Red Car", "red <AND> car", 1), ("a red bus", "red <AND> car", 0),
    ("blue", "red<OR>blue <AND> green", 0), ("blue and green", "red<OR>blue <AND> green", 1),
    ("a red", "red<OR>blue <AND> green", 1), ("anything", "", 0),
])
def test_contains(pred, gt, want):
    assert ev.score_answer(pred, gt, "contains") == want


@pytest.mark.parametrize("pred,gt,want", [
    ("B", "B", 1), ("(B) a cat", "B", 1), ("B. a cat", "b", 1), ("A cat", "B", 0), ("C", "B", 0),
    ("Yes, it is.", "yes", 1), ("No", "yes", 0), ("left of it", "left", 1), ("A", "A<OR>B", 1),
])
def test_choice(pred, gt, want):
    assert ev.score_answer(pred, gt, "choice") == want


def test_unknown_metric():
    with pytest.raises(ValueError, match="metric"):
        ev.score_answer("a", "a", "bleu")


# --- records ---------------------------------------------------------------------------------------------------
def test_parse_records():
    r = ev.parse_record({"id": 7, "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat shape?"}, {"from": "gpt", "value": "star"},
        {"from": "human", "value": "more?"}, {"from": "gpt", "value": "no"}], "metadata": {"question_type": "shape"}})
    assert (r.id, r.image, r.question, r.ground_truth, r.source) == ("7", "a.png", "What shape?", "star", "llava")
    assert r.info == {"question_type": "shape"}
    v = ev.parse_record({"question_id": 3, "image": "v1_3.png", "text": "What is <obj>?"},
                        {"v1_3": {"answer": "a<OR>b"}})
    assert (v.id, v.question, v.ground_truth, v.source) == (3, "What is <obj>?", "a<OR>b", "vipbench")
    with pytest.raises(ev.EvalError, match="'q1'.*no question"):
        ev.parse_record({"id": "q1", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\n"}]})
    with pytest.raises(ev.EvalError, match="no question"):
        ev.parse_record({"question_id": 5, "image": "a.png", "text": " "})
    with pytest.raises(ev.EvalError, match="<bbox1>"):
        ev.parse_record({"id": "r", "image": "a.png", "bboxes": [[0, 0, 5, 5]],
                         "conversations": [{"from": "human", "value": "<bbox1>?"}, {"from": "gpt", "value": "x"}]})


# --- the harness on a tiny random checkpoint -------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from vipllava_jax import load_pretrained
    from vipllava_jax.data import Processor
    from vipllava_jax.testing import make_tiny_checkpoint
    from vipllava_jax.testing import make_tiny_processor
    d = tmp_path_factory.mktemp("tiny")
    make_tiny_checkpoint(d, max_position_embeddings=512)
    make_tiny_processor(d, image_size=30, image_seq_length=25)
    module, params = load_pretrained(d, progress=False)
    return module, params, Processor.from_pretrained(d), d


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    marked = json.loads(syn.write_dataset(d, 4, seed=3).read_text())
    regions = json.loads(syn.write_dataset(d, 1, seed=4, pre_marked=False, json_name="r.json").read_text())
    return d, marked + regions


def _one_at_a_time(tiny, rec, image_folder, max_new_tokens, template="llava_v1"):
    """What a user gets from the generation API for one record, batch 1."""
    from vipllava_jax.data import visual_prompts as vp
    from vipllava_jax.generation import generate, stop_strings_for
    from vipllava_jax.data import build_prompt, load_image
    module, params, proc, _ = tiny
    q = rec["conversations"][0]["value"].replace("<image>\n", "")
    img = load_image(str(image_folder / rec["image"]))
    if "bboxes" in rec:  # the harness's fixed style: a red rectangle on the box
        img = vp.draw_markers(img, [vp.Rectangle(tuple(rec["bboxes"][0]), color="red")], warn_crop=False)
        q = q.replace("<bbox0>", "within the red rectangle")
    enc = proc([build_prompt(q, 1, style=template)], [img])
    stop = ("</s>",) if template == "llava_v1" else ("###",)
    toks = generate(module, params, enc["input_ids"], enc["pixel_values"], enc["attention_mask"],
                    max_new_tokens=max_new_tokens, pad_token_id=proc.pad_token_id, eos_token_id=proc.eos_token_id,
                    stop_strings=stop_strings_for(proc.tokenizer, stop, module.config.text.vocab_size))
    text = proc.decode(toks[0].tolist())
    cut = min((text.find(s) for s in stop if s in text), default=-1)
    return (text[:cut] if cut >= 0 else text).strip(), q


@pytest.mark.parametrize("template", ["llava_v1", "llava_v0"])
def test_batched_equals_one_at_a_time(tiny, synth, template):
    module, params, proc, _ = tiny
    folder, records = synth
    answers, score, stats = ev.evaluate(module, params, proc, records, image_folder=folder, batch_size=2,
                                        max_new_tokens=5, template=template, progress=False)
    assert [a["question_id"] for a in answers] == [r["id"] for r in records]
    for a, r in zip(answers, records):
        text, q = _one_at_a_time(tiny, r, folder, 5, template)
        assert a["text"] == text and a["prompt"] == q
        assert a["metadata"]["ground_truth"] == r["conversations"][1]["value"]
        assert a["metadata"]["score"] == ev.score_answer(text, a["metadata"]["ground_truth"], "exact")
        assert a["metadata"]["question_type"] == r["metadata"]["question_type"]
    assert stats["evaluated"] == stats["scored"] == len(records) and stats["skipped"] == 0
    assert score == pytest.approx(np.mean([a["metadata"]["score"] for a in answers]))
    assert set(stats["by_type"]) <= set(syn.QUESTION_TYPES)
    # the region record's marker phrase was put into the question
    assert "within the red rectangle" in answers[-1]["prompt"] and "<bbox" not in answers[-1]["prompt"]


def test_draw_regions_kinds():
    from vipllava_jax.data import visual_prompts as vp
    img = Image.new("RGB", (64, 48), (200, 200, 200))
    regions = [Region((10, 10, 30, 30)), Region(None, ((40, 5, 60, 5, 60, 40, 40, 40),))]
    for kind in vp.MARKER_KINDS:
        out, marks = ev.draw_regions(img, regions, kind)
        assert [m.kind for m in marks] == [kind, kind] and [m.color for m in marks] == ["red", "lime"]
        assert out.tobytes() != img.tobytes()
        assert out.tobytes() == ev.draw_regions(img, regions, kind)[0].tobytes()
    with pytest.raises(ValueError, match="no area"):
        ev.draw_regions(img, [Region((100, 100, 120, 120))])


def test_vipbench_files(tiny, tmp_path):
    """A small ViP-Bench-format split (questions.jsonl + images, meta-data beside the split folder) -> answers in
    model_vqa.py's format and the grader's results JSON."""
    module, params, proc, _ = tiny
    split = tmp_path / "bbox"
    (split / "images").mkdir(parents=True)
    meta = {}
    with open(split / "questions.jsonl", "w") as f:
        for qid in range(3):
            scene = syn.make_scene(qid)
            scene.image.save(split / "images" / f"v1_{qid}.png")
            f.write(json.dumps({"image": f"v1_{qid}.png", "text": scene.question, "question_id": qid,
                                "category": "rec"}) + "\n")
            meta[f"v1_{qid}"] = {"image": f"v1_{qid}.png", "question": scene.question,
                                 "answer": scene.answer + "<OR>" + scene.answer.upper() if qid else
                                 f"{scene.answer}<AND>{scene.marker_color}", "capability": ["rec"]}
    (tmp_path / "vip-bench-meta-data.json").write_text(json.dumps(meta))
    records = ev.load_eval_records(split / "questions.jsonl")
    assert [r["answer"] for r in records] == [meta[f"v1_{i}"]["answer"] for i in range(3)]
    answers, score, stats = ev.evaluate(module, params, proc, records, image_folder=split / "images",
                                        batch_size=2, metric="contains", max_new_tokens=4, progress=False)
    out = ev.write_answers(answers, tmp_path / "answers" / "tiny-bbox.jsonl")
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(lines) == 3
    for i, line in enumerate(lines):
        assert list(line) == ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]
        assert line["question_id"] == i and isinstance(line["question_id"], int)
        assert line["prompt"] == meta[f"v1_{i}"]["question"]
        assert isinstance(line["text"], str) and len(line["answer_id"]) == 22
        assert line["metadata"]["category"] == "rec" and line["metadata"]["metric"] == "contains"
    # what convert_vipbench_for_eval.py makes and vip-bench_evaluator.py reads: results[id] for every meta id
    results = json.loads(ev.write_vipbench_results(answers, tmp_path / "results" / "tiny-bbox.json").read_text())
    assert {k: results[k] for k in meta} == {f"v1_{a['question_id']}": a["text"] for a in answers}
    assert stats["scored"] == 3 and stats["by_type"].keys() == {"rec"}
    # same answers again: the file is deterministic
    again, _, _ = ev.evaluate(module, params, proc, ev.load_eval_records(split / "questions.jsonl"),
                              image_folder=split / "images", batch_size=3, metric="contains", max_new_tokens=4,
                              progress=False)
    assert [a["answer_id"] for a in again] == [a["answer_id"] for a in answers]


def test_bad_records(tiny, synth, tmp_path):
    module, params, proc, _ = tiny
    folder, records = synth
    missing = {"id": "gone-1", "image": "images/nope.png",
               "conversations": [{"from": "human", "value": "<image>\nWhat shape?"}, {"from": "gpt", "value": "x"}]}
    empty = {"id": "empty-2", "image": records[0]["image"], "conversations": [{"from": "gpt", "value": "x"}]}
    (tmp_path / "broken.png").write_bytes(b"not a png")
    broken = {"question_id": 9, "image": str(tmp_path / "broken.png"), "text": "What?"}
    with pytest.raises(ev.EvalError, match=r"'gone-1'.*image not found: .*images/nope\.png"):
        ev.evaluate(module, params, proc, [records[0], missing], image_folder=folder, progress=False)
    with pytest.raises(ev.EvalError, match="'empty-2'.*no question"):
        ev.evaluate(module, params, proc, [empty], image_folder=folder, progress=False)
    with pytest.raises(ev.EvalError, match="9.*cannot read image .*broken.png"):
        ev.evaluate(module, params, proc, [broken], image_folder=folder, progress=False)
    answers, score, stats = ev.evaluate(module, params, proc, [missing, records[0], empty, broken, records[1]],
                                        image_folder=folder, batch_size=2, max_new_tokens=5, skip_bad_examples=True,
                                        progress=False)
    assert [a["question_id"] for a in answers] == [records[0]["id"], records[1]["id"]]
    assert stats["skipped"] == 3 and [s[0] for s in stats["skipped_records"]] == ["gone-1", "empty-2", 9]
    assert stats["records"] == 5 and stats["evaluated"] == 2


def test_text_only_and_unscored(tiny):
    module, params, proc, _ = tiny
    recs = [{"question_id": 1, "text": "Hi"}, {"question_id": 2, "text": "Why?"}]
    answers, score, stats = ev.evaluate(module, params, proc, recs, batch_size=4, max_new_tokens=3, progress=False)
    assert score is None and stats["scored"] == 0 and len(answers) == 2
    assert all(a["metadata"]["ground_truth"] is None and "score" not in a["metadata"] for a in answers)
