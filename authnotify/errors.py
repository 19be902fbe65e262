"""Errors and exit codes: the bottom layer, imported by every other and importing nothing of the project.

Every message is one line that can be shown to an operator as it is: it never carries a token, an auth
code, a key or a password.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1  # the command could not do its job (broker unreachable, nothing found, ...)
EXIT_USAGE = 2  # bad arguments or configuration
EXIT_INTERRUPTED = 130  # Ctrl-C


class AuthnotifyError(Exception):
    """Base of the project's own errors."""


class ConfigError(AuthnotifyError):
    """A configuration problem, phrased as one line that names the variable."""


class CommandError(AuthnotifyError):
    """A command could not do its job; the message is the one line printed on stderr."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# --- what a message handler raises; the consumer runtime turns it into a retry or a dead letter ------


class PermanentError(AuthnotifyError):
    """Dead-letter the message now; ``str(exc)`` is the reason."""


class TransientError(AuthnotifyError):
    """Retry after the next delay, dead-letter after the last; ``str(exc)`` is the reason."""


class StoreError(TransientError):
    """The database could not do what was asked (unreachable, locked, failed); worth retrying."""


class PublishFailed(AuthnotifyError):
    """The broker did not confirm a message (down, nacked, returned or too slow); str is the reason."""


class BrokerUnavailable(AuthnotifyError):
    """An operator's request to the broker (listing, replaying, counting) could not be done now; str is why."""
