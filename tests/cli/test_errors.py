"""Every bad input gets one clear line (issue 11): the error names what is wrong and where, nothing silently
runs on wrong values, nothing hangs. Each test states the input and the message (or the exact behaviour)."""
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from vipllava_jax import load_pretrained
from vipllava_jax.checkpoints import save_orbax
from vipllava_jax.cli import main
from vipllava_jax.generation import generate
from vipllava_jax.checkpoints import CheckpointError
from vipllava_jax.data import ImageConfig, Processor
from vipllava_jax.testing import TINY_IMAGE_TOKEN, make_tiny_checkpoint
from vipllava_jax.data import visual_prompts as vp

REPO = Path(__file__).resolve().parents[2]
VOCAB = 128


@pytest.fixture(scope="module")
def hf(tiny_hf):
    """The shared tiny checkpoint with its processor (tests/conftest.py); tests change copies (`copy_model`)."""
    return tiny_hf


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def orbax(hf, model, tmp_path_factory):
    out = tmp_path_factory.mktemp("errors_orbax") / "ob"
    save_orbax(model[1], model[0].config, out, tokenizer_from=hf)
    return out


def copy_model(hf, tmp_path) -> Path:
    d = tmp_path / "m"
    shutil.copytree(hf, d)
    return d


def gen(model, ids, **kw):
    module, params = model
    return generate(module, params, np.asarray(ids), max_new_tokens=kw.pop("max_new_tokens", 2), **kw)


# --- silent wrong results: generation inputs ------------------------------------------------------------------
@pytest.mark.parametrize("bad, shown", [(-1, -1), (VOCAB, VOCAB), (2**32 + 5, 2**32 + 5)])
def test_token_ids_outside_the_vocabulary(model, bad, shown):
    ids = np.array([[1, 5, 6, 7], [1, 5, 6, 7]], np.int64)
    ids[1, 2] = bad  # 2**32 + 5 would wrap to 5 in an int32 cast
    with pytest.raises(ValueError, match=rf"input_ids row 1 position 2 holds token id {shown}, outside the "
                                         rf"vocabulary \[0, {VOCAB}\)"):
        gen(model, ids)
    module, params = model  # the model itself, called eagerly, checks too
    with pytest.raises(ValueError, match="row 1 position 2"):
        module.apply({"params": params}, ids)


def test_empty_input_ids(model):
    with pytest.raises(ValueError, match=r"input_ids is empty"):
        gen(model, np.zeros((1, 0), np.int32))


def test_attention_mask_not_zero_one(model):
    with pytest.raises(ValueError, match=r"attention_mask must hold only 0 \(padding\) and 1 \(token\), got \[2\]"):
        gen(model, [[1, 5, 6]], attention_mask=np.array([[1, 2, 1]]))


def test_nan_pixel_values(model):
    ids = np.array([[1] + [TINY_IMAGE_TOKEN] * 25 + [5]])
    pv = np.zeros((1, 3, 30, 30), np.float32)
    pv[0, 1, 3, 4] = np.nan
    with pytest.raises(ValueError, match=r"pixel_values of image\(s\) \[0\] hold NaN or infinite values"):
        gen(model, ids, pixel_values=pv)


@pytest.mark.parametrize("kw, name", [({"eos_token_id": 10**6}, "eos_token_id"), ({"eos_token_id": [2, -3]}, "eos"),
                                      ({"pad_token_id": VOCAB}, "pad_token_id"), ({"pad_token_id": -1}, "pad")])
def test_eos_and_pad_outside_the_vocabulary(model, kw, name):
    with pytest.raises(ValueError, match=rf"{name}.* is not a token id in the vocabulary \[0, {VOCAB}\)"):
        gen(model, [[1, 5, 6]], **kw)


@pytest.mark.parametrize("seed", [-1, 2**31, 2**40, 1.5, True])
def test_seed_out_of_range(model, seed):
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*31\)"):
        gen(model, [[1, 5, 6]], seed=seed, do_sample=True)


