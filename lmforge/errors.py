"""The exception types the CLI turns into a message and an exit code instead of a traceback.

Raise `UserError("what is wrong, where, what was expected")` for bad input (a missing file, a
malformed line, an unknown preset, a config key of the wrong type, a damaged checkpoint). The CLI
prints its message on one line and exits with code 2, without a traceback; Python callers can catch
it like any `ValueError`.

`Interrupted` ends a training run stopped by SIGTERM or SIGINT after its checkpoint was saved (the
Trainer has already printed one line saying so); the CLI exits with 128 + `signum`, like a process
the signal ended.
"""


class UserError(ValueError):
    """Bad input from the user: the message names what is wrong, where, and what was expected."""


class Interrupted(Exception):
    """A run stopped by signal `signum` at a step boundary, with a resumable checkpoint saved."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
