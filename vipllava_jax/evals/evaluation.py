"""Batched evaluation: greedy answers for a dataset, a local score, and ViP-Bench's answer files.

    from vipllava_jax.evals import evaluate, load_eval_records, write_answers
    records = load_eval_records("data/synth/data.json")           # or ViP-Bench's bbox/questions.jsonl
    answers, score, stats = evaluate(module, params, processor, records, image_folder="data/synth",
                                     batch_size=16, metric="exact")
    write_answers(answers, "answers.jsonl")

Inputs (`load_eval_records`, or a list of dicts; the format is told per record):

- Training format (LLaVA records, the schema of `vipllava_jax.data.records`): the question is the first human
  turn (its ``<image>`` tag removed: the prompt puts the image first, as training did), the ground truth the
  first gpt turn. A record with ``bboxes`` / ``segmentations`` and ``<bboxN>`` placeholders gets one marker
  per region drawn (`draw_regions`: a fixed, deterministic style -- the record's first "marker_kinds" entry or
  a rectangle, region i in the i-th named colour, red, lime, blue, ... -- rather than training's random
  draw, so an evaluation is repeatable) and the placeholders replaced by the markers' phrases. For the
  synthetic task, prefer sets written with ``pre_marked=True``.
- ViP-Bench question files (``bbox/questions.jsonl``, ``human/questions.jsonl`` of
  huggingface.co/datasets/mucai/ViP-Bench; the lines ViP-LLaVA's ``llava/eval/model_vqa.py`` reads):
  ``{"question_id", "image", "text", ...}``; the markers are already drawn in the images. The ground truth
  lives in ``vip-bench-meta-data.json`` (keys ``"v1_{question_id}"``, field ``"answer"``, possibly with
  ``<AND>`` / ``<OR>``), found beside the split folder or the file, or passed as ``meta=``; an ``"answer"``
  field on the line itself is used too. Without either, answers are written and nothing is scored.

Generation: prompts built by `data.build_prompt` in `template` (``llava_v1``, ViP-LLaVA's training and
ViP-Bench template, by default; ``llava_v0`` is the HF model card's), answered by `generation.generate_text`
(the project's `Processor`, left padding, greedy; with `mesh`, sharded as ``vipllava-jax generate`` shards it)
in batches of `batch_size` records. The last batch is filled up with copies of its last record, so
every batch has the same shape and compiles once; the copies' answers are dropped. An answer is the decoded
text up to the template's stop string (``</s>`` / ``###``), stripped.

Answers (`write_answers`): one JSON object per line, exactly the keys ViP-LLaVA's ``model_vqa.py`` writes,
``question_id``, ``prompt`` (the question as asked), ``text`` (the answer), ``answer_id``, ``model_id``,
``metadata`` (here: the ground truth and this record's score, the image, the record's question type / category
when it has one). `write_vipbench_results` turns them into the ``{"v1_<question_id>": text}`` JSON that
ViP-LLaVA's ``scripts/convert_vipbench_for_eval.py`` makes and its GPT-4 grader (``vip-bench_evaluator.py``)
and evaluation server read; two answers with one question_id are refused there (one would be lost). Both files
are written atomically, through a fresh ``<name>.tmp-<pid>-<random>`` beside them.

Metrics (`score_answer`): ``exact`` (normalised: case, whitespace, surrounding punctuation; any ``<OR>``
alternative), ``contains`` (ViP-Bench's ``<AND>`` / ``<OR>``: some ``<OR>`` alternative has all its
``<AND>`` parts in the answer, each as a whole word / number), ``choice`` (the first option letter, or for a
ground truth that is no single letter the first word, matches).

Bad records (no question, no image file, an unreadable image, markers that cannot be drawn): an `EvalError`
naming the record's id (and the path), raised before any generation; with ``skip_bad_examples`` they are left
out and counted (``stats["skipped"]``, ``stats["skipped_records"]``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import string
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from ..checkpoints.atomic import unique_token
from ..data import visual_prompts as vp
from ..data.images import load_image
from ..data.prompts import DEFAULT_SYSTEM_PROMPT, IMAGE_TOKEN, build_prompt, stop_for_template
from ..data.records import (GPT_ROLES, HUMAN_ROLES, RecordError, Region, fill_placeholders, image_paths,
                            parse_regions, polygon_mask, read_json_or_jsonl, record_id, role)
from ..generation.text import generate_text

__all__ = [
    "METRICS", "EvalError", "EvalRecord", "evaluate", "load_eval_records", "parse_record", "score_answer",
    "normalize_answer", "draw_regions", "find_vipbench_meta", "read_vipbench_meta", "check_unique_question_ids",
    "check_output_path", "write_answers", "write_vipbench_results",
]

METRICS = ("exact", "contains", "choice")
VIPBENCH_META = "vip-bench-meta-data.json"


class EvalError(RecordError):
    """A record that cannot be evaluated; `record_id` names it, the message says why (and the path)."""


# ---------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------

_EDGE = string.punctuation + string.whitespace


def normalize_answer(text: str) -> str:
    """Lower case, inner whitespace collapsed, surrounding whitespace and punctuation removed:
    "  The Circle. " -> "the circle"."""
    return " ".join(str(text).lower().split()).strip(_EDGE)


def _alternatives(ground_truth: str) -> list[list[str]]:
    """ViP-Bench's ground truth as [[and-part, ...] per <OR> alternative]."""
    return [[p for p in alt.split("<AND>")] for alt in str(ground_truth).split("<OR>")]