@pytest.mark.parametrize("n", [2.7, 0, "3", True, np.float32(2)])
def test_max_new_tokens_must_be_a_positive_integer(model, n):
    with pytest.raises(ValueError, match=r"max_new_tokens must be a positive integer"):
        gen(model, [[1, 5, 6]], max_new_tokens=n)


def test_max_new_tokens_capped_at_the_context(model):
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"max_new_tokens=1000000000 does not fit: the prompt is 3 tokens and the "
                                         r"model's context 256 .*at most 253 new tokens"):
        gen(model, [[1, 5, 6]], max_new_tokens=10**9)
    assert time.perf_counter() - t0 < 5  # refused before any allocation
    assert gen(model, [[1, 5, 6]], max_new_tokens=253).shape == (1, 253)  # exactly the room left is fine


# --- config.json ---------------------------------------------------------------------------------------------
def _edit_config(d: Path, fn):
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(fn(cfg)))


@pytest.mark.parametrize("text, msg", [("{not json", r"config.json: not valid JSON"),
                                       ("[1, 2]", r"config.json: a JSON list, not an object of config fields"),
                                       (b"\xff\xfe", r"config.json: not valid JSON")])
def test_config_not_a_json_object(hf, tmp_path, text, msg):
    d = copy_model(hf, tmp_path)
    (d / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(CheckpointError, match=msg):
        load_pretrained(d, progress=False)


@pytest.mark.parametrize("section, field", [("text_config", "hidden_size"), ("text_config", "vocab_size"),
                                            ("vision_config", "patch_size"), ("text_config", "rms_norm_eps")])
def test_config_string_typed_sizes(hf, tmp_path, section, field):
    d = copy_model(hf, tmp_path)
    _edit_config(d, lambda c: {**c, section: {**c[section], field: str(c[section][field])}})
    with pytest.raises(CheckpointError, match=rf"config.json: {section}.{field}='[0-9.e-]+' must be"):
        load_pretrained(d, progress=False)


@pytest.mark.parametrize("section", ["text_config", "vision_config"])
def test_config_without_a_section_does_not_fall_back_to_7b(hf, tmp_path, section):
    d = copy_model(hf, tmp_path)
    _edit_config(d, lambda c: {k: v for k, v in c.items() if k != section})
    with pytest.raises(CheckpointError, match=rf"config.json: config has no usable '{section}' section \(missing\)"):
        load_pretrained(d, progress=False)


def test_image_seq_length_disagreeing_with_the_tower_warns_and_runs(hf, model, tmp_path):
    d = copy_model(hf, tmp_path)
    _edit_config(d, lambda c: {**c, "image_seq_length": 7})
    with pytest.warns(UserWarning, match=r"image_seq_length=7 disagrees with the vision tower.*uses 25"):
        module, params = load_pretrained(d, progress=False)
    assert module.config.image_seq_length == 25
    ids = np.array([[1] + [TINY_IMAGE_TOKEN] * 25 + [5, 6]])
    pv = np.random.default_rng(0).standard_normal((1, 3, 30, 30)).astype(np.float32)
    np.testing.assert_array_equal(generate(module, params, ids, pv, max_new_tokens=3),
                                  generate(*model, ids, pv, max_new_tokens=3))


# --- safetensors files and shard indexes -----------------------------------------------------------------------
def _rewrite_header(path: Path, fn, *, header_len=None):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    hb = json.dumps(fn(header)).encode()
    hb += b" " * (-len(hb) % 8)
    path.write_bytes(struct.pack("<Q", len(hb) if header_len is None else header_len(raw, hb)) + hb
                     + raw[8 + n:])


KEY = "language_model.model.layers.0.mlp.up_proj.weight"


def _set(key, **kw):
    def fn(h):
        h[key] = {**h[key], **kw}
        return h
    return fn


@pytest.mark.parametrize("edit, msg", [
    (lambda h: _set(KEY, data_offsets=[-8, h[KEY]["data_offsets"][1]])(h),
     rf"tensor '{KEY}': data_offsets \[-8, \d+\] are negative or reversed"),
    (lambda h: _set(KEY, data_offsets=h[KEY]["data_offsets"][::-1])(h), rf"tensor '{KEY}'.*negative or reversed"),
    (lambda h: _set(KEY, data_offsets=[h[KEY]["data_offsets"][0] - 64, h[KEY]["data_offsets"][1] - 64])(h),
     r"tensors .* overlap: corrupt safetensors header"),
    (lambda h: {k: ({kk: vv for kk, vv in v.items() if kk != "shape"} if k == KEY else v) for k, v in h.items()},
     rf"tensor '{KEY}': header entry has no 'shape'"),
    (lambda h: _set(KEY, dtype="I32")(h), rf"integers or booleans where floating-point weights are expected: "
                                          rf"\['{KEY}'\]"),
    (lambda h: [1], r"corrupt safetensors header \(a JSON list"),
])
def test_safetensors_header_checks_name_file_and_tensor(hf, tmp_path, edit, msg):
    d = copy_model(hf, tmp_path)
    _rewrite_header(d / "model.safetensors", edit)
    with pytest.raises(CheckpointError, match=msg) as e:
        load_pretrained(d, progress=False)
    assert str(d) in str(e.value)


def test_safetensors_header_length_equal_to_file_size(hf, tmp_path):
    d = copy_model(hf, tmp_path)
    f = d / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[:8] = struct.pack("<Q", len(raw))
    f.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=rf"{f}: truncated or corrupt safetensors file: header says"):
        load_pretrained(d, progress=False)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    d = tmp_path_factory.mktemp("errors_sharded") / "hf"
    make_tiny_checkpoint(d, max_shard_size="100KB")
    assert (d / "model.safetensors.index.json").exists()
    return d


