"""The synthetic visual-prompt task (vipllava_jax.data.synthetic): seeded, right answers, markers that matter,
records the training pipeline reads."""
import collections
import json

import numpy as np
import pytest

from vipllava_jax.data import synthetic as syn
from vipllava_jax.data import visual_prompts as vp

N_SCENES = 160


@pytest.fixture(scope="module", params=["default", "demo"])
def scenes(request):
    """The default scenes (free layout, 96-192 px) and the demo model's (`DEMO_SCENE`: grid layout, 96 px)."""
    kw = syn.DEMO_SCENE if request.param == "demo" else {}
    return [syn.make_scene(i, **kw) for i in range(N_SCENES)]


def test_demo_scene_grid_layout():
    """DEMO_SCENE: 96 px squares, 3-4 shapes, each inside its own cell of the 4 x 4 grid (the demo model's 24 px
    patches), at varied places and sizes."""
    cells, radii = set(), []
    for i in range(60):
        s = syn.make_scene(i, **syn.DEMO_SCENE)
        assert s.image.size == (96, 96) and 3 <= len(s.shapes) <= 4
        seen = set()
        for sh in s.shapes:
            x0, y0, x1, y1 = sh.box
            cell = (x0 // 24, y0 // 24)
            assert ((x1 - 1) // 24, (y1 - 1) // 24) == cell, (i, sh)  # inside one cell
            assert cell not in seen
            seen.add(cell)
            radii.append(sh.r)
        cells |= seen
    assert len(cells) == 16 and max(radii) - min(radii) > 1.5
    with pytest.raises(ValueError, match="layout"):
        syn.make_scene(0, layout="spiral")


def _changed(scene):
    a, b = np.asarray(scene.image, np.int32), np.asarray(scene.clean_image, np.int32)
    return (a != b).any(-1)


def test_determinism():
    a, b, c = syn.make_scene(11), syn.make_scene(11), syn.make_scene(12)
    assert a.image.tobytes() == b.image.tobytes() and a.question == b.question and a.answer == b.answer
    assert a.metadata == b.metadata
    assert a.image.tobytes() != c.image.tobytes()
    assert syn.make_scene((3, 4)).metadata == syn.make_scene([3, 4]).metadata


def test_write_dataset_deterministic(tmp_path):
    p1 = syn.write_dataset(tmp_path / "a", 6, seed=5)
    p2 = syn.write_dataset(tmp_path / "b", 6, seed=5)
    assert p1.read_text() == p2.read_text()
    for r in json.loads(p1.read_text()):
        assert (tmp_path / "a" / r["image"]).read_bytes() == (tmp_path / "b" / r["image"]).read_bytes()
    assert syn.write_dataset(tmp_path / "c", 6, seed=6).read_text() != p1.read_text()


def test_write_dataset_workers_write_the_same_files(tmp_path):
    """num_workers draws the scenes in processes: the same records and the same image bytes, in order."""
    kw = dict(questions_per_scene=3, list_shapes=True, mark_listed=True, balance_counts=True, **syn.DEMO_SCENE)
    p1 = syn.write_dataset(tmp_path / "one", 10, seed=4, **kw)
    p2 = syn.write_dataset(tmp_path / "two", 10, seed=4, num_workers=2, **kw)
    assert p1.read_text() == p2.read_text()
    for r in json.loads(p1.read_text()):
        assert (tmp_path / "one" / r["image"]).read_bytes() == (tmp_path / "two" / r["image"]).read_bytes()
    with pytest.raises(ValueError, match="num_workers"):
        syn.write_dataset(tmp_path / "bad", 1, num_workers=-1)


def test_clean_image_rerenders_from_metadata(scenes):
    for s in scenes[:40]:
        m = json.loads(json.dumps(s.metadata))  # what a record keeps
        shapes = [syn.Shape.from_dict(d) for d in m["shapes"]]
        again = syn.render(shapes, tuple(m["image_size"]), tuple(m["background"]), m["noise"], m["noise_seed"])
        assert again.tobytes() == s.clean_image.tobytes()


def test_answers_are_right_and_need_the_marker(scenes):
    for s in scenes:
        size = s.image.size
        t = s.target_shape
        kinds = [x.kind for x in s.shapes]
        colors = [x.color for x in s.shapes]
        assert 3 <= len(s.shapes) <= 5
        clean = np.asarray(s.clean_image)
        mask = t.mask(size)
        assert (clean[mask] == t.rgb).all()  # the target is filled with its colour
        if s.question_type == "shape":
            assert s.answer == t.kind and len(set(kinds)) == len(kinds)
        elif s.question_type == "color":
            assert s.answer == t.color and len(set(colors)) == len(colors)
            # recolour check: the answered colour is what the target's pixels show where no marker covers them
            visible = mask & ~_changed(s)
            assert (np.asarray(s.image)[visible] == syn.SHAPE_COLORS[s.answer]).all()
        elif s.question_type == "count":
            attr = colors if s.count_of == "color" else kinds
            assert s.answer == str(attr.count(attr[s.target]))
            groups = collections.Counter(attr)
            assert any(v != int(s.answer) for v in groups.values())  # another answer was possible
            assert ("colour" if s.count_of == "color" else "same shape") in s.question
        elif s.question_type == "left_right":
            ref = s.shapes[s.reference]
            assert s.reference != s.target
            assert [x.description for x in s.shapes].count(ref.description) == 1
            assert ref.description in s.question
            tb, rb = t.box, ref.box
            if s.answer == "left":
                assert t.cx < ref.cx and tb[0] < rb[0]
            else:
                assert t.cx > ref.cx and tb[2] > rb[2]
            others = [x for i, x in enumerate(s.shapes) if i not in (s.target, s.reference)]
            assert any((x.cx > ref.cx) == (s.answer == "left") for x in others)
        assert s.answer in syn.answer_vocabulary(s.question_type)


def test_marker_phrase_kind_and_colour_match_the_drawing(scenes):
    for s in scenes:
        assert s.marker.kind == s.marker_kind
        prep, noun = vp.PHRASE_WORDS[s.marker_kind]
        assert s.marker_phrase == f"{prep} the {s.marker_color} {noun}"
        assert s.marker_phrase in s.question and "<bbox>" not in s.question
        assert s.question_template.replace("<bbox>", s.marker_phrase) == s.question
        assert s.marker_color not in syn.SHAPE_COLORS
        # every changed pixel is a blend of the clean pixel toward the named marker colour
        ch = _changed(s)
        assert ch.sum() > 0
        a, b = np.asarray(s.image, np.float64)[ch], np.asarray(s.clean_image, np.float64)[ch]
        c = np.asarray(vp.NAMED_COLORS[s.marker_color], np.float64)
        alpha = s.marker.alpha
        assert np.abs(a - (b * (1 - alpha) + c * alpha)).max() <= 0.51
        # the marker touches the target and never another shape
        others = np.zeros(ch.shape, bool)
        for i, x in enumerate(s.shapes):
            if i != s.target:
                others |= x.mask(s.image.size)
        assert not (ch & others).any()
        near_target = syn._dilate(s.target_shape.mask(s.image.size), max(4, int(s.target_shape.r)))
        assert (ch & near_target).any()
        if s.marker_kind != "mask":  # most of the target stays visible
            m = s.target_shape.mask(s.image.size)
            assert (m & ~ch).sum() >= 0.4 * m.sum()


def test_everything_inside_the_centre_crop(scenes):
    for s in scenes:
        x0, y0, x1, y1 = vp.kept_region(s.image.size)
        for sh in s.shapes:
            b = sh.box
            assert b[0] >= x0 and b[1] >= y0 and b[2] <= x1 + 1e-6 and b[3] <= y1 + 1e-6
        ys, xs = np.nonzero(_changed(s))
        assert xs.min() >= x0 - 1e-6 and xs.max() + 1 <= x1 + 1e-6
        assert ys.min() >= y0 - 1e-6 and ys.max() + 1 <= y1 + 1e-6
        assert 96 <= min(s.image.size) and max(s.image.size) <= 192


def test_all_kinds_and_types_occur_balanced(tmp_path):
    path = syn.write_dataset(tmp_path, 64, seed=1)
    recs = json.loads(path.read_text())
    kinds = collections.Counter(r["metadata"]["marker_kind"] for r in recs)
    types = collections.Counter(r["metadata"]["question_type"] for r in recs)
    assert set(kinds) == set(vp.MARKER_KINDS) and set(kinds.values()) == {8}
    assert set(types) == set(syn.QUESTION_TYPES) and set(types.values()) == {16}
    assert len({r["metadata"]["image_size"][0] != r["metadata"]["image_size"][1] for r in recs}) == 2  # both


def test_answers_uniform_within_type():
    counts = collections.defaultdict(collections.Counter)
    for i in range(600):
        s = syn.make_scene(10_000 + i)
        counts[s.question_type][s.answer] += 1
    for qt, c in counts.items():
        assert set(c) == set(syn.answer_vocabulary(qt)), qt
        n = sum(c.values())
        k = len(c)
        assert max(c.values()) / n < 1 / k + 0.12, (qt, c)


def test_vocabulary_and_chance():
    assert syn.answer_vocabulary("shape") == sorted(syn.SHAPES)
    assert syn.answer_vocabulary("count") == ["1", "2", "3"]
    assert syn.answer_vocabulary("left_right") == ["left", "right"]
    assert set(syn.answer_vocabulary()) == {a for t in syn.QUESTION_TYPES for a in syn.answer_vocabulary(t)}
    assert syn.chance_accuracy("shape") == pytest.approx(1 / 7)
    assert syn.chance_accuracy("left_right") == 0.5
    assert syn.chance_accuracy() == pytest.approx((1 / 7 + 1 / 6 + 1 / 3 + 1 / 2) / 4)
    assert syn.chance_accuracy() <= 0.35
    assert syn.chance_accuracy(question_types=("shape", "color")) == pytest.approx((1 / 7 + 1 / 6) / 2)
    with pytest.raises(ValueError, match="question type"):
        syn.answer_vocabulary("size")
    assert not set(syn.SHAPE_COLORS) & set(vp.NAMED_COLORS)
    assert not set(syn.SHAPE_COLORS.values()) & set(vp.NAMED_COLORS.values())


def test_options():
    s = syn.make_scene(3, question_type="count", marker_kind="arrow", size=(120, 100))
    assert s.question_type == "count" and s.marker_kind == "arrow" and s.image.size == (120, 100)
    s = syn.make_scene(4, named_color_probability=0.0)
    assert isinstance(s.marker_color, tuple) and vp.color_name(s.marker_color) is None
    assert " the " + vp.PHRASE_WORDS[s.marker_kind][1] in s.question  # no colour word
    with pytest.raises(ValueError, match="marker kind"):
        syn.make_scene(0, marker_kind="circle")
    with pytest.raises(ValueError, match="question type"):
        syn.write_dataset("/nonexistent-never-created", 1, question_types=("size",))


@pytest.fixture(scope="module")
def tiny_processor(tmp_path_factory):
    from vipllava_jax.data import Processor
    from vipllava_jax.testing import make_tiny_processor
    d = tmp_path_factory.mktemp("proc")
    make_tiny_processor(d, image_size=30, image_seq_length=25)
    return Processor.from_pretrained(d)


@pytest.mark.parametrize("pre_marked", [True, False])
def test_records_load_and_encode(tmp_path, tiny_processor, pre_marked):
    from vipllava_jax.data.records import load_records, polygon_mask
    from vipllava_jax.training.config import DataConfig
    from vipllava_jax.training.encoding import encode_example
    path = syn.write_dataset(tmp_path, 16, seed=2, pre_marked=pre_marked)
    recs = load_records(path)
    assert len(recs) == 16
    cfg = DataConfig(max_length=512, seed=0)
    tok = tiny_processor.tokenizer
    for r in recs:
        human, gpt = r["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n") and gpt["from"] == "gpt"
        assert gpt["value"] == r["metadata"]["answer"]
        ex = encode_example(r, tiny_processor, cfg, image_folder=tmp_path)
        assert (ex.input_ids == tiny_processor.image_token_id).sum() == 25
        assert ex.pixel_values.shape == (1, 3, 30, 30)
        kept = ex.labels[ex.labels != -100]
        assert tok.decode(kept.tolist()) == " " + gpt["value"] + "</s>"
        if pre_marked:
            assert "bboxes" not in r and r["metadata"]["marker_phrase"] in human["value"]
            assert ex.markers == []
        else:
            assert "<bbox0>" in human["value"] and len(r["bboxes"]) == 1 and len(r["segmentations"]) == 1
            (kind, _color, phrase), = ex.markers
            assert phrase in ex.text and "<bbox" not in ex.text
            # the segmentation is exactly the target's silhouette, and the image is the unmarked one
            m = r["metadata"]
            t = syn.Shape.from_dict(m["shapes"][m["target"]])
            size = tuple(m["image_size"])
            assert (polygon_mask(r["segmentations"][0], size) == t.mask(size)).all()
            assert list(t.box) == r["bboxes"][0]
            from PIL import Image
            clean = syn.render([syn.Shape.from_dict(d) for d in m["shapes"]], size, tuple(m["background"]),
                               m["noise"], m["noise_seed"])
            assert Image.open(tmp_path / r["image"]).convert("RGB").tobytes() == clean.tobytes()


def test_fix_marker_kind(tmp_path):
    recs = json.loads(syn.write_dataset(tmp_path, 4, seed=0, pre_marked=False, fix_marker_kind=True).read_text())
    assert all(r["marker_kinds"] == [r["metadata"]["marker_kind"]] for r in recs)


def test_above_below_is_an_extra_type():
    """above_below (the fine-tuning notebook's new task) is asked only when named, and is right: the target lies
    on the answer's side of the uniquely described reference, and another shape lies on the other side."""
    assert "above_below" not in syn.QUESTION_TYPES and "above_below" in syn.ALL_QUESTION_TYPES
    assert {syn.make_scene(i).question_type for i in range(60)} <= set(syn.QUESTION_TYPES)
    assert "above" not in syn.answer_vocabulary() and syn.answer_vocabulary("above_below") == ["above", "below"]
    answers = collections.Counter()
    for i in range(40):
        s = syn.make_scene((5, i), question_type="above_below")
        t, ref = s.target_shape, s.shapes[s.reference]
        assert s.reference != s.target and ref.description in s.question and "above or below" in s.question
        assert [x.description for x in s.shapes].count(ref.description) == 1
        assert (t.cy < ref.cy) == (s.answer == "above")
        others = [x for i, x in enumerate(s.shapes) if i not in (s.target, s.reference)]
        assert any((x.cy > ref.cy) == (s.answer == "above") for x in others)
        answers[s.answer] += 1
    assert set(answers) == {"above", "below"}
    with pytest.raises(ValueError, match="above_below"):
        syn.make_scene(0, question_type="up_down")


def test_training_turns_more_questions_and_the_marked_list(tmp_path):
    """questions_per_scene / list_shapes / mark_listed: every extra answer is right for the scene's shapes, and
    the list names every shape left to right with the tag after the marked one only."""
    path = syn.write_dataset(tmp_path, 24, seed=5, questions_per_scene=3, list_shapes=True, mark_listed=True,
                             **syn.DEMO_SCENE)
    for r in json.loads(path.read_text()):
        m, conv = r["metadata"], r["conversations"]
        shapes = [syn.Shape.from_dict(d) for d in m["shapes"]]
        t = shapes[m["target"]]
        assert len(conv) == 8 and conv[-2]["value"] == syn.LIST_QUESTION
        for q, a in zip(conv[2:-2:2], conv[3:-2:2]):
            assert m["marker_phrase"] in q["value"]
            if q["value"].startswith("What shape"):
                assert a["value"] == t.kind
            elif q["value"].startswith("What colour"):
                assert a["value"] == t.color
            else:
                field = "color" if "same colour" in q["value"] else "kind"
                assert a["value"] == str(sum(getattr(s, field) == getattr(t, field) for s in shapes))
        items = conv[-1]["value"].split(", ")
        left_to_right = sorted(range(len(shapes)), key=lambda i: shapes[i].cx)
        assert items == [shapes[i].description + (" " + syn.MARKED_TAG if i == m["target"] else "")
                         for i in left_to_right]
    plain = syn.write_dataset(tmp_path / "plain", 4, seed=5, list_shapes=True, **syn.DEMO_SCENE)
    assert all(syn.MARKED_TAG not in r["conversations"][-1]["value"] for r in json.loads(plain.read_text()))
    with pytest.raises(ValueError, match="list_shapes"):
        syn.write_dataset(tmp_path / "bad", 1, mark_listed=True)


def test_balance_counts(tmp_path):
    """balance_counts: the more questions ask counts first, and counts of 1 no longer dominate (without it, most
    scenes' counts are 1: no other shape shares the marked one's colour or shape)."""
    def count_answers(path):
        out = collections.Counter()
        for r in json.loads(path.read_text()):
            for q, a in zip(r["conversations"][0::2], r["conversations"][1::2]):
                if q["value"].startswith("How many") or "\nHow many" in q["value"]:
                    out[a["value"]] += 1
        return out

    kw = dict(questions_per_scene=3, list_shapes=True, mark_listed=True, **syn.DEMO_SCENE)
    plain = count_answers(syn.write_dataset(tmp_path / "plain", 200, seed=3, **kw))
    path = syn.write_dataset(tmp_path / "bal", 200, seed=3, balance_counts=True, **kw)
    bal = count_answers(path)
    assert plain["1"] / sum(plain.values()) > 0.6 and bal["1"] / sum(bal.values()) < 0.45
    for r in json.loads(path.read_text()):
        extra = [q["value"].startswith("How many") for q in r["conversations"][2:-2:2]]
        assert extra == sorted(extra, reverse=True)  # counts before the other questions
        m = r["metadata"]
        shapes = [syn.Shape.from_dict(d) for d in m["shapes"]]
        t = shapes[m["target"]]
        asked = {q["value"] for q in r["conversations"][2:-2:2]}
        for attr, field in (("colour", "color"), ("shape", "kind")):
            n = sum(getattr(s, field) == getattr(t, field) for s in shapes)
            q = f"How many shapes in the image have the same {attr} as the object {m['marker_phrase']}?"
            if m["question_type"] != "count" and n in (2, 3):
                assert q in asked  # a count other than 1 is always asked (two extra turns, at most two counts)
