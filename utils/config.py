"""The scripts' ArgumentParser, --config FILE.yaml (a run's flags from a YAML file), and config.yaml, the resolved
flags every run writes.

A config file maps flag names to values (`batch-size: 512`, `batch_size: 512` and `nepoch: 1600` all work: a
flag's destination or any of its option names, with - or _). Its values become the parser's defaults, so flags
given on the command line win. Each value is checked as the flag itself would check it (its type and domain,
its choices, a list for a flag that takes several values, true/false for a switch); an unknown key or a bad
value stops the script with the same one-line error a flag gets. A value left empty (`key:` or `key: null`) is
the flag's default where that default is "unset" (None, e.g. --img-size: the preset's), and refused elsewhere;
a flag that takes N values takes a list of exactly N; a key given twice (or one flag under two spellings) is
refused. The file is UTF-8 text, with or without a byte-order mark (utils.textfile). Every run writes the flags
it resolved to <output-dir>/config.yaml; `--config <output-dir>/config.yaml --output-dir NEW` reruns it exactly.
"""
import argparse
import os
import sys

import yaml

from utils.errors import UserError
from utils.flags import MARK, DomainHelpFormatter
from utils.textfile import read_text

CONFIG = "config.yaml"
NOT_SAVED = ("config",)         # flags a config file does not carry
MAX_CONFIG_BYTES = 1 << 20      # a config of flags is a few kB


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping with a key given twice (SafeLoader keeps the last silently)."""


def _unique_mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        try:
            first = seen.setdefault(key, line)
        except TypeError:                                           # an unhashable key: construct_mapping says so
            break
        if first != line:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice (lines {first} and "
                                                    f"{line}); keep one", key_node.start_mark)
    return loader.construct_mapping(node, deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def config_path(argv: list):
    """The value of --config in argv (None without one)."""
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    return None


def _names(action) -> set:
    names = {action.dest} | {o.lstrip("-") for o in action.option_strings}
    return names | {n.replace("-", "_") for n in names} | {n.replace("_", "-") for n in names}


def _convert(action, value, fail):
    """value (from YAML) as the flag would parse it; fail(message) for a value the flag refuses."""
    option = (action.option_strings or [action.dest])[-1]
    if action.nargs == 0:                                            # a switch
        if not isinstance(value, bool):
            fail(f"{option} is a switch: give true or false, not {value!r}")
        return value
    if value is None:
        if action.default is None:                                   # "unset" is the flag's own default
            return None
        fail(f"{option} is empty (null); give it a value, or remove the line to keep the default {action.default!r}")
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    if many and not isinstance(value, (list, tuple)):
        fail(f"{option} takes a list of values, not {value!r}")
    if not many and isinstance(value, (list, tuple, dict)):
        fail(f"{option} takes one value, not {value!r}")
    if many and isinstance(action.nargs, int) and len(value) != action.nargs:
        fail(f"{option} takes a list of exactly {action.nargs} values, not {len(value)} ({value!r})")
    if many and action.nargs == "+" and not value:
        fail(f"{option} takes a list of at least one value, not an empty list")
    items = list(value) if many else [value]
    out = []
    for item in items:
        if item is None or isinstance(item, (list, tuple, dict)):
            fail(f"{option} takes plain values, not {item!r} inside its list")
        text = str(item).lower() if isinstance(item, bool) else str(item)
        try:
            item = action.type(text) if action.type else text
        except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
            message = str(e)
            if MARK in message:                                       # a declared domain: "value MARK problem"
                _, value, problem = message.split(MARK, 2)
                message = f"{value} {problem.lstrip(': ')}".replace("{flag}", option)
            fail(f"{option} {message}")
        if action.choices is not None and item not in action.choices:
            fail(f"{option} {item!r} is not one of {', '.join(map(str, action.choices))}")
        out.append(item)
    return out if many else out[0]                                   # (a list, as argparse gives for nargs)


def read_config(parser: argparse.ArgumentParser, path: str) -> dict:
    """{dest: value} of a config file, every key a flag of `parser` and every value checked as the flag checks it
    (parser.error: one line, exit 2)."""
    fix = "pass a YAML file of flag: value lines"
    if not os.path.exists(path):
        parser.error(f"--config {path} does not exist; {fix}")
    try:
        data = yaml.load(read_text(path, f"--config {path}", fix, MAX_CONFIG_BYTES), Loader=UniqueKeyLoader)
    except UserError as e:
        parser.error(str(e))
    except yaml.YAMLError as e:
        parser.error(f"--config {path} is not readable YAML ({' '.join(str(e).split())[:200]})")
    if data is None:
        return {}
    if not isinstance(data, dict):
        parser.error(f"--config {path} holds a {type(data).__name__}, not flag: value lines")
    actions = [a for a in parser._actions if a.dest not in ("help",) + NOT_SAVED]
    out, keys = {}, {}
    for key, value in data.items():
        action = next((a for a in actions if str(key) in _names(a)), None)
        if action is None:
            parser.error(f"--config {path}: unknown key {key!r}, not a flag of this script; fix or remove it")
        if action.dest in keys:
            parser.error(f"--config {path}: {keys[action.dest]!r} and {key!r} are the same flag; keep one")
        keys[action.dest] = key
        out[action.dest] = _convert(action, value, lambda m: parser.error(f"--config {path}: {m}"))
    return out


def plain(value):
    """A flag's value as YAML can hold it (tuples as lists; anything else unusual as its text)."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def write_config(output_dir: str, flags: dict) -> str:
    """<output_dir>/config.yaml of the resolved flags (written whole, then renamed into place)."""
    path = os.path.join(output_dir, CONFIG)
    body = {k: plain(v) for k, v in flags.items() if k not in NOT_SAVED}
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("# the resolved flags of this run; rerun it with --config THIS_FILE --output-dir NEW_FOLDER\n")
        yaml.safe_dump(body, f, sort_keys=False, default_flow_style=None)
    os.replace(tmp, path)
    return path


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag gives one line (`error: ... (see X --help)`) instead of usage + error, and --help
    shows every flag's declared domain (utils.flags)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DomainHelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):
        """argparse's, after a --config file (read_config) has set the defaults: flags given here win."""
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
