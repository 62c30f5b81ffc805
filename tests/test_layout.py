"""The code's layout, kept by tests: the import floors, no import cycles, thin entry scripts, and each reference
constant of a recipe stated once. Every import counts, those inside functions included (an ast walk)."""
import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = tuple(sorted(f for f in os.listdir(ROOT) if f.startswith("main_") and f.endswith(".py")))  # discovered
# floor of each top-level name: a file may import from its own floor and those below, never from above
FLOORS = {"utils": 0, "augment": 1, "data": 1, "models": 1, "samplers": 1, "engine": 2, "methods": 3, "tools": 4, "bench": 4}
ENTRY_FLOOR = 5                                          # main_*.py and hubconf.py


def project_files() -> list:
    """Every .py file of the project (relative paths), tests and the virtual environment left out."""
    out = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("tests", "__pycache__", "output")]
        out += [os.path.relpath(os.path.join(folder, f), ROOT) for f in files if f.endswith(".py")]
    return sorted(out)


def module_file(name: str):
    """The project file that module `name` is (a.b -> a/b.py or a/b/__init__.py), or None (not ours)."""
    base = os.path.join(*name.split("."))
    for path in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(os.path.join(ROOT, path)):
            return path
    return None


def imports_of(path: str) -> set:
    """The project files `path` imports (`from a import b` names a/b.py when b is a module, else a)."""
    tree = ast.parse(open(os.path.join(ROOT, path)).read(), path)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {module_file(a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: a relative import"
            for a in node.names:
                out.add(module_file(f"{node.module}.{a.name}") or module_file(node.module))
    out.discard(None)
    out.discard(path)
    return out


def floor_of(path: str) -> int:
    top = path.split(os.sep)[0].removesuffix(".py")
    return FLOORS.get(top, ENTRY_FLOOR)


def is_entry(path: str) -> bool:
    return floor_of(path) == ENTRY_FLOOR


@pytest.fixture(scope="module")
def graph() -> dict:
    return {path: imports_of(path) for path in project_files()}


def test_every_file_is_on_a_known_floor(graph):
    unknown = [p for p in graph if is_entry(p) and os.sep in p]
    assert not unknown, f"files outside the known folders: {unknown}; add their folder to FLOORS"
    assert set(SCRIPTS) | {"hubconf.py"} == {p for p in graph if is_entry(p)}


def test_no_file_imports_from_a_floor_above_it_or_a_script(graph):
    climbs = [f"{p} -> {q}" for p, deps in graph.items() for q in deps
              if is_entry(q) or floor_of(q) > floor_of(p)]
    assert not climbs, climbs
    assert all(floor_of(q) == 0 for p, deps in graph.items() if floor_of(p) == 0 for q in deps)   # utils: the ground


def test_no_import_cycles(graph):
    state, stack, cycles = {}, [], []

    def visit(p):
        state[p] = "open"
        stack.append(p)
        for q in sorted(graph[p]):
            if state.get(q) == "open":
                cycles.append(" -> ".join(stack[stack.index(q):] + [q]))
            elif q not in state:
                visit(q)
        stack.pop()
        state[p] = "done"
    for p in sorted(graph):
        if p not in state:
            visit(p)
    assert not cycles, cycles


def test_the_checks_see_what_they_should():
    """The walk finds imports inside functions, and the floors and the cycle search would catch a climb."""
    assert "models/vit.py" in imports_of("models/loading.py")
    assert "augment/recipes.py" in imports_of("samplers/aps.py")
    assert floor_of("utils/dist.py") < floor_of("models/moco.py") < floor_of("engine/trainer.py") < floor_of("bench/speed.py")
    assert is_entry("main_moco.py") and not is_entry("tools/weights.py")


@pytest.mark.parametrize("script", SCRIPTS)
def test_entry_scripts_are_flags_and_main(script):
    source = open(os.path.join(ROOT, script)).read()
    assert len(source.splitlines()) <= 150, f"{script} has grown past 150 lines"
    tree = ast.parse(source)
    defs = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert {"get_args_parser", "main"} <= defs <= {"get_args_parser", "main", "validate"}, defs


# each recipe constant of the reference (docs/REFERENCE.md), as a literal: stated once in the code (docstrings, comments
# and help text aside)
RECIPE_CONSTANTS = [(0.4, 0.4, 0.4, 0.1), (0.15, 1.0), "rand-m9-mstd0.5-inc1", "rand-m10-n2-mstd0.5"]


def literal_places(value) -> list:
    """Where `value` is written as a literal in the project's code (help= texts and docstrings not counted)."""
    places = []
    for path in project_files():
        tree = ast.parse(open(os.path.join(ROOT, path)).read(), path)
        skip = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "help":
                skip |= {id(n) for n in ast.walk(node.value)}
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and node.body \
                    and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant):
                skip.add(id(node.body[0].value))
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            try:
                if isinstance(node, (ast.Tuple, ast.List, ast.Constant)) and ast.literal_eval(node) == value:
                    places.append(f"{path}:{node.lineno}")
            except (ValueError, TypeError, SyntaxError):       # not a literal
                pass
    return places


@pytest.mark.parametrize("value", RECIPE_CONSTANTS, ids=str)
def test_each_reference_recipe_constant_is_stated_once(value):
    places = literal_places(value)
    assert len(places) == 1, f"{value!r} is written at {places}; state it once (augment/recipes.py) and refer to it"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_takes_both_spellings_of_the_epoch_count(script):
    import importlib
    parser = importlib.import_module(script.removesuffix(".py")).get_args_parser()
    assert parser.parse_args(["--nepoch", "3"]).epochs == 3 == parser.parse_args(["--epochs", "3"]).epochs


def text_files() -> list:
    """Every text file a clone holds: code, docs, CI (the virtual environment and outputs left out)."""
    out = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in (".venv", ".git", "__pycache__", "output")]
        out += [os.path.relpath(os.path.join(folder, f), ROOT) for f in files
                if f.endswith((".py", ".md", ".txt", ".cfg", ".toml", ".yaml", ".sh")) or f == "run"]
    return sorted(out)


