import math

import torch

from dumo.metrics import mmd, sliced_wasserstein


def test_mmd_small_for_same_distribution_and_grows_with_shift():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, 2, generator=g), torch.randn(1000, 2, generator=g)
    same = mmd(a, b)
    shifted = [mmd(a, b + torch.tensor([d, 0.0])) for d in (0.25, 0.5, 1.0)]
    assert same < 0.06  # noise floor of 1000 vs 1000 points
    assert same < shifted[0] < shifted[1] < shifted[2]


def test_sliced_wasserstein_of_a_translation_matches_closed_form():
    # Translating by d moves every projection on direction theta by d . theta; averaged over
    # uniform directions in 2-D, E[(d . theta)^2] = |d|^2 / 2.
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 2, generator=g)
    d = torch.tensor([0.6, -0.8])
    value = sliced_wasserstein(a, a + d, projections=4096)
    assert math.isclose(value, 1.0 / math.sqrt(2), rel_tol=0.03)
    assert sliced_wasserstein(a, a) == 0.0


def test_sliced_wasserstein_handles_different_sizes():
    g = torch.Generator().manual_seed(0)
    assert sliced_wasserstein(torch.randn(500, 2, generator=g), torch.randn(800, 2, generator=g)) < 0.15
