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
from utils.transfer import to_device

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

    Every number is drawn on the CPU, whatever `device` is, and then moved there without a host sync
    (utils.transfer.to_device): a CUDA generator's stream depends on the GPU model, the CPU's does not, so a
    seed gives the same crops, patches and permutations on the CPU and on any GPU. `device`: where the draws
    are returned; `host()` is the same stream returning them on the CPU (for parameters worked out there).

    `BatchRandom.local(device)` draws n rows from the CPU's default generator (one process, no key)."""

    def __init__(self, device, rank: int = None, world: int = None, generator: bool = True):
        self.device = torch.device(device)
        self.rank = get_rank() if rank is None else rank
        self.world = get_world_size() if world is None else world
        self.generator = torch.Generator() if generator else None

    @classmethod
    def local(cls, device) -> "BatchRandom":
        return cls(device, rank=0, world=1, generator=False)

    def reseed(self, *key: int) -> "BatchRandom":
        self.generator.manual_seed(mix_seed(*key))
        return self

    def host(self) -> "BatchRandom":
        """This stream (the same generator, rank and world), returning its draws on the CPU."""
        if self.device.type == "cpu":
            return self
        twin = BatchRandom("cpu", self.rank, self.world, generator=False)
        twin.generator = self.generator
        return twin

    def _rows(self, draw, n: int, shape) -> torch.Tensor:
        full = draw(n * self.world, *shape, generator=self.generator)
        rows = full[self.rank * n:(self.rank + 1) * n] if self.world > 1 else full
        return to_device(rows, self.device)

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
        return to_device(torch.randperm(total, generator=self.generator), self.device)

    def noise(self, n: int, *shape: int, device=None) -> torch.Tensor:
        """This rank's rows [n, *shape] of standard normal noise made on `device` (default: self.device) from one
        CPU draw, a key: counter_normal over the global rows. For noise too large to draw on the host and copy
        (random erasing's per-pixel values); the same numbers on any device, to float round-off."""
        key = int(torch.randint(0, 2**62, (), generator=self.generator))       # a CPU tensor: no device sync
        return counter_normal(key, self.rank * n, n, shape, torch.device(device or self.device))


HASH_MULTIPLIERS = (0x7FEB352D, 0x5BD1E995)  # odd, below 2**31: a 32-bit value times one stays below 2**63
MASK32 = 0xFFFFFFFF


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply rounds) of int64 x in [0, 2**32), exact in int64 on any device."""
    for m in HASH_MULTIPLIERS:
        x = ((x ^ (x >> 16)) * m) & MASK32
    return x ^ (x >> 15)


def counter_uniform(key: int, counters: torch.Tensor) -> torch.Tensor:
    """U(0, 1) floats (24 bits) from a 62-bit key and int64 counters in [0, 2**32): two hash rounds keyed by
    the key's halves. A counter-based generator: value i depends only on (key, i), not on the device."""
    lo, hi = key & MASK32, (key >> 32) & MASK32
    h = hash32(hash32(counters ^ lo) ^ hi)
    return ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))


def counter_normal(key: int, first_row: int, n: int, shape, device: torch.device) -> torch.Tensor:
    """Rows [first_row, first_row + n) of standard normal noise [*, *shape] keyed by `key` (Box-Muller over
    pairs of counter_uniform draws)."""
    per_row = 1
    for s in shape:
        per_row *= s
    idx = torch.arange(first_row * per_row, (first_row + n) * per_row, device=device, dtype=torch.int64)
    u1, u2 = counter_uniform(key, 2 * idx & MASK32), counter_uniform(key, (2 * idx + 1) & MASK32)
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2 * torch.pi) * u2)
    return z.view(n, *shape)


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
