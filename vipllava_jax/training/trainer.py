"""`train(cfg)`: the whole fine-tuning run. Load, shard, loop, log, checkpoint, resume, export.

RUN_DIR layout: ``metrics.jsonl`` (one line per logged step) and TensorBoard events (``tb/``; see metrics.py);
``checkpoints/`` (orbax, see checkpointing.py), ``hf/`` (the final model, an HF directory) and
``train_config.json``. Running the same command again on the same RUN_DIR resumes from the latest checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from ..checkpoints.atomic import is_disk_full
from ..checkpoints.load import load_config, load_pretrained, resolve_model_path
from ..data.processor import Processor
from ..data.records import load_records
from ..parallel.mesh import make_mesh
from ..parallel.shardings import param_logical_axes, param_shardings
from .checkpointing import RunCheckpoints, abstract_like
from .config import FIELDS, DataConfig, TrainConfig
from .encoding import check_records
from .export import export_hf
from .lora import LoraConfig, init_lora, lora_logical_axes
from .loss import IGNORE_INDEX
from .metrics import MetricsWriter
from .optim import lr_schedule, make_optimizer, split_params
from .pipeline import make_eval_iterator, make_train_iterator
from .preemption import Preemption
from .step import (BATCH_KEYS, StepConfig, batch_shardings, host_batch_multiple, init_state, jit_eval_step,
                   jit_train_step, make_eval_step, make_train_step, put_batch, state_shardings,
                   tree_logical_shardings)

# Settings that change what a resumed run computes: resuming with any of them changed is refused.
RESUME_KEYS = ("model", "data", "image_folder", "stage", "max_steps", "epochs", "batch_size", "grad_accum", "lr",
               "warmup_ratio", "weight_decay", "optimizer", "muon_lr", "clip_norm", "max_length", "template",
               "system_prompt", "pad_to_square", "marker_kinds", "lora_rank", "lora_alpha", "lora_targets", "dtype",
               "seed")


class TrainError(RuntimeError):
    """A run that cannot go on: the message says why, in one line."""


def _log0(msg: str) -> None:
    if jax.process_index() == 0:
        tqdm.write(msg)


def total_steps(cfg: TrainConfig, n_records: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    if cfg.epochs is None:
        raise TrainError("Give max_steps (--max-steps) or epochs (--epochs)")
    return max(1, math.ceil(cfg.epochs * n_records / cfg.batch_size))


def check_resume(saved: dict, cfg: TrainConfig) -> None:
    now = cfg.to_dict()
    was = {k: saved.get(k, FIELDS[k].default) for k in RESUME_KEYS}  # a key saved before it existed: its default
    diffs = [k for k in RESUME_KEYS if was[k] != now.get(k)]
    if diffs and not cfg.force_resume:
        k = diffs[0]
        raise TrainError(f"{cfg.output} holds a run with {k}={was[k]!r}, but this run has {k}={now.get(k)!r} "
                         f"({len(diffs)} setting(s) differ: {', '.join(diffs)}); use a new --output, or "
                         f"--force-resume to resume anyway")


def gather_json(obj) -> list:
    """Every process's JSON-able ``obj``, in process order (a collective: all processes call it)."""
    if jax.process_count() == 1:
        return [obj]
    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    lens = np.asarray(multihost_utils.process_allgather(np.array([raw.size], np.int64))).reshape(-1)
    buf = np.zeros(int(lens.max()), np.uint8)
    buf[:raw.size] = raw
    got = np.asarray(multihost_utils.process_allgather(buf))
    return [json.loads(bytes(got[i, :int(n)]).decode()) for i, n in enumerate(lens)]


