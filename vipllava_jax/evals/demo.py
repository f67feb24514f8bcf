"""The demo's library half (``vipllava-jax demo`` is its command): the shipped VipLlava, trained from scratch by this package's own pipeline, answers a question about
a marked object in a fresh synthetic scene; then its accuracy on held-out scenes.

    vipllava-jax demo [--seed N] [--save-marked scene.png] [--n-eval 200]

    from vipllava_jax.evals.demo import run_demo
    result = run_demo(seed=3, out_image="scene.png")     # prints a few lines, returns what it printed

The model (`demo_model_path()`, ``vipllava_jax/assets/demo_model``: config.json, model.safetensors, tokenizer
and processor files, an HF directory that `load_pretrained` and transformers read) is a small VipLlava (CLIP
tower + Llama decoder, a word-level BPE tokenizer) trained with ``vipllava-jax train --stage all`` on
`vipllava_jax.data.synthetic` scenes drawn with `DEMO_SCENE` (train/train_demo.py and train/configs/demo.yaml retrain
it). It was trained on scenes ``(TRAIN_SEED, i)``; the held-out scenes are ``(HELDOUT_SEED, i)`` and a demo scene
is `demo_scene(seed)` for any integer seed (``make_scene(seed, **DEMO_SCENE)``; a negative seed ``s`` draws
``(NEGATIVE_SEED, -s)``): disjoint families of seeds.

`run_demo` names the model it runs from its own files (`describe_model`): the shipped model, a model written by
``vipllava-jax train`` (its export marker names the run and step), or any other checkpoint as what its config
says; a model whose tokenizer lacks the demo task's answer words is refused (`check_demo_tokenizer`).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from ..checkpoints.load import load_config, load_pretrained
from ..data.processor import Processor
from ..data.prompts import build_prompt, stop_for_template
from ..data.synthetic import (DEMO_SCENE, MARKER_KINDS, QUESTION_TYPES, chance_accuracy, make_scene,
                              write_dataset)
from ..data.synthetic import answer_vocabulary
from ..generation.text import generate_text_stream
from ..training.export import read_marker
from .evaluation import evaluate, score_answer

__all__ = ["demo_model_path", "demo_scene", "describe_model", "check_demo_tokenizer", "run_demo", "heldout_accuracy", "write_heldout", "format_accuracy",
           "TRAIN_SEED", "HELDOUT_SEED", "N_HELDOUT", "DEMO_TEMPLATE", "DEMO_SYSTEM_PROMPT"]

TRAIN_SEED = 0  # training scenes: synthetic.make_scene((TRAIN_SEED, i), **DEMO_SCENE)
HELDOUT_SEED = 1  # held-out scenes: make_scene((HELDOUT_SEED, i), **DEMO_SCENE), i < N_HELDOUT
NEGATIVE_SEED = 2  # demo scenes of negative seeds s: make_scene((NEGATIVE_SEED, -s)) (numpy seeds are >= 0)
N_HELDOUT = 200
# The prompt the demo model was trained with (train/configs/demo.yaml: template, system_prompt).
DEMO_TEMPLATE = "llava_v1"
DEMO_SYSTEM_PROMPT = ""
MAX_NEW_TOKENS = 8  # answers are one word (a token or two) and </s>

_TYPE_NAMES = {"shape": "shape", "color": "colour", "count": "count", "left_right": "left/right"}


SHIPPED_MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "demo_model"


def shipped_model_available() -> bool:
    return (SHIPPED_MODEL_DIR / "config.json").is_file()


def demo_model_path() -> Path:
    """The shipped demo model's HF directory (inside the installed package)."""
    p = SHIPPED_MODEL_DIR
    if not shipped_model_available():
        raise FileNotFoundError(f"The demo model is missing from the package ({p}): reinstall vipllava-jax, or "
                                f"retrain it with `python train/train_demo.py --install`")
    return p


def write_heldout(out_dir, n: int = N_HELDOUT, *, question_types: Sequence[str] = QUESTION_TYPES,
                  marker_kinds: Sequence[str] = MARKER_KINDS) -> Path:
    """Write the first `n` held-out scenes (pre-marked; scenes (HELDOUT_SEED, i)) to out_dir; returns the JSON.
    question_types / marker_kinds: the held-out scenes of a reduced task (default: the demo model's whole mix)."""
    return write_dataset(out_dir, n, seed=HELDOUT_SEED, pre_marked=True, id_prefix="heldout",
                         question_types=question_types, marker_kinds=marker_kinds, **DEMO_SCENE)


