"""Writes vipllava_visual_prompts.ipynb (outputs cleared): python notebooks/make_notebook.py"""
import nbformat as nbf

cells = []
md = lambda s: cells.append(nbf.v4.new_markdown_cell(s.strip()))
code = lambda s, **meta: cells.append(nbf.v4.new_code_cell(s.strip(), metadata=meta))

md("""
# ViP-LLaVA in JAX: ask about a region you mark on the image

[ViP-LLaVA](https://arxiv.org/abs/2312.00784) understands *visual prompts*: a red box, an arrow or a scribble drawn
straight onto the image. This notebook loads VipLlava with **vipllava-jax**, draws a marker, shows the marked image
and asks the model about the marked region, streaming the answer.

Runs on a Colab CPU, GPU or TPU runtime. With no checkpoint (or no network) it falls back to a tiny random model, so
every cell runs anywhere; its answers are then random characters.
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
md("## 2. Parameters\nCI runs this notebook top to bottom with `TINY = True`.")
code("""
MODEL = "llava-hf/vip-llava-7b-hf"   # a local HF or orbax directory, or a hub id (needs a network)
TINY = False                         # True: skip MODEL and use a tiny random model (no download)
IMAGE = ""                           # a path or URL; "" = a built-in synthetic picture
QUESTION = "What is the object <bbox>?"   # <bbox> becomes the marker's phrase, e.g. "within the red rectangle"
MAX_NEW_TOKENS = 48
DTYPE = "auto"                       # auto: bfloat16 on GPU/TPU, float32 on CPU
""", tags=["parameters"])
md("""
## 3. Accelerator
Colab: *Runtime > Change runtime type* and pick a GPU or TPU. JAX finds the accelerator by itself; on a fresh TPU
runtime you may need `pip install -U "jax[tpu]"` (GPU: `"jax[cuda12]"`) and a restart. A 7B model in bfloat16 needs
about 15 GB of accelerator memory (a T4 has 15 GB: use a bigger GPU, a TPU, or shard it, see the README).
""")
code("""
import jax
import jax.numpy as jnp

print("devices:", jax.devices())
dtype = {"auto": jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16,
         "bfloat16": jnp.bfloat16, "float32": jnp.float32}[DTYPE]
print("dtype:", jnp.dtype(dtype).name)
""")
md("## 4. Load the model and its processor")
code("""
import tempfile
from vipllava_jax import load_pretrained
from vipllava_jax.checkpoints import resolve_model_path
from vipllava_jax.data import Processor

model_dir, tiny = None, False
if not TINY:
    try:
        model_dir = resolve_model_path(MODEL)
    except Exception as e:  # no network, no such directory...
        print(f"Could not get {MODEL}: {e}\\nUsing a tiny random model instead.")
if model_dir is None:
    from vipllava_jax.testing import make_tiny_checkpoint, make_tiny_processor
    model_dir = tempfile.mkdtemp(prefix="tiny-vipllava-")
    make_tiny_checkpoint(model_dir)
    make_tiny_processor(model_dir, image_seq_length=25, image_size=30)
    print("tiny random model in", model_dir)
    tiny = True
module, params = load_pretrained(model_dir, dtype=dtype)
proc = Processor.from_pretrained(model_dir)
print(f"{sum(x.size for x in jax.tree.leaves(params)):,} parameters")
""")
md("## 5. An image")
code("""
from PIL import Image, ImageDraw
from vipllava_jax.data import load_image

if IMAGE:
    image = load_image(IMAGE)
else:  # a small synthetic scene: sky, grass, a sun, a house and a tree
    image = Image.new("RGB", (480, 360), (135, 190, 235))
    d = ImageDraw.Draw(image)
    d.rectangle((0, 250, 480, 360), fill=(80, 160, 70))
    d.ellipse((380, 30, 440, 90), fill=(250, 220, 60))
    d.rectangle((90, 160, 230, 280), fill=(190, 120, 80))
    d.polygon([(80, 160), (160, 100), (240, 160)], fill=(150, 50, 40))
    d.rectangle((300, 170, 320, 280), fill=(110, 75, 40))
    d.ellipse((260, 100, 360, 200), fill=(40, 120, 50))
image
""")
md("""
## 6. Draw visual prompts
Markers are drawn on the image as it is, before the processor resizes and centre-crops it (as in training), with
coordinates in pixels or, with `normalized=True`, in [0, 1]. A warning tells you when a marker falls outside the
centre crop; `pad_to_square=True` keeps the whole image instead.
""")
code("""
from vipllava_jax.data import visual_prompts as vp

markers = [
    vp.Rectangle((0.15, 0.25, 0.52, 0.8), normalized=True, color="red"),  # around the house
    vp.Arrow((0.8, 0.75), (0.68, 0.5), normalized=True, color="blue"),    # pointing at the tree
]
marked = vp.draw_markers(image, markers)
question = vp.build_question(QUESTION, *markers)
print(question)
marked
""")
md("""
## 7. Ask about the marked region
The conversation is written as Hugging Face chat messages and formatted by the checkpoint's own chat template
(`apply_chat_template`, as in transformers); `vipllava_jax.pipeline(model=...)` does all of this in one call.
""")
code("""
from vipllava_jax.generation import generate_text_stream

messages = [{"role": "user", "content": [{"type": "image", "image": marked}, {"type": "text", "text": question}]}]
prompt = proc.apply_chat_template(messages, add_generation_prompt=True)
print(repr(prompt))
answer = ""
for piece in generate_text_stream(module, params, proc, prompt, [marked], max_new_tokens=MAX_NEW_TOKENS):
    answer += piece
    print(piece, end="", flush=True)
print()
""")
md("## 8. One batch: a question per marker")
code("""
from vipllava_jax.generation import generate_text

questions = [vp.build_question("What is <bbox>?", m) for m in markers]
prompts = [proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                   add_generation_prompt=True) for q in questions]
answers = generate_text(module, params, proc, prompts,
                        [marked] * len(questions), max_new_tokens=MAX_NEW_TOKENS)
for q, a in zip(questions, answers):
    print(q, "->", a)
""")

nb = nbf.v4.new_notebook(cells=cells)
nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
nb.metadata["language_info"] = {"name": "python"}
nb.metadata["accelerator"] = "GPU"
nb.metadata["colab"] = {"provenance": []}
nbf.write(nb, __import__("pathlib").Path(__file__).with_name("vipllava_visual_prompts.ipynb"))
