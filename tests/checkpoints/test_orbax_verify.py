"""Orbax checksums (issue 26): save_orbax records each file's size and CRC-32 in params_files.json, and a load
checks them by default, so a file damaged in place at its size (flipped bytes, a zero-filled block) is refused with
one line naming it rather than loaded as weights. ``verify=False`` / ``--no-verify`` skips the check; what orbax
then reports is still one line of plain words (no pybind11 repr). Directories written before checksums
({"params/...": size}) still load, checked by size."""
import json
import re
import shutil
import zlib
from pathlib import Path

import jax
import numpy as np
import pytest

from vipllava_jax import load_pretrained
from vipllava_jax.checkpoints import CheckpointError, save_orbax
from vipllava_jax.cli import build_parser, main


@pytest.fixture(scope="module")
def orbax(tiny_hf, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("verify_orbax") / "ob"
    save_orbax(tiny_model[1], tiny_model[0].config, out, tokenizer_from=tiny_hf)
    return out


def _copy(orbax, tmp_path) -> Path:
    d = tmp_path / "ob"
    shutil.copytree(orbax, d)
    return d


def _biggest_data_file(d: Path) -> Path:
    return max((d / "params" / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)


def _flip_400_bytes(f: Path) -> None:
    b = bytearray(f.read_bytes())
    mid = len(b) // 2 - 200
    b[mid:mid + 400] = bytes(x ^ 0xFF for x in b[mid:mid + 400])
    f.write_bytes(bytes(b))


def _zero_fill(f: Path) -> None:
    f.write_bytes(b"\0" * f.stat().st_size)


def _one_plain_line(msg: str, d: Path) -> None:
    assert msg.startswith(f"Damaged orbax checkpoint {d}: ") and "\n" not in msg, msg
    assert not re.search(r"<[^>]*>|0x[0-9a-f]{6,}|pybind11|TensorStore\(", msg), msg  # no object reprs
    assert re.search(r"[A-Za-z]$", msg), msg  # ends in words


def test_file_list_records_size_and_crc32_of_every_file(orbax):
    listed = json.loads((orbax / "params_files.json").read_text())
    on_disk = sorted(str(f.relative_to(orbax)) for f in (orbax / "params").rglob("*") if f.is_file())
    assert sorted(listed) == on_disk
    for rel, v in listed.items():
        data = (orbax / rel).read_bytes()
        assert v == {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"}, rel


def test_flipped_bytes_refused_by_default_loaded_with_verify_false(orbax, tiny_model, tmp_path):
    """The issue's case: 400 bytes flipped in the middle of the biggest data file, same size."""
    d = _copy(orbax, tmp_path)
    f = _biggest_data_file(d)
    _flip_400_bytes(f)
    rel = f.relative_to(d)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(d, progress=False)
    _one_plain_line(str(e.value), d)
    assert f"{rel} checksum mismatch" in str(e.value) and "--no-verify" in str(e.value)
    # verify=False: nothing checks the bytes. Where the file is stored raw the damage loads as weights; where
    # orbax compressed it (zstd, whichever file is biggest this time) the decompressor fails: one plain line.
    try:
        _, params = load_pretrained(d, progress=False, verify=False)
    except CheckpointError as e2:
        _one_plain_line(str(e2), d)
        assert "missing, truncated or damaged" in str(e2)
    else:
        same = [np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(tiny_model[1]))]
        assert not all(same) and sum(same) >= len(same) - 3


@pytest.mark.parametrize("which", ["params/d", "ocdbt data"])
def test_zero_filled_data_file(orbax, tmp_path, capfd, which):
    d = _copy(orbax, tmp_path)
    f = next((d / "params" / "d").iterdir()) if which == "params/d" else _biggest_data_file(d)
    _zero_fill(f)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(d, progress=False)
    _one_plain_line(str(e.value), d)
    assert f"{f.relative_to(d)} checksum mismatch" in str(e.value)
    capfd.readouterr()
    with pytest.raises(CheckpointError) as e:  # unchecked, orbax fails: its error in one line of plain words
        load_pretrained(d, progress=False, verify=False)
    _one_plain_line(str(e.value), d)
    assert "a file under params/ is missing, truncated or damaged (" in str(e.value)
    assert "Event loop is closed" not in capfd.readouterr().err


def test_zero_filled_data_file_from_the_cli(orbax, tmp_path, capfd):
    d = _copy(orbax, tmp_path)
    _zero_fill(_biggest_data_file(d))
    for flags, words in [((), "checksum mismatch"), (("--no-verify",), "missing, truncated or damaged")]:
        capfd.readouterr()
        assert main(["generate", "--model", str(d), "--prompt", "hi", "--compilation-cache", "", *flags]) == 2
        err = capfd.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"vipllava-jax generate: error: Damaged orbax checkpoint {d}: "), err
        assert words in err[0] and re.search(r"[A-Za-z]$", err[0]), err


@pytest.mark.parametrize("command", [["generate", "--prompt", "x"], ["eval", "--data", "x", "--output", "y"],
                                     ["convert", "OUT"]])
def test_no_verify_flag(command):
    model = ["--model", "M"] if command[0] != "convert" else ["M"]
    ap = build_parser()
    assert ap.parse_args([command[0], *model, *command[1:]]).no_verify is False
    assert ap.parse_args([command[0], *model, *command[1:], "--no-verify"]).no_verify is True


def test_sizes_only_file_list_still_read(orbax, tmp_path):
    """The first format, {"params/...": size}: loads (nothing to checksum), and a size change is still named."""
    d = _copy(orbax, tmp_path)
    listed = json.loads((d / "params_files.json").read_text())
    (d / "params_files.json").write_text(json.dumps({k: v["size"] for k, v in listed.items()}))
    load_pretrained(d, progress=False)
    f = _biggest_data_file(d)
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=rf"{f.relative_to(d)} is truncated or damaged \(100 bytes"):
        load_pretrained(d, progress=False)


@pytest.mark.parametrize("listing", ['{"params/_METADATA": "12"}', '["params/_METADATA"]',
                                     '{"params/_METADATA": {"size": 1, "crc32": 5}}', '{"../x": 1}'])
def test_malformed_file_list_is_one_line(orbax, tmp_path, listing):
    d = _copy(orbax, tmp_path)
    (d / "params_files.json").write_text(listing)
    with pytest.raises(CheckpointError, match="params_files.json is not a list of files, sizes and checksums"):
        load_pretrained(d, progress=False)
