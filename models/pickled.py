"""A safe reader for `torch.save(module)` files: a whole pickled nn.Module tree turned into a plain state dict
without importing or calling anything the file names.

1. The pickle's opcodes are read first (`pickletools.genops` over the zip's data.pkl) and every global it names
   is checked against an allowlist: capitalised names (classes, never functions) under torch.nn.modules, timm's
   layers and ViT, the reference's model classes (module.model.Vit, ViTEncoderProjHead, ViTEncoderPredHead), and
   what torch's own weights-only loader accepts (OrderedDict, set, storages, dtypes, its tensor-rebuild
   functions). Anything else (os.system, builtins.eval, subprocess.Popen, functools.partial, ...) is refused
   before anything is unpickled, naming the global.
2. The file is then unpickled by torch's weights-only unpickler, the allowlisted names mapped to inert
   stand-in classes that only record their state (torch.serialization.safe_globals): tensors are rebuilt by
   torch itself, and no class of the file is ever imported.
3. The recorded `_parameters`, `_buffers` and `_modules` are walked into dotted state-dict keys.
"""
import pickletools
import re
import warnings
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING

import torch

from utils.errors import UserError, describe

REFERENCE_CLASSES = ("module.model.Vit", "module.model.ViTEncoderProjHead", "module.model.ViTEncoderPredHead")
LAYER_MODULES = ("torch.nn.modules.", "timm.models.vision_transformer", "timm.layers.", "timm.models.layers.")
CLASS_NAME = re.compile(r"[A-Z][A-Za-z0-9_]*$")
ACCEPTED = ("whole-module pickles of the reference's ViTs (module.model.Vit, ViTEncoderProjHead, "
            "ViTEncoderPredHead) built from torch.nn and timm layers, and state dicts")


def torch_allowed() -> set:
    """What torch's weights-only loader accepts by default ('module.name')."""
    from torch._weights_only_unpickler import _get_allowed_globals
    return set(_get_allowed_globals())


def pickle_globals(data: bytes) -> list:
    """Every global the pickle names, as 'module.name', in order of first appearance (Python 2 names mapped as
    the unpickler maps them: __builtin__.set is builtins.set)."""
    found, memo, recent = [], {}, []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("GLOBAL", "INST"):
            module, name = arg.split(" ", 1)
        elif op.name == "STACK_GLOBAL":
            if len(recent) < 2 or not all(isinstance(s, str) for s in recent[-2:]):
                raise UserError("the pickle names a global this reader cannot follow (STACK_GLOBAL without its "
                                "strings); it is not a plain torch.save file")
            module, name = recent[-2:]
        else:
            if op.name in ("MEMOIZE",):
                memo[len(memo)] = recent[-1] if recent else None
            elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = recent[-1] if recent else None
            elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                recent.append(memo.get(arg))
            elif "UNICODE" in op.name or op.name in ("STRING", "BINSTRING", "SHORT_BINSTRING"):
                recent.append(arg)
            elif op.name not in ("PROTO", "FRAME"):
                recent.append(None)
            recent = recent[-2:]
            continue
        recent.append(None)
        if (module, name) in NAME_MAPPING:
            module, name = NAME_MAPPING[(module, name)]
        module = IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"
        if full not in found:
            found.append(full)
    return found


def allowed(full: str, defaults: set) -> bool:
    if full in defaults or full in REFERENCE_CLASSES:
        return True
    module, _, name = full.rpartition(".")
    return bool(CLASS_NAME.match(name)) and any((module + ".").startswith(m) or module == m.rstrip(".")
                                                 for m in LAYER_MODULES)


def read_pickle_bytes(path: str) -> bytes:
    """data.pkl of a torch.save zip file; a one-line error for anything else."""
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path} is a legacy (non-zip) pickle; we read whole-module pickles only in torch's zip "
                        "format: save the model's state_dict() instead")
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
            if not names:
                raise UserError(f"{path} is a zip file but not a PyTorch checkpoint (no data.pkl); pass a .pth "
                                "file saved by torch.save")
            return z.read(names[0])
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise UserError(f"{path} is unreadable (truncated or not a PyTorch file: {describe(e)}); re-download or "
                        "re-create it") from None


