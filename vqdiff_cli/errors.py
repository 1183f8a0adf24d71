"""The errors vqdiff raises on purpose: each carries a one-line message, an optional hint and an exit code.

The library raises them; only the CLI's error boundary turns them into a message on stderr and an exit status.
"""

from __future__ import annotations

from enum import IntEnum


class ExitStatus(IntEnum):
    OK = 0
    FAILURE = 1
    USAGE = 2
    INTERRUPTED = 130


class VqdiffError(Exception):
    """Base class: a failure with a message meant for the user."""

    exit_code: ExitStatus = ExitStatus.FAILURE

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(VqdiffError):
    """Bad option values, unreadable or invalid inputs: the user can fix the command line."""

    exit_code = ExitStatus.USAGE


class WeightsError(VqdiffError):
    """A checkpoint that is missing, incomplete, or does not match its configuration."""


class DownloadError(VqdiffError):
    """Fetching a model from the Hub failed, or is impossible offline."""


class OutputError(VqdiffError):
    """An output file cannot be written (exists, or its directory is not writable)."""

    exit_code = ExitStatus.USAGE


class WriteError(VqdiffError):
    """Writing an output failed as it was written (a full disk, an I/O error): a runtime failure, not a usage one."""


class DeviceError(VqdiffError):
    """The requested device or dtype is not available, or the device ran out of memory."""