def _part(p: str) -> str:
    # a ground-truth part: keep signs and symbols that matter ("-1", "$5"), drop sentence punctuation at the ends
    return " ".join(p.lower().split()).strip(string.whitespace + ".,;:!?\"'")


def _contains(text: str, part: str) -> bool:
    if not part:
        return True
    return re.search(r"(?<!\w)" + re.escape(part) + r"(?!\w)", text) is not None


_LETTER = re.compile(r"^\W*\(?([A-Za-z])(?:[\)\].:,]|\s|$)")


def _first_option(text: str, letter: bool) -> str:
    if letter:
        m = _LETTER.match(text)
        return m.group(1).upper() if m else ""
    words = normalize_answer(text).split()
    return words[0].strip(_EDGE) if words else ""


def score_answer(prediction: str, ground_truth: str, metric: str = "exact") -> float:
    """1.0 or 0.0: does `prediction` answer `ground_truth` under `metric` (see the module docstring)?"""
    if metric == "exact":
        pred = normalize_answer(prediction)
        return float(any(pred == normalize_answer(alt) for alt in str(ground_truth).split("<OR>")))
    if metric == "contains":
        pred = " ".join(str(prediction).lower().split())
        return float(any(all(_contains(pred, _part(p)) for p in alt) and any(_part(p) for p in alt)
                         for alt in _alternatives(ground_truth)))
    if metric == "choice":
        for alt in str(ground_truth).split("<OR>"):
            gt = alt.strip()
            is_letter = bool(_LETTER.match(gt)) and len(normalize_answer(gt)) == 1
            want = _first_option(gt, is_letter)
            if want and _first_option(prediction, is_letter) == want:
                return 1.0
        return 0.0
    raise ValueError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")


# ---------------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class EvalRecord:
    """One question. id: the record's id (a ViP-Bench question_id as it is); image: path or None; question:
    the text without <image> (and with <bboxN> still in it when `regions` are given); ground_truth: None when
    unknown; source: "llava" or "vipbench"; info: question type / category / capability, kept in the answer."""
    id: Any
    image: str | None
    question: str
    ground_truth: str | None
    source: str
    regions: list = dataclasses.field(default_factory=list)
    marker_kinds: tuple | None = None
    info: dict = dataclasses.field(default_factory=dict)


def _rid(record: dict):
    """A ViP-Bench question_id as it is; else the training pipeline's id (`record_id`)."""
    if "question_id" in record:
        return record["question_id"]
    return record_id(record)


