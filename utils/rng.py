"""Randomness that does not depend on the number of processes.

A sample's random numbers (its crops, flips, colour jitter, sampled patches, ScaleMix box, where shuffle-BN
puts its key) come from streams keyed by (seed, epoch, batch) or (seed, epoch, sample), never by rank:

- `BatchRandom` draws the numbers of the whole *global* batch on every rank from one seeded generator, and
  each rank keeps its own rows. One process with global batch B and P processes with B / P each thus give
  every sample the same numbers.
- `sample_seeded` runs a CPU transform (PIL) with the global RNGs seeded by (seed, epoch, sample index), so
  its output does not depend on the process, the worker or the order samples are loaded in.

The rest (dropout, drop path, mixup pairing) stays on each rank's own generators.
"""
import contextlib
import random

import numpy as np
import torch

from utils.dist import get_rank, get_world_size

MASK64 = (1 << 64) - 1


def mix_seed(*key: int) -> int:
    """A 63-bit seed from a tuple of integers (splitmix64 over the parts): nearby keys, unrelated seeds."""
    h = 0x9E3779B97F4A7C15
    for part in key:
        h = (h ^ (int(part) & MASK64)) * 0xBF58476D1CE4E5B9 & MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & MASK64
        h ^= h >> 29
    return h >> 1


class BatchRandom:
    """Uniform draws for the rows of a global batch, the same on every rank; `rand(n, ...)` returns this
    rank's n rows of a [n * world, ...] draw. Reseed it per global batch with `reseed(*key)`.

    `BatchRandom.local(device)` draws n rows from the device's default generator (one process, no key)."""

    def __init__(self, device, rank: int = None, world: int = None, generator: bool = True):
        self.device = torch.device(device)
        self.rank = get_rank() if rank is None else rank
        self.world = get_world_size() if world is None else world
        self.generator = torch.Generator(device=self.device) if generator else None

    @classmethod
    def local(cls, device) -> "BatchRandom":
        return cls(device, rank=0, world=1, generator=False)

    def reseed(self, *key: int) -> "BatchRandom":
        self.generator.manual_seed(mix_seed(*key))
        return self

    def _rows(self, draw, n: int, shape) -> torch.Tensor:
        full = draw(n * self.world, *shape, device=self.device, generator=self.generator)
        return full[self.rank * n:(self.rank + 1) * n] if self.world > 1 else full

    def rand(self, n: int, *shape: int) -> torch.Tensor:
        """This rank's rows [n, *shape] of U[0, 1) numbers drawn for [n * world, *shape]."""
        return self._rows(torch.rand, n, shape)

    def normal(self, n: int, *shape: int) -> torch.Tensor:
        """Like rand, standard normal numbers."""
        return self._rows(torch.randn, n, shape)

    def uniform(self, n: int, low: float, high: float, *shape: int) -> torch.Tensor:
        return self.rand(n, *shape).mul_(high - low).add_(low)

    def randperm(self, total: int) -> torch.Tensor:
        """A permutation of range(total), the same on every rank (total: a global count)."""
        return torch.randperm(total, device=self.device, generator=self.generator)


def _global_states():
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _set_global_states(states):
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])


@contextlib.contextmanager
def sample_seeded(*key: int):
    """Python, numpy and torch's CPU generator seeded from `key` inside the block, restored after it."""
    saved = _global_states()
    s = mix_seed(*key)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.default_generator.manual_seed(s)
    try:
        yield
    finally:
        _set_global_states(saved)
