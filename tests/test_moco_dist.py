"""MoCo across processes and switches.

2-process gloo runs against the single-process computation they must equal (float64, 3 SGD steps):
- no BN: the DDP run (shuffle across ranks, all-gathered enqueue) equals one process on the global batch;
- AsymBN: equals a hand-written step where the query projector's BN sees each rank's half and the key
  projector's BN the whole global batch (MeanEnc and MultiCrop on, so that both travel across ranks);
- shuffle-BN: plain BN in 2 processes equals split BN (2 chunks) in one process, MeanEnc and MultiCrop on,
  with the key permutation drawn from a BatchRandom (the same on every rank).
Every combination of the five switches runs a step: the four data-side ones in one process, all sixteen
again with AsymBN really synchronised in the 2-process run.
"""
import itertools

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import default_collate

from augment.pil import pil_pipeline
from augment.recipes import moco_views
from data import build_dataset
from data.datasets import get_preset
from models.moco import MoCo, moco_inputs, moco_loss, shuffle_permutation, synchronise_key_projector
from models.norm import SplitBatchNorm
from models.resnet import create_resnet, moco_projector
from utils.rng import BatchRandom
from models.norm import DistBatchNorm

N, K, STEPS, WORLD = 8, 16, 3, 2           # global batch, queue, steps, processes
DATA_SWITCHES = ("multicrop", "scalemix", "asymm_aug", "mean_encoding")


class Trunk(nn.Module):
    """A BN-free trunk, so that BN lives in the projector only (where AsymBN acts)."""

    def __init__(self, projector_bn: bool):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 12), nn.Tanh())
        self.fc = moco_projector(12, 10, 6) if projector_bn else nn.Linear(12, 6)

    def forward(self, x):
        return self.fc(self.body(x))


def make_moco(projector_bn: bool) -> MoCo:
    torch.manual_seed(0)
    return MoCo(Trunk(projector_bn), dim=6, queue_size=K, momentum=0.9, temperature=0.2).double()


class BNTrunk(nn.Module):
    """conv -> BN (plain, or split into `splits` chunks) -> linear: BN in the trunk, as in a ResNet."""

    def __init__(self, splits: int):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.bn = SplitBatchNorm(5, num_splits=splits)
        self.fc = nn.Linear(5 * 4 * 4, 6)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def make_bn_moco(splits: int) -> MoCo:
    torch.manual_seed(0)
    return MoCo(BNTrunk(splits), dim=6, queue_size=K, momentum=0.9, temperature=0.2).double()


def make_batches(num_keys: int, num_minis: int):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(N, 3, 4, 4, generator=g, dtype=torch.float64),
             torch.randn(num_keys, N, 3, 4, 4, generator=g, dtype=torch.float64),
             torch.randn(num_minis, N, 3, 4, 4, generator=g, dtype=torch.float64) if num_minis else None)
            for _ in range(STEPS)]


def local(batch, rank, world):
    """Rank `rank`'s share of a global batch: the batch dimension is dim 0 of the query, dim 1 of the others."""
    n = N // world
    query, keys, minis = batch
    return (query[rank * n:(rank + 1) * n], keys[:, rank * n:(rank + 1) * n],
            None if minis is None else minis[:, rank * n:(rank + 1) * n])


def sgd(moco):
    return torch.optim.SGD(moco.encoder_q.parameters(), lr=0.5, momentum=0.9)


def train(moco, call, batches, rank=None, world=None):
    """SGD steps; with rank/world, shuffle-BN's permutation comes from a BatchRandom seeded per step."""
    opt = sgd(moco)
    for step, batch in enumerate(batches):
        rng = BatchRandom("cpu", rank, world).reseed(step) if world else None
        loss, _ = call(*batch, perm=shuffle_permutation(batch[1], rng)) if rng else call(*batch)
        opt.zero_grad()
        loss.backward()
        opt.step()


def hand_written_asym_bn_step(moco, opt, batch):
    """What 2 processes with AsymBN compute, written out in one process: per-rank query BN, global key BN."""
    query, keys, minis = batch
    n, V, T = N // WORLD, keys.shape[0], moco.temperature
    q = F.normalize(torch.cat([moco.encoder_q(query[r * n:(r + 1) * n]) for r in range(WORLD)]), dim=1)
    with torch.no_grad():
        for pq, pk in zip(moco.encoder_q.parameters(), moco.encoder_k.parameters()):
            pk.copy_(0.9 * pk + 0.1 * pq)
        k = F.normalize(moco.encoder_k(keys.flatten(0, 1)).view(V, N, -1).mean(0), dim=1)
    queue = moco.queue.clone()
    loss = moco_loss(q, k, queue, T)
    M = minis.shape[0]
    qm = torch.cat([moco.encoder_q(minis[:, r * n:(r + 1) * n].flatten(0, 1)).view(M, n, -1)
                    for r in range(WORLD)], dim=1)                    # each rank's minis are one BN batch
    qm = F.normalize(qm, dim=2)
    loss = loss + sum(moco_loss(qm[i], k, queue, T) for i in range(M)) / M
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        ptr = int(moco.queue_ptr)
        moco.queue[:, ptr:ptr + N] = k.T
        moco.queue_ptr.fill_((ptr + N) % K)


