"""Errors that mean "the input is wrong", as opposed to a bug in this package.

Every bad-input error raised by ``core/`` and ``io/`` derives from :class:`InputError`; its message
says what is wrong and how to fix it. The command line turns it into exit code 2, the widgets into
a notification.
"""


class InputError(ValueError):
    """The user's input (file, table, argument) is invalid; the message says how to fix it."""


class Cancelled(RuntimeError):
    """A long run was stopped by its ``should_stop()`` callback; nothing was half-written."""


def number_or_nan(value) -> float:
    """``float(value)``, or NaN where ``value`` is not a number: for argument checks, which then
    refuse NaN with a message that says what the argument must be."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")
