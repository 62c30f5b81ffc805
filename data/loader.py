"""Data loaders: a training loader whose batches and augmentations do not depend on the number of processes,
and a sharded, ordered evaluation loader.

Training order: one permutation of the dataset per epoch, seeded by (seed, epoch); global batch i is its
i-th slice of `--batch-size` samples, and rank r takes the r-th contiguous part of it. Each sample's
augmentation is seeded by (seed, epoch, sample index) (utils.rng.sample_seeded). So P processes see exactly
the samples, views and order that one process sees, split in P, whatever --num-workers is.
"""
import math

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from utils.dist import get_rank, get_world_size
from utils.errors import UserError
from utils.rng import mix_seed, sample_seeded
from utils.runtime import seed_worker


def per_rank_batch_size(global_batch: int, world: int = None) -> int:
    world = get_world_size() if world is None else world
    if global_batch <= 0 or global_batch % world:
        raise UserError(f"--batch-size {global_batch} is not divisible by the {world} processes; "
                        f"use a multiple of {world}")
    return global_batch // world


class GlobalBatchSampler(Sampler):
    """This rank's part of each global batch of one (seed, epoch)-seeded permutation (the last partial global
    batch is dropped). Yields lists of sample indices, or of (epoch, index) keys with `keys=True`.

    set_epoch(e) before each epoch; skip_next(k) makes the next pass start at global batch k (resuming)."""

    def __init__(self, n: int, global_batch: int, seed: int, rank: int = None, world: int = None,
                 keys: bool = False):
        self.rank = get_rank() if rank is None else rank
        self.world = get_world_size() if world is None else world
        self.batch = per_rank_batch_size(global_batch, self.world)
        if n < global_batch:
            raise UserError(f"--batch-size {global_batch} is larger than the training set ({n} images); "
                            "use a smaller --batch-size")
        self.n, self.global_batch, self.seed, self.keys = n, global_batch, seed, keys
        self.epoch, self._skip = 0, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def skip_next(self, k: int):
        self._skip = k

    @property
    def next_start(self) -> int:
        """The global batch the next pass starts at."""
        return self._skip

    def take_start(self) -> int:
        """next_start, consumed: the pass after the next one starts at 0 again."""
        start, self._skip = self._skip, 0
        return start

    def __len__(self):
        return self.n // self.global_batch

    def rank_order(self) -> torch.Tensor:
        """[len(self), batch]: this rank's sample indices of every global batch of the current epoch."""
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        perm = torch.randperm(self.n, generator=g)[:len(self) * self.global_batch]
        return perm.view(len(self), self.world, self.batch)[:, self.rank]

    def __iter__(self):
        order = self.rank_order()
        for i in range(self.take_start(), len(self)):
            idx = order[i].tolist()
            yield [(self.epoch, j) for j in idx] if self.keys else idx


class SampleSeeded(Dataset):
    """dataset[(epoch, i)] = dataset[i] computed with the RNGs seeded by (seed, epoch, i)."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = key
        with sample_seeded(self.seed, epoch, i):
            return self.dataset[i]


def build_train_loader(dataset, global_batch: int, num_workers: int, seed: int, device: torch.device,
                       rank: int = None, world: int = None):
    """Global batches of a (seed, epoch) permutation, this rank's part of each; per-sample seeded transforms."""
    sampler = GlobalBatchSampler(len(dataset), global_batch, seed, rank, world, keys=True)
    return DataLoader(SampleSeeded(dataset, seed), batch_sampler=sampler, num_workers=num_workers,
                      pin_memory=device.type == "cuda", worker_init_fn=seed_worker, persistent_workers=False)


class ShardSampler(Sampler):
    """Contiguous, ordered shard of range(n) for this rank, so gathered results keep the dataset order."""

    def __init__(self, n: int, rank: int = None, world: int = None):
        rank = get_rank() if rank is None else rank
        world = get_world_size() if world is None else world
        per = math.ceil(n / world)
        self.indices = range(min(rank * per, n), min((rank + 1) * per, n))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def build_eval_loader(dataset, batch: int, num_workers: int, device: torch.device):
    return DataLoader(dataset, batch_size=batch, sampler=ShardSampler(len(dataset)), num_workers=num_workers,
                      pin_memory=device.type == "cuda", drop_last=False)


def holdout_split(n: int, fraction: float, seed: int):
    """(train indices, held-out indices): a fixed random `fraction` of range(n) held out for validation."""
    if not 0.0 < fraction < 1.0:
        raise UserError(f"--val-split {fraction} must lie in (0, 1)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = max(1, int(round(n * fraction)))
    return sorted(perm[k:]), sorted(perm[:k])
