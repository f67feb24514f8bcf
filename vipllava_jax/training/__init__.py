"""Fine-tuning: data encoding and batching, loss, optimizer, train step, checkpoints, export (see README,
"Fine-tune").

The public contract: ``loss_fn(module, params, batch) -> (loss, metrics)`` equals HF's
``VipLlavaForConditionalGeneration(..., labels=labels).loss``; ``train(TrainConfig(...))`` runs a whole job.
"""
from .config import DataConfig, TrainConfig
from .encoding import DataError, Example, ExampleDropped, encode_example
from .loss import IGNORE_INDEX, loss_fn
from .pipeline import DataIterator, make_eval_iterator, make_train_iterator
from .trainer import TrainError, train

__all__ = ["DataConfig", "DataError", "DataIterator", "Example", "ExampleDropped", "IGNORE_INDEX", "TrainConfig",
           "TrainError", "encode_example", "loss_fn", "make_eval_iterator", "make_train_iterator", "train"]