def combos(names):
    return [dict(zip(names, bits)) for bits in itertools.product((False, True), repeat=len(names))]


def switch_step(combo, rank=0, world=1):
    """One real step of `main_moco`'s pipeline (views -> moco_inputs -> MoCo) with the switches in `combo`."""
    torch.manual_seed(rank)
    views = pil_pipeline(moco_views(get_preset("digits"), 16, num_key_views=2 if combo["mean_encoding"] else 1,
                                    num_minis=2 if combo["multicrop"] else 0, mini_size=8,
                                    asym_aug=combo["asymm_aug"], scalemix=combo["scalemix"]))
    data = build_dataset("digits", transform=views)
    batch = default_collate([data[i][0] for i in range(rank * 4, rank * 4 + 4)])
    encoder = create_resnet("resnet18", cifar_stem=True, bn_splits=2 if world == 1 else 1)
    encoder.fc = moco_projector(encoder.feature_dim, 16, 8)
    torch.manual_seed(0)
    moco = MoCo(encoder, dim=8, queue_size=16)
    if combo.get("asym_bn"):
        synchronise_key_projector(moco, torch.device("cpu"), world)
        assert isinstance(moco.encoder_k.fc[1], DistBatchNorm) and not isinstance(moco.encoder_q.fc[1], DistBatchNorm)
    model = DistributedDataParallel(moco) if world > 1 else moco
    loss, stats = model(*moco_inputs(batch))
    loss.backward()
    assert torch.isfinite(loss), combo
    assert ("loss_mini" in stats) == combo["multicrop"], combo
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in moco.encoder_q.parameters()), combo
    assert int(moco.queue_ptr) == 4 * world % 16, combo


def _worker(rank, init_file, out_path):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    results = {}
    for name, projector_bn, num_keys, num_minis in (("plain", False, 1, 0), ("asym_bn", True, 2, 2)):
        moco = make_moco(projector_bn)
        if projector_bn:
            synchronise_key_projector(moco, torch.device("cpu"), WORLD)
        ddp = DistributedDataParallel(moco)
        train(moco, ddp, [local(b, rank, WORLD) for b in make_batches(num_keys, num_minis)])
        results[name] = {k: v.clone() for k, v in moco.state_dict().items()}
    moco = make_bn_moco(splits=1)
    train(moco, DistributedDataParallel(moco), [local(b, rank, WORLD) for b in make_batches(2, 2)], rank, WORLD)
    results["shuffle_bn"] = {k: v.clone() for k, v in moco.state_dict().items()}
    for combo in combos(DATA_SWITCHES):
        switch_step(dict(combo, asym_bn=True), rank, WORLD)
    if rank == 0:
        torch.save(results, out_path)
    dist.destroy_process_group()


def assert_same(got, ref, skip=()):
    assert set(got) == set(ref)
    for k, v in ref.items():
        if not any(s in k for s in skip):
            assert torch.allclose(got[k].double(), v.double(), atol=1e-9, rtol=1e-9), k


@pytest.mark.slow
def test_two_process_moco_equals_the_single_process_computation(tmp_path):
    out = tmp_path / "rank0.pth"
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(out)), nprocs=WORLD, join=True)
    got = torch.load(out, weights_only=True)

    ref = make_moco(projector_bn=False)                  # no BN: one process on the global batch, same code
    start_queue = ref.queue.clone()
    train(ref, ref, make_batches(1, 0))
    assert_same(got["plain"], ref.state_dict())
    assert int(got["plain"]["queue_ptr"]) == STEPS * N % K
    assert not torch.allclose(got["plain"]["queue"], start_queue)  # the steps enqueued something

    ref = make_moco(projector_bn=True)                   # AsymBN, MeanEnc, MultiCrop: the hand-written step
    opt = sgd(ref)
    for batch in make_batches(2, 2):
        hand_written_asym_bn_step(ref, opt, batch)
    # the query BN's running stats are per rank (rank 0's are broadcast by DDP); all else must match
    assert_same(got["asym_bn"], ref.state_dict(), skip=("encoder_q.fc.1.running", "encoder_q.fc.1.num_batches"))
    assert torch.allclose(got["asym_bn"]["encoder_k.fc.1.running_var"], ref.encoder_k.fc[1].running_var,
                          atol=1e-9)                     # key BN statistics over the 2 x 8 x 2 global keys

    ref = make_bn_moco(splits=2)                         # shuffle-BN: one process, split BN in 2 chunks
    assert ref.splits == 2
    train(ref, ref, make_batches(2, 2), rank=0, world=1)
    # BN running statistics are per rank (rank 0's half) vs averaged over chunks: all else must match
    assert_same(got["shuffle_bn"], ref.state_dict(), skip=(".bn.running", ".bn.num_batches"))
    unsplit = make_bn_moco(splits=1)                     # the check can fail: plain BN over the whole batch
    train(unsplit, unsplit, make_batches(2, 2), rank=0, world=1)
    assert not torch.allclose(got["shuffle_bn"]["encoder_q.conv.weight"], unsplit.encoder_q.conv.weight, atol=1e-6)


def test_every_data_switch_combination_runs_a_step():
    for combo in combos(DATA_SWITCHES):
        switch_step(dict(combo, asym_bn=False))
