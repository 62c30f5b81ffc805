"""Every flag's domain, declared where the flag is: argparse `type`s that parse a value and reject one outside the
domain with one line naming the flag, the value and the domain, before any data or model is built.

    g.add_argument("--lr", type=positive(), ...)                       # a finite float > 0
    g.add_argument("--knn-every", type=count(zero="never"), ...)       # an int >= 1, or 0 meaning never
    g.add_argument("--blur-prob", type=probability(), ...)             # [0, 1]
    g.add_argument("--resume", type=input_file(empty="auto"), ...)     # an existing file; '' keeps its meaning

Each type carries its declared domain (`.kind`, `.low`, `.high`, `.low_open`, `.high_open`, `.special`) so that a
test can walk a parser and try every flag's edges (tests/test_flags.py). Values with a meaning of their own (0
turning something off, '' or 'auto') are part of the domain and are said in `domain_text()`, which --help shows.
"""
import argparse
import math
import os


MARK = "\x00"   # separates the value from the problem in a Domain's error (utils.errors.ArgumentParser reads it)


class Domain:
    """A flag's type: parse(text) -> value, or argparse.ArgumentTypeError saying what the domain is."""
    kind = "text"
    low = high = None
    low_open = high_open = False

    def __init__(self, special: dict = None):
        self.special = dict(special or {})        # text -> what it means

    def parse(self, text: str):
        return text

    def check(self, value) -> str:
        """'' when `value` is in the domain, else what is wrong ('must be ...')."""
        return ""

    def domain_text(self) -> str:
        return "any text"

    def special_note(self) -> str:
        return "".join(f" ({k or repr(k)}: {v})" for k, v in self.special.items())

    def describe(self) -> str:
        return self.domain_text() + self.special_note()

    def fail(self, text, problem: str):
        raise argparse.ArgumentTypeError(f"{MARK}{text}{MARK}{problem}{self.special_note()}")

    def __call__(self, text):
        if text in self.special and not isinstance(self, Number):
            return text
        try:
            value = self.parse(text)
        except (ValueError, TypeError):
            self.fail(text, f"is not {self.domain_text()}")
        problem = self.check(value)
        if problem:
            self.fail(text, problem)
        return value

    @property
    def __name__(self):                            # argparse names the type in some messages
        return self.kind


class Number(Domain):
    """A finite int or float in [low, high] (either side open, or unbounded when None)."""

    def __init__(self, kind: str, low=None, high=None, low_open=False, high_open=False, special: dict = None):
        super().__init__(special)
        self.kind, self.low, self.high, self.low_open, self.high_open = kind, low, high, low_open, high_open

    def parse(self, text):
        if self.kind == "int":
            return int(text)
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(text)
        return value

    def contains(self, value) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def check(self, value) -> str:
        if any(self.parse(k) == value for k in self.special):
            return ""
        return "" if self.contains(value) else self.requirement()

    def requirement(self) -> str:
        lo = f"{'(' if self.low_open else '['}{self.low:g}" if self.low is not None else None
        hi = f"{self.high:g}{')' if self.high_open else ']'}" if self.high is not None else None
        if lo and hi:
            return f"must lie in {lo}, {hi}"
        if hi:
            return f"must be {'<' if self.high_open else '<='} {self.high:g}"
        if self.low is None:
            return f"must be {self.domain_text()}"
        if self.low == 0 and self.low_open:
            return "must be positive"
        if self.low == 1 and self.kind == "int" and not self.low_open:
            return "must be positive (an integer >= 1)"
        return f"must be {'>' if self.low_open else '>='} {self.low:g}"

    def domain_text(self) -> str:
        what = "an integer" if self.kind == "int" else "a finite number"
        if self.low is not None and self.high is not None:
            return f"{what} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{what} {'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{what} {'<' if self.high_open else '<='} {self.high:g}"
        return what


def count(low: int = 1, zero: str = None, high: int = None) -> Number:
    """An int >= low (<= high); zero: what 0 means when it is accepted too ('off', 'never'): then the domain is
    an int >= 0, 0 having that meaning."""
    return Number("int", 0 if zero else low, high, special={"0": zero} if zero else None)


def integer(low: int = None, high: int = None) -> Number:
    return Number("int", low, high)


def positive() -> Number:
    """A finite float > 0."""
    return Number("float", 0.0, None, low_open=True)


def nonnegative(zero: str = None) -> Number:
    """A finite float >= 0 (zero: what 0 means, when it means something of its own)."""
    return Number("float", 0.0, None, special={"0": zero} if zero else None)


def probability() -> Number:
    return Number("float", 0.0, 1.0)


def fraction(high_closed: bool = False, zero: str = None) -> Number:
    """A float in (0, 1) (or (0, 1]); zero: what 0 means, when it is accepted too."""
    return Number("float", 0.0, 1.0, low_open=True, high_open=not high_closed, special={"0": zero} if zero else None)


def momentum() -> Number:
    """A float in [0, 1): a momentum or a decay."""
    return Number("float", 0.0, 1.0, high_open=True)


