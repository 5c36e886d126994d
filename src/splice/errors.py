"""Error types. Every user-facing failure is a `SpliceError` with one clear message."""


class SpliceError(Exception):
    """Base class: the CLI prints the message (traceback only under --debug) and exits 1."""


class CheckpointError(SpliceError):
    """A checkpoint or adapter file is missing, corrupt, truncated or unsafe."""


class RecipeError(SpliceError):
    """A recipe is malformed: unknown keys, bad values, wrong types."""


class MergeValidationError(SpliceError):
    """Inputs do not fit together: names, shapes, dtypes, missing base, bad parameters."""


class DataError(SpliceError):
    """A dataset is missing, malformed, or does not match a saved split."""