def _edit_index(d: Path, fn):
    p = d / "model.safetensors.index.json"
    p.write_text(json.dumps(fn(json.loads(p.read_text()))))


def test_shard_index_naming_a_file_outside_the_model_dir_is_refused(sharded, tmp_path):
    d = copy_model(sharded, tmp_path)
    first = sorted(d.glob("model-*.safetensors"))[0]
    shutil.copy(first, tmp_path / "x.safetensors")
    key = next(iter(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]))
    _edit_index(d, lambda i: {**i, "weight_map": {**i["weight_map"], key: "../x.safetensors"}})
    with pytest.raises(CheckpointError, match=rf"index.json: tensor '{key}' maps to '../x.safetensors', outside "
                                              rf"the model directory"):
        load_pretrained(d, progress=False)
    _edit_index(d, lambda i: {**i, "weight_map": {**i["weight_map"], key: str(tmp_path / "x.safetensors")}})
    with pytest.raises(CheckpointError, match="outside the model directory"):
        load_pretrained(d, progress=False)


def test_shard_index_without_weight_map(sharded, tmp_path):
    d = copy_model(sharded, tmp_path)
    _edit_index(d, lambda i: {"metadata": {}})
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: no 'weight_map'"):
        load_pretrained(d, progress=False)


def test_shard_index_mapping_a_key_to_the_wrong_shard(sharded, tmp_path):
    d = copy_model(sharded, tmp_path)
    wm = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    key, shard = next(iter(wm.items()))
    other = next(v for v in sorted(set(wm.values())) if v != shard)
    _edit_index(d, lambda i: {**i, "weight_map": {**wm, key: other}})
    with pytest.raises(CheckpointError, match=rf"index.json: tensor '{key}' is mapped to {other}, which does not "
                                              rf"hold it"):
        load_pretrained(d, progress=False)