def demo_scene(seed: int):
    """The demo scene of an integer ``seed`` (any sign): ``make_scene(seed, **DEMO_SCENE)`` for ``seed >= 0``,
    ``make_scene((NEGATIVE_SEED, -seed), **DEMO_SCENE)`` below 0 (numpy's generators take no negative seed)."""
    seed = int(seed)
    return make_scene(seed if seed >= 0 else (NEGATIVE_SEED, -seed), **DEMO_SCENE)


def describe_model(model) -> str:
    """What ``model`` is, from its own files: the shipped demo model; a model written by ``vipllava-jax train``
    (the export marker in its directory names the run and step); else what its config.json says it is."""
    if isinstance(model, (tuple, list)):
        return "(given in memory)"
    p = Path(model)
    if shipped_model_available() and p.resolve() == SHIPPED_MODEL_DIR:
        return f"{p}: the shipped demo model, trained from scratch by vipllava-jax train on synthetic visual-prompt scenes"
    marker = read_marker(p)
    if marker is not None:
        return f"{p}: written by vipllava-jax train (run {marker.get('run_dir')}, step {marker.get('step')})"
    cfg = load_config(p)
    name = getattr(cfg, "name_or_path", None) or ""
    return (f"{p}: a {cfg.text.num_hidden_layers}-layer VipLlava checkpoint{f' ({name})' if name else ''} not written "
            f"by vipllava-jax train (no export marker), so not known to be trained on the demo task")


def check_demo_tokenizer(processor, where) -> None:
    """Refuse a tokenizer without the demo task's answer words (a word, or a word-start piece such as ``▁red`` /
    ``Ġred``, for every answer the questions can have): such a model was not trained on the task."""
    get_vocab = getattr(processor.tokenizer, "get_vocab", None)
    vocab = get_vocab() if get_vocab is not None else {}
    missing = [w for w in answer_vocabulary() if not ({w, f"\u2581{w}", f"\u0120{w}"} & vocab.keys())]
    if missing:
        raise ValueError(f"{where} is not a demo-task model: its tokenizer lacks {len(missing)} of the demo's "
                         f"{len(answer_vocabulary())} answer words ({', '.join(missing[:6])}"
                         f"{', ...' if len(missing) > 6 else ''}); give a model trained with train/train_demo.py "
                         f"(or omit --model for the shipped one)")


def _load(model, quantize=None, quantize_tile_size: int = 128):
    """model: a directory, or (module, params, processor) -> (module, params, processor). quantize: "int8" /
    "int4" loads a directory's weights quantized (`load_pretrained`)."""
    if isinstance(model, (tuple, list)):
        return tuple(model)
    module, params = load_pretrained(model, jnp.float32, progress=False, quantize=quantize,
                                     quantize_tile_size=quantize_tile_size)
    return module, params, Processor.from_pretrained(model)


def heldout_accuracy(model=None, n: int = N_HELDOUT, *, template: str = DEMO_TEMPLATE,
                     system: str = DEMO_SYSTEM_PROMPT, batch_size: int | None = None, progress: bool = False,
                     data_dir=None, question_types: Sequence[str] = QUESTION_TYPES,
                     marker_kinds: Sequence[str] = MARKER_KINDS, quantize=None,
                     quantize_tile_size: int = 128) -> dict:
    """Exact-match accuracy of `model` (a directory, (module, params, processor), or None: the shipped model)
    on the first `n` held-out scenes, with `evaluation.evaluate` (greedy, batched). question_types /
    marker_kinds: a reduced task's held-out scenes (`write_heldout`), its chance for those types. quantize /
    quantize_tile_size: a directory's weights loaded int8 / int4 (`load_pretrained`).

    Returns {"accuracy", "by_type" {question type: accuracy}, "chance", "chance_by_type", "n", "seconds",
    "answers"}. data_dir: where to write the scenes (default: a temporary directory, removed after)."""
    t0 = time.perf_counter()
    module, params, processor = _load(demo_model_path() if model is None else model, quantize, quantize_tile_size)
    with tempfile.TemporaryDirectory(prefix="vipllava-heldout-") as tmp:
        folder = Path(data_dir) if data_dir is not None else Path(tmp)
        path = write_heldout(folder, n, question_types=question_types, marker_kinds=marker_kinds)
        answers, score, stats = evaluate(module, params, processor, path, image_folder=folder,
                                         batch_size=batch_size or min(n, 100), metric="exact",
                                         max_new_tokens=MAX_NEW_TOKENS, template=template, system=system,
                                         progress=progress, model_id="vipllava-jax-demo")
    return {"accuracy": score, "by_type": stats["by_type"], "chance": chance_accuracy(None, question_types),
            "chance_by_type": {t: chance_accuracy(t) for t in question_types}, "n": stats["scored"],
            "seconds": time.perf_counter() - t0, "answers": answers}


