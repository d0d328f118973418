"""The one exception type users see for bad input.

Every check in hiresdiff raises :class:`HiresError` with a single line that says what is wrong and what to do,
before any model work starts. It subclasses :class:`ValueError` so generic callers can catch it as such.
"""

from __future__ import annotations


class HiresError(ValueError):
    """Bad input or an unusable environment, explained in one actionable line."""


class HiresWarning(UserWarning):
    """Something the user should know that does not stop the run (the CLI prints it as one line)."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`HiresError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise HiresError(message)
