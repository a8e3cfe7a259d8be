"""Exceptions that carry a one-line, user-facing message.

Every error that the CLI should report without a traceback derives from :class:`DeftxError`;
``deftx.cli`` prints ``deftx: error: <message>`` and exits with status 2.
"""

from __future__ import annotations


class DeftxError(Exception):
    """Base class for errors whose message is meant for the user (one line, names the culprit)."""


class ConfigError(DeftxError):
    """A configuration value is invalid (raised before any training starts)."""


class SFTFormatError(DeftxError):
    """An SFT directory is missing, corrupt, or does not match the model it is applied to."""


class DataError(DeftxError):
    """A dataset, language code or data file is unknown or malformed."""


class ModelError(DeftxError):
    """A base model cannot be found, fetched, converted or used for the requested SFT kind."""


CAUSE_CHARS = 300   # how much of a cause given on the line after a first line ending in ':' is kept


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its type's name when it has none (for one-line
    errors that quote a library's failure). A first line that ends in ':' announces its cause on
    the next line (Ray Train's "Training failed due to controller error:"), so the first non-empty
    line after it is kept too, cut at ``CAUSE_CHARS`` characters."""
    lines = [line.strip() for line in str(exc).strip().splitlines()]
    if not lines or not lines[0]:
        return type(exc).__name__
    head = lines[0]
    if head.endswith(":"):
        cause = next((line for line in lines[1:] if line), "")
        if cause:
            head = f"{head} {cause if len(cause) <= CAUSE_CHARS else cause[:CAUSE_CHARS - 3] + '...'}"
    return head
