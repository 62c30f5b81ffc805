"""Bad input by construction: every flag of every script and tool declares its domain (utils.flags), and this test,
generated from the parsers themselves, tries each flag at and beyond its edges.

- A flag without a declared domain (a utils.flags type, or choices, or a switch) fails the test.
- Every value outside a flag's domain (0, -1, NaN, +-inf, a huge value, an empty string, a folder for a file, a
  file for a folder, ...) exits 2 with exactly one line naming the flag, no traceback, before anything runs.
- Every numeric flag's in-domain edge values (a closed bound, just inside an open one, the special 0) pass the
  flags' check, and a --dry-run of the script (data, model, one forward pass) either passes or stops with one
  line (a rule between flags), never a traceback.
"""
import argparse
import importlib
import math
import os

import pytest

from utils.flags import Domain, Number, Path, Text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = tuple(sorted(f[:-3] for f in os.listdir(ROOT) if f.startswith("main_") and f.endswith(".py")))
TOOLS = ("bench.speed", "tools.show_aps", "tools.show_attention", "tools.show_features", "tools.plot_runs",
         "tools.same_runs", "tools.weights", "bench.gpu_report", "bench.gpu_checks", "tools.check_data", "tools.make_shards",
         "tools.reproduce", "tools.embed")
SWITCHES = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction, argparse._HelpAction,
            argparse._CountAction, argparse._VersionAction, argparse._SubParsersAction)
PROBES = ("0", "-1", "nan", "inf", "-inf", "1e30", "", "0.5", "1", "abc")
# A script's tiny model, from the flags it has (not its name): a new script needs no row here. A script that can
# size a ViT (--depth): vit-tiny, depth 1, width 32, 2 heads, patch 8 at the dataset's size; else resnet18 at 16
# px; heads 16 wide (8 at the output); a batch of 32, or 8 beside a queue (which must hold whole batches); no kNN.
VIT_VALUES = {"--depth": "1", "--embed-dim": "32", "--num-heads": "2", "--patch-size": "8"}
TINY_VALUES = {"--moco-k": "16", "--bn-splits": "2", "--knn-every": "0"}


def tiny_flags(parser) -> list:
    """The tiny-model argv of a script's parser, by rule over its flags' names."""
    flags = {o: a for a in parser._actions for o in a.option_strings}
    vit = "--depth" in flags
    out = []
    arch = flags.get("--arch")
    if arch is not None and arch.choices:
        choice = "vit-tiny" if vit else "resnet18"
        assert choice in arch.choices, f"--arch has no {choice}: add the script's smallest model to tiny_flags"
        out += ["--arch", choice] + ([] if vit else ["--img-size", "16"])
    for name in flags:
        if vit and name in VIT_VALUES:
            out += [name, VIT_VALUES[name]]
        elif name in TINY_VALUES:
            out += [name, TINY_VALUES[name]]
        elif name.endswith("-hidden-dim"):
            out += [name, "16"]
        elif name.endswith("-dim") and name != "--embed-dim":
            out += [name, "8"]
    return out + ["--batch-size", "8" if "--moco-k" in flags else "32"]


def data_flags(parser) -> list:
    """The embedded data of a script's parser: --dataset digits where it has that flag (a script with data flags of
    its own, main_segprobe.py, has an embedded default already)."""
    flags = {o: a for a in parser._actions for o in a.option_strings}
    return ["--dataset", "digits"] if "digits" in (getattr(flags.get("--dataset"), "choices", None) or ()) else []


class TinyFlags(dict):
    def __missing__(self, script):
        parser = importlib.import_module(script).get_args_parser()
        return data_flags(parser) + tiny_flags(parser)


TINY = TinyFlags()


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    d = tmp_path_factory.mktemp("flags")
    (d / "a_file.txt").write_text("x")
    (d / "a_folder").mkdir()
    return d


def base_argv(module: str, sub: str, places) -> list:
    """Valid values for the required arguments of `module` (subcommand `sub`)."""
    f, folder = str(places / "a_file.txt"), str(places / "a_folder")
    return {("tools.show_attention", ""): [f], ("tools.show_features", ""): [f], ("tools.plot_runs", ""): [folder],
            ("tools.same_runs", "run"): ["run", str(places / "runs")],
            ("bench.gpu_report", ""): ["--out", str(places / "report")],
            ("bench.gpu_checks", ""): ["--out", str(places / "checks")],
            ("tools.check_data", ""): [folder],
            ("tools.make_shards", ""): [folder, str(places / "shards")],
            ("tools.same_runs", "compare"): ["compare", folder, folder], ("tools.weights", "list"): ["list"],
            ("tools.weights", "download"): ["download", "asym-siam/baseline-r50-100ep"],
            ("tools.weights", "convert"): ["convert", f, str(places / "out.pth")],
            ("tools.weights", "export"): ["export", f, str(places / "out.safetensors")],
            ("tools.embed", ""): [f, "--out", str(places / "e.npy")],
            ("tools.weights", "inspect"): ["inspect", f]}.get((module, sub), [])


