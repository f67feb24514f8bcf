"""``vipllava-jax train``: fine-tune VipLlava on LLaVA-format conversations (see README, "Fine-tune").

    vipllava-jax train --model llava-hf/vip-llava-7b-hf --data train.json --image-folder images/ \\
        --output runs/vip --stage full --epochs 1 --batch-size 128 --grad-accum 16 --dtype bfloat16
    vipllava-jax train --config train/configs/stage2_full.yaml --model DIR --data d.json --output runs/s2

Flags override the values of --config. Running the same command again on the same --output resumes from
its latest checkpoint. At the end RUN_DIR/hf/ holds the model as an HF directory that transformers loads.
A checkpoint is saved every --save-interval-minutes (default 5) and every --save-every steps. Ctrl-C or
SIGTERM: the current step finishes, a checkpoint is saved, exit 0 (a second Ctrl-C stops at once).
Exit status: 0 done or stopped cleanly, 2 a run that cannot go on (a refused resume, a bad record, ...).
"""
from __future__ import annotations

import argparse
import sys

import jax

from ..checkpoints.adapter import adapter_targets, read_adapter_config
from ..data.prompts import TEMPLATES
from ..parallel.distributed import add_distributed_args, initialize_from_args
from ..training.config import FIELDS, TrainConfig, read_config_file
from ..training.lora import LORA_TARGETS
from ..training.optim import OPTIMIZERS, STAGES
from ..training.trainer import TrainError, train


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def register(sub) -> None:
    p = sub.add_parser("train", help="fine-tune on LLaVA-format data (projector, full or LoRA stage)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    S = argparse.SUPPRESS  # unset flags do not override --config
    p.add_argument("--config", default=None, help="YAML file of these settings (flags override it)")
    p.add_argument("--model", default=S, help="HF model directory, hub id, or orbax directory to start from")
    p.add_argument("--data", default=S, help="training data: LLaVA JSON or JSONL")
    p.add_argument("--image-folder", default=S, help="folder the records' image paths are relative to")
    p.add_argument("--output", default=S, help="run directory (checkpoints, metrics, the final hf/ model)")
    p.add_argument("--stage", choices=list(STAGES), default=S,
                   help="projector (stage 1), full (stages 2-3: projector + LM), lora (adapters + projector), "
                        "all (every part, the tower too)")
    p.add_argument("--max-steps", type=int, default=S)
    p.add_argument("--epochs", type=float, default=S)
    p.add_argument("--batch-size", type=int, default=S, help="global rows per optimizer step (default 8)")
    p.add_argument("--grad-accum", type=int, default=S, help="micro-batches per step (default 1)")
    p.add_argument("--lr", type=float, default=S, help="peak learning rate (default: the stage's)")
    p.add_argument("--warmup-ratio", type=float, default=S)
    p.add_argument("--weight-decay", type=float, default=S)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=S,
                   help="adamw (default), or muon: torch.optim.Muon (AdamW-matched RMS) on the layers' weight "
                        "matrices, AdamW on embeddings, lm_head, norms and biases")
    p.add_argument("--muon-lr", type=float, default=S, help="Muon's peak learning rate (default: --lr)")
    p.add_argument("--clip-norm", type=float, default=S)
    p.add_argument("--max-length", type=int, default=S)
    p.add_argument("--length-buckets", default=S,
                   help="comma-separated sequence lengths a batch is padded to "
                        "(default: powers of two from 64, and max_length)")
    p.add_argument("--group-by-length", type=int, default=S,
                   help="k > 1: make batches from k batches' examples sorted by length (less padding; 0: off)")
    p.add_argument("--cache-examples", type=_bool, nargs="?", const=True, default=S,
                   help="keep encoded examples (without regions) in memory across epochs: small datasets")
    p.add_argument("--template", choices=TEMPLATES, default=S)
    p.add_argument("--system-prompt", default=S, help="system text of the template (default: LLaVA's)")
    p.add_argument("--pad-to-square", type=_bool, nargs="?", const=True, default=S)
    p.add_argument("--marker-kinds", default=S, help="comma-separated visual prompt kinds to draw")
    p.add_argument("--skip-bad-examples", type=_bool, nargs="?", const=True, default=S)
    p.add_argument("--lora-rank", type=int, default=S)
    p.add_argument("--lora-alpha", type=float, default=S)
    p.add_argument("--lora-targets", default=S, help=f"comma-separated, from {','.join(LORA_TARGETS)}")
    p.add_argument("--init-adapter", default=S, metavar="DIR",
                   help="stage lora: start from this PEFT LoRA adapter (adapter_config.json + "
                        "adapter_model.safetensors); its r, lora_alpha and targets are the run's unless given")
    p.add_argument("--quantize", choices=("int8", "int4"), default=S,
                   help="keep the frozen language-model linears in int8/int4 (qwix), adapters in fp32: QLoRA with "
                        "--stage lora (add --dtype bfloat16 for bf16 compute)")
    p.add_argument("--quantize-tile-size", type=int, default=S, help="int4: input rows per scale (default 128)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=S, help="compute dtype (params stay fp32)")
    p.add_argument("--remat", choices=("none", "full", "dots", "dots_no_batch"), default=S)
    p.add_argument("--scan-layers", type=_bool, nargs="?", const=True, default=S)
    p.add_argument("--mesh", default=S, help='device mesh, e.g. "fsdp=4,tensor=2" (default: auto)')
    p.add_argument("--devices", type=int, default=S, help="use only the first N devices (one process)")
    p.add_argument("--seed", type=int, default=S)
    p.add_argument("--save-every", type=int, default=S, help="also save a checkpoint every K steps")
    p.add_argument("--save-interval-minutes", type=float, default=S,
                   help="save a checkpoint when this many minutes passed since the last one (default 5; 0: off)")
    p.add_argument("--keep", type=int, default=S, help="checkpoints to keep")
    p.add_argument("--eval-data", default=S)
    p.add_argument("--eval-every", type=int, default=S)
    p.add_argument("--log-every", type=int, default=S)
    p.add_argument("--num-workers", type=int, default=S, help="data loading processes (0: in this process)")
    p.add_argument("--skip-nonfinite", type=_bool, nargs="?", const=True, default=S)
    p.add_argument("--max-skips", type=int, default=S)
    p.add_argument("--force-resume", type=_bool, nargs="?", const=True, default=S)
    p.add_argument("--no-progress", dest="progress", action="store_false", default=S)
    add_distributed_args(p, mesh=False)
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = read_config_file(args.config) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if k in FIELDS})
    if values.get("init_adapter"):  # the adapter's LoRA settings, where the run gives none
        ad = read_adapter_config(values["init_adapter"])
        values.setdefault("lora_rank", ad["r"])
        values.setdefault("lora_alpha", float(ad["lora_alpha"]))
        if "lora_targets" not in values:
            values["lora_targets"] = adapter_targets(values["init_adapter"])
    for req in ("model", "data", "output"):
        if not values.get(req):
            raise ValueError(f"--{req} is required (on the command line or in --config)")
    return TrainConfig(**values)


def run(args: argparse.Namespace) -> int:
    initialize_from_args(args)
    cfg = config_from_args(args)
    try:
        summary = train(cfg)
    except TrainError as e:
        print(f"vipllava-jax train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C (the first one stops after the step and saves)
        print(f"vipllava-jax train: interrupted; nothing more was saved. Run the same command again to resume from "
              f"the last checkpoint in {cfg.output}/checkpoints", file=sys.stderr)
        return 130
    if jax.process_index() == 0:
        print(summary_line(summary))
    return 0


def summary_line(summary: dict) -> str:
    """The run's last line: what was written (a stopped run names its checkpoint, never a model)."""
    last = summary["last"]
    loss = f", loss {last['loss']:.4f}" if last and "loss" in last else ""
    if summary["stopped"]:
        return (f"stopped at step {summary['steps']} of {summary['total_steps']}{loss}; checkpoint: "
                f"{summary['checkpoint']}; run the same command again to resume")
    return f"done: {summary['steps']} steps{loss}; model: {summary['hf']}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="train.py")
    register(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(["train"] + list(sys.argv[1:] if argv is None else argv))
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 2