def rate() -> Number:
    """A float in [0, 1): a share that must leave something (a drop-path rate, a label-smoothing weight)."""
    return Number("float", 0.0, 1.0, high_open=True)


def finite() -> Number:
    return Number("float")


class Path(Domain):
    """A path: an existing file or folder to read, or where to write (a folder created if needed, a file whose
    folder exists). A path of the wrong kind says so."""

    def __init__(self, kind: str, special: dict = None, registry=None):
        super().__init__(special)
        self.kind, self.registry = kind, registry

    def check(self, value) -> str:
        if not value:
            return "is empty"
        if self.registry is not None and not os.path.exists(value) and self.registry(value):
            return ""
        if self.kind == "input-file":
            if os.path.isdir(value):
                return "is a folder, not a file"
            return "" if os.path.isfile(value) else "does not exist"
        if self.kind == "input-weights":
            if os.path.isdir(value):
                return "" if os.path.isfile(os.path.join(value, "config.json")) else \
                    "is a folder without config.json, not a checkpoint file or a hub folder"
            return "" if os.path.isfile(value) else "does not exist"
        if self.kind == "input-folder":
            if os.path.isfile(value):
                return "is a file, not a folder"
            return "" if os.path.isdir(value) else "does not exist"
        if self.kind == "folder":
            return "is a file, not a folder" if os.path.isfile(value) else ""
        if self.kind == "data-root":                                   # the dataset reader says what is wrong
            return ""
        if self.kind == "output-folder":
            if os.path.isfile(value):
                return "is not writable: it is a file, not a folder"
            parent = next((p for p in _parents(value) if os.path.exists(p)), "")
            return "" if os.path.isdir(parent or ".") else f"is not writable: {parent} is a file, not a folder"
        if os.path.isdir(value):                                       # output-file
            return "is a folder, not a file"
        folder = os.path.dirname(os.path.abspath(value))
        return "" if os.path.isdir(folder) else f"is in {folder}, which is not an existing folder"

    def domain_text(self) -> str:
        return {"input-file": "an existing file" + (" or a registry name" if self.registry else ""),
                "input-weights": "an existing checkpoint file, a folder in the hub's layout (config.json + "
                                 "model.safetensors)" + (", or a registry name" if self.registry else ""),
                "input-folder": "an existing folder", "folder": "a folder (existing, or to download into)",
                "data-root": "a dataset's folder (existing, or to download into), or a list file (--dataset filelist)",
                "output-folder": "a folder to write in (created if missing)",
                "output-file": "a file to write, in an existing folder"}[self.kind]


def _parents(path: str):
    path = os.path.abspath(path)
    while True:
        yield path
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent


def input_file(empty: str = None, registry=None) -> Path:
    """An existing file (not a folder); empty: what '' means, if it may be left empty; registry(name) -> True
    for names of released weights (downloaded when used)."""
    return Path("input-file", {"": empty} if empty else None, registry)


def input_weights(empty: str = None, registry=None) -> Path:
    """Weights to read: an existing file, or a folder in the hub's layout (one with config.json); empty and
    registry as input_file's."""
    return Path("input-weights", {"": empty} if empty else None, registry)


def input_folder(empty: str = None) -> Path:
    return Path("input-folder", {"": empty} if empty else None)


def folder() -> Path:
    """A folder that need not exist yet (a dataset to download), but is not a file."""
    return Path("folder")


def data_root() -> Path:
    """A dataset's folder (which need not exist yet: a dataset to download), or a list file (--dataset filelist)."""
    return Path("data-root")


def output_folder() -> Path:
    return Path("output-folder")


def output_file() -> Path:
    return Path("output-file")


class Text(Domain):
    """Free text, or text a `check(text) -> problem` function accepts."""

    def __init__(self, what: str = "any text", check=None, special: dict = None):
        super().__init__(special)
        self.what, self._check = what, check

    def check(self, value) -> str:
        return self._check(value) if self._check else ""

    def domain_text(self) -> str:
        return self.what


def text(what: str = "any text", check=None, special: dict = None) -> Text:
    return Text(what, check, special)


def device_name() -> Text:
    """auto, cpu, cuda or cuda:N."""
    def check(value):
        ok = value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit())
        return "" if ok else "is not a device we know"
    return Text("auto, cpu, cuda or cuda:N", check)


def one_of(names, what: str) -> Text:
    """A comma-separated list of `names` (what: one of them is a ..., e.g. 'arch')."""
    names = tuple(names)

    def check(value):
        unknown = [v for v in value.split(",") if v not in names]
        return (f"has an unknown {what} {unknown[0]!r} in {{flag}}; choose among {', '.join(names)}" if unknown
                else "")
    return Text(f"a comma-separated list of {what}s: {', '.join(names)}", check)


class DomainHelpFormatter(argparse.HelpFormatter):
    """--help shows each flag's domain after its help."""

    def _get_help_string(self, action):
        text = action.help or ""
        if isinstance(action.type, Domain) and text != argparse.SUPPRESS:
            text += f" [{action.type.describe()}]"
        return text

