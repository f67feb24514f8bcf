"""``vipllava-jax eval``: greedy answers for a dataset, a local score, and ViP-Bench's answer files.

    vipllava-jax eval --model DIR --data val.json --image-folder images/ --output answers.jsonl --metric exact
    vipllava-jax eval --model DIR --data vip-bench/bbox/questions.jsonl --image-folder vip-bench/bbox/images \\
        --output bbox_answers.jsonl --metric contains --vipbench-results bbox_results.json

--data is training-format records (question: the first human turn, ground truth: the first gpt turn) or a
ViP-Bench question file (ground truth from vip-bench-meta-data.json beside it, or --meta). The answers file has
the keys ViP-LLaVA's model_vqa.py writes; --vipbench-results writes the {"v1_<id>": answer} JSON ViP-Bench's
GPT-4 grader reads. `contains` honours ViP-Bench's <AND> / <OR>.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from ..checkpoints.load import load_config, load_pretrained, resolve_model_path
from ..data.processor import Processor
from ..data.prompts import DEFAULT_SYSTEM_PROMPT, TEMPLATES
from ..evals.evaluation import (METRICS, check_output_path, check_unique_question_ids, evaluate, load_eval_records,
                                write_answers, write_vipbench_results)
from ..parallel.distributed import add_distributed_args, initialize_from_args, is_main_process, mesh_from_args
from .common import DEFAULT_CACHE_DIR, DTYPES, auto_dtype, enable_compilation_cache, add_quantize_args, quantize_kwargs


def register(sub) -> None:
    p = sub.add_parser("eval", help="batched greedy evaluation on a dataset or ViP-Bench questions",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF model directory, hub id, or orbax directory")
    p.add_argument("--no-verify", action="store_true",
                   help="orbax directory: skip checking each file's checksum before loading (faster; a file "
                        "damaged in place then loads as weights)")
    add_quantize_args(p)
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a PEFT LoRA adapter directory (RUN_DIR/adapter, or one saved by peft) merged into the model")
    p.add_argument("--data", required=True, help="training-format JSON/JSONL or a ViP-Bench questions file")
    p.add_argument("--image-folder", default=None, help="folder the records' image paths are relative to")
    p.add_argument("--output", required=True, help="answers file to write (JSONL, model_vqa's keys)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--metric", choices=METRICS, default="exact")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--prompt-style", choices=TEMPLATES, default="llava_v1",
                   help="llava_v1 (ViP-LLaVA's training and ViP-Bench template, default) or llava_v0")
    p.add_argument("--system", default=None, help="system text (default: LLaVA's)")
    p.add_argument("--meta", default=None, help="ViP-Bench's vip-bench-meta-data.json (found beside --data if "
                                                "not given)")
    p.add_argument("--vipbench-results", default=None, help="also write the grader's {v1_<id>: answer} JSON")
    p.add_argument("--skip-bad-examples", action="store_true",
                   help="skip (and count) records without a question or with a missing image")
    p.add_argument("--pad-to-square", action="store_true", help="pad images to a square instead of centre-crop")
    p.add_argument("--dtype", choices=DTYPES, default="auto")
    p.add_argument("--compilation-cache", default=str(DEFAULT_CACHE_DIR),
                   help="JAX persistent compilation cache directory ('' to turn it off)")
    add_distributed_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    initialize_from_args(args)
    enable_compilation_cache(args.compilation_cache)
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise ValueError(f"--batch-size and --max-new-tokens must be >= 1, got {args.batch_size}, "
                         f"{args.max_new_tokens}")
    # Everything that can be checked is checked before any work: the output paths, the model's config.json
    # (before the tokenizer, which would blame itself for a bad config), the data and the meta-data.
    check_output_path(args.output, "--output")
    if args.vipbench_results:
        check_output_path(args.vipbench_results, "--vipbench-results")
        if Path(args.vipbench_results).absolute() == Path(args.output).absolute():
            raise ValueError(f"--output and --vipbench-results are the same file ({args.output}): give two names")
    model_dir = resolve_model_path(args.model)
    config = load_config(model_dir)
    proc = Processor.from_pretrained(model_dir, pad_to_square=args.pad_to_square)
    records = load_eval_records(args.data, meta=args.meta)  # a bad file fails before loading weights
    if args.vipbench_results:
        check_unique_question_ids(records, args.data)
    dtype = auto_dtype(args.dtype)
    mesh = None
    if jax.device_count() > 1 or args.mesh not in (None, "", "auto"):
        mesh = mesh_from_args(args, config)
    module, params = load_pretrained(model_dir, dtype=jnp.dtype(dtype), mesh=mesh, progress=is_main_process(),
                                     verify=not args.no_verify,
                                     adapter=args.adapter, **quantize_kwargs(args))
    answers, score, stats = evaluate(
        module, params, proc, records, image_folder=args.image_folder, batch_size=args.batch_size,
        metric=args.metric, max_new_tokens=args.max_new_tokens, template=args.prompt_style, mesh=mesh,
        skip_bad_examples=args.skip_bad_examples, progress=is_main_process(),
        system=DEFAULT_SYSTEM_PROMPT if args.system is None else args.system, meta=args.meta)
    if not is_main_process():
        return 0
    write_answers(answers, args.output)
    if args.vipbench_results:
        write_vipbench_results(answers, args.vipbench_results)
    line = f"{len(answers)} answers written to {args.output}"
    if stats["skipped"]:
        line += f"; {stats['skipped']} record(s) skipped"
    print(line, file=sys.stderr)
    if score is None:
        print("no ground truth in the data: nothing scored", file=sys.stderr)
    else:
        print(f"{args.metric}: {100 * score:.1f}% ({stats['scored']} scored)")
        for k, v in sorted(stats["by_type"].items()):
            print(f"  {k}: {100 * v:.1f}%")
    return 0