def flags_of(module: str):
    """(subcommand, action) for every argument of the module's parser, subcommands included."""
    parser = importlib.import_module(module).get_args_parser()
    out = []

    def walk(p, sub):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sp in a.choices.items():
                    walk(sp, name)
            else:
                out.append((sub, a))
    walk(parser, "")
    return parser, out


def name_of(action) -> str:
    return action.option_strings[0] if action.option_strings else action.dest


def argv_with(base: list, sub: str, action, value) -> list:
    """`base` with `action` given `value` (repeated for nargs=N); a positional replaces its base value."""
    values = [value] * (action.nargs if isinstance(action.nargs, int) else 1)
    if action.option_strings:
        return base + [action.option_strings[0]] + values
    positionals = [a for a in POSITIONALS[id(action)]]
    i = positionals.index(action) + (1 if sub else 0)
    if i < len(base):
        return base[:i] + values + base[i + 1:]
    return base + values


def expected_in(domain: Domain, text: str, places) -> bool:
    """Whether `text` lies in the declared domain, worked out from the declaration (not by calling the type)."""
    if text in domain.special:
        return True
    if isinstance(domain, Number):
        try:
            value = int(text) if domain.kind == "int" else float(text)
        except ValueError:
            return False
        if not math.isfinite(value):
            return False
        if any(float(k) == value for k in domain.special):        # a special value, however it is written
            return True
        low_ok = domain.low is None or value > domain.low or (value == domain.low and not domain.low_open)
        high_ok = domain.high is None or value < domain.high or (value == domain.high and not domain.high_open)
        return low_ok and high_ok
    if isinstance(domain, Path):
        if text == "":
            return False
        is_file, is_dir = os.path.isfile(text), os.path.isdir(text)
        hub = is_dir and os.path.isfile(os.path.join(text, "config.json"))
        return {"input-file": is_file, "input-weights": is_file or hub, "input-folder": is_dir, "folder": not is_file, "data-root": True, "output-folder": not is_file,
                "output-file": not is_dir and os.path.isdir(os.path.dirname(os.path.abspath(text)))}[domain.kind]
    return None                                                   # text: the domain's own check decides


def probes(domain: Domain, places) -> list:
    if isinstance(domain, Path):
        return ["", str(places / "a_file.txt"), str(places / "a_folder"), str(places / "missing" / "x")]
    if isinstance(domain, Text):
        return ["", "no-such-value"] if domain._check else []
    edges = [str(v) for v in (domain.low, domain.high) if v is not None]
    return list(PROBES) + edges


ALL, POSITIONALS = [], {}                     # (module, subcommand, action); action -> its subcommand's positionals
for _m in SCRIPTS + TOOLS:
    _acts = flags_of(_m)[1]
    for _sub, _a in _acts:
        ALL.append((_m, _sub, _a))
        POSITIONALS[id(_a)] = [a for s, a in _acts if s == _sub and not a.option_strings]


def undeclared(entries) -> list:
    """The flags of (module, subcommand, action) entries that declare no domain."""
    return [f"{m} {sub} {name_of(a)}".replace("  ", " ") for m, sub, a in entries
            if not isinstance(a, SWITCHES) and not a.choices and not isinstance(a.type, Domain)]


def test_every_flag_declares_its_domain():
    missing = undeclared(ALL)
    assert not missing, f"flags without a declared domain (utils.flags): {missing}"


def out_of_domain_cases(places):
    cases = []
    for m, sub, a in ALL:
        if isinstance(a.type, Domain) and not a.choices:
            for text in probes(a.type, places):
                inside = expected_in(a.type, text, places)
                if inside is False or (inside is None and text in ("", "no-such-value")):
                    cases.append((m, sub, a, text))
    return cases


def test_every_value_outside_a_domain_exits_2_with_one_line(places, capsys):
    cases = out_of_domain_cases(places)
    assert len(cases) > 500                                       # every numeric and path flag, several values
    failures = []
    parsers = {m: importlib.import_module(m).get_args_parser() for m in SCRIPTS + TOOLS}
    for m, sub, action, text in cases:
        parser = parsers[m]
        argv = argv_with(base_argv(m, sub, places), sub, action, text)
        try:
            parser.parse_args(argv)
            failures.append(f"{m} {argv}: accepted")
            continue
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err.strip().splitlines()
        if code != 2 or len(err) != 1 or not err[0].startswith("error: ") or name_of(action) not in err[0]:
            failures.append(f"{m} {argv}: exit {code}, {err}")
    assert not failures, failures[:10]
    assert not (places / "runs").exists()                         # nothing ran, nothing was written


