"""Training loop, EMA and checkpoints.

The loop (:mod:`dumo.training.loop`) is imported on first use of ``Trainer``, ``TrainResult`` or
``train``, so that importing a small module of this package (``dumo.training.ema``, say) does not
load it and everything it needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dumo.training.loop import Trainer, TrainResult, train

__all__ = ["TrainResult", "Trainer", "train"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from dumo.training import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
