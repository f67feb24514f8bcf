"""The demo (issue 14): the demo recipe (train/train_demo.py) writes a VipLlava that transformers runs the same,
`vipllava-jax demo` shows a demo-format model at work end to end, and `vipllava-jax selfcheck` (the old parity
demo, and what `demo` runs while no trained demo model is shipped) still passes."""
import json
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vipllava_jax import generate
from vipllava_jax.evals import demo
from vipllava_jax.data import synthetic as syn
from vipllava_jax import load_pretrained
from vipllava_jax.cli import main
from vipllava_jax.evals.demo import shipped_model_available
from vipllava_jax.data import Processor, build_prompt

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "train"))

import make_demo_model  # noqa: E402
import train_demo  # noqa: E402


# The tests of the shortened recipe share one run: on one xdist worker (--dist loadgroup), so it runs once.
RECIPE_GROUP = pytest.mark.xdist_group("demo_recipe")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The demo recipe run end to end, shortened: 64 scenes, two rounds of 3 steps of 8 rows, 20 held-out
    scenes; one length bucket, so each round compiles its step once."""
    work = tmp_path_factory.mktemp("demo_recipe")
    assert train_demo.main(["--work", str(work), "--n-train", "64", "--n-eval", "20", "--rounds", "2",
                            "--set", "max_steps=3", "--set", "batch_size=8", "--set", "progress=false",
                            "--set", "log_every=1", "--set", "length_buckets=[112]"]) == 0
    hf = work / "run2" / "hf"
    module, params = load_pretrained(hf, jnp.float32, progress=False)
    return work, hf, module, params, Processor.from_pretrained(hf)


@RECIPE_GROUP
def test_recipe_summary_and_data(trained):
    work, hf, *_ = trained
    s = json.loads((work / "summary.json").read_text())
    assert s["n"] == 20 and 0 <= s["accuracy"] <= 1 and abs(s["chance"] - syn.chance_accuracy()) < 1e-9
    assert set(s["by_type"]) <= set(syn.QUESTION_TYPES) and s["config"]["stage"] == "all"
    recs = json.loads((work / "data" / "train.json").read_text())
    assert len(recs) == 64
    # each scene: its own question, one or two more it answers (balance_counts drops most counts of 1), and the
    # list of its shapes, the marked one tagged
    turns = [len(r["conversations"]) // 2 for r in recs]
    full = train_demo.QUESTIONS_PER_SCENE + 1
    assert set(turns) <= {3, full} and turns.count(full) > len(recs) // 2
    assert recs[0]["conversations"][-2]["value"] == syn.LIST_QUESTION
    assert all(r["conversations"][-1]["value"].count(syn.MARKED_TAG) == 1 for r in recs)  # the marked list
    # two rounds: the second trained from the first's model, each its whole 3-step schedule
    assert s["rounds"] == 2
    for run in ("run", "run2"):
        lines = (work / run / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["step"] for x in lines if "loss" in json.loads(x)] == [1, 2, 3]
    assert json.loads((work / "run2" / "train_config.json").read_text())["model"] == str(work / "run" / "hf")
    first = load_pretrained(work / "run" / "hf", jnp.float32, progress=False)[1]
    second = trained[3]
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(first), jax.tree.leaves(second)))


@RECIPE_GROUP
def test_recipe_model_is_an_hf_directory_transformers_runs_the_same(trained):
    """The recipe's output is a VipLlava that transformers loads; its processor gives our processor's inputs and
    its logits are ours."""
    torch = pytest.importorskip("torch")
    from transformers import AutoProcessor, VipLlavaForConditionalGeneration

    _, path, module, params, proc = trained
    scene = syn.make_scene((demo.HELDOUT_SEED, 7), **syn.DEMO_SCENE)
    prompt = build_prompt(scene.question, 1, system=demo.DEMO_SYSTEM_PROMPT, style=demo.DEMO_TEMPLATE)
    ours = proc([prompt], [scene.image])
    theirs = AutoProcessor.from_pretrained(path)(text=[prompt], images=[scene.image], return_tensors="np")
    np.testing.assert_array_equal(ours["input_ids"], theirs["input_ids"])
    np.testing.assert_allclose(ours["pixel_values"], theirs["pixel_values"], atol=1e-5)
    ref = VipLlavaForConditionalGeneration.from_pretrained(path).eval()
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ours["input_ids"]), pixel_values=torch.tensor(ours["pixel_values"]),
                   attention_mask=torch.tensor(ours["attention_mask"])).logits.numpy()
    got = np.asarray(module.apply({"params": params}, ours["input_ids"], ours["pixel_values"],
                                  ours["attention_mask"]).logits)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@RECIPE_GROUP
def test_demo_command_end_to_end(trained, tmp_path, capsys):
    """`vipllava-jax demo --model`: the seeded scene saved as drawn, its question, the answer, the right answer
    beside it, and the held-out accuracy that `heldout_accuracy` measures, against chance."""
    _, hf, module, params, proc = trained
    img = tmp_path / "scene.png"
    assert main(["demo", "--model", str(hf), "--seed", "5", "--save-marked", str(img), "--n-eval", "20"]) == 0
    out = capsys.readouterr().out
    scene = syn.make_scene(5, **syn.DEMO_SCENE)
    assert np.array_equal(np.asarray(Image.open(img)), np.asarray(scene.image))
    assert f"Q: {scene.question}" in out
    answer = re.search(r"^A: (.*?)\s+\(right answer: (\S+) - (correct|wrong)\)", out, re.M)
    assert answer and answer.group(2) == scene.answer
    assert (answer.group(3) == "correct") == (answer.group(1).strip() == scene.answer)
    acc = re.search(r"Accuracy on (\d+) held-out scenes: ([\d.]+)% exact match \(chance (\d+)%\)", out)
    assert acc, out
    want = demo.heldout_accuracy((module, params, proc), 20)
    assert int(acc.group(1)) == 20 and acc.group(2) == f"{100 * want['accuracy']:.1f}"
    assert int(acc.group(3)) == round(100 * syn.chance_accuracy()) and int(acc.group(3)) <= 35
    assert len(out.strip().splitlines()) <= 8


@RECIPE_GROUP
def test_demo_answer_is_the_greedy_answer(trained):
    """The streamed demo answer is the model's greedy answer, scored against the scene's truth."""
    _, _, module, params, proc = trained
    for seed in (1, 2):
        res = demo.run_demo(seed, n_eval=0, stream=lambda *a, **k: None, model=(module, params, proc))
        scene = syn.make_scene(seed, **syn.DEMO_SCENE)
        enc = proc([build_prompt(scene.question, 1, system=demo.DEMO_SYSTEM_PROMPT, style=demo.DEMO_TEMPLATE)],
                   [scene.image])
        toks = generate(module, params, enc["input_ids"], enc["pixel_values"], enc["attention_mask"],
                        max_new_tokens=8, eos_token_id=proc.eos_token_id, pad_token_id=proc.pad_token_id)
        text = proc.decode(toks[0].tolist(), skip_special_tokens=True).split("</s>")[0].strip()
        assert res["answer"] == text
        assert res["truth"] == scene.answer and res["correct"] == (res["answer"] == scene.answer)


@pytest.mark.skipif(shipped_model_available(), reason="a trained demo model is shipped")
def test_demo_without_a_shipped_model_runs_the_selfcheck(tmp_path, capsys):
    pytest.importorskip("torch")
    assert main(["demo", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "No trained demo model is shipped" in out and "(OK)" in out and "same as HF generate" in out


# The shipped model's exact match on the 200 held-out scenes, as measured when it was trained and installed
# (train/train_demo.py --install prints it; greedy decoding on fixed scenes, so it is the same on any CPU up to
# float rounding of a near-tie). Measured 2026-12-03: 90.5% (one run of train/configs/demo.yaml, Muon, 2600 steps).
SHIPPED_ACCURACY = 0.905


@pytest.mark.skipif(not shipped_model_available(), reason="no trained demo model is shipped")
def test_shipped_demo_model(tmp_path, capsys):
    """`vipllava-jax demo` with the shipped model: the seeded scene saved as drawn, its question, an answer, the
    right answer, and the accuracy on the 200 held-out scenes, which is what the model shipped with."""
    img = tmp_path / "scene.png"
    assert main(["demo", "--seed", "3", "--save-marked", str(img)]) == 0
    out = capsys.readouterr().out
    scene = syn.make_scene(3, **syn.DEMO_SCENE)
    assert np.array_equal(np.asarray(Image.open(img)), np.asarray(scene.image))
    assert f"Q: {scene.question}" in out
    acc = re.search(r"Accuracy on (\d+) held-out scenes: ([\d.]+)% exact match \(chance (\d+)%\)", out)
    assert acc and int(acc.group(1)) == 200, out
    assert float(acc.group(2)) / 100 >= SHIPPED_ACCURACY - 0.01
    assert float(acc.group(2)) / 100 >= 0.90 and syn.chance_accuracy() <= 0.35  # the bar


def _reduced_recipe(run_python, tmp_path, steps: int) -> dict:
    """train/train_demo.py from scratch (the demo model, train/configs/demo.yaml) for `steps` steps of 16 rows on
    3000 scenes whose own question asks the colour of the object in a rectangle (the data recipe's other
    questions and the marked shape list as in the full recipe), scored on 100 held-out colour scenes. The answer
    is read off the marked shape: every other shape in a colour scene has another colour. Returns summary.json,
    after checking the data, the summary and that the random model scores about chance."""
    work = tmp_path / "demo"
    args = ["--work", str(work), "--n-train", "3000", "--n-eval", "100", "--question-types", "color",
            "--marker-kinds", "rectangle", "--set", f"max_steps={steps}", "--set", "batch_size=16",
            "--set", "progress=false"]
    r = run_python([ROOT / "train" / "train_demo.py", *args], full_opt=True, timeout=1800)  # many steps: -O2
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads((work / "summary.json").read_text())
    assert s["question_types"] == ["color"] and s["marker_kinds"] == ["rectangle"] and s["n"] == 100
    assert s["config"]["max_steps"] == steps and s["chance"] == pytest.approx(1 / 6)
    data = json.loads((work / "data" / "train.json").read_text())
    assert len(data) == 3000 and {r["metadata"]["question_type"] for r in data} == {"color"}
    assert {r["metadata"]["marker_kind"] for r in data} == {"rectangle"}
    before = demo.heldout_accuracy(work / "init", 100, question_types=("color",), marker_kinds=("rectangle",))
    assert before["accuracy"] <= s["chance"] + 0.05, before["accuracy"]
    return s


@pytest.mark.slow
def test_reduced_recipe_learns_to_read_the_marker(run_python, tmp_path):
    """800 steps: measured on a 2-core CPU (2026-12-03, Muon as in demo.yaml): 99% on these 100 held-out scenes,
    170 s (57% with AdamW alone; 41% at 200 steps, 23% at 150). Its fast twins in the default suite: the recipe
    run end to end, shortened (the demo_recipe group above), and the fine-tuning notebook's learning check
    (tests/test_notebooks.py). The full recipe (the slow test below, 14 minutes) made the shipped model
    (90.5%)."""
    s = _reduced_recipe(run_python, tmp_path, 800)
    assert s["accuracy"] >= 0.9, s


def test_reduced_task_is_named_and_never_installed(tmp_path, capsys):
    """A reduced task's model is not installed as the demo model, and an unknown type or kind is named."""
    with pytest.raises(SystemExit):
        train_demo.main(["--work", str(tmp_path), "--install", "--question-types", "color"])
    assert "--install ships the demo model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_demo.main(["--work", str(tmp_path), "--rounds", "0"])
    assert "--rounds must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown question type 'colour'"):
        train_demo.main(["--work", str(tmp_path), "--question-types", "colour"])
    with pytest.raises(ValueError, match="unknown marker kind 'box'"):
        train_demo.main(["--work", str(tmp_path), "--marker-kinds", "box"])
    assert not (tmp_path / "init").exists()


