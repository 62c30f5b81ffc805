"""What a sample sees does not depend on the number of processes, the rank or --num-workers.

Each rank's batches are built here in one process (rank and world passed explicitly): the parts of P ranks,
concatenated, must equal the one-process batch. tests/test_distributed.py then runs the scripts themselves.
"""
import pytest
import torch

from augment.batched import batched_pipeline
from augment.pil import pil_pipeline
from augment.recipes import aps_pair, finetune_view, lincls_view, moco_views
from data import build_dataset, get_preset
from data.device_loaders import DeviceLoader
from data.loader import GlobalBatchSampler, build_train_loader
from samplers.aps import random_boxes, sample_aps
from utils.rng import BatchRandom, mix_seed, sample_seeded

CPU = torch.device("cpu")


def test_mix_seed_is_deterministic_and_separates_nearby_keys():
    seeds = {mix_seed(0, e, i) for e in range(4) for i in range(500)}
    assert len(seeds) == 2000 and all(0 <= s < 2**63 for s in seeds)
    assert mix_seed(1, 2, 3) == mix_seed(1, 2, 3) != mix_seed(1, 3, 2)
    assert mix_seed(0, 1) != mix_seed(0, 1, 0)     # the key's length matters


@pytest.mark.parametrize("world", [2, 4])
def test_batch_random_ranks_hold_the_rows_of_the_one_process_draw(world):
    ref = BatchRandom(CPU, 0, 1).reseed(5, 1, 2)
    full = (ref.rand(12, 3), ref.uniform(12, -2.0, 3.0), ref.randperm(30))
    n = 12 // world
    parts = []
    for r in range(world):
        rng = BatchRandom(CPU, r, world).reseed(5, 1, 2)
        parts.append((rng.rand(n, 3), rng.uniform(n, -2.0, 3.0), rng.randperm(30)))
    assert torch.equal(torch.cat([p[0] for p in parts]), full[0])
    assert torch.equal(torch.cat([p[1] for p in parts]), full[1])
    assert all(torch.equal(p[2], full[2]) for p in parts)             # a permutation is global: the same
    assert full[1].min() >= -2.0 and full[1].max() < 3.0 and sorted(full[2].tolist()) == list(range(30))


def test_global_batch_sampler_splits_each_global_batch_into_rank_parts():
    one = GlobalBatchSampler(50, 12, seed=3, rank=0, world=1)
    one.set_epoch(1)
    ref = list(one)
    assert len(ref) == 4 and all(len(b) == 12 for b in ref)
    flat = [i for b in ref for i in b]
    assert len(set(flat)) == 48 and set(flat) <= set(range(50))          # no sample twice in an epoch
    for world in (2, 3, 4):
        parts = []
        for r in range(world):
            s = GlobalBatchSampler(50, 12, seed=3, rank=r, world=world)
            s.set_epoch(1)
            parts.append(list(s))
        assert [sum((p[i] for p in parts), []) for i in range(4)] == ref
    one.set_epoch(2)
    assert list(one) != ref                                               # a new order every epoch
    one.set_epoch(1)
    one.skip_next(3)
    assert list(one) == ref[3:] and list(one) == ref                      # skipping holds for one pass


def test_cpu_views_do_not_depend_on_rank_split_or_workers():
    """PIL views (random crops, flips, colour) of P ranks with workers = the one-process views without."""
    views = pil_pipeline(aps_pair(get_preset("digits"), 16))
    data = build_dataset("digits", transform=views)

    def first_batches(rank, world, workers, epoch=0):
        loader = build_train_loader(data, 16, workers, seed=4, device=CPU, rank=rank, world=world)
        loader.batch_sampler.set_epoch(epoch)
        it = iter(loader)
        return [next(it) for _ in range(2)]

    ref = first_batches(0, 1, 0)
    parts = [first_batches(r, 2, 2) for r in range(2)]
    for b in range(2):
        got = [torch.cat([parts[0][b][0][k], parts[1][b][0][k]]) for k in ref[b][0]]
        assert all(torch.equal(g, ref[b][0][k]) for g, k in zip(got, ref[b][0])), b
        assert torch.equal(torch.cat([parts[0][b][1], parts[1][b][1]]), ref[b][1])
    assert not torch.equal(ref[0][0]["box1"], first_batches(0, 1, 0, epoch=1)[0][0]["box1"])


def test_sample_seeded_restores_the_global_generators():
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    with sample_seeded(1, 2, 3):
        a = torch.rand(2)
    assert torch.equal(torch.rand(3), before)
    with sample_seeded(1, 2, 3):
        assert torch.equal(torch.rand(2), a)


@pytest.mark.parametrize("make_views", [
    lambda p: batched_pipeline(aps_pair(p, 16, blur_p=0.5)),
    lambda p: batched_pipeline(moco_views(p, 16, num_key_views=2, num_minis=2, mini_size=8, asym_aug=True,
                                          scalemix=True)),
    lambda p: batched_pipeline(finetune_view(p, 16)),
    lambda p: batched_pipeline(lincls_view(p, 16)),
], ids=["aps", "moco", "finetune", "lincls"])
def test_device_views_do_not_depend_on_the_rank_split(make_views):
    data = build_dataset("digits")
    views = make_views(get_preset("digits"))

    def batches(rank, world):
        loader = DeviceLoader(data, 16, seed=4, device=CPU, augment=views, rank=rank, world=world)
        loader.batch_sampler.set_epoch(1)
        it = iter(loader)
        return [next(it) for _ in range(2)]

    ref = batches(0, 1)
    parts = [batches(r, 2) for r in range(2)]
    named = lambda views: views if isinstance(views, dict) else {"view": views}  # noqa: E731
    for b in range(2):
        for k, v in named(ref[b][0]).items():
            got = torch.cat([named(parts[0][b][0])[k], named(parts[1][b][0])[k]])
            assert torch.allclose(got.float(), v.float(), atol=1e-5), (b, k)
        assert torch.equal(torch.cat([parts[0][b][1], parts[1][b][1]]), ref[b][1])


def test_patch_sampling_does_not_depend_on_the_rank_split():
    torch.manual_seed(0)
    boxes = random_boxes(8, 32)
    ref = sample_aps(*boxes, 16, 0.25, 4, 3.0, rng=BatchRandom(CPU, 0, 1).reseed(9))
    parts = [sample_aps(*(b[r * 4:(r + 1) * 4] for b in boxes), 16, 0.25, 4, 3.0,
                        rng=BatchRandom(CPU, r, 2).reseed(9)) for r in range(2)]
    for i in range(2):
        assert torch.equal(torch.cat([parts[0][i], parts[1][i]]), ref[i])