# --- damaged orbax directories -----------------------------------------------------------------------------------
def _damage(d: Path, how: str) -> str:
    params = d / "params"
    if how == "data file missing":
        f = max((params / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)
        f.unlink()
        return f"params/ocdbt.process_0/d/{f.name} is missing"
    if how == "data file truncated":
        f = max((params / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)
        f.write_bytes(f.read_bytes()[:100])
        return f"params/ocdbt.process_0/d/{f.name} is truncated or damaged (100 bytes, written as"
    if how == "manifest missing":
        (params / "manifest.ocdbt").unlink()
        return "params/manifest.ocdbt is missing"
    if how == "manifest truncated":
        (params / "manifest.ocdbt").write_bytes(b"")
        return "params/manifest.ocdbt is truncated or damaged (0 bytes"
    if how == "_METADATA missing":
        (params / "_METADATA").unlink()
        return "params/_METADATA is missing"
    if how == "_METADATA truncated":
        (params / "_METADATA").write_bytes((params / "_METADATA").read_bytes()[:50])
        return "params/_METADATA is truncated or damaged"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["data file missing", "data file truncated", "manifest missing",
                                 "manifest truncated", "_METADATA missing", "_METADATA truncated"])
def test_damaged_orbax_dir_is_one_line(orbax, tmp_path, capfd, how):
    d = tmp_path / "ob"
    shutil.copytree(orbax, d)
    names = _damage(d, how)
    _load_damaged(d, names, capfd)


NO_LIST = {"data file missing": "params/", "data file truncated": "params/", "manifest missing":
           "params/manifest.ocdbt is missing", "manifest truncated": "params/manifest.ocdbt is empty",
           "_METADATA missing": "params/_METADATA is missing", "_METADATA truncated": "params/"}


@pytest.mark.parametrize("how", sorted(NO_LIST))
def test_damaged_orbax_dir_without_file_list_is_one_line(orbax, tmp_path, capfd, how):
    """A directory written before save_orbax listed its files: the failure still is one line."""
    d = tmp_path / "ob"
    shutil.copytree(orbax, d)
    (d / "params_files.json").unlink()
    _damage(d, how)
    _load_damaged(d, NO_LIST[how], capfd)


def _load_damaged(d, names, capfd):
    capfd.readouterr()
    with pytest.raises(CheckpointError) as e:
        load_pretrained(d, progress=False)
    msg = str(e.value)
    assert msg.startswith(f"Damaged orbax checkpoint {d}: ") and names in msg and "\n" not in msg, msg
    assert "Event loop is closed" not in capfd.readouterr().err


def test_damaged_orbax_dir_from_the_cli(orbax, tmp_path, capfd):
    d = tmp_path / "ob"
    shutil.copytree(orbax, d)
    _damage(d, "data file missing")
    capfd.readouterr()
    assert main(["generate", "--model", str(d), "--prompt", "hi", "--compilation-cache", ""]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"vipllava-jax generate: error: Damaged orbax checkpoint {d}"), err


# --- mesh divisibility: the clear mesh-fit error at every entry point that takes a mesh -------------------------
def test_mesh_error_in_a_subprocess_with_three_devices(hf, orbax):
    """The same with three CPU devices (the test process has one): every entry point, the clear error."""
    code = f"""
import numpy as np, jax
from vipllava_jax import load_pretrained
from vipllava_jax.checkpoints import restore_orbax
from vipllava_jax.generation import generate
from vipllava_jax.parallel import shard_params, sharded_forward
m = jax.sharding.Mesh(np.array(jax.devices()).reshape(1, 1, 3), ('data', 'fsdp', 'tensor'))
module, params = load_pretrained({str(hf)!r}, progress=False)
ids = np.array([[1, 5, 6]])
for name, call in [('load_pretrained hf', lambda: load_pretrained({str(hf)!r}, mesh=m, progress=False)),
                   ('load_pretrained orbax', lambda: load_pretrained({str(orbax)!r}, mesh=m, progress=False)),
                   ('restore_orbax', lambda: restore_orbax({str(orbax)!r}, module.config, mesh=m)),
                   ('shard_params', lambda: shard_params(params, module.config, m)),
                   ('sharded_forward', lambda: sharded_forward(module, params, ids, mesh=m)),
                   ('generate', lambda: generate(module, params, ids, max_new_tokens=2, mesh=m))]:
    try:
        call()
        print(name, 'RAN')
    except Exception as e:
        print(name, type(e).__name__, str(e).splitlines()[0])
"""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=3", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 6, r.stdout
    for line in lines:
        assert "ValueError Mesh data=1 x fsdp=1 x tensor=3 does not fit the model: mesh axis tensor=3 does not " \
               "divide" in line and "vocab_size=128" in line, line


# --- visual prompts: bounded by the image ------------------------------------------------------------------------
IMG = Image.new("RGB", (40, 30))


def test_width_wider_than_the_image_is_refused_quickly():
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"rectangle: width 100000 is wider than the 40x30 image; at most 40 pixels"):
        vp.draw_markers(IMG, vp.Rectangle(box=(5, 5, 20, 20), width=100000))
    with pytest.raises(ValueError, match=r"mask_contour: width 100000 is wider"):
        vp.draw_markers(IMG, vp.MaskContour(mask=np.ones((30, 40), bool), width=100000))
    assert time.perf_counter() - t0 < 2


