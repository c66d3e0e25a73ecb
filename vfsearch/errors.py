"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: a file, an option or a value that the user must change.

    The message names the file or option and the problem, in one line.
    """

    exit_code = 2


def fail(subject: object, problem: str) -> UserError:
    """Build a `UserError` reading ``"<subject>: <problem>"``."""
    return UserError(f"{subject}: {problem}")
