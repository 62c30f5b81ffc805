"""--init-weights: a fresh run whose backbone (and, where names and shapes agree, its heads) starts from any file
the reader takes (ours, the releases, the public layouts of models/outside.py). Only weights move: the schedule,
the optimiser and the epoch start fresh. What was loaded and what was left as initialised is one line, for the log
and report.md."""
import torch.nn as nn

from models.loading import head_name, open_checkpoint
from utils.errors import UserError


def copy_matching(target: nn.Module, state: dict) -> tuple:
    """Copy the entries of `state` whose names and shapes match `target`'s; (loaded, shape mismatches, unused)."""
    own = target.state_dict()
    loaded = sorted(k for k in state if k in own and tuple(state[k].shape) == tuple(own[k].shape))
    shapes = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state
                    if k in own and tuple(state[k].shape) != tuple(own[k].shape))
    unused = sorted(k for k in state if k not in own)
    if loaded:
        target.load_state_dict({**own, **{k: state[k] for k in loaded}})
    return loaded, shapes, unused


def _listed(items: list, limit: int = 3) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def warm_start(source, backbone: nn.Module, whole: nn.Module = None, fresh=(), flag: str = "--init-weights") -> str:
    """Start `backbone` from the backbone of `source`; when `source` is one of our checkpoints whose model fits
    `whole` (the same method), `whole` from its whole model instead (heads included where shapes agree), except
    the entries under `fresh` (a queue, ...). Returns the line saying what was loaded and what was left."""
    ck = open_checkpoint(source)
    model = ck.loaded.get("model") if ck.format.ours else None
    target, state, part = backbone, ck.state, "backbone"
    if whole is not None and isinstance(model, dict):
        own = whole.state_dict()
        if sum(k in own for k in model) > len(ck.state):          # more than the backbone fits: the same method
            target, state, part = whole, {k: v for k, v in model.items() if not k.startswith(tuple(fresh))}, "model"
    loaded, shapes, unused = copy_matching(target, state)
    total = len(target.state_dict())
    if not loaded:
        raise UserError(f"{flag} {ck.name} ({ck.format.name}) has no tensor that fits this model's {part} (names "
                        "and shapes); pass a checkpoint of the same family (a ViT for a ViT, a ResNet for a ResNet)")
    left = total - len(loaded)
    line = (f"{flag} {ck.name} ({ck.format.name}): loaded {len(loaded)} of {total} tensors of the {part}; "
            f"left initialised: {left}")
    if shapes:
        line += f" (shape mismatch: {_listed(shapes)})"
    if unused:
        line += f"; not used: {_listed(unused)}"
    if part == "backbone" and ck.dropped:
        line += f"; the file's heads left out: {_listed(sorted({head_name(k) for k in ck.dropped}))}"
    return line + "; schedule, optimiser and epochs start fresh"
