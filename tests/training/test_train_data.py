"""Fine-tuning data (vipllava_jax.data.records, vipllava_jax.training.encoding and .pipeline): records -> ids /
labels / marked images -> grain batches."""
from __future__ import annotations

import dataclasses
import json
import types

import numpy as np
import pytest
from PIL import Image
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from vipllava_jax.data import visual_prompts as vp
from vipllava_jax.data import ImageConfig, Processor, build_prompt
from vipllava_jax.data.prompts import TEMPLATES, template_parts
from vipllava_jax.data.records import load_records
from vipllava_jax.testing import make_tiny_processor
from vipllava_jax.training import pipeline
from vipllava_jax.training.config import DataConfig, TrainConfig
from vipllava_jax.training.encoding import DataError, ExampleDropped, encode_example
from vipllava_jax.training.loss import IGNORE_INDEX
from vipllava_jax.training.pipeline import make_eval_iterator, make_train_iterator
from vipllava_jax.training.step import BATCH_KEYS

SYS = "Sys."  # a short system text keeps the char-level sequences short
SEQ = 25  # the tiny processor's image tokens per image
IMG, PAD, BOS, EOS = 100, 101, 1, 2


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("traindata")
    make_tiny_processor(root / "proc")
    proc = Processor.from_pretrained(root / "proc")
    folder = root / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(folder / "b.png")
    Image.fromarray(np.full((30, 30, 3), 128, np.uint8)).save(folder / "grey.png")
    (folder / "broken.png").write_bytes(b"not a png at all")
    return types.SimpleNamespace(proc=proc, folder=folder, root=root)


def cfg(**kw):
    kw.setdefault("system_prompt", SYS)
    kw.setdefault("max_length", 512)
    return DataConfig(**kw)


def conv(*pairs):
    out = []
    for q, a in pairs:
        out += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return out


def kept_spans(labels):
    """Contiguous runs of kept label positions -> list of id lists."""
    spans, cur = [], []
    for x in labels.tolist():
        if x != IGNORE_INDEX:
            cur.append(x)
        elif cur:
            spans.append(cur)
            cur = []
    return spans + ([cur] if cur else [])


def encode(env, rec, c=None, epoch=0):
    return encode_example(rec, env.proc, c or cfg(), image_folder=env.folder, epoch=epoch)


# --- templates, ids, labels ------------------------------------------------------------------------------------

def test_template_parts_come_from_build_prompt():
    v1, v0 = template_parts("llava_v1", SYS), template_parts("llava_v0", SYS)
    assert (v1.system, v1.user_tag, v1.assistant_tag, v1.answer_prefix, v1.end_of_turn) == \
        ("Sys. ", "USER: ", " ASSISTANT:", " ", "</s>")
    assert (v0.system, v0.user_tag, v0.assistant_tag, v0.answer_prefix, v0.end_of_turn) == \
        ("Sys.###", "Human: ", "###Assistant:", " ", "###")


@pytest.mark.parametrize("template", TEMPLATES)
def test_multi_turn_labels_decode_to_answers_and_end_of_turn(env, template):
    answers = ["A cat.", "It is grey, mostly.", "No."]
    rec = {"id": "mt", "image": "a.png",
           "conversations": conv(("<image>\nWhat is it?", answers[0]), ("Colour?", answers[1]), ("More?", answers[2]))}
    ex = encode(env, rec, cfg(template=template))
    eot = "</s>" if template == "llava_v1" else "###"
    tok = env.proc.tokenizer
    spans = [tok.decode(s, skip_special_tokens=False) for s in kept_spans(ex.labels)]
    assert spans == [" " + a + eot for a in answers]
    if template == "llava_v1":  # the end of turn is the eos token itself
        assert all(s[-1] == EOS for s in kept_spans(ex.labels))
    kept = ex.labels != IGNORE_INDEX
    np.testing.assert_array_equal(ex.labels[kept], ex.input_ids[kept])
    assert ex.input_ids[0] == BOS and ex.labels[0] == IGNORE_INDEX
    assert (ex.input_ids == IMG).sum() == SEQ and (ex.labels[ex.input_ids == IMG] == IGNORE_INDEX).all()
    # the text is build_prompt's (the template lives in processing.py), v0 with its final "###"
    turns = [("<image>\nWhat is it?", answers[0]), ("Colour?", answers[1]), ("More?", answers[2])]
    assert ex.text == build_prompt(turns, num_images=0, system=SYS, style=template) + ("###" if eot == "###" else "")
    # ids equal the project's processor (whole-string tokenization, images expanded) and so does the image
    ref = env.proc(ex.text, images=[env.folder / "a.png"])
    np.testing.assert_array_equal(ex.input_ids, ref["input_ids"][0])
    np.testing.assert_array_equal(ex.pixel_values, ref["pixel_values"])


