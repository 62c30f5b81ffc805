"""2-process gloo runs equal the 1-process run on the same global batch (SyncBN, all-gather, DDP)."""
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from data import build_dataset
from models import APS, create_vit
from models.norm import convert_sync_batchnorm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B = 8


TORCHRUN_MOCO = ["-a", "resnet18", "--img-size", "16", "--batch-size", "8", "--moco-k", "16", "--moco-dim", "8",
                 "--mlp-hidden-dim", "16", "--epochs", "1", "--num-workers", "0", "--device", "cpu"]


def make_model_and_batch():
    """A tiny APS model and a fixed batch, in float64 so that the comparison can be tight (1e-9)."""
    torch.manual_seed(0)
    model = APS(create_vit("vit-tiny", img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2), 24, 8, 20)
    model = model.double()
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(B, 3, 16, 16, generator=g, dtype=torch.float64)
    x2 = torch.randn(B, 3, 16, 16, generator=g, dtype=torch.float64)
    idx1 = torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(B)])
    idx2 = torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(B)])
    return model, (x1, x2, idx1, idx2)


def train(model, call, batch, steps=3):
    # SGD, not Adam: some gradients are exactly zero in theory (a bias before BN), and Adam would blow their
    # float round-off up to +-lr, which says nothing about the distributed computation
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=0.05)
    losses = []
    for _ in range(steps):
        loss, _ = call(*batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _worker(rank, world, init_file, out_path):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model, batch = make_model_and_batch()
    model = convert_sync_batchnorm(model, torch.device("cpu"))
    ddp = DistributedDataParallel(model)
    per = B // world
    local = tuple(t[rank * per:(rank + 1) * per] for t in batch)
    losses = train(model, ddp, local)
    if rank == 0:
        torch.save({"state": model.state_dict(), "losses": losses}, out_path)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_step_equals_one_process(tmp_path):
    model, batch = make_model_and_batch()
    ref_losses = train(model, model, batch)
    out = tmp_path / "rank0.pth"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    ref = model.state_dict()
    assert set(got["state"]) == set(ref)
    for k, v in ref.items():
        assert torch.allclose(got["state"][k].double(), v.double(), atol=1e-9, rtol=1e-9), k
    assert ref_losses[-1] < ref_losses[0]  # the steps did something


def single(script: str, *args: str) -> subprocess.CompletedProcess:
    """`script args` in one process, output captured (the reference for the torchrun runs)."""
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.fixture
def run_both(torchrun):
    """run_both(port, script, tmp_path, *args, one_process_args=()): the same command with 2 processes and with 1
    (plus `one_process_args`); returns the 2-process result and both checkpoints."""
    def run(port: int, script: str, tmp_path, *args: str, one_process_args=()):
        two = torchrun(port, script, *args, "--output-dir", str(tmp_path / "two"))
        assert two.returncode == 0, two.stderr[-3000:]
        one = single(script, *args, *one_process_args, "--output-dir", str(tmp_path / "one"))
        assert one.returncode == 0, one.stderr[-3000:]
        load = lambda d: torch.load(tmp_path / d / "checkpoint.pth", weights_only=True)  # noqa: E731
        got, ref = load("two"), load("one")
        # the epoch's mean training loss, averaged over all ranks: the same global batches, the same losses
        assert got["metrics"]["train_loss"] == pytest.approx(ref["metrics"]["train_loss"], rel=1e-5)
        return two, got, ref
    return run


def assert_same_weights(got: dict, ref: dict, atol: float, skip=()):
    """Every float tensor of the 2-process model equals the 1-process one (bar `skip`); and training moved
    them (so that the check can fail)."""
    assert set(got) == set(ref)
    compared = 0
    for k, v in ref.items():
        if v.is_floating_point() and not any(s in k for s in skip):
            diff = (got[k] - v).abs().max().item()
            assert diff <= atol, f"{k}: 2 processes differ from 1 by {diff:.2e} (> {atol})"
            compared += 1
    assert compared > 4


# float32 on CPU: DDP averages the two halves' gradients, one process the whole batch's; the round-off
# (~1e-7 relative) is all that may differ. Data order, views, patch sampling and shuffle-BN must not.
# The runs are kept to a step or two: AdamW turns a gradient that is zero in theory (a bias whose shift the
# next BN removes) into +-lr steps of random sign, and a longer run lets that noise grow: one process with
# 1 vs 2 threads drifts apart just as much.
ATOL = 1e-4


@pytest.mark.slow
def test_torchrun_two_process_pretraining_equals_one_process(tmp_path, tiny_flags, run_both):
    two, got, ref = run_both(29517, "main_pretrain.py", tmp_path, *tiny_flags, "--dataset", "digits", "--nepoch",
                             "1", "--warmup-epochs", "0", "--batch-size", "1024", "--nsampling", "2",
                             "--num-workers", "0", "--knn-every", "1", "--device", "cpu", "--accum-steps", "2")
    assert "2 process(es)" in two.stdout and "final kNN top-1" in two.stdout
    assert "batch of 512 in 2 chunks of about 256" in two.stdout          # --accum-steps 2 on both sides
    assert got["epoch"] == 1 and got["global_step"] == ref["global_step"] == 2
    # all-gathered contrastive targets, SyncBN in the heads, device views and patch sampling per global batch.
    # The encoder's last LayerNorm bias only shifts the projector's input, which its BN removes: its gradient
    # is round-off (AdamW makes that +-lr), and the projector's first running mean tracks that shift
    assert_same_weights(got["model"], ref["model"], ATOL, skip=("encoder.norm.bias", "projector.1.running_mean"))


@pytest.mark.slow
def test_torchrun_two_process_pretraining_on_an_unlabelled_folder_equals_one_process(tmp_path, tiny_flags,
                                                                                     make_folder, run_both):
    # the device path: workers read the files, the batch's JPEGs are decoded in one call (the CPU path's order and
    # per-sample seeding do not depend on the dataset: fine-tuning below tests them)
    make_folder(tmp_path / "photos", classes=2, per_class=8)            # 32 JPEGs in nested folders, no labels used
    path = "device"
    two, got, ref = run_both(29523, "main_pretrain.py", tmp_path, *tiny_flags,
                             "--dataset", "folder", "--data-root", str(tmp_path / "photos"), "--img-size", "16",
                             "--nepoch", "1", "--warmup-epochs", "0", "--batch-size", "16", "--nsampling", "2",
                             "--num-workers", "0", "--device", "cpu", "--data-path", path)
    assert "2 process(es)" in two.stdout and got["global_step"] == ref["global_step"] == 4
    assert_same_weights(got["model"], ref["model"], ATOL, skip=("encoder.norm.bias", "projector.1.running_mean"))


@pytest.mark.slow
def test_torchrun_two_process_finetuning_equals_one_process(tmp_path, run_both):
    # mixup/cutmix pair samples within a process's batch, and drop path draws per rank: off here. Both run with
    # --accum-steps 4 (DDP's one gradient reduction per step, over chunks recomputed in the backward pass)
    two, got, ref = run_both(29518, "main_finetune.py", tmp_path, "--dataset", "digits", "--arch", "vit-tiny",
                             "--depth", "2", "--embed-dim", "32", "--num-heads", "2", "--patch-size", "8",
                             "--batch-size", "512", "--epochs", "1", "--warmup-epochs", "0", "--num-workers", "0",
                             "--device", "cpu", "--model-ema", "--val-split", "0.1", "--mixup", "0", "--cutmix", "0",
                             "--drop-path", "0", "--data-path", "cpu", "--accum-steps", "4")
    assert "final-epoch test top-1" in two.stdout and "--accum-steps 4" in two.stdout
    assert got["epoch"] == 1 and got["global_step"] == 2 and "ema" in got["extra"]
    assert got["metrics"]["val_acc1"] == ref["metrics"]["val_acc1"]
    assert_same_weights(got["model"], ref["model"], ATOL)               # RandAugment + erasing per sample
    assert_same_weights(got["extra"]["ema"], ref["extra"]["ema"], ATOL)


@pytest.mark.slow
def test_torchrun_two_process_fine_tuning_on_a_few_labels_equals_one_process(tmp_path, run_both):
    """Every rank draws the same class-balanced subset (its own seed) and the device path cuts it the same way."""
    two, got, ref = run_both(29522, "main_finetune.py", tmp_path, "--dataset", "digits", "--arch", "vit-tiny",
                             "--depth", "2", "--embed-dim", "32", "--num-heads", "2", "--patch-size", "8",
                             "--batch-size", "128", "--epochs", "1", "--warmup-epochs", "0", "--num-workers", "0",
                             "--device", "cpu", "--mixup", "0", "--cutmix", "0", "--drop-path", "0",
                             "--label-fraction", "0.3", "--subset-seed", "5", "--data-path", "device")
    subset = got["extra"]["subset"]["indices"].tolist()
    per_class = Counter(build_dataset("digits").targets)
    assert subset == ref["extra"]["subset"]["indices"].tolist()
    assert len(subset) == sum(max(1, round(0.3 * n)) for n in per_class.values())
    assert (tmp_path / "two" / "subset.txt").read_text() == (tmp_path / "one" / "subset.txt").read_text()
    assert got["global_step"] == len(subset) // 128
    assert_same_weights(got["model"], ref["model"], ATOL)


@pytest.mark.slow
def test_torchrun_two_process_moco_equals_one_process_with_split_bn(tmp_path, make_folder, run_both):
    make_folder(tmp_path / "data", per_class=8)
    two, got, ref = run_both(29519, "main_moco.py", tmp_path, *TORCHRUN_MOCO, "--knn-every", "1",
                             "--enable-multicrop", "--num-mini-crops", "2", "--enable-scalemix",
                             "--enable-mean-encoding", str(tmp_path / "data"), one_process_args=("--bn-splits", "2"))
    assert "2 process(es), split BN 1" in two.stdout and "final kNN top-1" in two.stdout
    assert int(got["model"]["queue_ptr"]) == (2 * 8) % 16   # 16 images, global batch 8: 2 enqueues of 8
    # shuffle-BN across 2 ranks = split BN in 2 chunks; the queue holds the same keys in the same order.
    # BN running statistics: rank 0's half vs the chunks' average
    assert_same_weights(got["model"], ref["model"], ATOL, skip=("running_mean", "running_var"))


@pytest.mark.slow
def test_torchrun_two_process_moco_with_asym_bn(tmp_path, make_folder, torchrun):
    make_folder(tmp_path / "data", per_class=8)
    base = [*TORCHRUN_MOCO, "--knn-every", "0", "--enable-asym-bn", str(tmp_path / "data")]
    res = torchrun(29520, "main_moco.py", *base, "--syncbn-group-size", "2", "--output-dir", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "asym-bn True" in res.stdout
    ckpt = torch.load(tmp_path / "out" / "checkpoint.pth", weights_only=True)
    assert "encoder_k.fc.1.running_mean" in ckpt["model"]     # synchronised BN keeps the BN state-dict keys
    res = torchrun(29520, "main_moco.py", *base, "--syncbn-group-size", "3", "--output-dir", str(tmp_path / "bad"))
    assert res.returncode != 0 and "--syncbn-group-size 3 does not divide the 2 processes" in res.stderr


@pytest.mark.slow
def test_torchrun_two_process_linear_probe_equals_one_process(tmp_path, moco_checkpoints, run_both):
    moco_checkpoints(tmp_path)
    two, got, ref = run_both(29521, "main_lincls.py", tmp_path, "--dataset", "digits", "--img-size", "16",
                             "--batch-size", "256", "--epochs", "1", "--lars", "--head-bn", "--num-workers", "0",
                             "--device", "cpu", "--pretrained", str(tmp_path / "ours.pth"))
    assert "final test top-1" in two.stdout
    assert got["epoch"] == 1 and got["global_step"] == 1438 // 256
    assert_same_weights(got["model"], ref["model"], ATOL)               # head BN synchronised over ranks


def _gather_worker(rank, world, init_file, out_path):
    from utils.dist import all_gather_uneven
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    # rank 0 holds 3 rows of width 4, rank 1 none (and never saw a row, so no width either: [0, 0])
    x = torch.arange(12.0).view(3, 4) if rank == 0 else torch.zeros(0, 0)
    y = torch.arange(3) if rank == 0 else torch.zeros(0, dtype=torch.long)
    got = (all_gather_uneven(x), all_gather_uneven(y), all_gather_uneven(torch.zeros(0, 0)))
    if rank == 1:
        torch.save(got, out_path)
    dist.destroy_process_group()


@pytest.mark.slow
def test_an_empty_rank_gathers_the_others_rows_instead_of_hanging(tmp_path):
    out = tmp_path / "rank1.pth"
    mp.spawn(_gather_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    x, y, none = torch.load(out, weights_only=True)
    assert torch.equal(x, torch.arange(12.0).view(3, 4)) and torch.equal(y, torch.arange(3))
    assert none.shape == (0, 0)


@pytest.mark.slow
def test_more_processes_than_evaluation_images_end_with_the_one_process_result(tmp_path, tiny_flags, run_both,
                                                                               moco_checkpoints):
    """A kNN bank of one labelled image and one query, and the probe's cached features of one val image: the
    second rank's shards are empty (it gathered a [0, 0] tensor and waited forever before)."""
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 8), ("val", 1)):
        (tmp_path / "one" / split / "c0").mkdir(parents=True)
        for i in range(n):
            arr = (torch.rand(20, 20, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(tmp_path / "one" / split / "c0" / f"{i}.jpg")
    data = ["--dataset", "imagefolder", "--data-root", str(tmp_path / "one"), "--img-size", "16", "--batch-size", "8",
            "--num-workers", "0", "--device", "cpu"]
    two, got, ref = run_both(29531, "main_pretrain.py", tmp_path / "aps", *tiny_flags, *data, "--nepoch", "1",
                             "--warmup-epochs", "0", "--knn-every", "1", "--labels-per-class", "1")
    assert "final kNN top-1" in two.stdout and got["metrics"]["knn_top1"] == ref["metrics"]["knn_top1"]
    assert_same_weights(got["model"], ref["model"], ATOL, skip=("encoder.norm.bias", "projector.1.running_mean"))
    moco_checkpoints(tmp_path)
    two, got, ref = run_both(29532, "main_lincls.py", tmp_path / "probe", *data, "--epochs", "1", "--cache-features",
                             "--pretrained", str(tmp_path / "ours.pth"))
    assert "final test top-1" in two.stdout and got["metrics"]["test_acc1"] == ref["metrics"]["test_acc1"]
    assert_same_weights(got["model"], ref["model"], ATOL)
