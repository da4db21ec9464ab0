"""dumo: Duality Models (one backbone, velocity and flow-map heads) and their baselines."""

from dumo.version import __version__

__all__ = ["__version__", "load"]


def load(path, device: str = "cpu", weights: str = "ema", checkpoint=None):
    """A trained run folder or export, ready to sample::

        model = dumo.load("runs/digits")
        images = model.generate(16, nfe=1, classes=[3])  # (16, C, H, W) in [0, 1]

    See :class:`dumo.runs.loading.Model`. (Imported lazily: ``import dumo`` stays light.)
    """
    from dumo.runs.loading import load as load_model

    return load_model(path, device=device, weights=weights, checkpoint=checkpoint)