def test_image_expansion_two_images_and_text_only(env):
    rec = {"id": "two", "image": ["a.png", "b.png"],
           "conversations": conv(("<image>\nFirst.", "ok"), ("<image>\nSecond?", "yes"))}
    ex = encode(env, rec)
    pos = np.nonzero(ex.input_ids == IMG)[0]
    assert len(pos) == 2 * SEQ and ex.pixel_values.shape == (2, 3, 30, 30)
    # two runs of SEQ, each after its own turn's "USER: "
    assert pos[SEQ - 1] - pos[0] == SEQ - 1 and pos[SEQ] > pos[SEQ - 1] + 1
    txt = encode(env, {"id": "t", "conversations": conv(("Hi", "Hello."))})
    assert txt.pixel_values.shape == (0, 3, 30, 30) and (txt.input_ids != IMG).all()


def test_first_turn_without_image_tag_gets_it_prepended(env):
    ex = encode(env, {"id": "p", "image": ["a.png", "b.png"], "conversations": conv(("Describe.", "Two."))})
    assert ex.text.startswith("Sys. USER: <image>\n<image>\nDescribe. ASSISTANT:")
    # a tag placed after the question stays where it is
    ex = encode(env, {"id": "q", "image": "a.png", "conversations": conv(("Describe.\n<image>", "One."))})
    assert "USER: Describe.\n<image> ASSISTANT:" in ex.text
    # leading gpt turn dropped (as LLaVA), trailing unanswered human turn dropped
    c = [{"from": "gpt", "value": "x"}] + conv(("Q?", "A.")) + [{"from": "human", "value": "left"}]
    ex = encode(env, {"id": "r", "conversations": c})
    assert ex.text == "Sys. USER: Q? ASSISTANT: A.</s>"