def stack_micro(batches: list[dict], multiple: int = 1) -> dict:
    """A micro-batches -> one dict of [A, ...] arrays (the train step's input): length and image count padded
    to the largest, rows and images to a multiple of ``multiple`` (this host's share of the devices the batch
    is split over). Padding rows are fully masked with labels -100 and padding images zero and marked
    invalid, so they change no loss and no gradient."""
    t = max(b["input_ids"].shape[1] for b in batches)
    rows = -(-max(b["input_ids"].shape[0] for b in batches) // multiple) * multiple
    n_img = max(b["pixel_values"].shape[0] for b in batches)
    n_img = -(-n_img // multiple) * multiple
    out: dict[str, list] = {k: [] for k in BATCH_KEYS}
    for b in batches:
        dt, di = t - b["input_ids"].shape[1], n_img - b["pixel_values"].shape[0]
        dr = rows - b["input_ids"].shape[0]
        out["input_ids"].append(np.pad(b["input_ids"], ((0, dr), (0, dt))))
        out["attention_mask"].append(np.pad(b["attention_mask"], ((0, dr), (0, dt))))
        out["labels"].append(np.pad(b["labels"], ((0, dr), (0, dt)), constant_values=IGNORE_INDEX))
        out["pixel_values"].append(np.pad(b["pixel_values"], ((0, di),) + ((0, 0),) * 3))
        out["image_valid"].append(np.pad(b["image_valid"], (0, di)))
    return {k: np.stack(v) for k, v in out.items()}


@dataclasses.dataclass
class Setup:
    """What the loop needs, built once: the model, what trains, shardings, optimizer and data settings."""
    module: object
    model_dir: Path
    mesh: object
    processor: Processor
    data_cfg: DataConfig
    records: list
    steps: int
    frozen: dict
    frozen_sh: dict
    init_state: object  # () -> the fresh TrainState, on its shardings (not built when a run resumes)
    state_sh: object
    abstract_state: object
    tx: object
    step_cfg: StepConfig
    batch_multiple: int


def setup(cfg: TrainConfig) -> Setup:
    # Every record checked before anything is loaded (structure, <image> tags, regions, that the images exist):
    # a bad record is found now, all of them in one error, not at some step of the run.
    show = cfg.progress and jax.process_index() == 0
    records = check_records(load_records(cfg.data), cfg.data_config(), image_folder=cfg.image_folder,
                            source=cfg.data, progress=show, log=_log0)
    if cfg.eval_data:  # checked here; train() loads it again (bad ones skipped there with skip_bad_examples)
        check_records(load_records(cfg.eval_data), cfg.data_config(), image_folder=cfg.image_folder,
                      source=cfg.eval_data, progress=show, log=_log0)
    model_dir = resolve_model_path(cfg.model)
    devices = None
    if cfg.devices is not None:
        if jax.process_count() > 1 or cfg.devices > jax.device_count():
            raise TrainError(f"devices={cfg.devices}: give at most the {jax.device_count()} devices of one process")
        devices = jax.devices()[:cfg.devices]
    mesh = make_mesh(cfg.mesh, load_config(model_dir), devices=devices)
    module, params = load_pretrained(model_dir, jnp.float32, mesh=mesh, scan_layers=cfg.scan_layers,
                                     remat_policy=cfg.remat, progress=cfg.progress and jax.process_index() == 0)
    if cfg.dtype == "bfloat16":  # fp32 master parameters, bf16 compute
        module = module.clone(dtype=jnp.bfloat16)
    processor = Processor.from_pretrained(model_dir)
    data_cfg = cfg.data_config(module.config, processor)
    steps = total_steps(cfg, len(records))
    if cfg.micro_batch_size % jax.process_count():
        raise TrainError(f"batch_size / grad_accum = {cfg.micro_batch_size} rows is not divisible by the "
                         f"{jax.process_count()} processes")

    trainable_params, frozen = split_params(params, cfg.stage)
    psh = param_shardings(module.config, mesh, scan_layers=module.runtime.scan_layers)
    train_psh, frozen_sh = split_params(psh, cfg.stage)
    lora_cfg = None
    trainable, trainable_sh = {"params": trainable_params, "lora": {}}, {"params": train_psh, "lora": {}}
    if cfg.stage == "lora":
        lora_cfg = LoraConfig(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        axes = param_logical_axes(module.config, scan_layers=module.runtime.scan_layers)
        shapes = jax.eval_shape(lambda k: init_lora(frozen, lora_cfg, k), jax.random.key(0))
        lora_sh = tree_logical_shardings(lora_logical_axes(axes, shapes), mesh)
        lora = jax.jit(lambda k: init_lora(frozen, lora_cfg, k), out_shardings=lora_sh)(jax.random.key(cfg.seed))
        trainable["lora"], trainable_sh["lora"] = lora, lora_sh
    tx = make_optimizer(cfg.learning_rate, steps, warmup_ratio=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
                        clip_norm=cfg.clip_norm, optimizer=cfg.optimizer, muon_lr=cfg.muon_lr)
    abstract = jax.eval_shape(lambda t: init_state(t, tx), trainable)
    state_sh = state_shardings(abstract, trainable_sh, mesh)
    fresh = lambda: jax.jit(lambda t: init_state(t, tx), out_shardings=state_sh)(trainable)  # noqa: E731
    return Setup(module=module, model_dir=model_dir, mesh=mesh, processor=processor, data_cfg=data_cfg,
                 records=records, steps=steps, frozen=frozen, frozen_sh=frozen_sh, init_state=fresh,
                 state_sh=state_sh,
                 abstract_state=abstract, tx=tx, batch_multiple=host_batch_multiple(mesh),
                 step_cfg=StepConfig(lora=lora_cfg, skip_nonfinite=cfg.skip_nonfinite))


class CompiledSteps:
    """The jitted train / eval step per batch shape (lengths and image counts are bucketed: a few shapes)."""

    def __init__(self, s: Setup):
        self.s = s
        self._train: dict = {}
        self._eval: dict = {}

    def _get(self, cache, make, batch):
        shapes = {k: v.shape for k, v in batch.items()}
        key = tuple(sorted(shapes.items()))
        if key not in cache:
            bsh = batch_shardings(shapes, self.s.mesh)
            cache[key] = (make(bsh), bsh)
        return cache[key]

    def train(self, state, batch):
        s = self.s
        fn, bsh = self._get(self._train, lambda bsh: jit_train_step(
            make_train_step(s.module, s.tx, s.step_cfg), s.mesh, s.state_sh, s.frozen_sh, bsh), batch)
        return fn(state, s.frozen, put_batch(batch, bsh))

    def eval(self, state, batch):
        s = self.s
        fn, bsh = self._get(self._eval, lambda bsh: jit_eval_step(
            make_eval_step(s.module, s.step_cfg), s.mesh, s.state_sh, s.frozen_sh, bsh), batch)
        return fn(state, s.frozen, put_batch(batch, bsh))


def evaluate(cfg: TrainConfig, s: Setup, steps: CompiledSteps, state, records) -> float:
    """Mean next-token loss over every supervised token of the eval records."""
    it = make_eval_iterator(records, s.processor, s.data_cfg, image_folder=cfg.image_folder,
                                     batch_size=cfg.micro_batch_size // jax.process_count(),
                                     shard_index=jax.process_index(), shard_count=jax.process_count())
    total, count = 0.0, 0
    with it:
        for b in it:
            out = steps.eval(state, stack_micro([b], s.batch_multiple))
            total += float(out["nll_sum"])
            count += int(out["num_tokens"])
    return total / max(count, 1)


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) a fine-tuning job. Returns a summary: steps, stopped (preempted), last metrics, paths."""
    run_dir = Path(cfg.output).absolute()
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    ckpts = RunCheckpoints(run_dir / "checkpoints", keep=cfg.keep, best_metric="eval_loss" if cfg.eval_data else None)
    latest = ckpts.latest_step()
    if latest is not None:  # before loading any weights: a refused resume fails at once
        check_resume(ckpts.read_run(latest)["config"], cfg)
    s = setup(cfg)
    data_state, start = None, 0
    if latest is not None:
        state, data_state, _ = ckpts.restore(latest, abstract_like(s.abstract_state, s.state_sh))
        start = int(state.step)
        _log0(f"Resuming {run_dir} from step {start}")
    else:
        state = s.init_state()
        if jax.process_index() == 0:
            (run_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    it = make_train_iterator(s.records, s.processor, s.data_cfg, image_folder=cfg.image_folder,
                                      batch_size=cfg.micro_batch_size // jax.process_count(),
                                      shard_index=jax.process_index(), shard_count=jax.process_count(),
                                      num_workers=cfg.num_workers)
    if data_state is not None:
        states = data_state.get("processes", [])
        if len(states) == jax.process_count():
            it.set_state(states[jax.process_index()])
        else:  # saved by another number of processes: the global stream is the same, skip what was consumed
            _log0(f"The checkpoint's data position was saved by {len(states)} process(es), this run has "
                  f"{jax.process_count()}: skipping the {start * cfg.grad_accum} micro-batches already trained on")
            for _ in range(start * cfg.grad_accum):
                next(it)
    eval_records = load_records(cfg.eval_data) if cfg.eval_data else None
    steps = CompiledSteps(s)
    lr_at = lr_schedule(cfg.learning_rate, s.steps, cfg.warmup_ratio)
    writer = MetricsWriter(run_dir, start)
    preempt = Preemption()
    bar = tqdm(total=s.steps, initial=start, desc=f"train ({cfg.stage})", dynamic_ncols=True,
               disable=not cfg.progress or jax.process_index() != 0)
    step, last, stopped = start, {}, False
    t0, tokens = time.perf_counter(), 0

    pending = None  # the previous step's metrics, checked after the next step is dispatched (no stall)

    def save(step, eval_loss=None):
        nonlocal pending
        if pending is not None:  # never save a state whose last update was not checked
            check_finite(*pending)
            pending = None
        ckpts.save(step, state, {"processes": gather_json(it.get_state())}, {"config": cfg.to_dict(), "step": step},
                   metrics={"eval_loss": eval_loss} if eval_loss is not None else None)

    def check_finite(at: int, m) -> None:
        """Non-finite loss or gradient at step ``at``: an error, or (skip_nonfinite) skipped up to max_skips."""
        if bool(m["finite"]):
            return
        where = f"at step {at} (loss {float(m['loss'])}, grad norm {float(m['grad_norm'])})"
        if not cfg.skip_nonfinite:
            raise TrainError(f"Non-finite loss or gradient {where}; last good checkpoint: {_last_ckpt(ckpts)}")
        _log0(f"Skipped the update of step {at}: non-finite loss or gradient")
        if int(m["nonfinite_run"]) >= cfg.max_skips:
            raise TrainError(f"{int(m['nonfinite_run'])} non-finite steps in a row, the last {where}; last good "
                             f"checkpoint: {_last_ckpt(ckpts)}")

    with _orbax_failures_collected(ckpts):
        try:
            while step < s.steps:
                batch = stack_micro([next(it) for _ in range(cfg.grad_accum)], s.batch_multiple)
                state, m = steps.train(state, batch)
                step += 1
                if pending is not None:
                    check_finite(*pending)
                pending = (step, m)
                tokens += int(batch["attention_mask"].sum()) * jax.process_count()
                if step % cfg.log_every == 0 or step == s.steps:
                    m = jax.device_get(m)
                    check_finite(step, m)
                    pending = None
                    dt = time.perf_counter() - t0
                    stats = it.stats()
                    last = {"step": step, "loss": float(m["loss"]), "lr": float(lr_at(step - 1)),
                            "grad_norm": float(m["grad_norm"]), "tokens_per_s": tokens / max(dt, 1e-9),
                            "examples_seen": int(stats["examples"]) * jax.process_count(),
                            "dropped_examples": int(stats["dropped"]) * jax.process_count(),
                            "skipped_steps": int(m["skipped_total"])}
                    writer.write(last)
                    bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}",
                                    tok_s=f"{last['tokens_per_s']:.0f}")
                    t0, tokens = time.perf_counter(), 0
                bar.update(1)
                eval_loss = None
                if eval_records is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == s.steps):
                    eval_loss = evaluate(cfg, s, steps, state, eval_records)
                    writer.write({"step": step, "eval_loss": eval_loss})
                    _log0(f"step {step}: eval loss {eval_loss:.4f}")
                if preempt.should_stop(step):
                    save(step, eval_loss)
                    stopped = True
                    _log0(f"Stopped at step {step} of {s.steps} (preemption); checkpoint saved in {ckpts.directory}. "
                          f"Run the same command again to resume.")
                    break
                if (cfg.save_every and step % cfg.save_every == 0) or step == s.steps:
                    save(step, eval_loss)
        except Exception as e:  # noqa: BLE001 - re-raised unless it is a full disk
            if not is_disk_full(e):
                raise
            with contextlib.suppress(Exception):
                ckpts.wait()
            raise TrainError(f"Disk full while writing to {run_dir} at step {step}; the last whole checkpoint is "
                             f"{_last_ckpt(ckpts)}. Free space and run the same command again to resume "
                             f"from it") from None
        finally:
            bar.close()
            preempt.close()
            it.close()
            with contextlib.suppress(OSError):
                writer.close()
        try:
            ckpts.wait()
        except Exception as e:  # noqa: BLE001
            if not is_disk_full(e):
                raise
            raise TrainError(f"Disk full while saving the checkpoint of step {step} in {ckpts.directory}; the last "
                             f"whole checkpoint is {_last_ckpt(ckpts)}. Free space and run the same command again to "
                             f"resume from it") from None
    hf_dir = run_dir / "hf"
    if not stopped and not hf_dir.exists():
        export_hf(state, s.frozen, s.module.config, hf_dir, lora=s.step_cfg.lora, files_from=s.model_dir)
        _log0(f"Wrote {hf_dir}")
    ckpts.close()
    return {"steps": step, "stopped": stopped, "last": last, "run_dir": str(run_dir), "hf": str(hf_dir)}


@contextlib.contextmanager
def _orbax_failures_collected(ckpts: RunCheckpoints):
    """Mute asyncio's "Task exception was never retrieved" (orbax's failed asynchronous writes log it) for the
    block. If the block fails, close the checkpoint manager and collect those tasks here, while muted, not at some
    later collection (Python 3.11 formatting their tracebacks inside a running ``ast.parse`` breaks that parse)."""
    log = logging.getLogger("asyncio")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            ckpts.close()
        gc.collect()
        raise
    finally:
        log.setLevel(level)


def _last_ckpt(ckpts: RunCheckpoints) -> str:
    s = ckpts.latest_step()
    return str(ckpts.directory / str(s)) if s is not None else "none (no checkpoint yet)"