@pytest.mark.slow
def test_full_recipe_retrains_the_shipped_accuracy(run_python, tmp_path):
    """python train/train_demo.py as documented (train/configs/demo.yaml from scratch, the shipped model's
    recipe, XLA's default optimization): within 3 points of the shipped model's 90.5%. About 14 minutes on a
    2-core CPU (21 on a slower one).

    The run is bitwise deterministic on one machine (two short runs, one beside the other, gave equal weights; the
    code of 2026-12-06 and of 2026-12-07 too), so what differs between machines is the machine: XLA:CPU compiles
    its kernels for the processor it runs on. 90.5% on the machine that trained the shipped model (its weights
    bitwise reproduced from a fresh clone), 88.5% on 2026-12-07's (AMD EPYC, AVX2)."""
    r = run_python([ROOT / "train" / "train_demo.py", "--work", tmp_path], full_opt=True, timeout=3600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["n"] == 200 and s["rounds"] == 1 and s["config"]["optimizer"] == "muon"
    assert s["accuracy"] >= SHIPPED_ACCURACY - 0.03, s


def test_selfcheck_matches_pytorch(tmp_path, capsys):
    """`vipllava-jax selfcheck` (the old parity demo): tiny random checkpoint -> orbax -> logits and greedy
    tokens equal PyTorch's."""
    pytest.importorskip("torch")
    assert main(["selfcheck", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "(OK)" in out and "same as HF generate" in out


def test_demo_model_tokenizer_covers_the_task():
    """The demo tokenizer encodes every answer word as one token and any printable text without <unk>."""
    tok = make_demo_model.build_tokenizer()
    for a in syn.answer_vocabulary():
        ids = tok.encode(" " + a, add_special_tokens=False).ids
        assert len(ids) == 1, (a, tok.encode(" " + a, add_special_tokens=False).tokens)
    text = "Zebra? 123 ~#@ {x}"
    assert make_demo_model.UNK_ID not in tok.encode(text).ids
    assert tok.decode(tok.encode(text).ids) == text