def sentencepiece_like(legacy: bool, extra_merges=()):
    """A Llama-like fast tokenizer: "\u2581" for spaces (prefix space per segment when legacy, Metaspace
    prepend_scheme="first" otherwise), BPE merges across characters including a space's "\u2581"."""
    sp = "\u2581"
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in [sp, "\n"] + [chr(c) for c in range(33, 127)]:
        vocab.setdefault(ch, len(vocab))
    pairs = list(extra_merges) + [
        (sp, "A"), ("A", "S"), (sp + "A", "S"), (sp + "AS", "S"), ("I", "S"), ("IS", "T"), ("A", "N"), ("AN", "T"),
        (sp, "U"), (sp + "U", "S"), (sp + "US", "E"), (sp + "USE", "R"), ("#", "#"), ("##", "#"), (sp, "c"),
        (sp + "c", "a"), (sp + "ca", "t"), (sp, "W"), (sp + "W", "h"), (sp + "Wh", "a"), (sp + "Wha", "t"),
        ("a", "t"), (sp, "H"), (sp + "H", "u"), (".", sp)]
    for a, b in pairs:
        vocab.setdefault(a + b, len(vocab))
    for t in ("<image>", "<pad>"):
        vocab[t] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, unk_token="<unk>"))
    if legacy:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend(sp), normalizers.Replace(" ", sp)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=sp, prepend_scheme="first", split=False)
    tok.decoder = decoders.Metaspace(replacement=sp, prepend_scheme="never", split=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<unk>", "<s>", "</s>", "<image>", "<pad>")])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                pad_token="<pad>")
    return types.SimpleNamespace(tokenizer=t, image_seq_length=4, image_token_id=t.convert_tokens_to_ids("<image>"),
                                 image_token="<image>", pad_token_id=t.pad_token_id,
                                 image_config=ImageConfig(size={"shortest_edge": 30},
                                                          crop_size={"height": 30, "width": 30}))


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "metaspace"])
@pytest.mark.parametrize("template", TEMPLATES)
def test_sentencepiece_style_pieces_equal_whole_string(env, template, legacy):
    """Spaces attach to the next word and merge with it: the pieces still split at token edges, and equal
    whole-string tokenization (checked inside encode_example)."""
    proc = sentencepiece_like(legacy)
    answers = ["A cat at ASSISTANT.", "What"]
    rec = {"id": "sp", "image": "a.png", "conversations": conv(("What cat?\n<image>", answers[0]),
                                                               ("USER: cat", answers[1]))}
    ex = encode_example(rec, proc, cfg(template=template, system_prompt="A chat."), image_folder=env.folder)
    eot = "</s>" if template == "llava_v1" else "###"
    tok = proc.tokenizer
    spans = [tok.convert_ids_to_tokens(s) for s in kept_spans(ex.labels)]
    assert ["".join(s) for s in spans] == [("\u2581" + a).replace(" ", "\u2581") + eot for a in answers]
    assert (ex.input_ids == proc.image_token_id).sum() == 4
    # a merge across the "###" / "Human" edge: no clean boundary, so a DataError, never silently shifted labels
    if template == "llava_v0":
        bad = sentencepiece_like(legacy, extra_merges=[("#", "H")])
        with pytest.raises(DataError, match="tokenization mismatch"):
            encode_example(rec, bad, cfg(template=template, system_prompt="A chat."), image_folder=env.folder)


# --- markers ---------------------------------------------------------------------------------------------------

REGION_REC = {"id": "reg-1", "image": "b.png", "bboxes": [[5, 5, 30, 30], [25, 10, 55, 38]],
              "conversations": conv(("<image>\nWhat is <bbox0> doing near <bbox1>?", "<bbox1> watches."))}


def test_markers_same_seed_epoch_record_same_pixels_other_epoch_differs(env):
    c = cfg(pad_to_square=True)
    a, b = encode(env, REGION_REC, c, epoch=3), encode(env, REGION_REC, c, epoch=3)
    np.testing.assert_array_equal(a.pixel_values, b.pixel_values)
    assert a.text == b.text and a.markers == b.markers
    others = [encode(env, REGION_REC, c, epoch=e) for e in (4, 5)]
    others.append(encode(env, REGION_REC, dataclasses.replace(c, seed=1), epoch=3))
    others.append(encode(env, dict(REGION_REC, id="reg-2"), c, epoch=3))
    for o in others:
        assert not np.array_equal(o.pixel_values, a.pixel_values)
    plain = encode(env, {k: v for k, v in REGION_REC.items() if k != "bboxes"} |
                   {"conversations": conv(("<image>\nWhat?", "x"))}, c)
    assert not np.array_equal(plain.pixel_values, a.pixel_values)  # the markers are on the image


def test_phrases_match_drawn_kinds_and_colours(env):
    seen_kinds, named, unnamed = set(), 0, 0
    for e in range(40):
        ex = encode(env, REGION_REC, epoch=e)
        (k0, c0, p0), (k1, c1, p1) = ex.markers
        assert k0 == k1 and k0 in vp.MARKER_KINDS  # one kind per example, as training
        seen_kinds.add(k0)
        prep, noun = vp.PHRASE_WORDS[k0]
        for c, p in ((c0, p0), (c1, p1)):
            if isinstance(c, str):
                assert c in vp.NAMED_COLORS and p == f"{prep} the {c} {noun}"
                named += 1
            else:
                assert tuple(c) not in vp.NAMED_COLORS.values() and p == f"{prep} the {noun}"
                unnamed += 1
        if isinstance(c0, str):
            assert c0 != c1  # distinct named colours per region
        assert f"What is {p0} doing near {p1}?" in ex.text and f" {p1} watches.</s>" in ex.text
    assert seen_kinds == set(vp.MARKER_KINDS) and named > 10 and unnamed > 10


