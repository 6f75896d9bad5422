"""One error family for everything a user can get wrong (torch-free).

Every expected failure (a bad data file, a bad model file, a bad setting, a missing optional
library) raises a subclass of ``CDDRecError`` whose message names the file, the line where there
is one, and what was expected. The command-line layer turns exactly these into one-line errors;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class CDDRecError(Exception):
    """Base of the errors a user can act on."""


class DataError(CDDRecError, ValueError):
    """Bad input data: the message names the file, the line and what was expected."""


class ConfigError(CDDRecError, ValueError):
    """A config value of the wrong type or out of range."""


class CheckpointError(CDDRecError, ValueError):
    """A model file that is missing, corrupt, of another format or of another version."""


class ModelFileError(CDDRecError, ValueError):
    """A graph or engine that is not a readable cddrec export."""


class ExportError(CDDRecError, ValueError):
    """Export or validation failed; nothing was written."""


class BackendUnavailable(CDDRecError, RuntimeError):
    """The library or device a backend needs is missing; the message says what to install."""


class NonFiniteError(CDDRecError, ArithmeticError):
    """A loss, score or weight that is NaN or infinite: training diverged or a model file holds such weights."""


class OutputError(CDDRecError, OSError):
    """An output that cannot be written, or that would replace one of the command's inputs."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message (libraries add context lines), at most ``limit``
    characters; the exception's type name when the message is empty."""
    return next((x.strip() for x in str(e).splitlines() if x.strip()), type(e).__name__)[:limit]