def in_domain_edges(domain: Number) -> list:
    """A closed bound itself, a value just inside an open one, the special values."""
    out = list(domain.special)
    for bound, is_open, inward in ((domain.low, domain.low_open, 1), (domain.high, domain.high_open, -1)):
        if bound is None:
            continue
        if not is_open:
            out.append(f"{bound:g}")
        else:
            out.append(str(bound + inward) if domain.kind == "int" else f"{bound + inward * 1e-6:g}")
    if domain.low is None and domain.high is None:
        out.append("0")
    return sorted(set(out))


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_in_domain_edges_pass_the_check_and_a_dry_run_never_tracebacks(script, tmp_path, capsys):
    module = importlib.import_module(script)
    parser, actions = flags_of(script)
    for _, a in actions:
        POSITIONALS[id(a)] = [b for _, b in actions if not b.option_strings]
    base = ["--num-workers", "0", "--device", "cpu", *TINY[script], "--dry-run",
            "--output-dir", str(tmp_path / "out")]
    tried, stopped, failures = 0, [], []
    for _, action in actions:
        if not isinstance(action.type, Number) or name_of(action) in ("--num-workers",):
            continue
        for text in in_domain_edges(action.type):
            argv = argv_with(base, "", action, text)
            try:
                args = parser.parse_args(argv)
            except SystemExit:
                failures.append(f"{argv[-2:]}: refused by its own domain: {capsys.readouterr().err.strip()}")
                continue
            tried += 1
            try:
                module.main(args)
            except SystemExit as e:
                err = capsys.readouterr().err.strip().splitlines()
                if e.code != 2 or len(err) != 1 or not err[0].startswith("error: "):
                    failures.append(f"{name_of(action)} {text}: exit {e.code}, {err[-3:]}")
                else:
                    stopped.append(f"{name_of(action)} {text}: {err[0]}")
            except Exception as e:                                # a traceback: the thing this test forbids
                failures.append(f"{name_of(action)} {text}: {type(e).__name__}: {e}")
    assert not failures, failures
    assert tried >= 15 and len(stopped) < tried / 2, stopped


@pytest.mark.parametrize("script, argv, flag", [
    ("main_pretrain", ["--temperature", "1e-40"], "--temperature 1e-40 is outside the range APS is known to train in"),
    ("main_moco", ["--moco-t", "1e-40"], "--moco-t 1e-40 is outside the range MoCo is known to train in"),
])
def test_a_loss_that_diverges_at_once_names_the_flag_outside_the_known_range(script, argv, flag, tmp_path, capsys):
    module = importlib.import_module(script)
    args = module.get_args_parser().parse_args(["--dataset", "digits", "--num-workers", "0", "--device", "cpu",
                                                "--epochs", "1", "--output-dir", str(tmp_path), *TINY[script], *argv])
    with pytest.raises(SystemExit) as e:
        module.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert "non-finite at step 0" in err[0] and flag in err[0] and "--base-lr" not in err[0] and "--lr" not in err[0]


def test_a_path_of_the_wrong_kind_says_so(places, capsys):
    import main_finetune
    import main_pretrain
    for module, argv, said in ((main_pretrain, ["--resume", str(places / "a_folder")], "is a folder, not a file"),
                               (main_pretrain, ["--output-dir", str(places / "a_file.txt")], "is a file, not a folder"),
                               (main_finetune, ["--subset-file", str(places / "a_folder")], "is a folder, not a file")):
        with pytest.raises(SystemExit):
            module.get_args_parser().parse_args(argv)
        assert said in capsys.readouterr().err


def test_a_new_scripts_tiny_model_comes_from_its_flags_not_a_table():
    """A script nobody listed (a SimSiam on ResNets) gets its tiny model from the names of its flags."""
    from data import add_data_args
    from utils.config import ArgumentParser
    p = ArgumentParser()
    add_data_args(p, batch_size=512)
    p.add_argument("-a", "--arch", default="resnet50", choices=("resnet18", "resnet50"))
    p.add_argument("--proj-hidden-dim", type=int, default=2048)
    p.add_argument("--pred-dim", type=int, default=512)
    got = tiny_flags(p)
    assert dict(zip(got[::2], got[1::2])) == {"--arch": "resnet18", "--img-size": "16", "--proj-hidden-dim": "16",
                                              "--pred-dim": "8", "--batch-size": "32"}
