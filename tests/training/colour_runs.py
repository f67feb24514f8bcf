"""What the training-run tests share: a tiny colour dataset and a TrainConfig as `vipllava-jax train` flags."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}


def write_dataset(root: Path, n: int = 16, seed: int = 0) -> Path:
    """n records under ``root``: a coloured 14 px square at a seeded place on a grey 30 px image ("images/<i>.png"),
    'Colour?' -> the colour's name; returns root/train.json."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    recs = []
    for i in range(n):
        name = list(COLORS)[i % len(COLORS)]
        a = np.full((30, 30, 3), 128, np.uint8)
        x, y = rng.integers(0, 15, 2)
        a[y:y + 14, x:x + 14] = COLORS[name]
        Image.fromarray(a).save(root / "images" / f"{i}.png")
        recs.append({"id": f"r{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": name}]})
    path = root / "train.json"
    path.write_text(json.dumps(recs))
    return path


def cli_args(cfg) -> list[str]:
    """A TrainConfig as the flags of `vipllava-jax train` / train/train.py (unset fields left out)."""
    args = []
    for k, v in cfg.to_dict().items():
        if k in ("progress", "force_resume", "lora_targets", "marker_kinds") or v is None:
            continue
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args + ["--no-progress"]
