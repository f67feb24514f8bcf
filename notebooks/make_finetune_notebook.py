"""Writes finetune_visual_prompts.ipynb (outputs cleared): python notebooks/make_finetune_notebook.py"""
from pathlib import Path

import nbformat as nbf

cells = []
md = lambda s: cells.append(nbf.v4.new_markdown_cell(s.strip()))
code = lambda s, **meta: cells.append(nbf.v4.new_code_cell(s.strip(), metadata=meta))

md("""
# Fine-tune a ViP model on a new visual-prompt question, in JAX

vipllava-jax ships a small VipLlava trained from scratch on synthetic visual-prompt scenes: coloured shapes, one of
them marked with a box, an ellipse, an arrow, a scribble, ... and a question about the marked one (its shape, its
colour, how many share them, whether it is left or right of another shape). It has never been asked whether the
marked shape is **above or below** another one.

This notebook teaches it that: it generates a small synthetic set with the new question type, scores the model
before, fine-tunes every weight with `vipllava_jax.training.train` (what `vipllava-jax train --stage full` runs),
scores it after, and shows a few marked scenes with the answers. It needs no download and runs on a CPU in a few
minutes (Colab: any runtime).
""")
md("## 1. Install")
code("""
# Installs vipllava-jax unless it is already importable (a local checkout with `pip install -e .`, or CI).
# Colab: set VIPLLAVA_JAX_SOURCE to this repository's git URL or an uploaded copy, e.g. "git+https://...".
import importlib.util, subprocess, sys
VIPLLAVA_JAX_SOURCE = "vipllava-jax"
if importlib.util.find_spec("vipllava_jax") is None:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", VIPLLAVA_JAX_SOURCE])
""")
md("## 2. Parameters\nCI runs this notebook top to bottom with fewer steps and scenes.")
code("""
NEW_TYPE = "above_below"  # the question type the shipped model never saw
N_TRAIN = 2000            # synthetic training scenes: the new question, then two known ones on the same marker
N_EVAL = 100              # held-out scenes of the new type, scored before and after
STEPS = 400               # fine-tuning steps
BATCH_SIZE = 32
LR = 3e-4
WORKDIR = ""              # "" = a fresh temporary directory
""", tags=["parameters"])
md("## 3. The shipped demo model")
code("""
import tempfile
from pathlib import Path

import jax.numpy as jnp
from vipllava_jax import load_pretrained
from vipllava_jax.data import synthetic
from vipllava_jax.evals import demo
from vipllava_jax.data import Processor

work = Path(WORKDIR or tempfile.mkdtemp(prefix="vipllava-finetune-"))
base = demo.demo_model_path()
module, params = load_pretrained(base, jnp.float32, progress=False)
processor = Processor.from_pretrained(base)
print("model:", base)
print("question types it was trained on:", ", ".join(synthetic.QUESTION_TYPES))
""")
md("""
## 4. A small synthetic set with the new question

Scenes as the demo model was trained on (`synthetic.DEMO_SCENE`). Each training scene asks the new question, then
two questions the model already knows about the same marked shape (its shape, its colour, how many share them),
so it keeps what it knew. The held-out scenes (another seed) ask only the new question.
""")
code("""
train_json = synthetic.write_dataset(work / "data", N_TRAIN, seed=100, question_types=(NEW_TYPE,), json_name="train.json",
                                     id_prefix="train", questions_per_scene=3, **synthetic.DEMO_SCENE)
heldout_json = synthetic.write_dataset(work / "data", N_EVAL, seed=101, question_types=(NEW_TYPE,),
                                       json_name="heldout.json", id_prefix="heldout", **synthetic.DEMO_SCENE)
import json
example = json.loads(train_json.read_text())[0]
print(len(json.loads(train_json.read_text())), "training records, e.g.:")
for turn in example["conversations"]:
    print(f"  {turn['from']}: {turn['value']}")
""")
md("## 5. Before: the shipped model on the new question")
code("""
from vipllava_jax.evals import evaluate

def score(module, params):
    answers, acc, stats = evaluate(module, params, processor, heldout_json, image_folder=work / "data",
                                   batch_size=50, metric="exact", max_new_tokens=4, system="", progress=False)
    return acc, answers

before, before_answers = score(module, params)
print(f"before fine-tuning: {before:.0%} exact match on {N_EVAL} held-out '{NEW_TYPE}' questions "
      f"(chance {synthetic.chance_accuracy(NEW_TYPE):.0%})")
print("its answers, e.g.:", [a["text"] for a in before_answers[:8]])
""")
md("""
## 6. Fine-tune every weight

`TrainConfig` holds what `vipllava-jax train` reads from its YAML; `stage="full"` trains the tower, the projector and
the decoder. Checkpoints (orbax) go to `work/run/checkpoints`, the final model as an HF directory to `work/run/hf`.
""")
code("""
from vipllava_jax.training import TrainConfig, train

cfg = TrainConfig(model=str(base), data=str(train_json), image_folder=str(work / "data"), output=str(work / "run"),
                  stage="full", lr=LR, max_steps=STEPS, batch_size=BATCH_SIZE, warmup_ratio=0.05,
                  weight_decay=0.0, max_length=128, template="llava_v1", system_prompt="", dtype="float32",
                  scan_layers=False, remat="none", devices=1, log_every=max(1, STEPS // 4))
summary = train(cfg)
tuned_dir = work / "run" / "hf"
print("fine-tuned model:", tuned_dir)
""")
md("## 7. After")
code("""
module2, params2 = load_pretrained(tuned_dir, jnp.float32, progress=False)
after, after_answers = score(module2, params2)
print(f"before fine-tuning: {before:.0%}   after: {after:.0%}   "
      f"(exact match, {N_EVAL} held-out '{NEW_TYPE}' questions, chance {synthetic.chance_accuracy(NEW_TYPE):.0%})")
""")
md("## 8. A few marked scenes and the fine-tuned model's answers")
code("""
from IPython.display import display
from PIL import Image

records = json.loads(heldout_json.read_text())
for rec, before_ans, after_ans in list(zip(records, before_answers, after_answers))[:4]:
    display(Image.open(work / "data" / rec["image"]).resize((192, 192), Image.NEAREST))
    question, truth = rec["conversations"][0]["value"].replace("<image>\\n", ""), rec["conversations"][1]["value"]
    print(f"Q: {question}\\n   before: {before_ans['text']!r}   after: {after_ans['text']!r}   right answer: {truth!r}")
""")

nb = nbf.v4.new_notebook()
nb.cells = cells
nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
nb.metadata["colab"] = {"provenance": []}
nbf.write(nb, Path(__file__).with_name("finetune_visual_prompts.ipynb"))
