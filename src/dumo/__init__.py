"""dumo: Duality Models (one backbone, velocity and flow-map heads) and their baselines."""

__version__ = "0.1.0"