def test_marker_pixels_take_the_phrase_colour(env):
    """On a uniform grey image, every changed pixel moves toward the drawn colour, channel by channel."""
    base = {"id": "g", "image": "grey.png", "conversations": conv(("<image>\nWhat is <bbox>?", "x"))}
    plain = encode(env, dict(base, conversations=conv(("<image>\nWhat?", "x")))).pixel_values[0]
    checked = 0
    for e in range(12):
        for kind in ("mask", "rectangle", "arrow"):
            rec = dict(base, bboxes=[[4, 4, 26, 26]], marker_kinds=[kind])
            ex = encode(env, rec, epoch=e)
            (k, color, phrase), = ex.markers
            assert k == kind and phrase in ex.text
            rgb = np.asarray(vp.parse_color(color), float)
            diff = ex.pixel_values[0] - plain  # [3, H, W]
            changed = np.abs(diff).max(axis=0) > 0.05
            assert changed.any()
            for ch in range(3):
                if abs(rgb[ch] - 128) > 30:
                    assert (np.sign(diff[ch][changed]) == np.sign(rgb[ch] - 128)).mean() > 0.9
            checked += 1
    assert checked == 36


def test_segmentation_and_marker_kinds(env):
    rec = {"id": "seg", "image": "a.png", "segmentations": [[[2, 2, 20, 3, 12, 25]]], "marker_kinds": ["mask_contour"],
           "conversations": conv(("<image>\nName <bbox0>.", "x"))}
    ex = encode(env, rec)
    assert ex.markers[0][0] == "mask_contour" and "Name with the " in ex.text
    ex = encode(env, dict(REGION_REC, id="k"), cfg(marker_kinds=("arrow",)))
    assert {m[0] for m in ex.markers} == {"arrow"} and "pointed to by the" in ex.text


# --- too long, bad inputs --------------------------------------------------------------------------------------

def test_truncation_and_drop_counting(env):
    long_answer = "word " * 60
    rec = {"id": "long", "image": "a.png", "conversations": conv(("<image>\nQ", long_answer))}
    ex = encode(env, rec, cfg(max_length=64))
    assert len(ex.input_ids) == 64 and ex.truncated and (ex.input_ids == IMG).sum() == SEQ
    assert (ex.labels != IGNORE_INDEX).sum() > 0
    late = {"id": "late", "image": "a.png", "conversations": conv(("Q" * 30, "A"), ("<image>\nmore", "B"))}
    with pytest.raises(ExampleDropped, match="late") as e:
        encode(env, late, cfg(max_length=64))
    assert e.value.reason == "too_long"
    good = {"id": "ok", "conversations": conv(("Q", "A"))}
    it = make_train_iterator([rec, late, good], env.proc, cfg(max_length=64, batch_size=2), image_folder=env.folder,
                               num_epochs=1)
    batches = list(it)
    assert len(batches) == 1 and batches[0]["input_ids"].shape == (2, 64)
    assert not (batches[0]["attention_mask"].sum(1) == 0).any()
    s = it.stats()
    assert s["dropped_too_long"] == 1 and s["dropped"] == 1 and s["examples"] == 2 and s["truncated"] == 1


