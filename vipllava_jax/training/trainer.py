"""`train(cfg)`: the whole fine-tuning run. Load, shard, loop, log, checkpoint, resume, export.

RUN_DIR layout: ``metrics.jsonl`` (one line per logged step) and TensorBoard events (``tb/``; see metrics.py);
``checkpoints/`` (orbax, see checkpointing.py), ``hf/`` (the final model, an HF directory; LoRA merged), for
stage lora ``adapter/`` (the same run as a PEFT adapter on the base model: `checkpoints.adapter`) and
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
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from ..checkpoints.adapter import read_adapter
from ..checkpoints.atomic import is_disk_full
from ..checkpoints.config_file import CheckpointError
from ..checkpoints.load import load_config, load_pretrained, resolve_model_path
from ..data.processor import Processor
from ..data.records import load_records
from ..models.params import flat_paths, unflatten_paths
from ..parallel.mesh import make_mesh
from ..parallel.shardings import param_logical_axes, param_shardings
from .checkpointing import DAMAGED_DIR, RunCheckpoints, abstract_like
from .config import FIELDS, DataConfig, TrainConfig
from .encoding import DataError, check_records
from .export import MARKER, export_adapter, export_hf, export_owner, read_marker
from .fingerprint import fingerprint_change, run_fingerprint
from .lora import LoraConfig, init_lora, lora_logical_axes
from .loss import IGNORE_INDEX
from .metrics import MetricsWriter
from .optim import lr_schedule, make_optimizer, split_params
from .pipeline import make_eval_iterator, make_train_iterator
from .preemption import Preemption
from .run_lock import RunInUse, RunLock
from .step import (BATCH_KEYS, StepConfig, batch_shardings, host_batch_multiple, init_state, jit_eval_step,
                   jit_train_step, make_eval_step, make_train_step, put_batch, state_shardings,
                   tree_logical_shardings)

# Settings that change what a resumed run computes: resuming with any of them changed is refused.
RESUME_KEYS = ("model", "data", "image_folder", "stage", "max_steps", "epochs", "batch_size", "grad_accum", "lr",
               "warmup_ratio", "weight_decay", "optimizer", "muon_lr", "clip_norm", "max_length", "template",
               "system_prompt", "pad_to_square", "marker_kinds", "lora_rank", "lora_alpha", "lora_targets", "dtype",
               "seed", "init_adapter", "quantize", "quantize_tile_size")


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


def check_fingerprint(saved: dict | None, now: dict, cfg: TrainConfig) -> None:
    """Refuse a resume whose data or base model changed at the same path (see fingerprint.py), unless
    force_resume (then the new fingerprint is recorded with the next checkpoint). A run saved before
    fingerprints existed is not checked."""
    if saved is None:
        _log0(f"{cfg.output}: its checkpoint has no fingerprint of the data and model (saved by an older version): "
              f"they are not checked")
        return
    change = fingerprint_change(saved, now)
    if change is None:
        return
    if not cfg.force_resume:
        raise TrainError(f"{change}; use a new --output, or --force-resume to resume anyway")
    _log0(f"--force-resume: {change}; going on (the new fingerprint is recorded with the next checkpoint)")


def _none_whole(ckpts: RunCheckpoints, damaged: list) -> str:
    steps = ", ".join(str(d) for d, _ in damaged)
    return (f"No checkpoint in {ckpts.directory} reads back whole (step(s) {steps}; step {damaged[0][0]}: "
            f"{damaged[0][1]}); move that directory away to start afresh, or use a new --output")


def _close_quietly(ckpts: RunCheckpoints) -> None:
    with contextlib.suppress(Exception):
        ckpts.close()
    gc.collect()  # orbax's leftover tasks finalized now, not at a random later collection


def _output_error(run_dir: Path, e: OSError) -> str:
    """One line for a run directory that cannot be made or locked."""
    if isinstance(e, FileExistsError) or (run_dir.exists() and not run_dir.is_dir()):
        return f"--output {run_dir} is a file, not a directory; give a directory (it is created if absent)"
    if isinstance(e, NotADirectoryError):
        p = run_dir.parent
        while not p.exists() and p != p.parent:
            p = p.parent
        return f"--output {run_dir} cannot be created: {p} is a file, not a directory"
    if isinstance(e, PermissionError):
        return f"--output {run_dir}: permission denied on {e.filename or run_dir} (cannot create or write it)"
    return f"--output {run_dir} cannot be used: {e.strerror or e}"


@contextlib.contextmanager
def _run_dir_taken(run_dir: Path):
    """Make RUN_DIR and hold its lock (process 0; the others learn the outcome) for the block; yields an
    ExitStack the block may push its own cleanups on (they run before the lock is released)."""
    with contextlib.ExitStack() as stack:
        error = None
        if jax.process_index() == 0:
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
                stack.enter_context(RunLock(run_dir))
            except RunInUse as e:
                error = str(e)
            except OSError as e:
                error = _output_error(run_dir, e)
        if jax.process_count() > 1:
            ok = multihost_utils.broadcast_one_to_all(np.array(error is None, np.int32))
            if not int(ok) and error is None:
                error = f"process 0 could not take the run directory {run_dir} (its error says why)"
        if error is not None:
            raise TrainError(error)
        yield stack


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
                                     remat_policy=cfg.remat, progress=cfg.progress and jax.process_index() == 0,
                                     quantize=cfg.quantize, quantize_tile_size=cfg.quantize_tile_size)
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
        if cfg.init_adapter:
            lora = _adapter_start(cfg, lora_cfg, params, shapes, trainable, train_psh)
            lora = jax.tree.map(lambda a, sh: jax.device_put(jnp.asarray(a, jnp.float32), sh), lora, lora_sh)
        else:
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


def _adapter_start(cfg: TrainConfig, lora_cfg: LoraConfig, params, shapes, trainable: dict, train_psh) -> dict:
    """The adapters of ``cfg.init_adapter`` (a PEFT directory) as the run's starting point, checked against the
    run's rank, alpha and targets; a projector it saves replaces the base's in ``trainable`` (in place)."""
    try:
        ad = read_adapter(cfg.init_adapter, params)
    except CheckpointError as e:
        raise TrainError(f"--init-adapter: {e}") from None
    if (ad.rank, ad.alpha, ad.targets) != (lora_cfg.rank, lora_cfg.alpha, tuple(lora_cfg.targets)):
        raise TrainError(f"--init-adapter {cfg.init_adapter} holds r={ad.rank}, lora_alpha={ad.alpha:g} on "
                         f"{','.join(ad.targets)}; this run has lora_rank={lora_cfg.rank}, lora_alpha="
                         f"{lora_cfg.alpha:g}, lora_targets={','.join(lora_cfg.targets)}: give --lora-rank {ad.rank} "
                         f"--lora-alpha {ad.alpha:g} --lora-targets {','.join(ad.targets)}")
    got = jax.tree.map(np.shape, ad.lora)
    want = jax.tree.map(lambda x: tuple(x.shape), shapes)
    if got != want:  # the same targets on every layer is checked by read_adapter; this is a last guard
        raise TrainError(f"--init-adapter {cfg.init_adapter}: its adapters do not cover this run's targets")
    flat_tr, flat_sh = flat_paths(trainable["params"]), flat_paths(train_psh)
    for path, arr in ad.modules.items():
        if path not in flat_tr:
            raise TrainError(f"--init-adapter {cfg.init_adapter}: it saves {path}, which stage lora does not train")
        flat_tr[path] = jax.device_put(jnp.asarray(arr, flat_tr[path].dtype), flat_sh[path])
    trainable["params"] = unflatten_paths(flat_tr)
    _log0(f"LoRA adapters (r={ad.rank}, alpha={ad.alpha:g}, {','.join(ad.targets)}) started from {ad.path}"
          + (f", and {', '.join(sorted({p.split('/')[0] for p in ad.modules}))}" if ad.modules else ""))
    return ad.lora


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
    """Run (or resume) a fine-tuning job. Returns a summary: steps, stopped (preempted), last metrics, paths.
    One run at a time per RUN_DIR: the run holds a lock on it (see run_lock.py) until it returns or fails."""
    run_dir = Path(cfg.output).absolute()
    with _run_dir_taken(run_dir) as stack:
        return _train(cfg, run_dir, stack)


def _train(cfg: TrainConfig, run_dir: Path, stack: contextlib.ExitStack) -> dict:
    ckpts = RunCheckpoints(run_dir / "checkpoints", keep=cfg.keep, best_metric="eval_loss" if cfg.eval_data else None)
    stack.push(lambda *exc: _close_quietly(ckpts) if exc[0] is not None else None)  # any error: orbax closed
    latest, saved, damaged = ckpts.read_newest_run()
    if damaged and latest is None:
        raise TrainError(_none_whole(ckpts, damaged))
    fingerprint = None
    if latest is not None:  # before loading any weights: a refused resume fails at once
        check_resume(saved["config"], cfg)
        fingerprint = run_fingerprint(cfg.data, cfg.eval_data, resolve_model_path(cfg.model))
        check_fingerprint(saved.get("fingerprint"), fingerprint, cfg)
    _refuse_foreign_export(run_dir)  # before loading anything: an hf/ this run may not replace fails at once
    s = setup(cfg)
    if fingerprint is None:
        fingerprint = run_fingerprint(cfg.data, cfg.eval_data, s.model_dir)
    data_state, start = None, 0
    if latest is not None:
        at, state, data_state, _, damaged = ckpts.restore_newest(abstract_like(s.abstract_state, s.state_sh))
        if at is None:
            raise TrainError(_none_whole(ckpts, damaged))
        if damaged and jax.process_index() == 0:
            warnings.warn(f"Damaged checkpoint(s) in {ckpts.directory}: "
                          + "; ".join(f"step {d} ({why})" for d, why in damaged)
                          + f"; moved to {ckpts.directory.parent / DAMAGED_DIR}; resuming from step {at}, the newest "
                            f"whole one", stacklevel=3)  # names train()'s caller
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
    saved_step = start or None  # the newest checkpoint this run has (a resumed run: the one it resumed from)
    clock = _SaveClock(cfg.save_interval_minutes)
    t0, tokens = time.perf_counter(), 0

    pending = None  # the previous step's metrics, checked after the next step is dispatched (no stall)

    def save(step, eval_loss=None, data_state=None):
        """data_state: the data position to save (default: the iterator's now, after this step's reads)."""
        nonlocal pending, saved_step
        if pending is not None:  # never save a state whose last update was not checked
            check_finite(*pending)
            pending = None
        data_state = it.get_state() if data_state is None else data_state
        ckpts.save(step, state, {"processes": gather_json(data_state)},
                   {"config": cfg.to_dict(), "step": step, "fingerprint": fingerprint},
                   metrics={"eval_loss": eval_loss} if eval_loss is not None else None)
        saved_step = step
        clock.reset()

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
                before = it.get_state()  # where the last completed step left the data
                batch, bad = _next_batch(it, cfg.grad_accum, s.batch_multiple)
                bad, due = _agree(bad, clock.due())  # the same on every process
                if bad is not None:  # a record that cannot be read: save the last completed step, then stop
                    if step > 0 and saved_step != step:
                        save(step, data_state=before)
                    ckpts.wait()
                    where = (f"the checkpoint of step {step}, the last completed, is saved in "
                             f"{ckpts.directory / str(step)}" if step > 0 else "no step was completed, no checkpoint")
                    raise TrainError(f"Cannot read the data of step {step + 1}: {bad}; {where}. Fix that (or pass "
                                     f"--skip-bad-examples to skip bad records) and run the same command again"
                                     + (" to resume" if step > 0 else ""))
                if due and saved_step != step:  # save_interval_minutes passed: save the last completed step
                    save(step, data_state=before)
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
                    why = {"SIGINT": "Ctrl-C", "SIGTERM": "SIGTERM"}.get(preempt.reason, "preemption")
                    _log0(f"Stopped at step {step} of {s.steps} ({why}); checkpoint saved in "
                          f"{ckpts.directory / str(step)}. Run the same command again to resume.")
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
    checkpoint = str(ckpts.directory / str(saved_step)) if saved_step is not None else None
    ckpts.close()
    hf_dir = run_dir / "hf"
    if not stopped:  # hf/ always holds the final step's weights; a stopped run writes no model
        _export_final(s, state, run_dir, step, fresh=step > start, checkpoint=checkpoint)
    return {"steps": step, "total_steps": s.steps, "stopped": stopped, "last": last, "run_dir": str(run_dir),
            "hf": None if stopped else str(hf_dir), "checkpoint": checkpoint,
            "stop_reason": (preempt.reason or "preemption") if stopped else None}


def _foreign_export(hf_dir: Path, run_dir: Path) -> str:
    return (f"{hf_dir} is in the way: it was not written by a run of {run_dir} (no {MARKER} naming it), and a run "
            f"never replaces what it did not write")


def _owner0(hf_dir: Path, run_dir: Path) -> list:
    """[owner, the step its marker names] as process 0 sees them (a collective: all processes call it)."""
    mine = None
    if jax.process_index() == 0:
        owner = export_owner(hf_dir, run_dir)
        mine = [owner, (read_marker(hf_dir) or {}).get("step") if owner == "ours" else None]
    return gather_json(mine)[0]


def _refuse_foreign_export(run_dir: Path) -> None:
    for out in (run_dir / "hf", run_dir / "adapter"):
        if _owner0(out, run_dir)[0] == "foreign":
            raise TrainError(f"{_foreign_export(out, run_dir)}. Move it away or use another --output; nothing was "
                             f"trained")


def _export_final(s: Setup, state, run_dir: Path, step: int, *, fresh: bool, checkpoint: str | None) -> None:
    """Write RUN_DIR/hf from the final state, atomically, unless it already holds this step's weights (a finished
    run started again, nothing trained). An hf/ this run did not write is never touched: an error."""
    hf_dir = run_dir / "hf"
    owner, at = _owner0(hf_dir, run_dir)
    if owner == "foreign":
        raise TrainError(f"{_foreign_export(hf_dir, run_dir)}, so the model was not written; the final checkpoint "
                         f"is {checkpoint}. Move it away and run the same command again to write the model")
    if owner == "ours" and not fresh and at == step:
        return
    export_hf(state, s.frozen, s.module.config, hf_dir, lora=s.step_cfg.lora, files_from=s.model_dir,
              run_dir=run_dir, step=step)
    _log0(f"Wrote {hf_dir} (the weights of step {step})")
    if s.step_cfg.lora is not None:  # also as a PEFT adapter: RUN_DIR/adapter, on the base model
        ad_dir = run_dir / "adapter"
        if _owner0(ad_dir, run_dir)[0] == "foreign":
            raise TrainError(f"{_foreign_export(ad_dir, run_dir)}, so the adapter was not written (hf/ was)")
        export_adapter(state, ad_dir, lora=s.step_cfg.lora, base_model=s.model_dir, run_dir=run_dir, step=step)
        _log0(f"Wrote {ad_dir} (a PEFT LoRA adapter of step {step} on {s.model_dir})")


_clock = time.monotonic  # the save timer's clock (tests replace it)


class _SaveClock:
    """`due()` is true once ``minutes`` passed since the last `reset()` (each save resets it). None or 0: never."""

    def __init__(self, minutes: float | None):
        self.seconds = minutes * 60 if minutes else None
        self.reset()

    def reset(self) -> None:
        self.t = _clock()

    def due(self) -> bool:
        return self.seconds is not None and _clock() - self.t >= self.seconds


def _next_batch(it, grad_accum: int, multiple: int) -> tuple[dict | None, str | None]:
    """(the next step's stacked micro-batches, None), or (None, the message) where a record cannot be read."""
    try:
        return stack_micro([next(it) for _ in range(grad_accum)], multiple), None
    except DataError as e:
        return None, str(e)


def _agree(bad: str | None, due: bool) -> tuple[str | None, bool]:
    """With several processes, one decision for all (one small collective a step): a data error on any process
    stops every one (its message, naming the process), and process 0's clock says whether a save is due."""
    if jax.process_count() == 1:
        return bad, due
    flags = np.asarray(multihost_utils.process_allgather(np.array([bad is not None, due], np.int32))).reshape(-1, 2)
    if flags[:, 0].any():
        msgs = gather_json(bad)
        i = next(i for i, msg in enumerate(msgs) if msg)
        bad = f"process {i}: {msgs[i]}"
    return bad, bool(flags[0, 1])


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