def _info(record: dict) -> dict:
    out = {}
    meta = record.get("metadata")
    if isinstance(meta, dict) and meta.get("question_type") is not None:
        out["question_type"] = meta["question_type"]
    for k in ("category", "capability", "question_type"):
        if record.get(k) is not None:
            out[k] = record[k]
    return out


def draw_regions(image, regions: Sequence[Region], kind: str = "rectangle"):
    """(marked image, markers): one `kind` marker per region, region i in the i-th named colour, geometry fixed
    (rectangle / ellipse / triangle / scribble on the box, point at its centre, arrow from the upper left onto
    the centre, mask kinds from the polygons or the box). Raises ValueError for a region off the image."""
    if kind not in vp.MARKER_KINDS:
        raise ValueError(f"unknown marker kind {kind!r}: use one of {', '.join(vp.MARKER_KINDS)}")
    w, h = image.size
    names = list(vp.NAMED_COLORS)
    markers = []
    for i, reg in enumerate(regions):
        mask = polygon_mask(reg.polygons, (w, h)) if reg.polygons else None
        if reg.box is not None:
            x0, y0, x1, y1 = reg.box
        elif mask is not None and mask.any():
            ys, xs = np.nonzero(mask)
            x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        else:
            raise ValueError(f"region {i} has no area")
        x0, x1 = min(max(float(x0), 0.0), w), min(max(float(x1), 0.0), w)
        y0, y1 = min(max(float(y0), 0.0), h), min(max(float(y1), 0.0), h)
        if x1 - x0 < 1 or y1 - y0 < 1:
            raise ValueError(f"region {i}'s box {reg.box} has no area on the {w}x{h} image")
        box = (x0, y0, x1, y1)
        style = {"color": names[i % len(names)]}
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        if kind in ("rectangle", "ellipse"):
            m = vp.make_marker(kind, box=box, **style)
        elif kind in ("triangle", "scribble"):
            m = vp.make_marker(kind, box=box, seed=i, **style)
        elif kind == "point":
            m = vp.Point((cx, cy), **style)
        elif kind == "arrow":
            tail = (max(0.0, cx - max(x1 - x0, 8.0)), max(0.0, cy - max(y1 - y0, 8.0)))
            if tail == (cx, cy):
                tail = (min(float(w), cx + max(x1 - x0, 8.0)), min(float(h), cy + max(y1 - y0, 8.0)))
            m = vp.Arrow(tail, (cx, cy), **style)
        else:
            if mask is None or not mask.any():
                mask = polygon_mask([(x0, y0, x1, y0, x1, y1, x0, y1)], (w, h))
            m = vp.make_marker(kind, mask=mask, **style)
        markers.append(m)
    return vp.draw_markers(image, markers, warn_crop=False), markers


def parse_record(record: dict, meta: dict | None = None) -> EvalRecord:
    """A training-format or ViP-Bench record -> EvalRecord. Raises EvalError (no question...)."""
    if not isinstance(record, dict):
        raise EvalError(None, f"a record must be a JSON object, got {type(record).__name__}")
    rid = _rid(record)
    paths = image_paths(record, rid, EvalError)
    if len(paths) > 1 or (isinstance(record.get("image"), list) and not paths):
        raise EvalError(rid, f"evaluation takes one image per record, got {len(paths)}")
    image = paths[0] if paths else None
    if "conversations" in record:
        conv = record["conversations"]
        if not isinstance(conv, list):
            raise EvalError(rid, "'conversations' must be a list")
        turns = [t for t in conv if isinstance(t, dict)]
        human = next((i for i, t in enumerate(turns) if role(t) in HUMAN_ROLES), None)
        q = turns[human].get("value") if human is not None else None
        if not isinstance(q, str) or not q.replace(IMAGE_TOKEN, "").strip():
            raise EvalError(rid, "has no question (no human turn with text)")
        gt = next((t.get("value") for t in turns[human + 1:] if role(t) in GPT_ROLES), None)
        question = q.replace(IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, "").strip()
        regions, used = parse_regions(record, rid, [question], image is not None, EvalError)
        kinds = record.get("marker_kinds")
        return EvalRecord(rid, image, question, gt if isinstance(gt, str) else None, "llava",
                          regions if used else [], tuple(kinds) if kinds else None, _info(record))
    if "text" in record or "question_id" in record:
        q = record.get("text")
        if not isinstance(q, str) or not q.strip():
            raise EvalError(rid, "has no question ('text')")
        gt = record.get("answer", record.get("ground_truth"))
        if gt is None and meta is not None:
            gt = (meta.get(f"v1_{rid}") or {}).get("answer")
        question = q.replace(IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, "").strip()
        return EvalRecord(rid, image, question, gt, "vipbench", info=_info(record))
    raise EvalError(rid, "is neither a training record ('conversations') nor a ViP-Bench question ('text')")


