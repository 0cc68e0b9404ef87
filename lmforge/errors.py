"""The one exception type for a user's mistake.

Raise `UserError("what is wrong, where, what was expected")` for bad input (a missing file, a
malformed line, an unknown preset, a config key of the wrong type). The CLI prints its message on
one line and exits with code 2, without a traceback; Python callers can catch it like any
`ValueError`.
"""


class UserError(ValueError):
    """Bad input from the user: the message names what is wrong, where, and what was expected."""
