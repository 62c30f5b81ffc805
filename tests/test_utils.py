"""Schedules, kNN, atomic checkpoints, datasets read from files, argument errors."""
import gzip
import math
import os

import numpy as np
import pytest
import torch

from data.datasets import build_dataset, read_idx
from utils.checkpoint import load_file, save_checkpoint
from utils.errors import UserError
from utils.knn import knn_classify
from utils.optim import set_lr
from utils.schedule import aps_factor, warmup_cosine


def test_aps_schedule_by_hand():
    # f(e) = min((e+1)/20, (1 + cos(pi e / E)) / 2), E = 1600
    assert aps_factor(0, 20, 1600) == pytest.approx(1 / 20)
    assert aps_factor(9.5, 20, 1600) == pytest.approx(10.5 / 20)
    assert aps_factor(19, 20, 1600) == pytest.approx(min(1.0, 0.5 * (1 + math.cos(math.pi * 19 / 1600))))
    assert aps_factor(800, 20, 1600) == pytest.approx(0.5)
    assert aps_factor(1600, 20, 1600) == pytest.approx(0.0, abs=1e-12)


def test_warmup_cosine_and_lr_scale():
    assert warmup_cosine(0, 5, 100, 1.0, 1e-5, 1e-6) == pytest.approx(1e-6)
    assert warmup_cosine(5, 5, 100, 1.0, 1e-5) == pytest.approx(1.0)
    assert warmup_cosine(52.5, 5, 100, 1.0, 0.0) == pytest.approx(0.5)
    assert warmup_cosine(100, 5, 100, 1.0, 1e-5) == pytest.approx(1e-5)
    opt = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr_scale": 0.1},
                           {"params": [torch.zeros(1, requires_grad=True)]}], lr=1.0)
    set_lr(opt, 0.3)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.03, 0.3])


