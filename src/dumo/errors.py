"""Errors that the command line reports as one line (no traceback)."""


class DumoError(Exception):
    """Base class for problems caused by the user's input, not by a bug in dumo."""


class ConfigError(DumoError):
    """A config file or override is invalid: unknown key, wrong type, value out of range."""


class CheckpointError(DumoError):
    """A checkpoint is missing, corrupt, foreign, or does not match the model."""


class RunDirError(DumoError):
    """A run directory is missing, empty, or holds a different run."""


class SamplingError(DumoError):
    """Sampling cannot go ahead as asked: a bad sampler or schedule, too little memory, an unreadable file."""


class TrainingError(DumoError):
    """Training cannot continue (for example: the loss stayed non-finite)."""


class MetricsError(DumoError):
    """A score cannot be computed: too few or non-finite samples, or missing or unusable Inception
    weights or reference statistics."""


class DiskFullError(DumoError):
    """The disk (or the user's quota) filled up while writing a file; the file's previous version is kept."""
