"""Errors a user can act on. Each carries the exit code the CLI returns.

Messages name the problem and the fix; the CLI prints them without a traceback.
"""


class ClipSegError(Exception):
    """Base class: a problem the user can fix. Exit code 1."""

    exit_code = 1


class CorruptFileError(ClipSegError):
    """A file exists but cannot be read in full (truncated or damaged: an interrupted copy or download). Exit code 1.

    Raised instead of reading what is there and filling the rest with zeros."""

    exit_code = 1


class InputError(ClipSegError):
    """Bad input image, prompt or output path. Exit code 2."""

    exit_code = 2


class ModelError(ClipSegError):
    """Model missing, corrupt, or checksum mismatch. Exit code 3."""

    exit_code = 3


class DeviceError(ClipSegError):
    """Requested device is not available. Exit code 4."""

    exit_code = 4


class Cancelled(ClipSegError):
    """The user cancelled the run. Exit code 5."""

    exit_code = 5


class UnsupportedError(InputError, NotImplementedError):
    """The engine lacks an optional step that was asked for (e.g. interactive refinement). Exit code 2."""