def test_knn_weighted_vote_by_hand():
    n = torch.nn.functional.normalize
    train = n(torch.tensor([[1.0, 0.0], [0.95, 0.31], [0.8, 0.6]]), dim=1)   # classes 0, 0, 1
    labels = torch.tensor([0, 0, 1])
    query = n(torch.tensor([[0.8, 0.55]]), dim=1)                             # closest to the class-1 point
    sims = (query @ train.T)[0]
    assert sims[2] > sims[1] > sims[0]
    # sharp weights (small T): the single nearest neighbour decides; flat weights (large T): two votes beat one
    top1, _ = knn_classify(train, labels, query, torch.tensor([1]), num_classes=2, k=3, temperature=0.01)
    assert top1 == 100.0
    top1, _ = knn_classify(train, labels, query, torch.tensor([1]), num_classes=2, k=3, temperature=100.0)
    assert top1 == 0.0
    # with k = 1 only the nearest votes, whatever T; k beyond the bank and < 5 classes are fine
    top1, top5 = knn_classify(train, labels, query, torch.tensor([1]), num_classes=2, k=1, temperature=100.0)
    assert top1 == 100.0 and top5 == 100.0
    top1, top5 = knn_classify(train, labels, query, torch.tensor([0]), num_classes=2, k=50, temperature=0.01)
    assert top1 == 0.0 and top5 == 100.0


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint({"model": {"w": torch.ones(2)}, "epoch": 1}, str(path))

    def exploding_save(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(UserError, match="No space left on device.*previous checkpoint is intact"):
        save_checkpoint({"model": {"w": torch.zeros(2)}, "epoch": 2}, str(path))
    monkeypatch.undo()
    assert load_file(str(path))["epoch"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pth"]  # no temporary file left behind


def write_idx(path, array, gz):
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


@pytest.mark.parametrize("gz", [False, True])
def test_idx_datasets_are_read_from_the_standard_files(tmp_path, gz):
    rng = np.random.RandomState(0)
    suffix = ".gz" if gz else ""
    raw = tmp_path / "FashionMNIST" / "raw"  # torchvision's layout is found too
    raw.mkdir(parents=True)
    for split, n in (("train", 12), ("t10k", 5)):
        write_idx(raw / f"{split}-images-idx3-ubyte{suffix}", rng.randint(0, 256, (n, 28, 28)), gz)
        write_idx(raw / f"{split}-labels-idx1-ubyte{suffix}", np.arange(n) % 10, gz)
    train = build_dataset("fashion-mnist", str(tmp_path), train=True)
    test = build_dataset("fashion-mnist", str(tmp_path), train=False)
    assert len(train) == 12 and len(test) == 5
    img, label = train[3]
    assert img.size == (32, 32) and img.mode == "RGB" and label == 3


def test_idx_reader_rejects_bad_files(tmp_path):
    bad = tmp_path / "x-ubyte"
    bad.write_bytes(b"\x12\x34\x56\x78")
    with pytest.raises(UserError, match="magic"):
        read_idx(str(bad))
    short = tmp_path / "y-ubyte"
    short.write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"\x00\x01")
    with pytest.raises(UserError, match="truncated"):
        read_idx(str(short))


def test_embedded_digits_dataset():
    train = build_dataset("digits", train=True)
    test = build_dataset("digits", train=False)
    assert len(train) + len(test) == 1797 and len(test) == 359
    img, label = train[0]
    assert img.size == (32, 32) and 0 <= label < 10
    assert set(train.targets) == set(range(10))


def test_view_reports_its_crop_box_and_flip():
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    from PIL import Image

    from augment.pil import PILView
    from augment.recipes import View
    src = Image.fromarray(torch.arange(20 * 28 * 3).remainder(256).to(torch.uint8).reshape(20, 28, 3).numpy())
    view = PILView(View(size=8, scale=(0.2, 1.0), boxed=True, mean=(0.0,) * 3, std=(1.0,) * 3))
    torch.manual_seed(0)
    flips = set()
    for _ in range(12):
        x, box, flipped = view(src)
        top, left, h, w = [int(v) for v in box]
        assert 0 <= top and top + h <= 20 and 0 <= left and left + w <= 28
        expected = TF.to_tensor(TF.resized_crop(src, top, left, h, w, [8, 8], InterpolationMode.BILINEAR,
                                                antialias=True))
        if flipped:
            expected = expected.flip(-1)
        assert torch.allclose(x, expected)
        flips.add(bool(flipped))
    assert flips == {True, False}


def test_configure_device_turns_on_cudnn_benchmark_for_cuda_only(monkeypatch):
    from utils.runtime import configure_device
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    configure_device(torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False
    configure_device(torch.device("cuda", 0))                 # a flag only: no GPU needed to set it
    assert torch.backends.cudnn.benchmark is True


def test_the_shared_optimiser_flag_groups_give_the_spec_their_flags_say():
    import argparse

    from utils.optim import (OptimizerSpec, add_adamw_args, add_lars_args, add_sgd_args, adamw_from_args,
                             sgd_from_args)
    p = argparse.ArgumentParser()
    add_adamw_args(p, weight_decay=0.05, decay_on="on all parameters", betas=True)
    args = p.parse_args(["--betas", "0.8", "0.95"])
    assert adamw_from_args(args, 0.5) == OptimizerSpec("adamw", 0.5, 0.05, betas=(0.8, 0.95), eps=1e-8)
    assert "--opt-eps" not in p.format_help() and "AdamW weight decay (on all parameters)" in p.format_help()
    p = argparse.ArgumentParser()
    add_adamw_args(p, weight_decay=0.0, decay_on="x", eps=True)
    assert adamw_from_args(p.parse_args(["--opt-eps", "1e-6"]), 1.0) == OptimizerSpec("adamw", 1.0, 0.0, eps=1e-6)
    p = argparse.ArgumentParser()
    add_sgd_args(p, lr=0.1, weight_decay=0.0)
    add_lars_args(p)
    args = p.parse_args(["--lars", "--trust-coefficient", "0.02", "--wd", "1e-4"])
    args.batch_size = 512
    lr, spec = sgd_from_args(args, "lars" if args.lars else "sgd")
    assert lr == 0.2 and spec == OptimizerSpec("lars", 0.2, 1e-4, momentum=0.9, trust_coefficient=0.02)
