"""Errors a user can act on.

Every error chatforge raises on bad input is a ``ChatforgeError``: the CLI prints
its message (which names the file, line or field at fault) without a traceback.
"""


class ChatforgeError(Exception):
    """Base class for errors caused by the user's input, config or environment."""


class ConfigError(ChatforgeError):
    """A config file, preset or ``--set`` override is invalid."""


class DataError(ChatforgeError):
    """Input data is unreadable or malformed; the message names file and line."""
