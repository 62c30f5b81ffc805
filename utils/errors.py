"""User-facing errors: one line saying what is wrong and what to do, exit code 2, no traceback."""
import argparse
import functools
import sys

from utils.config import config_path, read_config
from utils.flags import MARK, DomainHelpFormatter


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


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag gives one line (`error: ... (see X --help)`) instead of usage + error, and --help
    shows every flag's declared domain (utils.flags)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DomainHelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):
        """argparse's, after a --config file (utils.config) has set the defaults: flags given here win."""
        argv = sys.argv[1:] if args is None else list(args)
        path = config_path(argv) if "--config" in self._option_string_actions else None
        if path is not None:
            self.set_defaults(**read_config(self, path))
        return super().parse_args(argv, namespace)

    def error(self, message):
        if MARK in message:                      # a declared domain refused a value: "--flag value must ..."
            head, value, problem = message.split(MARK, 2)
            flag = head.removeprefix("argument ").rstrip(": ")
            flag, sep = flag.split("/")[0], "" if problem.startswith(":") else " "
            message = f"{flag} {value if value else repr(value)}{sep}{problem.replace('{flag}', flag)}"
        self.exit(2, f"error: {' '.join(message.split())} (see {self.prog} --help)\n")
