"""Run folders: their names and bookkeeping, checkpoints on disk, reading a run back and exporting it,
drawing samples into files, and importing public weights as a run.

Nothing is imported here: ``import dumo.runs.layout`` (names only) stays light.
"""