def format_accuracy(res: dict) -> str:
    """One line: accuracy over the held-out scenes against chance, and per question type."""
    per = ", ".join(f"{_TYPE_NAMES.get(t, t)} {v:.0%}" for t, v in res["by_type"].items())
    return (f"Accuracy on {res['n']} held-out scenes: {res['accuracy']:.1%} exact match "
            f"(chance {res['chance']:.0%}); {per}")


def run_demo(seed: int = 0, *, out_image=None, n_eval: int = N_HELDOUT, stream: Callable[..., Any] = print,
             model=None, max_new_tokens: int = MAX_NEW_TOKENS, quantize=None,
             quantize_tile_size: int = 128) -> dict:
    """Show the demo model at work, in a few lines written with `stream` (a print-like callable; the answer is
    written piece by piece with ``end=""``):

    1. the model, and a fresh scene `synthetic.make_scene(seed, **DEMO_SCENE)` (a few shapes, one marked with one of the
       eight visual prompts), its marked image saved to `out_image` (default: vipllava-demo-<seed>.png in the
       temp directory);
    2. the question, the answer streamed as it is generated (`generate_text_stream`), and the right answer beside it;
    3. the accuracy over `n_eval` held-out scenes (fixed seeds, disjoint from training and from demo scenes)
       against chance, per question type too (n_eval=0 skips it).

    model: an HF directory of a demo-format model, or (module, params, processor); None: the shipped model.
    quantize: "int8" / "int4" (``quantize_tile_size``): its weights loaded quantized (`load_pretrained`).
    Returns {"question", "answer", "truth", "correct", "image", "accuracy" (None when skipped), "by_type",
    "chance", "seconds"}.
    """
    t0 = time.perf_counter()
    model = demo_model_path() if model is None else model
    if not isinstance(model, (tuple, list)):  # the tokenizer's words before minutes of loading weights
        check_demo_tokenizer(Processor.from_pretrained(model), model)
    module, params, processor = _load(model, quantize, quantize_tile_size)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    q = module.config.quantization
    stream(f"Model: {describe_model(model)} ({n_params / 1e6:.1f}M parameters"
           + (f", {q.mode} linears" if q else "") + ")")

    scene = demo_scene(seed)
    out_image = Path(out_image) if out_image is not None else \
        Path(tempfile.gettempdir()) / f"vipllava-demo-{int(seed)}.png"
    if out_image.parent and not out_image.parent.exists():
        out_image.parent.mkdir(parents=True, exist_ok=True)
    scene.image.save(out_image)
    w, h = scene.image.size
    stream(f"Scene (seed {seed}): {w}x{h} px, {len(scene.shapes)} shapes, the {scene.target_shape.description} "
           f"marked {scene.marker_phrase}; saved to {out_image}")

    stream(f"Q: {scene.question}")
    stream("A:", end=" ", flush=True)
    prompt = build_prompt(scene.question, 1, system=DEMO_SYSTEM_PROMPT, style=DEMO_TEMPLATE)
    pieces = []
    for piece in generate_text_stream(module, params, processor, prompt, [scene.image],
                                      max_new_tokens=max_new_tokens, stop=stop_for_template(DEMO_TEMPLATE)):
        pieces.append(piece)
        stream(piece, end="", flush=True)
    answer = "".join(pieces).strip()
    correct = bool(score_answer(answer, scene.answer, "exact"))
    stream(f"    (right answer: {scene.answer} - {'correct' if correct else 'wrong'})")

    res = {"accuracy": None, "by_type": {}, "chance": None}
    if n_eval:
        res = heldout_accuracy((module, params, processor), n_eval)
        stream(format_accuracy(res))
    seconds = time.perf_counter() - t0
    return {"question": scene.question, "answer": answer, "truth": scene.answer, "correct": correct,
            "question_type": scene.question_type, "image": str(out_image), "accuracy": res["accuracy"],
            "by_type": res["by_type"], "chance": res["chance"], "seconds": seconds}