BAD = [
    ({"id": "b-missing", "image": "nope.png", "conversations": conv(("<image>\nQ", "A"))}, "nope.png"),
    ({"id": "b-broken", "image": "broken.png", "conversations": conv(("<image>\nQ", "A"))}, "broken.png"),
    ({"id": "b-tags", "image": "a.png", "conversations": conv(("<image>\n<image>\nQ", "A"))}, "2 <image> tag"),
    ({"id": "b-notimage", "conversations": conv(("<image>\nQ", "A"))}, "1 <image> tag"),
    ({"id": "b-bbox", "image": "a.png", "bboxes": [[1, 1, 9, 9]], "conversations": conv(("<image>\n<bbox2>?", "A"))},
     "<bbox2>"),
    # NaN and infinity alike (a NaN polygon vertex drew a mask three times too big; an infinite box was clipped)
    ({"id": "b-nanbox", "image": "a.png", "bboxes": [[1, float("nan"), 9, 9]], "marker_kinds": ["mask"],
      "conversations": conv(("<image>\n<bbox>?", "A"))}, "bboxes[0] (region 0) has a NaN or infinite"),
    ({"id": "b-infbox", "image": "a.png", "bboxes": [[1, 1, float("inf"), 9]],
      "conversations": conv(("<image>\n<bbox>?", "A"))}, "bboxes[0] (region 0) has a NaN or infinite"),
    ({"id": "b-nanseg", "image": "a.png", "segmentations": [[1, 1, 9, 9, 5, 5], [[2, 2, 20, 3, float("nan"), 25]]],
      "conversations": conv(("<image>\n<bbox1>?", "A"))}, "segmentations[1] (region 1), polygon 0, has a NaN"),
]


@pytest.mark.parametrize("rec,what", BAD, ids=[r["id"] for r, _ in BAD])
def test_bad_input_errors_name_record_and_path(env, rec, what):
    with pytest.raises(DataError) as e:
        encode(env, rec)
    assert rec["id"] in str(e.value) and what in str(e.value) and e.value.record_id == rec["id"]


def test_bad_inputs_raise_in_iterator_or_are_skipped_and_counted(env):
    recs = [r for r, _ in BAD] + [{"id": f"g{i}", "conversations": conv(("Q", f"A{i}"))} for i in range(3)]
    with pytest.raises(DataError, match="b-"):
        list(make_train_iterator(recs, env.proc, cfg(batch_size=2), image_folder=env.folder, num_epochs=1))
    it = make_train_iterator(recs, env.proc, cfg(batch_size=2, skip_bad_examples=True), image_folder=env.folder,
                               num_epochs=1)
    batches = list(it)
    assert sum(int((b["attention_mask"].sum(1) > 0).sum()) for b in batches) == 3
    s = it.stats()
    assert s["skipped_bad"] == len(BAD) and s["dropped"] == len(BAD) and len(s["last_skips"]) == 5


# --- batches ---------------------------------------------------------------------------------------------------

def _mixed_records(n=12):
    recs = []
    for i in range(n):
        if i % 3 == 0:
            recs.append({"id": f"t{i}", "conversations": conv(("Q" * (i + 1), f"answer {i}"))})
        elif i % 3 == 1:
            recs.append({"id": f"i{i}", "image": "a.png", "conversations": conv(("<image>\nQ", f"answer {i}"))})
        else:
            recs.append({"id": f"m{i}", "image": ["a.png", "b.png"], "bboxes": [[2, 2, 20, 20]],
                         "conversations": conv(("<image>\n<image>\nWhere is <bbox>?", f"answer {i}"), ("x" * 40, "y"))})
    return recs


def test_batches_bucketed_shapes_and_dtypes(env):
    c = cfg(batch_size=3, max_length=256, max_images_per_example=2)
    assert c.lengths == (64, 128, 256) and c.images_buckets() == (1, 2, 4, 6)
    it = make_train_iterator(_mixed_records(), env.proc, c, image_folder=env.folder, num_epochs=2)
    shapes = set()
    for b in it:
        assert set(b) == set(BATCH_KEYS) | {"num_tokens"}
        t, i = b["input_ids"].shape[1], b["pixel_values"].shape[0]
        assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (3, t)
        assert b["input_ids"].dtype == b["labels"].dtype == b["attention_mask"].dtype == np.int32
        assert b["pixel_values"].dtype == np.float32 and b["pixel_values"].shape[1:] == (3, 30, 30)
        assert b["image_valid"].dtype == bool and b["image_valid"].shape == (i,)
        assert t in c.lengths and i in c.images_buckets()
        n_real = int((b["input_ids"] == IMG).sum()) // SEQ
        assert b["image_valid"].sum() == n_real and b["image_valid"][:n_real].all()
        assert not b["pixel_values"][n_real:].any()
        m = b["attention_mask"].astype(bool)
        assert (b["input_ids"][~m] == PAD).all() and (b["labels"][~m] == IGNORE_INDEX).all()
        assert (m[:, :-1] >= m[:, 1:]).all()  # right padding
        assert int(b["num_tokens"]) == int((b["labels"] != IGNORE_INDEX).sum())
        shapes.add((t, i))
    assert len(shapes) >= 2


