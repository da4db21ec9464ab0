"""Sample-quality metrics."""

from dumo.metrics.toy import mmd, sliced_wasserstein

__all__ = ["mmd", "sliced_wasserstein"]