def markdown_anchors(path: str) -> set:
    """The anchors GitHub gives a Markdown file's headings (lower case, punctuation dropped, spaces to hyphens)."""
    anchors = set()
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        for line in f:
            if line.startswith("#"):
                title = line.lstrip("#").strip().lower()
                anchors.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return anchors


def test_the_repo_stands_alone_and_every_citation_of_the_reference_resolves():
    anchors = markdown_anchors("docs/REFERENCE.md")
    assert {"aps-sampling", "moco-switches", "linear-probe", "bugs-we-fix", "results"} <= anchors
    cited, outside = 0, []
    for path in text_files():
        with open(os.path.join(ROOT, path), encoding="utf-8", errors="replace") as f:
            text = f.read()
        outside += [f"{path}: {m.group(0)!r}" for m in re.finditer(r"\bSPEC\b[ ._]?[A-E]?\d?|\.\./shared|shared/S[P]EC|"
                                                                  r"[Ii]ssue #?\d+", text)]
        for m in re.finditer(r"REFERENCE\.md#([\w-]+)", text):
            cited += 1
            assert m.group(1) in anchors, f"{path} cites REFERENCE.md#{m.group(1)}, which is no heading there"
    assert not outside, outside                # pointers to files or trackers a clone does not have
    assert cited > 40


def code_words(path: str) -> set:
    """Every identifier and string literal of a file's code: docstrings and comments left out."""
    tree = ast.parse(open(os.path.join(ROOT, path), encoding="utf-8").read())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    words = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            words.add(node.id)
        elif isinstance(node, ast.Attribute):
            words.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.arg)):
            words.add(getattr(node, "name", None) or node.arg)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words.add(node.value)
    return words


def test_a_new_method_is_a_script_a_method_and_a_model():
    # the loop names no method, model or flag of one (the scripts and methods bring those)
    named = {w for f in sorted(os.listdir(os.path.join(ROOT, "engine"))) if f.endswith(".py")
             for w in code_words(os.path.join("engine", f))
             if re.search(r"(?<![a-z])(aps|moco|knn|vit|resnet|lincls|finetune|probe|temperature|arch)(?![a-z])", w,
                          re.I)}
    assert not named, named
    # the tests find the scripts by their prefix
    assert len(SCRIPTS) >= 4 and all(re.fullmatch(r"main_\w+\.py", s) for s in SCRIPTS)
    # every recipe type reaches both realisations through the registry, not a table to edit
    import augment.batched  # noqa: F401  (each realisation registers itself on import)
    import augment.pil  # noqa: F401
    from augment.recipes import _REALISERS, MoCoViews, Pair, View
    assert {(t, how) for t in (View, Pair, MoCoViews) for how in ("pil", "batched")} <= set(_REALISERS)
    # each script brings its method (methods/) and its model (models/); nothing else lists the methods
    for script in SCRIPTS:
        imported = imports_of(script)
        assert any(m.startswith("methods/") for m in imported) and any(m.startswith("models/") for m in imported), script
