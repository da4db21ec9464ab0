"""Errors that the command line reports as one line (no traceback)."""


class DumoError(Exception):
    """Base class for problems caused by the user's input, not by a bug in dumo."""


class ConfigError(DumoError):
    """A config file or override is invalid: unknown key, wrong type, value out of range."""


class CheckpointError(DumoError):
    """A checkpoint is missing, corrupt, foreign, or does not match the model."""


class RunDirError(DumoError):
    """A run directory is missing, empty, or holds a different run."""


class TrainingError(DumoError):
    """Training cannot continue (for example: the loss stayed non-finite)."""


class DiskFullError(DumoError):
    """The disk (or the user's quota) filled up while writing a file; the file's previous version is kept."""
