"""The documented errors of sae-pipeline.

Every failure a user can cause (bad config, wrong hook, damaged cache, mismatched files) raises a
subclass of :class:`SaePipelineError` whose message names the problem *and* the fix. The CLI prints
these without a traceback; anything else is a bug.
"""


class SaePipelineError(Exception):
    """Base class of every error sae-pipeline raises on purpose."""


class ConfigError(SaePipelineError, ValueError):
    """A config field is missing, unknown, misspelled or out of range."""


class ModelError(SaePipelineError):
    """A model cannot be found or loaded (missing file, unknown name, no hub access)."""


class HookNameError(SaePipelineError, KeyError):
    """A hook name does not exist on the model; the message lists the closest valid names."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class DatasetError(SaePipelineError):
    """A text dataset is missing, empty, or too short for the requested token budget."""


class CacheError(SaePipelineError):
    """An activation cache is missing, incomplete, damaged, locked or incompatible."""


class CacheWriteError(CacheError):
    """A harvest cannot write its cache (disk full, quota, read-only or unwritable folder); the
    message names the path, the OS error, the free space there and how to resume."""


class SAEFormatError(SaePipelineError):
    """An SAE folder is missing files, or its tensors do not match its cfg.json."""


class SAEWriteError(SaePipelineError):
    """Training cannot write a checkpoint or the trained SAE (disk full, quota, read-only or
    unwritable folder); the message names the path, the OS error, the free space there, the last
    complete checkpoint kept and how to continue from it."""


class TrainingError(SaePipelineError):
    """Training cannot continue (NaN/Inf in a batch, loss, gradient or parameter; d_in mismatch
    with the cache)."""
