"""Training loop, EMA and checkpoints."""

from dumo.training.trainer import TrainResult, Trainer, train

__all__ = ["TrainResult", "Trainer", "train"]
