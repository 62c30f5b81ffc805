"""2-process gloo runs equal the 1-process run on the same global batch (SyncBN, all-gather, DDP)."""
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from models import APS, create_vit
from utils.syncbn import convert_sync_batchnorm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B = 8


TORCHRUN_MOCO = ["-a", "resnet18", "--img-size", "16", "--batch-size", "8", "--moco-k", "16", "--moco-dim", "8",
                 "--mlp-hidden-dim", "16", "--epochs", "1", "--num-workers", "0", "--device", "cpu"]


def torchrun(port: int, script: str, *args: str) -> subprocess.CompletedProcess:
    """`script args` under torchrun with 2 CPU processes (gloo), output captured."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           script, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


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


@pytest.mark.slow
def test_torchrun_two_process_pretraining_runs(tmp_path, tiny_flags):
    res = torchrun(29517, "main_pretrain.py", *tiny_flags, "--dataset", "digits", "--nepoch", "1",
                   "--warmup-epochs", "1", "--batch-size", "128", "--num-workers", "0", "--knn-every", "1",
                   "--device", "cpu", "--output-dir", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 process(es)" in res.stdout and "final kNN top-1" in res.stdout
    ckpt = torch.load(tmp_path / "out" / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 4 * (1438 // 128)


@pytest.mark.slow
def test_torchrun_two_process_finetuning_runs(tmp_path):
    res = torchrun(29518, "main_finetune.py", "--dataset", "digits", "--arch", "vit-tiny", "--depth", "2",
                   "--embed-dim", "32", "--num-heads", "2", "--patch-size", "8", "--batch-size", "64", "--epochs", "1",
                   "--warmup-epochs", "0", "--num-workers", "0", "--device", "cpu", "--model-ema", "--val-split", "0.1",
                   "--output-dir", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "final-epoch test top-1" in res.stdout
    ckpt = torch.load(tmp_path / "out" / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 1 and "ema" in ckpt["extra"]


@pytest.mark.slow
def test_torchrun_two_process_moco_with_shuffle_bn_runs(tmp_path):
    from test_tools import make_folder
    make_folder(tmp_path / "data", per_class=8)
    res = torchrun(29519, "main_moco.py", *TORCHRUN_MOCO, "--knn-every", "1", "--output-dir", str(tmp_path / "out"),
                   str(tmp_path / "data"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 process(es), split BN 1" in res.stdout and "final kNN top-1" in res.stdout
    ckpt = torch.load(tmp_path / "out" / "checkpoint.pth", weights_only=True)
    assert int(ckpt["model"]["queue_ptr"]) == (2 * 8) % 16   # 16 images, global batch 8: 2 enqueues of 8


@pytest.mark.slow
def test_torchrun_two_process_moco_with_asym_bn(tmp_path):
    from test_tools import make_folder
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
def test_torchrun_two_process_linear_probe_runs(tmp_path):
    from test_lincls import moco_checkpoints
    moco_checkpoints(tmp_path)
    res = torchrun(29521, "main_lincls.py", "--dataset", "digits", "--img-size", "16", "--batch-size", "256",
                   "--epochs", "1", "--lars", "--num-workers", "0", "--device", "cpu",
                   "--pretrained", str(tmp_path / "ours.pth"), "--output-dir", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "final test top-1" in res.stdout
    ckpt = torch.load(tmp_path / "out" / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 1438 // 256