def test_huge_point_radius_is_refused():
    with pytest.raises(ValueError, match=r"point: radius 1000000000.0 is larger than the 40x30 image; at most 40 "
                                         r"pixels"):
        vp.draw_markers(IMG, vp.Point(xy=(10, 10), radius=1e9))
    with pytest.raises(ValueError, match=r"point: radius must be > 0, got nan"):
        vp.draw_markers(IMG, vp.Point(xy=(10, 10), radius=float("nan")))


@pytest.mark.parametrize("w", [float("nan"), float("inf"), "3"])
def test_nan_width(w):
    with pytest.raises(ValueError, match=r"rectangle: width must be a number of pixels"):
        vp.Rectangle(box=(5, 5, 20, 20), width=w)


def test_nan_mask():
    m = np.zeros((30, 40), np.float32)
    m[3, 3] = np.nan
    with pytest.raises(ValueError, match=r"A mask must hold finite values .* 1 NaN or infinite value"):
        vp.draw_markers(IMG, vp.Mask(mask=m))


# --- processor files ---------------------------------------------------------------------------------------------
def test_image_std_zero_names_the_processor_file(hf, tmp_path):
    d = copy_model(hf, tmp_path)
    name = "processor_config.json"  # its "image_processor" entry comes first, as in HF
    cfg = json.loads((d / name).read_text())
    assert "image_processor" in cfg
    if name == "processor_config.json":
        cfg["image_processor"]["image_std"] = [0.2, 0.0, 0.2]
    else:
        cfg["image_std"] = [0.2, 0.0, 0.2]
    (d / name).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"{d / name}: image_std=\[0.2, 0.0, 0.2\] must be finite and non-zero"):
        Processor.from_pretrained(d)
    with pytest.raises(ValueError, match="non-zero"):
        ImageConfig.from_dict({"image_std": 0})


# --- the CLI ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    p = tmp_path_factory.mktemp("errors_img") / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((36, 48, 3)) * 255).astype(np.uint8)).save(p)
    return p


def cli(capsys, *args):
    rc = main(["generate", *map(str, args), "--compilation-cache", "", "--system", ""])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_max_new_tokens_past_the_context(hf, photo, capsys):
    t0 = time.perf_counter()
    rc, _, err = cli(capsys, "--model", hf, "--image", photo, "--prompt", "hi", "--max-new-tokens", 10**9)
    assert rc == 2 and "error: max_new_tokens=1000000000 does not fit: the prompt is" in err, err
    assert time.perf_counter() - t0 < 120


def test_cli_default_max_new_tokens_fits_the_context(hf, photo, capsys):
    """The default (256) is capped at what fits after the prompt (256-token context here), not refused."""
    rc, out, err = cli(capsys, "--model", hf, "--image", photo, "--prompt", "hi", "--stop", "@@@@")
    assert rc == 0, err