def find_vipbench_meta(questions_path) -> Path | None:
    """ViP-Bench's meta-data file for a split's questions.jsonl: beside the split folder or the file."""
    p = Path(questions_path).resolve()
    for d in (p.parent.parent, p.parent):
        if (d / VIPBENCH_META).is_file():
            return d / VIPBENCH_META
    return None


def read_vipbench_meta(meta) -> dict:
    """ViP-Bench's meta-data, a path or a dict, checked: a JSON object whose entries are objects
    (``{"v1_<question_id>": {"answer": ...}, ...}``). Anything else is a ValueError naming the file (and the
    first bad entry), rather than an AttributeError deep in the scoring."""
    where = "the meta-data" if isinstance(meta, dict) else str(meta)
    if not isinstance(meta, dict):
        p = Path(meta)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"ViP-Bench meta-data file not found: {p}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"Cannot read the ViP-Bench meta-data file {p}: {e}") from None
        try:
            meta = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON ({e}); --meta wants ViP-Bench's {VIPBENCH_META}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: a JSON {type(meta).__name__}, not ViP-Bench's meta-data (an object "
                         f'{{"v1_<question_id>": {{"answer": ...}}, ...}})')
    for k, v in meta.items():
        if not isinstance(v, dict):
            raise ValueError(f"{where}: entry {k!r} is a JSON {type(v).__name__}, not an object with an "
                             f'"answer" (ViP-Bench\'s meta-data maps "v1_<question_id>" to {{"answer": ...}})')
    return meta


def check_unique_question_ids(records, what: str = "the data") -> None:
    """ViP-Bench's results JSON keys each answer by ``v1_<question_id>``: two records with the same id (2 and
    "2" too) would keep one answer of the two. Raises ValueError naming the id and both records (counted from
    1 in `what`)."""
    seen: dict[str, int] = {}
    for i, r in enumerate(records, 1):
        if not isinstance(r, dict):
            continue
        key = f"v1_{_rid(r)}"
        if key in seen:
            raise ValueError(f"{what}: question_id {_rid(r)!r} appears twice (records {seen[key]} and {i}, "
                             f"counting from 1): ViP-Bench's results JSON keys answers by v1_<question_id>, so one "
                             f"answer would be lost; give each question its own id")
        seen[key] = i


def load_eval_records(path, *, meta=None) -> list[dict]:
    """Records from a training-format JSON / JSONL or a ViP-Bench questions.jsonl. For ViP-Bench lines the
    ground truth is copied in as "answer" from `meta` (a path or dict, checked by `read_vipbench_meta`;
    default: `find_vipbench_meta`)."""
    path = Path(path)
    if meta is not None:  # a given file is checked whatever the data
        meta = read_vipbench_meta(meta)
    records = read_json_or_jsonl(path)
    if any(isinstance(r, dict) and "conversations" not in r and "text" in r for r in records):
        if meta is None:
            meta = find_vipbench_meta(path)
            if meta is not None:
                meta = read_vipbench_meta(meta)
        if meta:
            records = [dict(r, answer=(meta.get(f"v1_{r.get('question_id')}") or {}).get("answer"))
                       if isinstance(r, dict) and "text" in r and r.get("answer") is None else r for r in records]
    return records


