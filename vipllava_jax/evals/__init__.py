"""Evaluation: answer metrics, ViP-Bench question and answer files, batched greedy `evaluate`, and the demo's
library half (`run_demo`, `heldout_accuracy`, `write_heldout`, `demo_model_path`)."""
from . import demo, evaluation
from .demo import demo_model_path, format_accuracy, heldout_accuracy, run_demo, write_heldout
from .evaluation import METRICS, EvalError, evaluate, load_eval_records, score_answer, write_answers, \
    write_vipbench_results

__all__ = ["demo", "evaluation", "demo_model_path", "format_accuracy", "heldout_accuracy", "run_demo",
           "write_heldout", "METRICS", "EvalError", "evaluate", "load_eval_records", "score_answer", "write_answers",
           "write_vipbench_results"]
