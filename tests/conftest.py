import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from dumo.data.batch import Batch
from dumo.models import ModelConfig, build_model
from dumo.models.output import ModelOutput


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class PointMassOracle(torch.nn.Module):
    """The exact v and u for data concentrated at one point ``a``: both equal (x_t - a) / t.

    Every path from a straight line x_t = t z + (1 - t) a, so the ODE trajectory through x_t
    is that line and the average velocity over any [r, t] is z - a, whatever r is.
    """

    def __init__(self, point: torch.Tensor):
        super().__init__()
        self.point = point
        self.calls: list[torch.Tensor] = []

    def forward(self, x, t, r=None, cond=None):
        self.calls.append(t.detach().clone())
        value = (x - self.point) / t.reshape(-1, *([1] * (x.dim() - 1)))
        return ModelOutput(v=value, u=value)


def randomise_heads(model: torch.nn.Module) -> None:
    """Heads start at zero (adaLN-zero); give them weights so gradients reach the trunk."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.abs().sum() == 0:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))


def small_model(heads=("v", "u"), num_classes=0, time_inputs=1, dim=2):
    model = build_model(ModelConfig(hidden_dim=32, depth=2), (dim,), heads, num_classes, time_inputs)
    randomise_heads(model)
    return model


def batch_of(n=16, dim=2, cond=None):
    return Batch(x=torch.randn(n, dim), cond=cond)


def jvp_vs_difference_error(model, batch, num_classes=3, epsilon=0.001):
    """Relative error of DuMo's finite-difference du/dt against the exact JVP, same draws, t near 0.5."""
    from dumo.objectives import DuMoConfig, DuMoObjective, TimeConfig

    middle = TimeConfig(theta1=20.0, theta2=20.0)
    torch.manual_seed(1)
    exact = DuMoObjective(DuMoConfig(derivative="jvp", time=middle), num_classes)(model, batch).targets["du_dt"]
    torch.manual_seed(1)
    approx = DuMoObjective(DuMoConfig(epsilon=epsilon, time=middle), num_classes)(model, batch).targets["du_dt"]
    return ((approx - exact).norm() / exact.norm()).item()


MOONS_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "toy" / "moons-dumo.yaml"
#: overrides that shrink the moons demo config to a run of a few seconds
TINY_MOONS = [
    "model.hidden_dim=16",
    "model.depth=1",
    "data.batch_size=32",
    "train.eval_samples=100",
    "train.log_every=1",
    "train.progress=false",
]


def load_script(path: Path) -> ModuleType:
    """Import a script of experiments/ or benchmarks/ as a module named after its file."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up
    # As ``python experiments/X.py`` does, the script's folder comes first on the path while it is
    # imported, so that its imports of its neighbours (experiments/common.py) resolve; taken off
    # after, so that one folder's modules do not shadow another's in later tests.
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    return module