def refused_globals(path: str) -> list:
    """The globals of `path`'s pickle that the allowlist refuses (nothing is unpickled)."""
    try:
        names = pickle_globals(read_pickle_bytes(path))
    except (ValueError, EOFError, IndexError) as e:              # pickletools on a damaged stream
        raise UserError(f"{path} is unreadable (a damaged pickle: {describe(e)}); re-download or re-create "
                        "it") from None
    defaults = torch_allowed()
    return [g for g in names if not allowed(g, defaults)]


class Recorded:
    """An inert stand-in for a class the file names: it records its arguments and state, and does nothing."""
    qualname = "?"

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


def stand_in(full: str) -> type:
    return type(full.rpartition(".")[2], (Recorded,), {"qualname": full})


def walk(node, prefix: str, out: dict, path: str, eps: dict):
    """The recorded module `node`'s parameters and persistent buffers, then its children's, as dotted keys; the
    epsilon of every norm layer into `eps` (module path -> eps: a state dict does not hold it)."""
    state = getattr(node, "state", None)
    if not isinstance(node, Recorded) or not isinstance(state, dict) or not isinstance(state.get("_modules"), dict):
        raise UserError(f"{path}: {prefix or 'the top object'} is not a recorded nn.Module; {ACCEPTED} are read")
    if node.qualname.endswith("Norm") and isinstance(state.get("eps"), float):
        eps[prefix.rstrip(".")] = state["eps"]
    skip = state.get("_non_persistent_buffers_set") or set()
    for kind in ("_parameters", "_buffers"):
        for name, t in (state.get(kind) or {}).items():
            if t is None or (kind == "_buffers" and name in skip):
                continue
            if not torch.is_tensor(t):
                raise UserError(f"{path}: {prefix}{name} is a {type(t).__name__}, not a tensor; {ACCEPTED} are read")
            out[prefix + name] = t.detach()
    for name, child in state["_modules"].items():
        if child is not None:
            walk(child, f"{prefix}{name}.", out, path, eps)


def first_heads(node):
    """num_heads of the first attention layer of the tree (heads are not in a state dict), or None."""
    state = getattr(node, "state", {}) or {}
    if node.qualname.endswith("Attention") and isinstance(state.get("num_heads"), int):
        return state["num_heads"]
    for child in (state.get("_modules") or {}).values():
        if isinstance(child, Recorded):
            found = first_heads(child)
            if found is not None:
                return found
    return None


def read_module_tree(path: str, what: str = "weights") -> dict:
    """{'module_tree': the top class ('module.model.Vit'), 'state': its state dict, 'num_heads': int or None,
    'eps': {norm layer path: epsilon}} of a torch.save(module) file, read without importing or calling anything
    it names."""
    refused = refused_globals(path)
    if refused:
        raise UserError(f"{what} {path} contains pickled Python objects that are not a plain model (it names "
                        f"{refused[0]}); we refuse to unpickle it, since that could run code: we read {ACCEPTED}")
    names = [g for g in pickle_globals(read_pickle_bytes(path)) if g not in torch_allowed()]
    stand_ins = {g: stand_in(g) for g in names}
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals([(c, g) for g, c in stand_ins.items()]):
            warnings.simplefilter("ignore")
            top = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged or unusual pickle can fail anywhere inside the unpickler
        raise UserError(f"{what} {path} is unreadable as a module tree ({describe(e)}); {ACCEPTED} are read") from None
    if not isinstance(top, Recorded) or top.qualname not in REFERENCE_CLASSES:
        kind = top.qualname if isinstance(top, Recorded) else type(top).__name__
        raise UserError(f"{what} {path} holds a pickled {kind}: we refuse whole-module pickles other than the "
                        f"reference's models ({', '.join(REFERENCE_CLASSES)}); save its state_dict() instead")
    state, eps = {}, {}
    walk(top, "", state, path, eps)
    return {"module_tree": top.qualname, "state": state, "num_heads": first_heads(top), "eps": eps}
