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


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its type's name when it has none (for one-line
    errors that quote a library's failure)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
