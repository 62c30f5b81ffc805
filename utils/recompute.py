"""Memory savers that change no number, both built on recomputation in the backward pass.

Activation checkpointing (--grad-checkpointing; the engine applies it to the method's module): a ViT's blocks
and a ResNet's stages keep only their inputs in the forward pass and run again during the backward pass. Less
memory, more compute, the same numbers:

- the random numbers of a recomputed block (dropout, drop path) are the forward's own (torch.utils.checkpoint
  restores the RNG state before recomputing);
- a recomputed stage's batch norms would update their running statistics a second time, so their buffers are put
  back as they were after the forward pass.

The modules keep their attributes (their class gains a checkpointing forward): state-dict keys, and so checkpoints,
stay the same.

Exact accumulation (--accum-steps N; each method says which module is its backbone, `split_batch`): the backbone
runs over the batch in N consecutive chunks, each keeping only its input and output; the heads and the loss see
the whole batch's features, as without; in the backward pass each chunk runs again and takes its share of the
features' gradient (the gradient-caching idea). So a contrastive loss keeps every negative, and the gradient is
the whole batch's, to float round-off. A chunk's batch norms see whole BN splits (`num_splits` is divided by N
while a chunk runs) and the running statistics come out as one update over the batch.
"""
import contextlib
import functools

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


def split_norms(module: nn.Module) -> list:
    """The split batch norms in `module` (modules with num_splits: models.norm.SplitBatchNorm)."""
    return [m for m in module.modules() if hasattr(m, "num_splits")]


@contextlib.contextmanager
def splits_set(splits: list):
    """Each split batch norm of `splits` [(module, num_splits)] split that many ways for the duration."""
    now = [m.num_splits for m, _ in splits]
    for m, n in splits:
        m.num_splits = n
    try:
        yield
    finally:
        for (m, _), n in zip(splits, now):
            m.num_splits = n


@contextlib.contextmanager
def as_in_forward(module: nn.Module, splits: list):
    """What a recomputation runs under: the split batch norms `splits` [(module, num_splits in the forward pass)]
    split as they were then (a chunk of --accum-steps holds fewer splits, and a block inside a chunk may be
    recomputed after the chunk's own recomputation has ended); `module`'s buffers put back afterwards."""
    with splits_set(splits), buffers_kept(module):
        yield


def recompute_context(context_fn) -> dict:
    """checkpoint()'s context_fn, eager only. Compiled, the region is traced once: the backward graph recomputes
    what the gradient needs from the traced ops (the split batch norms as they were traced) and never repeats a
    buffer update (the running statistics are written once, in the forward graph), so there is nothing to restore;
    dynamo takes no Python context there either."""
    return {} if torch.compiler.is_compiling() else {"context_fn": context_fn}


class Checkpointed:
    """Mixed into a module's own class (checkpointed()): its forward runs under checkpointing when it trains with
    gradients, as before otherwise. A copy (EMA, MoCo's key encoder) is a module of the same class, so it
    computes with its own weights."""

    def forward(self, *args, **kwargs):
        plain = super().forward
        if not (self.training and torch.is_grad_enabled()):
            return plain(*args, **kwargs)
        if self.recompute_buffers:
            splits = [(m, m.num_splits) for m in self.split_norms]
            kwargs.update(recompute_context(lambda: (contextlib.nullcontext(), as_in_forward(self, splits))))
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
    module.split_norms = split_norms(module)
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


def _in_chunks(method):
    """method(self, *tensors, **kw) run on self.batch_chunks consecutive parts of the tensors' batch (dim 0),
    the outputs concatenated; under autograd each part keeps only its input and output."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        n = self.batch_chunks
        if n <= 1:
            return method(self, *args, **kwargs)
        plain = functools.partial(method, self, **kwargs)
        splits = [(m, m.num_splits // n) for m in self.split_norms]         # a chunk holds 1/n of the splits
        buffers = list(self.buffers()) if self.training else []     # (frozen or evaluating: nothing updates them)
        start = [b.detach().clone() for b in buffers]
        floats = [b for b in buffers if b.is_floating_point()]
        sums = [torch.zeros_like(b) for b in floats]
        counts = []                                                  # the counters after one chunk: one update
        recompute = lambda: (contextlib.nullcontext(), as_in_forward(self, splits))  # noqa: E731
        outs = []
        for part in zip(*(a.chunk(n) for a in args)):
            if buffers:
                torch._foreach_copy_(buffers, start)                 # every chunk updates the same statistics
            with splits_set(splits):
                if torch.is_grad_enabled():
                    outs.append(checkpoint(plain, *part, use_reentrant=False, **recompute_context(recompute)))
                else:
                    outs.append(plain(*part))
            if floats:
                torch._foreach_add_(sums, floats)
            counts = counts or [b.detach().clone() for b in buffers if not b.is_floating_point()]
        if buffers:                                                  # one update over the whole batch: the mean
            torch._foreach_div_(sums, len(outs))
            torch._foreach_copy_(floats, sums)
            if counts:
                torch._foreach_copy_([b for b in buffers if not b.is_floating_point()], counts)
        return torch.cat(outs)
    return run


_SPLIT = {}


def split_batch(module: nn.Module, chunks: int, methods: tuple = ("forward",)) -> nn.Module:
    """Make `module`'s `methods` (which take batched tensors and return one) run on `chunks` consecutive parts of
    the batch, each recomputed in the backward pass (its class becomes a subclass; state-dict keys stay).
    Exact when nothing in the module mixes samples, except split batch norms whose splits `chunks` divides."""
    bad = [m.num_splits for m in split_norms(module) if m.num_splits % chunks]
    if bad:
        raise ValueError(f"{chunks} chunks do not hold whole batch-norm splits ({bad[0]})")
    cls = type(module)
    key = (cls, tuple(methods))
    if key not in _SPLIT:
        _SPLIT[key] = type(f"BatchSplit{cls.__name__}", (cls,), {m: _in_chunks(getattr(cls, m)) for m in methods})
    module.__class__ = _SPLIT[key]
    module.batch_chunks, module.split_norms = chunks, split_norms(module)
    return module


def recomputes_buffers(model: nn.Module) -> bool:
    """Whether a module in `model` recomputes a region that updates buffers (batch norms under
    --grad-checkpointing or --accum-steps)."""
    return any(getattr(m, "recompute_buffers", False) or (getattr(m, "batch_chunks", 1) > 1 and
                                                          any(True for _ in m.buffers()))
               for m in model.modules())
