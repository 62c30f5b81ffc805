"""Activation checkpointing (--grad-checkpointing; the engine applies it to the method's module): a ViT's blocks
and a ResNet's stages keep only their inputs in the forward pass and run again during the backward pass. Less
memory, more compute, the same numbers:

- the random numbers of a recomputed block (dropout, drop path) are the forward's own (torch.utils.checkpoint
  restores the RNG state before recomputing);
- a recomputed stage's batch norms would update their running statistics a second time, so their buffers are put
  back as they were after the forward pass.

The modules keep their attributes (their class gains a checkpointing forward): state-dict keys, and so checkpoints,
stay the same.
"""
import contextlib

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


@contextlib.contextmanager
def buffers_kept(module: nn.Module):
    """Every buffer of `module` (batch-norm statistics and counters) as it was on entering the block."""
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


class Checkpointed:
    """Mixed into a module's own class (checkpointed()): its forward runs under checkpointing when it trains with
    gradients, as before otherwise. A copy (EMA, MoCo's key encoder) is a module of the same class, so it
    computes with its own weights."""

    def forward(self, *args, **kwargs):
        plain = super().forward
        if not (self.training and torch.is_grad_enabled()):
            return plain(*args, **kwargs)
        if self.recompute_buffers:
            kwargs["context_fn"] = lambda: (contextlib.nullcontext(), buffers_kept(self))
        return checkpoint(plain, *args, use_reentrant=False, **kwargs)


_CLASSES = {}


def checkpointed(module: nn.Module) -> nn.Module:
    """Make `module` checkpoint its forward (its class becomes a subclass with Checkpointed mixed in)."""
    cls = type(module)
    if not issubclass(cls, Checkpointed):
        if cls not in _CLASSES:
            _CLASSES[cls] = type(f"Checkpointed{cls.__name__}", (Checkpointed, cls), {})
        module.__class__ = _CLASSES[cls]
    module.recompute_buffers = any(True for _ in module.buffers())          # batch norms to restore after a recompute
    return module


def enable_grad_checkpointing(model: nn.Module) -> int:
    """Checkpoint every ViT block (a module with .attn and .mlp inside a `blocks` list) and every ResNet stage
    (layer1..layer4) in `model`; returns how many modules now checkpoint."""
    done = 0
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        is_block = hasattr(module, "attn") and hasattr(module, "mlp") and ".blocks." in f".{name}"
        is_stage = leaf in ("layer1", "layer2", "layer3", "layer4") and isinstance(module, nn.Sequential)
        if is_block or is_stage:
            checkpointed(module)
            done += 1
    return done

