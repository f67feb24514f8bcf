"""Fine-tuning: data, loss, optimizer, train step, checkpoints, export (see README, "Fine-tune").

The public contract: ``loss_fn(module, params, batch) -> (loss, metrics)`` equals HF's
``VipLlavaForConditionalGeneration(..., labels=labels).loss``; ``train(TrainConfig(...))`` runs a whole job.
"""
from .config import TrainConfig
from .loss import IGNORE_INDEX, loss_fn
from .trainer import TrainError, train

__all__ = ["IGNORE_INDEX", "TrainConfig", "TrainError", "loss_fn", "train"]
