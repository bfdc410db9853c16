"""Errors a user can act on.

Anything the user can fix (not root, no BCC, no kernel headers, a bad flag, a
port already in use, a malformed config file) is raised as a ``UserError``
whose message is one line saying what is wrong and how to fix it. The CLI
prints that line and exits non-zero, never a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; ``str(err)`` is the one-line message."""

    exit_code = 2

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
