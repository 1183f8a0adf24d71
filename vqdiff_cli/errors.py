"""The errors vqdiff raises on purpose: each carries a one-line message, an optional hint and an exit code, and
structured fields where code decides by them (the settings an error is about, the files missing or unreadable).

The library raises them; only the CLI's error boundary turns them into a message on stderr and an exit status.
"""

from __future__ import annotations

from enum import IntEnum
from pathlib import Path
from typing import Self

EXCERPT_WORDS = 12  # what a message quotes of a text: its first words, then a count of the rest
EXCERPT_CHARS = 160  # and of anything still longer (a path, one long word): its start and end


def excerpt(text: object, words: int = EXCERPT_WORDS, chars: int = EXCERPT_CHARS) -> str:
    """User input (a prompt, a file name, a config value) as a message quotes it: on one line, whole when short;
    else its first `words` words and a count of the rest, and its start and end around a count of the characters
    left out when it is still longer than `chars`."""
    shown = str(text)
    if any(c in shown for c in "\n\r\t\v\f"):
        shown = " ".join(shown.split())
    rest = ""
    split = shown.split()
    if len(split) > words:
        shown, rest = " ".join(split[:words]), f" … (+{len(split) - words} more words)"
    if len(shown) > chars:
        side = max(1, (chars - 20) // 2)
        shown = f"{shown[:side]}…(+{len(shown) - 2 * side} characters)…{shown[-side:]}"
    return shown + rest


class ExitStatus(IntEnum):
    OK = 0
    FAILURE = 1
    USAGE = 2
    INTERRUPTED = 130


class VqdiffError(Exception):
    """Base class: a failure with a message meant for the user."""

    exit_code: ExitStatus = ExitStatus.FAILURE

    def __init__(self, message: str, hint: str | None = None, *, about: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.about = about  # the settings (as option keys: "steps", "device") whose value the error is about

    def __str__(self) -> str:
        return self.message

    def with_message(self, message: str, hint: str | None = None) -> Self:
        """The same error (class and fields) with another message, and a hint when one is given."""
        other = type(self).__new__(type(self))  # not copy.copy: that calls __init__ with the message alone
        other.__dict__.update(self.__dict__)
        other.message, other.args = message, (message,)
        if hint is not None:
            other.hint = hint
        return other


class UsageError(VqdiffError):
    """Bad option values, unreadable or invalid inputs: the user can fix the command line."""

    exit_code = ExitStatus.USAGE


class WeightsError(VqdiffError):
    """A checkpoint that is missing, incomplete, or does not match its configuration."""


class MissingFilesError(WeightsError):
    """A checkpoint (a folder, a Hub listing, the cached files) lacks files a load needs."""

    def __init__(self, lacking: str, hint: str | None = None, *, owner: str = "the checkpoint has") -> None:
        super().__init__(f"{owner} {lacking}", hint)
        self.lacking = lacking  # "no vqvae/config.json", "no weights for vqvae (looked for ...)"

    def of(self, owner: str) -> MissingFilesError:
        """The same error said of another owner ("the cached files have", "<repo> at <commit>: has")."""
        return MissingFilesError(self.lacking, self.hint, owner=owner)


class UnreadableFileError(WeightsError):
    """A checkpoint file exists but cannot be read: damaged, truncated, or not what its name says."""

    def __init__(self, message: str, path: Path, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.path = path


class DownloadError(VqdiffError):
    """Fetching a model from the Hub failed, or is impossible offline."""


class OutputError(VqdiffError):
    """An output file cannot be written (exists, or its directory is not writable)."""

    exit_code = ExitStatus.USAGE


class WriteError(VqdiffError):
    """Writing an output failed as it was written (a full disk, an I/O error): a runtime failure, not a usage one."""


class DeviceError(VqdiffError):
    """The requested device or dtype is not available, or the device ran out of memory."""


class RankError(VqdiffError):
    """A failure in one process of a run spread over several (torchrun), raised in every process so that all of them
    stop; only the process that speaks for the run (`reported`) says so."""

    def __init__(self, message: str, hint: str | None, exit_code: int, *, reported: bool) -> None:
        super().__init__(message, hint)
        self.exit_code = ExitStatus(exit_code)
        self.reported = reported


def explain(exc: Exception) -> VqdiffError:
    """Any failure as a VqdiffError: ours as they are; running out of device memory with what to do about it; anything
    else as an unexpected error of its type, with its first line."""
    if isinstance(exc, VqdiffError):
        return exc
    name = type(exc).__name__
    if name == "OutOfMemoryError" or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()):
        return DeviceError(
            "the device ran out of memory", "use a smaller --batch-size, --dtype float16 or bfloat16, or --device cpu"
        )
    first = (str(exc).strip().splitlines() or [""])[0]
    return VqdiffError(
        f"unexpected {name}: {first}",
        "run again as vqdiff --debug ... (or with VQDIFF_DEBUG=1) for the traceback, and report it",
    )