def test_cli_bbox_without_a_marker(hf, photo, capsys):
    rc, _, err = cli(capsys, "--model", hf, "--image", photo, "--prompt", "What is <bbox>?")
    assert rc == 2 and "error: the prompt names a marker with <bbox>, but there is none" in err


def test_cli_width_past_the_image(hf, photo, capsys):
    rc, _, err = cli(capsys, "--model", hf, "--image", photo, "--box", "5,5,20,20", "--width", 100000,
                     "--prompt", "What is <bbox>?")
    assert rc == 2 and "error: rectangle: width 100000 is wider than the 48x36 image" in err, err


def test_cli_nan_coordinates(hf, photo, capsys):
    with pytest.raises(SystemExit):
        cli(capsys, "--model", hf, "--image", photo, "--point", "nan,3", "--prompt", "x")
    assert "--point wants finite numbers" in capsys.readouterr().err


def _cli_env():
    return dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", LC_ALL="C.UTF-8")


def test_cli_non_utf8_prompt_is_one_line(hf, photo):
    r = subprocess.run([sys.executable, "-m", "vipllava_jax.cli", "generate", "--model", str(hf), "--image",
                        str(photo), "--compilation-cache", "", "--prompt", b"caf\xe9 ?"],
                       capture_output=True, env=_cli_env(), timeout=300)
    err = r.stderr.decode("utf-8", "replace").strip().splitlines()
    assert r.returncode == 2 and err == ["vipllava-jax generate: error: --prompt is not valid UTF-8 (byte(s) e9 at "
                                         "character 3); re-encode it as UTF-8"], err


def test_cli_chat_non_utf8_question_is_replaced_and_said(hf, photo, capsys, monkeypatch):
    """stdin bytes that are not UTF-8 (read from sys.stdin.buffer, as a terminal or a pipe gives them)."""
    import io
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9 ?\n"), encoding="utf-8"))
    rc, _, err = cli(capsys, "--model", hf, "--image", photo, "--chat", "--max-new-tokens", 3)
    assert rc == 0, err
    assert "[warning: the question was not valid UTF-8 (byte 0xe9 at 3); undecodable bytes replaced with" in err


def test_cli_chat_outgrowing_the_context_drops_the_oldest_turn_and_goes_on(hf, photo, capsys, monkeypatch):
    """A conversation longer than the context (256 tokens, one character a token here) does not end the session:
    the oldest turn is dropped with one notice, the image stays (now with the oldest turn kept) and the next line
    is answered; a question too long even alone is one error line and the session goes on; /reset starts over.
    (Every prompt is 230 tokens: one length bucket, one compile.)"""
    import io
    import vipllava_jax.cli.generate as cg
    prompts = []

    def recording(module, params, proc, text, images, **kw):
        prompts.append(text)
        return real(module, params, proc, text, images, **kw)
    real = cg.generate_text_stream
    monkeypatch.setattr(cg, "generate_text_stream", recording)
    q1, q2, q3 = (f"question {i}: " + "abcdefghij" * 17 for i in (1, 2, 3))  # 180 characters each
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join([q2, "x" * 300, "/reset", q3]) + "\n"))
    rc, out, err = cli(capsys, "--model", hf, "--image", photo, "--prompt", q1, "--chat", "--max-new-tokens",
                       2, "--stop", "@@@")
    assert rc == 0, err
    assert out.count("\n") == 3 and len(prompts) == 3, (prompts, out)
    assert [p.startswith("###Human: <image>\n") for p in prompts] == [True] * 3
    assert prompts[1] == f"###Human: <image>\n{q2}###Assistant:"  # question 1 dropped, the image kept
    assert prompts[2] == f"###Human: <image>\n{q3}###Assistant:"
    lines = err.splitlines()
    assert sum(ln.startswith("[context full: the oldest 1 turn(s) dropped (") for ln in lines) == 1, err
    assert "error: the question does not fit: the prompt is 350 tokens and the model's context 256, leaving room " \
           "for 0 new token(s) where 2 are wanted; ask a shorter question" in lines, err
    assert any(ln.startswith("[conversation reset") for ln in lines), err
