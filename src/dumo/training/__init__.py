"""Training loop, EMA and checkpoints."""

from dumo.training.trainer import Trainer, TrainResult, train

__all__ = ["TrainResult", "Trainer", "train"]
