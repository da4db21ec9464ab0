import pytest
import torch
from sklearn.datasets import make_moons

from dumo.data.toy import TOY_DATASETS, Moons, ToyStream
from dumo.metrics import mmd


def test_moons_match_scikit_learn():
    ours, labels = Moons().sample(2000, torch.Generator().manual_seed(0))
    theirs, _ = make_moons(n_samples=2000, noise=0.05, random_state=0)
    theirs = torch.as_tensor(theirs, dtype=torch.float32)
    assert mmd(ours, theirs) < 0.03
    assert mmd(ours, theirs + torch.tensor([0.2, 0.0])) > 0.1  # the test can tell moons apart
    assert set(labels.tolist()) == {0, 1}


@pytest.mark.parametrize("name", sorted(TOY_DATASETS))
def test_standardisation_is_fixed_and_standardises(name):
    dataset = TOY_DATASETS[name]()
    points, _ = dataset.sample(50_000, torch.Generator().manual_seed(3))
    z = dataset.standardise(points)
    assert torch.allclose(z.mean(0), torch.zeros(2), atol=0.03)
    assert torch.allclose(z.std(0), torch.ones(2), atol=0.03)
    assert torch.allclose(dataset.unstandardise(z), points, atol=1e-5)
    # independent of any run's seed: a fresh instance gives the same constants
    assert torch.equal(TOY_DATASETS[name]().standardisation[0], dataset.standardisation[0])


def test_stream_resumes_from_its_state():
    stream = ToyStream(Moons(), 8, conditional=True, seed=5)
    stream.next_batch()
    state = stream.state()
    expected = stream.next_batch()
    stream.next_batch()
    stream.load_state(state)
    again = stream.next_batch()
    assert torch.equal(expected.x, again.x) and torch.equal(expected.cond, again.cond)
