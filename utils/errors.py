"""User-facing errors: one line saying what is wrong and what to do, exit code 2, no traceback."""
import functools
import sys


class UserError(Exception):
    """A problem with the user's input (path, flag, file) that they can fix.

    The message must name the bad input and say how to fix it, on one line.
    """


def describe(e: BaseException) -> str:
    """`Type: first line of the message`, for quoting an exception inside a one-line error."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def exit_on_user_error(fn):
    """Decorator for script entry points: turn a UserError into `error: ...` on stderr and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            text = str(e)
            if "Original Traceback" in text:  # raised in a DataLoader worker: keep the original message only
                text = text.strip().splitlines()[-1].split("UserError: ", 1)[-1]
            msg = " ".join(text.split())  # always one line
            print(f"error: {msg}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper
