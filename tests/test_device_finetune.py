"""The fine-tuning view (docs/REFERENCE.md#fine-tuning-recipe) on the device: random crop with padding, flip,
RandAugment, normalise, random erasing, each against torchvision's functional op per sample; and the script on the device path."""
import math

import pytest
import torch
import torchvision.transforms.functional as TF

from augment.batched import BatchedView
from augment.ops import erase_boxes, random_erasing, to_float
from augment.recipes import finetune_view
from data import get_preset
from utils.rng import BatchRandom

N, S = 8, 16


def test_erase_boxes_follow_timms_area_and_aspect_ranges():
    boxes, found = erase_boxes(20000, S, 24, BatchRandom("cpu").reseed(0))
    top, left, h, w = boxes[found].T
    assert found.float().mean() > 0.95
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= S).all() and (left + w <= 24).all()
    assert (h < S).all() and (w < 24).all() and (h >= 1).all() and (w >= 1).all()
    area = h * w / (S * 24)
    assert 0.01 <= area.min() and area.max() <= 0.45                # 0.02-1/3 of the image, up to rounding
    aspect = h / w
    assert aspect.min() >= 0.3 / 2 and aspect.max() <= 2 / 0.3          # log-uniform 0.3-3.3, up to rounding
    assert torch.log(aspect).mean().abs() < 0.1                         # symmetric in log


def test_random_erasing_equals_torchvisions_erase_per_sample():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 3, S, S, generator=g)
    boxes, _ = erase_boxes(N, S, S, BatchRandom("cpu").reseed(2))
    erase = torch.tensor([True, False] * (N // 2))
    values = torch.randn(N, 3, S, S, generator=g)
    got = random_erasing(x, boxes, erase, values)
    for i in range(N):
        t, l, h, w = boxes[i].long().tolist()
        ref = TF.erase(x[i], t, l, h, w, values[i, :, t:t + h, l:l + w]) if erase[i] else x[i]
        assert torch.equal(got[i], ref), i


def test_crop_with_padding_and_flip_equal_torchvision_per_sample():
    preset = get_preset("digits")
    view = BatchedView(finetune_view(preset, S, randaugment="none", erase_p=0.0))
    images = torch.randint(0, 256, (N, 1, S, S), dtype=torch.uint8)
    p = view.params(N, S, S, BatchRandom("cpu").reseed(3))
    got = view.apply(to_float(images), p)[0] * preset.std[0] + preset.mean[0]
    assert set(p["boxes"][:, :2].flatten().tolist()) <= set(range(9)) and p["flips"].any() and (~p["flips"]).any()
    for i in range(N):
        t, l = p["boxes"][i, :2].long().tolist()
        ref = TF.crop(TF.pad(images[i].expand(3, -1, -1).float() / 255, [4]), t, l, S, S)   # RandomCrop(padding=4)
        ref = TF.hflip(ref) if p["flips"][i] else ref
        assert torch.allclose(got[i], ref, atol=1e-5), i


@pytest.mark.parametrize("remode", ["pixel", "rand", "const"])
def test_finetune_view_erases_a_quarter_with_the_modes_values(remode):
    view = BatchedView(finetune_view(get_preset("cifar10"), S, randaugment="rand-m9-mstd0.5-inc1", erase_p=0.25,
                                     erase_mode=remode))
    images = torch.randint(0, 256, (400, 3, 32, 32), dtype=torch.uint8)     # resized to 16 px first
    p = view.params(400, 32, 32, BatchRandom("cpu").reseed(4))
    out = view.apply(to_float(images), p)[0]
    assert out.shape == (400, 3, S, S) and "ra_ops" in p
    assert p["erase"].float().mean().item() == pytest.approx(0.25, abs=0.06)
    k = int(p["erase"].nonzero()[0])
    t, l, h, w = p["erase_boxes"][k].long().tolist()
    patch = out[k, :, t:t + h, l:l + w]
    if remode == "const":
        assert torch.equal(patch, torch.zeros_like(patch))
    elif remode == "rand":                                              # one normal value per channel
        assert torch.equal(patch, patch[:, :1, :1].expand_as(patch))
    else:
        assert torch.equal(patch, p["erase_values"][k, :, t:t + h, l:l + w]) and patch.std() > 0.5


def test_finetune_script_on_the_device_path(tmp_path):
    import main_finetune
    argv = ["--dataset", "digits", "--arch", "vit-tiny", "--depth", "2", "--embed-dim", "32", "--num-heads", "2",
            "--patch-size", "8", "--batch-size", "128", "--epochs", "1", "--warmup-epochs", "0", "--device", "cpu",
            "--val-split", "0.1", "--data-path", "device", "--output-dir", str(tmp_path / "out")]
    metrics = main_finetune.main(main_finetune.get_args_parser().parse_args(argv))
    assert math.isfinite(metrics["train_loss"]) and 0 <= metrics["val_acc1"] <= 100
    assert "data path device" in (tmp_path / "out" / "log.txt").read_text()
