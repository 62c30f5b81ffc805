"""Data loaders: a seeded, per-rank shuffled training loader and a sharded, ordered evaluation loader."""
import math

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from utils.dist import get_rank, get_world_size
from utils.errors import UserError
from utils.runtime import seed_worker


def per_rank_batch_size(global_batch: int) -> int:
    world = get_world_size()
    if global_batch <= 0 or global_batch % world:
        raise UserError(f"--batch-size {global_batch} is not divisible by the {world} processes; "
                        f"use a multiple of {world}")
    return global_batch // world


def build_train_loader(dataset, global_batch: int, num_workers: int, seed: int, device: torch.device):
    """Shuffled with a sampler seeded by (seed, epoch), drop_last, the global batch split over ranks."""
    batch = per_rank_batch_size(global_batch)
    if len(dataset) < global_batch:
        raise UserError(f"--batch-size {global_batch} is larger than the training set ({len(dataset)} images); "
                        "use a smaller --batch-size")
    sampler = DistributedSampler(dataset, num_replicas=get_world_size(), rank=get_rank(), shuffle=True,
                                 seed=seed, drop_last=True)
    return DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=num_workers,
                      pin_memory=device.type == "cuda", drop_last=True, worker_init_fn=seed_worker,
                      persistent_workers=False)


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
