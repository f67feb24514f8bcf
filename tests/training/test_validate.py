"""The check of every record before training (`encoding.validate_records` / `check_records`, called by
`trainer.setup`): all bad records in one error before step 1, or left out up front with skip_bad_examples."""
import json

import numpy as np
import pytest
from PIL import Image

from vipllava_jax.checkpoints.config_file import CheckpointError
from vipllava_jax.cli import main as cli_main
from vipllava_jax.training import TrainConfig, train
from vipllava_jax.training.config import DataConfig
from vipllava_jax.training.encoding import BadRecordsError, DataError, check_records, validate_records


def conv(q, a="A"):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


@pytest.fixture
def data(tmp_path):
    """8 records in tmp_path/d.json, images in tmp_path/img: #2 an <image> tag without an image, #4 a missing
    image file, #6 a NaN polygon vertex; the rest good (text only, an image, a region)."""
    folder = tmp_path / "img"
    folder.mkdir()
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(folder / "a.png")
    recs = [{"id": "t0", "conversations": conv("Q")},
            {"id": "i1", "image": "a.png", "conversations": conv("<image>\nQ")},
            {"id": "bad-tag", "conversations": conv("<image>\nQ")},
            {"id": "r3", "image": "a.png", "bboxes": [[1, 1, 20, 20]], "conversations": conv("<image>\n<bbox>?")},
            {"id": "bad-missing", "image": "gone.png", "conversations": conv("<image>\nQ")},
            {"image": "a.png", "conversations": conv("Q, no tag: one is prepended")},
            {"id": "bad-region", "image": "a.png", "segmentations": [[[2, 2, 20, float("nan"), 12, 25]]],
             "conversations": conv("<image>\n<bbox>?")},
            {"id": "t7", "conversations": conv("Q7")}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(recs))  # NaN as JSON's NaN literal, as Python's json reads it
    return path, folder, recs


BAD = {2: ("bad-tag", "1 <image> tag(s) but 0 image(s)"), 4: ("bad-missing", "image not found: "),
       6: ("bad-region", "segmentations[0] (region 0), polygon 0, has a NaN")}


def test_validate_records_finds_every_bad_record(data):
    _, folder, recs = data
    good, problems = validate_records(recs, DataConfig(), image_folder=folder)
    assert good == [r for i, r in enumerate(recs) if i not in BAD]
    assert [i for i, _ in problems] == list(BAD)
    for i, e in problems:
        assert isinstance(e, DataError) and e.record_id == BAD[i][0] and BAD[i][1] in str(e)


def test_validate_records_region_geometry_and_header_size(tmp_path):
    """Regions with no area on the (EXIF-rotated) image are found from the file header, as make_markers would
    find them once the image is decoded; an unreadable header of a region record is found too."""
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "a.png")  # 40 x 30
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: load_image makes it 30 x 40
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "r.jpg", exif=exif)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    recs = [{"id": "off", "image": "a.png", "bboxes": [[50, 1, 60, 9]], "conversations": conv("<image>\n<bbox>")},
            {"id": "on-rot", "image": "r.jpg", "bboxes": [[1, 32, 9, 39]], "conversations": conv("<image>\n<bbox>")},
            {"id": "seg-off", "image": "a.png", "segmentations": [[45, 1, 50, 1, 50, 9]],
             "conversations": conv("<image>\n<bbox>")},
            {"id": "broken", "image": "broken.png", "bboxes": [[1, 1, 9, 9]], "conversations": conv("<image>\n<bbox>")},
            {"id": "broken-no-region", "image": "broken.png", "conversations": conv("<image>\nQ")}]
    good, problems = validate_records(recs, DataConfig(), image_folder=tmp_path)
    assert [r["id"] for r in good] == ["on-rot", "broken-no-region"]  # pixels are not decoded
    msgs = {e.record_id: str(e) for _, e in problems}
    assert "has no area on the 40x30 image" in msgs["off"] and "no area" in msgs["seg-off"]
    assert "cannot read image" in msgs["broken"]


def test_check_records_one_error_or_skip_with_one_log_line(data):
    path, folder, recs = data
    with pytest.raises(BadRecordsError) as e:
        check_records(recs, DataConfig(), image_folder=folder, source=str(path))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"3 bad record(s) of 8 in {path}") and "--skip-bad-examples" in msg
    assert all(f"#{i} record '{rid}': {what}" in msg for i, (rid, what) in BAD.items())
    assert isinstance(e.value, ValueError) and [i for i, _ in e.value.problems] == list(BAD)
    many = [{"id": f"x{i}", "conversations": conv("<image>\nQ")} for i in range(25)] + recs[:1]
    with pytest.raises(BadRecordsError, match=r"#19 record 'x19'.*; and 5 more$") as e:
        check_records(many, DataConfig(), source="m.json")
    assert "x20" not in str(e.value)
    lines = []
    good = check_records(recs, DataConfig(skip_bad_examples=True), image_folder=folder, source="d.json",
                         log=lines.append)
    assert len(good) == 5 and len(lines) == 1 and lines[0].startswith("Left out 3 bad record(s) of 8 in d.json")
    with pytest.raises(BadRecordsError, match="all 1 record"):
        check_records(recs[2:3], DataConfig(skip_bad_examples=True), source="d.json")


def test_train_fails_before_step_1_naming_every_bad_record(data, tmp_path, capsys):
    """Before any weight is loaded (the model path here does not even exist) and before any checkpoint; from
    the CLI, one line and exit status 2."""
    path, folder, recs = data
    out = tmp_path / "run"
    cfg = TrainConfig(model=str(tmp_path / "no-model"), data=str(path), image_folder=str(folder), output=str(out),
                      max_steps=3, batch_size=2, progress=False)
    with pytest.raises(BadRecordsError, match="3 bad record"):
        train(cfg)
    assert not list(out.glob("checkpoints/*")) and not (out / "train_config.json").exists()
    assert cli_main(["train", "--model", str(tmp_path / "no-model"), "--data", str(path), "--image-folder",
                     str(folder), "--output", str(out), "--max-steps", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "3 bad record(s) of 8" in err[0] and all(rid in err[0] for rid, _ in BAD.values())
    # skip_bad_examples: the check passes with one log line, and the run goes on (here to the missing model).
    with pytest.raises(CheckpointError, match="no-model does not exist"):
        train(cfg.replace(skip_bad_examples=True))
    assert "Left out 3 bad record(s) of 8" in capsys.readouterr().out
    # The eval data is checked too.
    good, bad_eval = tmp_path / "good.json", tmp_path / "eval.json"
    good.write_text(json.dumps([r for i, r in enumerate(recs) if i not in BAD]))
    bad_eval.write_text(json.dumps([{"id": "e0", "conversations": conv("<image>\nQ")}, recs[0]]))
    with pytest.raises(BadRecordsError, match=r"1 bad record\(s\) of 2 in .*eval.json.*'e0'"):
        train(cfg.replace(data=str(good), eval_data=str(bad_eval)))
