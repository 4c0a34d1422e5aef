"""The one training loop every stage uses, with its checkpoints, schedules and precision."""

from chatforge.train.checkpoint import (
    latest_checkpoint,
    load_model,
    load_model_weights,
    save_model,
)
from chatforge.train.loop import NonFiniteLossError, TrainResult, TrainTask, train

__all__ = [
    "NonFiniteLossError",
    "TrainResult",
    "TrainTask",
    "latest_checkpoint",
    "load_model",
    "load_model_weights",
    "save_model",
    "train",
]
