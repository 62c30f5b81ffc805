"""Checkpoints: plain dicts of tensors and builtins, written atomically, read with weights_only=True."""
import os
import pickle
import warnings

import torch

from utils.errors import UserError, describe
from utils.failpoints import failpoint

LATEST = "checkpoint.pth"
RECORD = "backbone_record"     # what a checkpoint we write says about its own layout (backbone_record)


def backbone_record(method: str, family: str, prefix: str, heads=(), config: dict = None, classifier: str = None,
                    format: str = None) -> dict:
    """A checkpoint's description of itself, saved beside its weights, so that every reader (models.loading) takes
    the backbone of any method's checkpoint without a table of layouts. family: 'vit' (rebuilt by create_vit from
    `config`) or 'resnet' (its arch and stem read off the weights); prefix: where the backbone's keys sit in
    "model"; heads: key prefixes (in "model") that are not backbone (projectors, predictors, a classifier);
    classifier: the prefix of a trained classifier head (Linear weight and bias) a reader may keep; format: the
    name readers give the layout (default ours-<method>)."""
    return {"method": method, "format": format or f"ours-{method.lower()}", "family": family, "prefix": prefix,
            "heads": list(heads), "classifier": classifier, "config": dict(config or {})}


def save_checkpoint(state: dict, path: str):
    """Write `state` to `path` atomically: a temporary file in the same folder, fsync, then rename.

    A crash at any moment leaves either the previous file or the new one, never a partial file.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            failpoint("checkpoint-write")
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"could not write checkpoint {path}: {e.strerror or e}; "
                        "free disk space or choose a writable --output-dir (the previous checkpoint is intact)") from e


class PickledObjects(UserError):
    """A file that holds more than tensors and plain containers (a whole pickled module, or code): refused
    here; models.pickled reads the module trees it knows without running anything."""


def load_file(path: str, what: str = "checkpoint") -> dict:
    """torch.load with weights_only=True, turning every failure into a one-line UserError."""
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} does not exist; check the path")
    try:
        with warnings.catch_warnings():  # torch's notes about pickle protocols are noise to a user here
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise PickledObjects(f"{what} {path} contains pickled Python objects (e.g. a whole nn.Module), which we "
                                 "refuse to load because unpickling can run code; save and pass a state_dict "
                                 "instead") from e
        raise UserError(f"{what} {path} is not a PyTorch checkpoint ({e}); pass a .pth file saved by torch.save") from e
    except Exception as e:  # a damaged or foreign file can fail anywhere inside the unpickler
        raise UserError(f"{what} {path} is unreadable (truncated or not a PyTorch file: {describe(e)}); "
                        "re-download or re-create it") from e
    if not isinstance(obj, dict):
        raise UserError(f"{what} {path} holds a {type(obj).__name__}, not a dict of tensors; "
                        "pass a state_dict or a checkpoint of this repo")
    return obj


TRAINING_KEYS = ("model", "optimizer", "epoch", "args")


def load_training_checkpoint(path: str) -> dict:
    ckpt = load_file(path)
    missing = [k for k in TRAINING_KEYS if k not in ckpt]
    if missing:
        raise UserError(f"{path} is not a training checkpoint of this repo (no {', '.join(missing)}); "
                        "--resume takes a checkpoint.pth written by the same script")
    return ckpt


def find_resume_path(resume: str, output_dir: str):
    """--resume wins; otherwise auto-resume from <output_dir>/checkpoint.pth when it exists."""
    if resume:
        return resume
    path = os.path.join(output_dir, LATEST)
    return path if os.path.isfile(path) else None


def load_strict(model: torch.nn.Module, state: dict, source: str, expect_missing=()):
    """load_state_dict(strict=True), with missing/unexpected/mismatched keys named in one line.

    expect_missing: keys that must be absent from `state` (exactly those; e.g. a new classifier's), which
    keep the model's own values.
    """
    own = model.state_dict()
    expect_missing = set(expect_missing)
    if not expect_missing <= set(own):
        raise ValueError(f"expect_missing names keys the model does not have: {sorted(expect_missing - set(own))}")
    present = sorted(expect_missing & set(state))
    if present:
        raise UserError(f"{source} already holds {', '.join(present)}, which should be new; pass a backbone "
                        "(pretraining) checkpoint, or use --resume / --evaluate for a trained classifier")
    missing = sorted(set(own) - set(state) - expect_missing)
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(set(own) & set(state))
              if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                parts.append(f"{label}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}")
        raise UserError(f"{source} does not fit the model ({'; '.join(parts)}); check --arch/--patch-size/--img-size")
    model.load_state_dict({**state, **{k: own[k] for k in expect_missing}}, strict=True)
