"""Probability paths x_t = alpha(t) * z + gamma(t) * x between data (t=0) and noise (t=1).

Objectives only use the path through this interface, so another transport can be added by
subclassing :class:`AffinePath` without touching them. The flow-map parameterisation
``x_0 = x_t - t * u`` used by DuMo and MeanFlow is the one of the Linear path.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor


def expand_time(t: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample time of shape (B,) so that it broadcasts against ``like`` (B, ...)."""
    return t.reshape(t.shape[0], *([1] * (like.dim() - 1))).to(like.dtype)


class AffinePath(ABC):
    """x_t = alpha(t) z + gamma(t) x with alpha(0)=0, gamma(0)=1, alpha(1)=1, gamma(1)=0."""

    @abstractmethod
    def alpha(self, t: Tensor) -> Tensor: ...

    @abstractmethod
    def gamma(self, t: Tensor) -> Tensor: ...

    @abstractmethod
    def d_alpha(self, t: Tensor) -> Tensor: ...

    @abstractmethod
    def d_gamma(self, t: Tensor) -> Tensor: ...

    def sample(self, x: Tensor, z: Tensor, t: Tensor) -> Tensor:
        """The point x_t on the path from data ``x`` to noise ``z``; ``t`` has shape (B,)."""
        t = expand_time(t, x)
        return self.alpha(t) * z + self.gamma(t) * x

    def velocity(self, x: Tensor, z: Tensor, t: Tensor) -> Tensor:
        """The conditional velocity dx_t/dt for the pair (x, z)."""
        t = expand_time(t, x)
        return self.d_alpha(t) * z + self.d_gamma(t) * x


class LinearPath(AffinePath):
    """The paper's "Linear" transport: x_t = t z + (1 - t) x, velocity z - x."""

    def alpha(self, t: Tensor) -> Tensor:
        return t

    def gamma(self, t: Tensor) -> Tensor:
        return 1 - t

    def d_alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def d_gamma(self, t: Tensor) -> Tensor:
        return -torch.ones_like(t)


PATHS: dict[str, type[AffinePath]] = {"linear": LinearPath}
