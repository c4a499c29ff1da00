"""The error types of the core library.

Every error a user can cause derives from :class:`SdreplError`; its message says what was wrong, where,
and how to fix it. The daemon turns these into protocol error replies using :attr:`SdreplError.type_name`,
so the class names below are part of the user-facing contract (``error.type`` in scripted JSON).
"""

from __future__ import annotations


class SdreplError(Exception):
    """Base class of every expected, user-explainable failure."""

    @property
    def type_name(self) -> str:
        return type(self).__name__


class EmbeddingError(SdreplError):
    """An embedding file cannot be read or written (names the file, what was found, what was expected)."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class IncompatibleEmbedding(EmbeddingError):
    """An embedding that is fine in itself but does not fit the loaded model (listed as skipped)."""


class PromptError(SdreplError):
    """A prompt cannot be understood (unknown ``<name>``, bad option value, ...)."""


class ModelError(SdreplError):
    """A model cannot be resolved or loaded (missing path, not a model folder, corrupt checkpoint)."""


class DeviceError(SdreplError):
    """The requested device or dtype is not available on this machine."""


class SamplerError(SdreplError):
    """An unknown sampler name."""


class TrainingError(SdreplError):
    """A training job cannot start or had to stop (bad dataset, NaN loss, existing file, ...)."""


class UsageError(SdreplError):
    """A command was written wrongly (unknown option, missing argument)."""


class Cancelled(SdreplError):
    """The request was cancelled (by ``cancel``, by its client going away, or by shutdown)."""


class NetworkError(SdreplError):
    """A LoRA, LyCORIS or hypernetwork file cannot be used (names the file, what was found, what to do)."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class WriteError(SdreplError):
    """A file could not be written for a reason of the user's machine (no space left, a read-only disk, no
    permission); the message names the folder and says what to do."""
