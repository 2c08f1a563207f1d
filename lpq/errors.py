"""User-facing errors.

Every problem that the user can fix (a bad option, a missing model, a corrupt file) is raised as an
``LpqError`` whose message is one readable line naming the problem and the fix. The CLI prints that
line and exits non-zero without a traceback; anything else is a bug and keeps its traceback.
"""


class LpqError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2


class ModelNotFoundError(LpqError):
    pass


class UnsupportedModelError(LpqError):
    pass


class SpecError(LpqError):
    """Bits, group size or another quantization option is out of range."""


class FormatError(LpqError):
    """A tensor shape the packed format cannot hold, or a checkpoint that does not match its config."""


class CheckpointError(LpqError):
    """A corrupt, truncated or inconsistent checkpoint on disk."""


class OutputExistsError(LpqError):
    pass


class CalibrationError(LpqError):
    pass


class OutOfMemory(LpqError):
    exit_code = 3
