"""`TrainConfig`: every setting of a fine-tuning run, from flags or a YAML file holding the same keys."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import yaml

from ..data.prompts import DEFAULT_SYSTEM_PROMPT
from .data import check_batching
from .lora import LORA_TARGETS
from .optim import OPTIMIZERS, STAGES

# Stage defaults from ViP-LLaVA's recipe (../shared facts): stage 1 projector lr 1e-3; stage 2 full 2e-5;
# LoRA 2e-4 (r 128, alpha 256).
DEFAULT_LR = {"projector": 1e-3, "full": 2e-5, "lora": 2e-4, "all": 1e-3}


FLOAT_FIELDS = ("epochs", "lr", "warmup_ratio", "weight_decay", "muon_lr", "clip_norm", "lora_alpha")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: str = ""
    data: str = ""
    output: str = ""
    image_folder: str | None = None
    stage: str = "full"
    max_steps: int | None = None
    epochs: float | None = None
    batch_size: int = 8  # global rows per optimizer step (per micro-batch x grad_accum)
    grad_accum: int = 1
    lr: float | None = None  # None: the stage's default
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # or "muon": torch.optim.Muon on the layers' weight matrices, AdamW on the rest
    muon_lr: float | None = None  # Muon's peak lr (None: lr); its updates have AdamW's RMS, so lr carries over
    clip_norm: float = 1.0
    max_length: int = 2048
    length_buckets: tuple[int, ...] | None = None  # None: powers of two from 64, and max_length
    group_by_length: int = 0  # k > 1: batches from k batches' examples sorted by length (less padding)
    cache_examples: bool = False  # keep encoded examples of region-free records in memory across epochs
    template: str = "llava_v1"
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    pad_to_square: bool = False
    marker_kinds: tuple[str, ...] | None = None
    skip_bad_examples: bool = False
    lora_rank: int = 128
    lora_alpha: float = 256.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    dtype: str = "float32"  # compute dtype; parameters stay fp32 master copies
    remat: str = "full"
    scan_layers: bool = True
    mesh: str = "auto"
    devices: int | None = None  # use only the first N devices (one process); None: every device
    seed: int = 0
    save_every: int | None = None
    keep: int = 3
    eval_data: str | None = None
    eval_every: int | None = None
    log_every: int = 1
    num_workers: int = 0
    skip_nonfinite: bool = False
    max_skips: int = 10
    force_resume: bool = False
    progress: bool = True

    def __post_init__(self):
        for f in FLOAT_FIELDS:  # YAML 1.1 reads "2e-3" (no dot) as a string
            v = getattr(self, f)
            if isinstance(v, str):
                try:
                    object.__setattr__(self, f, float(v))
                except ValueError:
                    raise ValueError(f"{f} must be a number, got {v!r}") from None
        for f in ("marker_kinds", "lora_targets"):
            v = getattr(self, f)
            if isinstance(v, str):
                object.__setattr__(self, f, tuple(s.strip() for s in v.split(",") if s.strip()))
            elif isinstance(v, list):
                object.__setattr__(self, f, tuple(v))
        if self.stage not in STAGES:
            raise ValueError(f"Unknown stage {self.stage!r}; choose from {list(STAGES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Unknown optimizer {self.optimizer!r}; choose from {list(OPTIMIZERS)}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        for f in ("batch_size", "grad_accum", "max_length", "log_every", "keep"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{f} must be a positive integer, got {v!r}")
        for f in ("max_steps", "save_every", "eval_every", "devices"):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{f} must be a positive integer, got {v!r}")
        if self.epochs is not None and not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ValueError(f"epochs must be a positive number, got {self.epochs!r}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}: "
                             f"each optimizer step takes grad_accum micro-batches of batch_size / grad_accum rows")
        for f in ("lr", "muon_lr"):
            v = getattr(self, f)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{f} must be a positive number, got {v!r}")
        object.__setattr__(self, "length_buckets",
                           check_batching(self.length_buckets, self.group_by_length, self.max_length))

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.stage]

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def read_config_file(path) -> dict:
    """A YAML (or JSON) file of TrainConfig keys (dashes or underscores). Unknown keys are an error."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ValueError(f"Cannot read training config {p}: {e.strerror}") from None
    try:
        d = yaml.safe_load(text) if p.suffix in (".yaml", ".yml") else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise ValueError(f"Training config {p} is not valid {'YAML' if p.suffix != '.json' else 'JSON'}: "
                         f"{str(e).splitlines()[0]}") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ValueError(f"Training config {p} must hold a mapping of settings, not a {type(d).__name__}")
    out = {}
    for k, v in d.items():
        key = str(k).replace("-", "_")
        if key not in FIELDS:
            raise ValueError(f"Training config {p}: unknown setting {k!r}; known: {sorted(FIELDS)}")
        out[key] = v
    return out
