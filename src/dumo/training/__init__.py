"""Training loop, EMA and checkpoints.

``train``, ``Trainer`` and ``TrainResult`` are imported on first use: importing a training utility
(snapshots, throughput, initialisation) does not load the loop.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dumo.training.trainer import Trainer, TrainResult, train

__all__ = ["TrainResult", "Trainer", "train"]
#: the names above and the module that defines them
LAZY = {"TrainResult": "dumo.training.trainer", "Trainer": "dumo.training.trainer", "train": "dumo.training.trainer"}


def __getattr__(name: str) -> Any:
    if name in LAZY:
        return getattr(importlib.import_module(LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
