"""Errors that reach the user as one line.

Every error a user can cause (a bad recipe, a bad source file, an unreachable server) is raised
as a BardError whose message already names the file, row, key or column; the CLI prints
``error: <message>`` and exits 2 without a traceback.
"""


class BardError(Exception):
    """Base class: the message is the whole explanation, on one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class RecipeError(BardError):
    """The recipe (YAML) is malformed, has unknown keys, wrong types or names missing files."""


class DataError(BardError):
    """A source table is unreadable, empty, or lacks a column the recipe maps."""


class BackendError(BardError):
    """An LLM backend cannot be started or reached (model not found, server down)."""


class PublishError(BardError):
    """Export or push failed (bad run, bad target, Hub error, bad card template)."""


def one_line(exc: BaseException, limit: int = 500) -> str:
    """An exception as ``Type: message`` on one line, at most ``limit`` characters of message
    (for errors of libraries, which span lines)."""
    msg = " ".join(str(exc).split())
    if len(msg) > limit:
        msg = msg[: limit - 3] + "..."
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
