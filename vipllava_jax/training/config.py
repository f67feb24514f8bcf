"""The settings of fine-tuning: `TrainConfig`, every setting of a run, from flags or a YAML file holding the same
keys, and `DataConfig`, those of the data pipeline (`TrainConfig.data_config` builds it for a run).

The settings both hold are defined once, in `DataSettings`, which both extend: a run's YAML keys, flags and saved
``train_config.json`` stay flat.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import yaml

from ..data import visual_prompts as vp
from ..data.prompts import DEFAULT_SYSTEM_PROMPT, check_template
from .lora import LORA_TARGETS
from .optim import OPTIMIZERS, STAGES

# Stage defaults from ViP-LLaVA's recipe (../shared facts): stage 1 projector lr 1e-3; stage 2 full 2e-5;
# LoRA 2e-4 (r 128, alpha 256).
DEFAULT_LR = {"projector": 1e-3, "full": 2e-5, "lora": 2e-4, "all": 1e-3}


FLOAT_FIELDS = ("epochs", "lr", "warmup_ratio", "weight_decay", "muon_lr", "clip_norm", "lora_alpha",
                "save_interval_minutes")


def _as_tuple(v):
    """A comma-separated string (the CLI's form) or a list -> a tuple; None stays None."""
    if isinstance(v, str):
        v = [s.strip() for s in v.split(",") if s.strip()]
    return tuple(v) if v is not None else None


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """The data settings a run sets (`TrainConfig`) and the data pipeline reads (`DataConfig`).

    max_length: longest sequence in tokens (image tokens included); longer examples are truncated or dropped.
    length_buckets: the T values a batch can take (None: powers of two from 64, and max_length).
    group_by_length: k > 1 reads k batches' examples at a time (a run of the shuffled stream), sorts them by
      length and yields them as k batches in a seeded order (Hugging Face's group_by_length with mega-batches):
      rows of a batch have similar lengths, so with fine `length_buckets` far less of T is padding. Batches
      then mix less across lengths. 0 or 1: off. make_eval_iterator never groups.
    cache_examples: keep each record's encoded example (ids, labels, preprocessed images) in memory after its
      first encoding and reuse it in later epochs. Only records without regions are kept (their markers are
      drawn afresh each epoch), so a kept example is exactly what encoding the record again would give. For
      small datasets trained over many epochs: it costs the float32 images' memory (3 x H x W x 4 bytes each,
      in every worker process that encodes the record). make_eval_iterator never caches.
    template: "llava_v1" (training default) or "llava_v0".
    system_prompt: the system text of the template.
    pad_to_square: pad images to a square with the CLIP mean colour (the original training) instead of HF's
      centre crop.
    marker_kinds: kinds to draw for region records (None: all eight); a record's own "marker_kinds" wins.
    skip_bad_examples: count and skip a `DataError` record instead of raising.
    seed: shuffling and marker draws (and a run's LoRA initialisation).
    """
    max_length: int = 2048
    length_buckets: tuple[int, ...] | None = None
    group_by_length: int = 0
    cache_examples: bool = False
    template: str = "llava_v1"
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    pad_to_square: bool = False
    marker_kinds: tuple[str, ...] | None = None
    skip_bad_examples: bool = False
    seed: int = 0

    def __post_init__(self):
        """Check the batching settings; length_buckets and marker_kinds may be comma-separated strings (the
        CLI's form) or lists, and become tuples."""
        buckets = self.length_buckets
        if isinstance(buckets, str):
            buckets = [x.strip() for x in buckets.split(",") if x.strip()]
            buckets = [int(x) if x.isdigit() else x for x in buckets]
        if buckets is not None:
            buckets = tuple(buckets)
            bad = [b for b in buckets if not isinstance(b, int) or isinstance(b, bool) or b < 1]
            if bad or not buckets:
                raise ValueError(f"length_buckets must be positive integers, got {list(buckets)}")
            if max(buckets) < self.max_length:
                raise ValueError(f"length_buckets {list(buckets)} must reach max_length {self.max_length}")
        g = self.group_by_length
        if not isinstance(g, int) or isinstance(g, bool) or g < 0:
            raise ValueError(f"group_by_length must be a non-negative integer, got {g!r}")
        object.__setattr__(self, "length_buckets", buckets)
        object.__setattr__(self, "marker_kinds", _as_tuple(self.marker_kinds))


def _default_length_buckets(max_length: int) -> tuple[int, ...]:
    out = {max_length}
    b = 64
    while b < max_length:
        out.add(b)
        b *= 2
    return tuple(sorted(out))


def _default_image_buckets(max_images: int) -> tuple[int, ...]:
    out = {max(1, max_images)}
    b = 1
    while b < max_images:
        out.add(b)
        b *= 2
    return tuple(sorted(out))


@dataclasses.dataclass(frozen=True)
class DataConfig(DataSettings):
    """Settings of the training data: `DataSettings` and the pipeline's own. None fields are filled from the
    processor by `resolve(processor)`.

    image_seq_length / image_token_index / pad_token_id: tokens per image, the image token id, the pad id.
    batch_size: rows per batch (per host).
    max_images_per_example: more is a `DataError`. Sets the default image buckets.
    image_buckets: the I values (None: powers of two up to batch_size * max_images_per_example, and that).
    check_tokenization: compare the piecewise ids with whole-string tokenization (a mismatch is a DataError).
    shuffle: shuffle the records (per epoch, seeded); make_eval_iterator never shuffles.
    """
    image_seq_length: int | None = None
    image_token_index: int | None = None
    pad_token_id: int | None = None
    batch_size: int = 8
    max_images_per_example: int = 4
    image_buckets: tuple[int, ...] | None = None
    check_tokenization: bool = True
    shuffle: bool = True

    def __post_init__(self):
        check_template(self.template)
        super().__post_init__()
        object.__setattr__(self, "image_buckets", _as_tuple(self.image_buckets))
        if self.marker_kinds is not None:
            bad = [k for k in self.marker_kinds if k not in vp.MARKER_KINDS]
            if bad or not self.marker_kinds:
                raise ValueError(f"unknown marker kinds {bad or '(none given)'}: use {', '.join(vp.MARKER_KINDS)}")
        if self.max_length < 1 or self.batch_size < 1 or self.max_images_per_example < 0:
            raise ValueError("max_length and batch_size must be >= 1, max_images_per_example >= 0")

    def resolve(self, processor) -> "DataConfig":
        """Fill the None ids / lengths from a `vipllava_jax.data.Processor` (checked against it)."""
        kw = {}
        if self.image_seq_length is None:
            if processor.image_seq_length is None:
                raise ValueError("the processor's image token count depends on the image size: set image_seq_length")
            kw["image_seq_length"] = int(processor.image_seq_length)
        if self.image_token_index is None:
            kw["image_token_index"] = int(processor.image_token_id)
        elif self.image_token_index != processor.image_token_id:
            raise ValueError(f"image_token_index {self.image_token_index} != the tokenizer's "
                             f"{processor.image_token!r} id {processor.image_token_id}")
        if self.pad_token_id is None:
            pad = processor.pad_token_id
            if pad is None:
                raise ValueError("the tokenizer has no pad token: set DataConfig.pad_token_id")
            kw["pad_token_id"] = int(pad)
        return dataclasses.replace(self, **kw) if kw else self

    @property
    def lengths(self) -> tuple[int, ...]:
        return self.length_buckets or _default_length_buckets(self.max_length)

    def images_buckets(self, batch_size: int | None = None) -> tuple[int, ...]:
        if self.image_buckets:
            return self.image_buckets
        return _default_image_buckets((batch_size or self.batch_size) * self.max_images_per_example)


@dataclasses.dataclass(frozen=True)
class TrainConfig(DataSettings):
    """Every setting of a fine-tuning run: `DataSettings` and the run's own (flat: one YAML key / flag each)."""
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
    lora_rank: int = 128
    lora_alpha: float = 256.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    init_adapter: str | None = None  # a PEFT LoRA adapter directory to start the adapters (and projector) from
    quantize: str | None = None  # "int8" / "int4": the frozen language-model linears quantized (QLoRA)
    quantize_tile_size: int = 128  # int4: input rows per scale
    dtype: str = "float32"  # compute dtype; parameters stay fp32 master copies
    remat: str = "full"
    scan_layers: bool = True
    mesh: str = "auto"
    devices: int | None = None  # use only the first N devices (one process); None: every device
    save_every: int | None = None  # also save every K steps (None: only on time, at a stop and at the end)
    # save when this many minutes passed since the last save (0 or None: only on steps); either trigger saves
    save_interval_minutes: float | None = 5.0
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
        object.__setattr__(self, "lora_targets", _as_tuple(self.lora_targets))
        if self.stage not in STAGES:
            raise ValueError(f"Unknown stage {self.stage!r}; choose from {list(STAGES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Unknown optimizer {self.optimizer!r}; choose from {list(OPTIMIZERS)}")
        if self.quantize is not None and self.quantize not in ("int8", "int4"):
            raise ValueError(f"quantize must be int8 or int4 (or unset), got {self.quantize!r}")
        if self.quantize is not None and self.stage in ("full", "all"):
            raise ValueError(f"quantize={self.quantize} keeps the language model's weights frozen in {self.quantize}: "
                             f"use stage lora (QLoRA) or projector, not {self.stage}")
        if self.init_adapter is not None and self.stage != "lora":
            raise ValueError(f"init_adapter starts LoRA adapters: it needs stage lora, not {self.stage}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        for f in ("batch_size", "grad_accum", "max_length", "log_every", "keep", "quantize_tile_size"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{f} must be a positive integer, got {v!r}")
        for f in ("max_steps", "save_every", "eval_every", "devices"):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{f} must be a positive integer, got {v!r}")
        v = self.save_interval_minutes
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                              or not (v >= 0 and math.isfinite(v))):
            raise ValueError(f"save_interval_minutes must be a non-negative number (0: off), got {v!r}")
        if self.epochs is not None and not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ValueError(f"epochs must be a positive number, got {self.epochs!r}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}: "
                             f"each optimizer step takes grad_accum micro-batches of batch_size / grad_accum rows")
        for f in ("lr", "muon_lr"):
            v = getattr(self, f)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{f} must be a positive number, got {v!r}")
        super().__post_init__()

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.stage]

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum

    def data_config(self, model_cfg=None, processor=None) -> DataConfig:
        """This run's `DataConfig`: its `DataSettings`, micro_batch_size rows per batch, and the image token and
        pad ids of `model_cfg` (a VipLlavaConfig) where it has them; resolved against `processor` if given."""
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(DataSettings)}
        kw["batch_size"] = self.micro_batch_size  # rows per micro-batch, not per optimizer step
        for k in ("image_token_index", "pad_token_id"):
            v = getattr(model_cfg, k, None)
            if v is not None:
                kw[k] = int(v)
        cfg = DataConfig(**kw)
        return cfg.resolve(processor) if processor is not None else cfg

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