def _answers(env, batch):
    """The answer of each real row (decoded kept labels of its first turn)."""
    out = []
    for row in batch["labels"]:
        spans = kept_spans(row)
        if spans:
            out.append(env.proc.tokenizer.decode(spans[0], skip_special_tokens=True).strip())
    return out


def test_iterator_state_restore_is_exact_across_epochs(env):
    recs = _mixed_records(7)
    c = cfg(batch_size=2, max_length=256, max_images_per_example=2, pad_to_square=True)
    mk = lambda: make_train_iterator(recs, env.proc, c, image_folder=env.folder)  # noqa: E731
    it = mk()
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # checkpointed as JSON
    rest = [next(it) for _ in range(5)]  # crosses into epoch 2 (7 records, 2 a batch)
    it2 = mk()
    it2.set_state(state)
    again = [next(it2) for _ in range(5)]
    for a, b in zip(rest, again):
        assert set(a) == set(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert it2.stats()["batches"] == it.stats()["batches"] == 8 and it.stats()["epoch"] >= 1


def test_epochs_reshuffle_and_cover_everything(env):
    recs = [{"id": f"e{i}", "conversations": conv(("Q", f"answer {i}"))} for i in range(8)]
    it = make_train_iterator(recs, env.proc, cfg(batch_size=4, max_length=64), num_epochs=2)
    seen = [a for b in it for a in _answers(env, b)]
    e0, e1 = seen[:8], seen[8:]
    want = sorted(f"answer {i}" for i in range(8))
    assert sorted(e0) == sorted(e1) == want and e0 != e1
    again = [a for b in make_train_iterator(recs, env.proc, cfg(batch_size=4, max_length=64), num_epochs=2)
             for a in _answers(env, b)]
    assert again == seen  # seeded
    other = [a for b in make_train_iterator(recs, env.proc, cfg(batch_size=4, max_length=64, seed=5), num_epochs=1)
             for a in _answers(env, b)]
    assert other != e0


def test_host_shards_are_disjoint_and_complete(env):
    recs = [{"id": f"s{i}", "conversations": conv(("Q", f"answer {i}"))} for i in range(10)]
    per_host = []
    for h in range(3):
        it = make_train_iterator(recs, env.proc, cfg(batch_size=2, max_length=64), num_epochs=1,
                                   shard_index=h, shard_count=3)
        per_host.append([a for b in it for a in _answers(env, b)])
    flat = [a for p in per_host for a in p]
    assert sorted(flat) == sorted(f"answer {i}" for i in range(10)) and len(set(flat)) == 10
    # eval: every host the same number of batches (padding batches where its share ran out)
    counts = [len(list(make_eval_iterator(recs, env.proc, cfg(batch_size=2, max_length=64), shard_index=h,
                                            shard_count=3))) for h in range(3)]
    assert counts == [2, 2, 2]
    few = [{"id": "only", "conversations": conv(("Q", "A"))}]  # a host whose share is empty still keeps step
    assert [len(list(make_eval_iterator(few, env.proc, cfg(batch_size=2, max_length=64), shard_index=h,
                                          shard_count=2))) for h in range(2)] == [1, 1]


def test_worker_processes_give_the_same_batches(env):
    recs = _mixed_records(6)
    c = cfg(batch_size=2, max_length=256, max_images_per_example=2)
    ref = [next(it) for it in [make_train_iterator(recs, env.proc, c, image_folder=env.folder)] for _ in range(3)]
    it = make_train_iterator(recs, env.proc, c, image_folder=env.folder, num_workers=1)
    got = [next(it) for _ in range(3)]
    for a, b in zip(ref, got):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    state = json.loads(json.dumps(it.get_state()))
    nxt = next(it)
    it2 = make_train_iterator(recs, env.proc, c, image_folder=env.folder, num_workers=1)
    it2.set_state(state)
    b = next(it2)
    for k in nxt:
        np.testing.assert_array_equal(nxt[k], b[k])
    it.close()
    it2.close()


def test_cache_examples_gives_the_same_batches_and_encodes_region_free_records_once(env, monkeypatch):
    # region-free records with and without images, region records (markers drawn afresh each epoch) and a
    # record too long for max_length (dropped, and counted as dropped every epoch)
    recs = _mixed_records(9) + [{"id": "long", "conversations": conv(("Q" * 300, "A"))}]
    c = cfg(batch_size=2, max_length=256, max_images_per_example=2)
    calls = []
    real = encode_example
    monkeypatch.setattr(pipeline, "encode_example", lambda rec, *a, **k: calls.append(rec["id"]) or real(rec, *a, **k))

    def run(**kw):
        calls.clear()
        it = make_train_iterator(recs, env.proc, dataclasses.replace(c, **kw), image_folder=env.folder,
                                   num_epochs=3)
        return list(it), it.stats(), list(calls)

    ref, ref_stats, ref_calls = run()
    got, stats, got_calls = run(cache_examples=True)
    assert len(got) == len(ref) and stats == ref_stats and stats["dropped"] == 3
    for a, b in zip(ref, got):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # uncached: every record encoded in every epoch (grain may read a batch or two ahead: seen once in 15 runs)
    assert all(ref_calls.count(r["id"]) >= 3 for r in recs) and len(ref_calls) <= 3 * len(recs) + 4, ref_calls
    regions = [r["id"] for r in recs if r.get("bboxes")]
    assert sorted(got_calls) == sorted([r["id"] for r in recs] + 2 * regions)


def _varied_records(n=24):
    """Text-only records of many lengths (question i has 3 * (i % 8) characters more)."""
    return [{"id": f"g{i}", "conversations": conv(("Q" + "x" * (3 * (i % 8)), f"answer {i}"))} for i in range(n)]


def test_group_by_length_sorts_within_groups_and_keeps_the_stream(env):
    recs = _varied_records()
    lengths = [len(encode(env, r, cfg(max_length=128)).input_ids) for r in recs]
    assert max(lengths) - min(lengths) >= 16
    # a bucket for every length: a batch is padded to its longest row only
    plain = cfg(batch_size=4, max_length=128, length_buckets=tuple(range(min(lengths), max(lengths) + 1)) + (128,))
    grouped = dataclasses.replace(plain, group_by_length=3)
    ref = list(make_train_iterator(recs, env.proc, plain, num_epochs=2))
    got = list(make_train_iterator(recs, env.proc, grouped, num_epochs=2))
    assert len(got) == len(ref) == 12
    for g in range(0, 12, 3):  # each group: the same 12 examples as the same 3 plain batches, sorted by length
        ref_ans = sorted(a for b in ref[g:g + 3] for a in _answers(env, b))
        got_ans = sorted(a for b in got[g:g + 3] for a in _answers(env, b))
        assert got_ans == ref_ans
        spans = sorted((int(b["attention_mask"].sum(1).min()), int(b["attention_mask"].sum(1).max()))
                       for b in got[g:g + 3])
        assert all(hi <= lo2 for (_, hi), (lo2, _) in zip(spans, spans[1:]))  # no overlap between the batches
    pad = lambda bs: sum(b["input_ids"].size - int(b["attention_mask"].sum()) for b in bs)  # noqa: E731
    assert pad(got) < pad(ref)
    again = list(make_train_iterator(recs, env.proc, grouped, num_epochs=2))
    for a, b in zip(got, again):  # seeded
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    # a stream that ends inside a group: what is left is sorted and yielded, nothing lost
    short = list(make_train_iterator(recs[:10], env.proc, grouped, num_epochs=1))
    assert sorted(a for b in short for a in _answers(env, b)) == sorted(f"answer {i}" for i in range(10))


@pytest.mark.parametrize("after", [1, 2, 3, 4])  # inside the first group, at its end, inside the second
def test_group_by_length_state_restore_is_exact(env, after):
    recs = _varied_records(14)
    c = cfg(batch_size=2, max_length=128, group_by_length=3, length_buckets=(48, 56, 64, 72, 80, 128))
    mk = lambda: make_train_iterator(recs, env.proc, c)  # noqa: E731
    it = mk()
    for _ in range(after):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    rest = [next(it) for _ in range(9)]  # crosses into epoch 2 (14 records, 2 a batch)
    it2 = mk()
    it2.set_state(state)
    again = [next(it2) for _ in range(9)]
    for a, b in zip(rest, again):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert it2.stats() == it.stats()
    plain = make_train_iterator(recs, env.proc, dataclasses.replace(c, group_by_length=0))
    with pytest.raises(ValueError, match="group_by_length"):
        plain.set_state(state)


# --- records and config ----------------------------------------------------------------------------------------

def test_load_records_json_and_jsonl(tmp_path):
    recs = [{"id": "1", "conversations": conv(("Q", "A"))}, {"id": "2", "image": "x.png", "conversations": []}]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    assert load_records(tmp_path / "d.json") == recs == load_records(tmp_path / "d.jsonl")
    (tmp_path / "bad.jsonl").write_text(json.dumps(recs[0]) + "\n{oops\n")
    with pytest.raises(ValueError, match="line 2"):
        load_records(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_records(tmp_path / "missing.json")


def test_data_config_from_train_config_and_resolve(env):
    tc = TrainConfig(template="llava_v0", max_length=300, pad_to_square=True, marker_kinds=("point",),
                     skip_bad_examples=True, seed=7, batch_size=16, grad_accum=4)
    mc = types.SimpleNamespace(image_token_index=IMG, pad_token_id=PAD)
    c = tc.data_config(mc, env.proc)
    assert (c.template, c.max_length, c.pad_to_square, c.marker_kinds, c.skip_bad_examples, c.seed, c.batch_size) \
        == ("llava_v0", 300, True, ("point",), True, 7, 4)
    assert (c.image_seq_length, c.image_token_index, c.pad_token_id) == (SEQ, IMG, PAD)
    assert c.lengths == (64, 128, 256, 300)
    with pytest.raises(ValueError, match="marker kinds"):
        DataConfig(marker_kinds=("star",))
    with pytest.raises(ValueError, match="template"):
        DataConfig(template="chatml")
    c = TrainConfig(model="m", data="d", output="o", max_length=112, length_buckets="64,96,112", group_by_length=16,
                    batch_size=32).data_config()
    assert (c.lengths, c.group_by_length, c.batch_size) == ((64, 96, 112), 16, 32)
    assert TrainConfig(length_buckets=[64, 128], max_length=128).length_buckets == (64, 128)
    for bad, msg in (({"length_buckets": "64,96"}, "must reach max_length"), ({"length_buckets": "64,x,112"}, "positive"),
                     ({"group_by_length": -1}, "group_by_length"), ({"group_by_length": 2.5}, "group_by_length")):
        with pytest.raises(ValueError, match=msg):
            TrainConfig(max_length=112, **bad)
        with pytest.raises(ValueError, match=msg):
            DataConfig(max_length=112, **bad)
    # YAML 1.1 reads "2e-3" as a string: numbers in any spelling are numbers; anything else names its setting
    c = TrainConfig(lr="2e-3", muon_lr="1e-3", weight_decay="0", optimizer="muon")
    assert (c.lr, c.muon_lr, c.weight_decay, c.optimizer) == (2e-3, 1e-3, 0.0, "muon")
    for bad, msg in (({"lr": "fast"}, "lr must be a number, got 'fast'"), ({"muon_lr": -1.0}, "muon_lr must be a "
                     "positive number"), ({"optimizer": "sgd"}, "Unknown optimizer 'sgd'")):
        with pytest.raises(ValueError, match=msg):
            TrainConfig(**bad)
