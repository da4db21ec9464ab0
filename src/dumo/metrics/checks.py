"""What every metric checks before it scores: enough samples, and only finite ones.

A NaN or infinite sample (a diverged model, an absurd guidance scale) would otherwise come out as
a NaN score, or as an error deep inside a matrix square root; each metric refuses it by name.
"""

from __future__ import annotations

from torch import Tensor

from dumo.errors import MetricsError


def count_nonfinite(samples: Tensor) -> int:
    """How many of the samples (rows of ``samples``) hold a NaN or an infinity."""
    if samples.shape[0] == 0:
        return 0
    return int((~samples.reshape(samples.shape[0], -1).isfinite().all(dim=1)).sum())


def nonfinite_message(metric: str, bad: int, count: int, what: str = "samples") -> str:
    return (
        f"{metric}: {bad} of {count} {what} are not finite (NaN/inf); the model or its sampling settings "
        "(guidance scale, schedule) diverged"
    )


def check_samples(samples: Tensor, metric: str, minimum: int = 1, what: str = "samples") -> None:
    """Refuse ``samples`` (one per row) that ``metric`` cannot score: fewer than ``minimum`` of them,
    or any that is not finite."""
    count = samples.shape[0]
    if count < minimum:
        noun = what.removesuffix("s") if minimum == 1 else what
        raise MetricsError(f"{metric} needs at least {minimum} {noun}; got {count}")
    bad = count_nonfinite(samples)
    if bad:
        raise MetricsError(nonfinite_message(metric, bad, count, what))