# ---------------------------------------------------------------------------------------------------------
# Answers files
# ---------------------------------------------------------------------------------------------------------

def _answer_id(model_id: str, qid, text: str) -> str:
    """A 22-character id like model_vqa's shortuuid, but deterministic (same run -> same file)."""
    alphabet = "23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"  # shortuuid's
    n = int.from_bytes(hashlib.sha256(f"{model_id}\0{qid}\0{text}".encode()).digest(), "big")
    out = []
    for _ in range(22):
        n, r = divmod(n, len(alphabet))
        out.append(alphabet[r])
    return "".join(out)


def check_output_path(path, what: str = "the output") -> Path:
    """Refuse, before any work, an output file that cannot be written: a directory, or a path below a file.
    Missing parent directories are fine (the writers create them)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a directory: give a file name")
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"{what} {path} cannot be written: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {path} cannot be written: {parent} is not writable")
    return path


def _write_atomically(path, write) -> Path:
    """`write(f)` into a fresh temporary file beside `path` (``<name>.tmp-<pid>-<random>``, created
    exclusively: never a file the user has), then renamed over `path`; on failure only that file is removed."""
    path = check_output_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{unique_token(collective=False)}")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_answers(answers: Sequence[dict], path) -> Path:
    """JSONL, one answer a line (model_vqa.py's format: question_id, prompt, text, answer_id, model_id,
    metadata). Written atomically (`path` is the old file or the whole new one, never part of it)."""
    def write(f):
        for a in answers:
            f.write(json.dumps(a) + "\n")
    return _write_atomically(path, write)


def write_vipbench_results(answers: Sequence[dict], path) -> Path:
    """The grader's input: {"v1_<question_id>": answer text}, as ViP-LLaVA's convert_vipbench_for_eval.py
    writes it (results/<model>-<split>.json for vip-bench_evaluator.py / the evaluation server). Two answers
    with one question_id are refused (`check_unique_question_ids`): one of them would be lost."""
    check_unique_question_ids(answers, "the answers")
    return _write_atomically(path, lambda f: json.dump({f"v1_{a['question_id']}": a["text"] for a in answers},
                                                       f, indent=2))


# ---------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------

def _image_path(rec: EvalRecord, image_folder) -> str:
    if image_folder is None or os.path.isabs(rec.image):
        return rec.image
    return os.path.join(os.fspath(image_folder), rec.image)


def _prepare(rec: EvalRecord, image_folder):
    """(question as asked, PIL image or None). Raises EvalError."""
    if rec.image is None:
        return rec.question, None
    path = _image_path(rec, image_folder)
    try:
        img = load_image(path)
    except FileNotFoundError:
        raise EvalError(rec.id, f"image not found: {path}") from None
    except (ValueError, OSError) as e:
        raise EvalError(rec.id, f"cannot read image {path}: {e}") from None
    question = rec.question
    if rec.regions:
        kind = rec.marker_kinds[0] if rec.marker_kinds else "rectangle"
        try:
            img, marks = draw_regions(img, rec.regions, kind)
        except ValueError as e:
            raise EvalError(rec.id, f"cannot draw the regions on {path}: {e}") from None
        question = fill_placeholders(question, [vp.marker_phrase(m) for m in marks])
    return question, img


def evaluate(module, params, processor, records, *, image_folder=None, batch_size: int = 8,
             metric: str = "exact", max_new_tokens: int = 32, template: str = "llava_v1", mesh=None,
             skip_bad_examples: bool = False, progress: bool = True, system: str = DEFAULT_SYSTEM_PROMPT,
             model_id: str = "vipllava-jax", meta=None):
    """Greedy answers for `records`, batched. Returns (answers, score, stats).

    module, params: from `load_pretrained`. processor: a `processing.Processor` (left padding).
    records: dicts (training format or ViP-Bench lines, see the module docstring) or a path
      (`load_eval_records`). image_folder: image paths are relative to it.
    metric: "exact", "contains" or "choice" (`score_answer`). template: "llava_v1" or "llava_v0".
    mesh: shard generation over it (as `generate(mesh=...)`); None: one device.
    skip_bad_examples: leave bad records out (counted in stats) instead of raising `EvalError`.
    progress: a progress bar on stderr.
    meta: ViP-Bench's meta-data (a dict or its path) for ViP-Bench lines without an "answer".
    answers: one dict per evaluated record, in order (model_vqa's keys, see `write_answers`).
    score: the mean score over records with a ground truth (None when none has one).
    stats: {"records", "evaluated", "scored", "correct", "skipped", "skipped_records" [(id, message)],
      "by_type" {question type / category: score}, "seconds", "records_per_s"}.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")
    stop = stop_for_template(template)
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}")
    if meta is not None:
        meta = read_vipbench_meta(meta)
    if isinstance(records, (str, os.PathLike)):
        records = load_eval_records(records, meta=meta)
    records = list(records)
    t0 = time.perf_counter()
    skipped: list[tuple[Any, str]] = []

    def bad(e: EvalError):
        if not skip_bad_examples:
            raise e
        skipped.append((e.record_id, str(e)))

    # Check every record (question, image present) before compiling anything.
    parsed: list[EvalRecord] = []
    for r in records:
        try:
            rec = parse_record(r, meta)
            if rec.image is not None:
                path = _image_path(rec, image_folder)
                if not os.path.isfile(path):
                    raise EvalError(rec.id, f"image not found: {path}")
            parsed.append(rec)
        except EvalError as e:
            bad(e)

    answers: list[dict] = []
    bar = tqdm(total=len(parsed), desc="eval", unit="q", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    correct, n_scored = 0.0, 0
    by_type: dict[str, list[float]] = {}
    i = 0
    while i < len(parsed):
        chunk, prepared = [], []
        while i < len(parsed) and len(chunk) < batch_size:
            rec = parsed[i]
            i += 1
            try:
                prepared.append(_prepare(rec, image_folder))
                chunk.append(rec)
            except EvalError as e:
                bad(e)
                bar.update(1)
        if not chunk:
            continue
        n_real = len(chunk)
        rows = prepared + [prepared[-1]] * (batch_size - n_real)  # same batch shape every time: one compile
        prompts = [build_prompt(q, 1 if img is not None else 0, system=system, style=template) for q, img in rows]
        images = [img for _, img in rows if img is not None]
        texts = generate_text(module, params, processor, prompts, images, max_new_tokens=max_new_tokens, stop=stop,
                              mesh=mesh)
        for rec, (question, _img), text in zip(chunk, prepared, texts[:n_real]):
            meta_out: dict[str, Any] = {"image": rec.image, "ground_truth": rec.ground_truth, **rec.info}
            if rec.ground_truth is not None:
                s = score_answer(text, rec.ground_truth, metric)
                meta_out["score"] = s
                meta_out["metric"] = metric
                correct += s
                n_scored += 1
                key = rec.info.get("question_type") or rec.info.get("category")
                if isinstance(key, str):
                    by_type.setdefault(key, []).append(s)
            answers.append({"question_id": rec.id, "prompt": question, "text": text,
                            "answer_id": _answer_id(model_id, rec.id, text), "model_id": model_id,
                            "metadata": meta_out})
        bar.update(n_real)
        if n_scored:
            bar.set_postfix({metric: f"{correct / n_scored:.3f}"})
    bar.close()
    seconds = time.perf_counter() - t0
    score = correct / n_scored if n_scored else None
    stats = {"records": len(records), "evaluated": len(answers), "scored": n_scored, "correct": correct,
             "skipped": len(skipped), "skipped_records": skipped,
             "by_type": {k: float(np.mean(v)) for k, v in sorted(by_type.items())},
             "seconds": seconds, "records_per_s": len(answers) / seconds if seconds > 0 else 0.0}
    return answers, score, stats
