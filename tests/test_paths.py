import torch

from dumo.paths import LinearPath


def test_linear_path_endpoints_and_velocity():
    path = LinearPath()
    x, z = torch.randn(5, 3), torch.randn(5, 3)
    assert torch.allclose(path.sample(x, z, torch.zeros(5)), x)
    assert torch.allclose(path.sample(x, z, torch.ones(5)), z)
    assert torch.allclose(path.velocity(x, z, torch.rand(5)), z - x)


def test_velocity_is_time_derivative_of_sample():
    path = LinearPath()
    x, z = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    t = torch.rand(4, dtype=torch.float64) * 0.8 + 0.1
    h = 1e-6
    numeric = (path.sample(x, z, t + h) - path.sample(x, z, t - h)) / (2 * h)
    assert torch.allclose(numeric, path.velocity(x, z, t), atol=1e-8)
