"""Each augmentation recipe is described once (augment/recipes.py) and both realisations, PIL (augment/pil.py)
and batched on the device (augment/batched.py), read that one description: every knob, the same named groups,
and the same pixels where the random draws are pinned."""
import dataclasses
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import main_finetune
import main_moco
import main_pretrain
from augment.batched import BatchedView, batched_pipeline
from augment.ops import to_float
from augment.pil import PILView, pil_pipeline
from augment.recipes import (APS_VIEW, FINETUNE_VIEW, MOCO_V2_VIEW, Pair, View, aps_pair, aps_pair_from_args,
                             finetune_view, finetune_view_from_args, lincls_view, moco_views, moco_views_from_args)
from data import get_preset
from utils.rng import BatchRandom

PIL_ONLY = {"flip_late"}             # the PIL realisation's order of draws; the batched one flips with the crop


class Reads:
    """A View that records which of its knobs are read."""

    def __init__(self, view):
        object.__setattr__(self, "_view", view)
        object.__setattr__(self, "read", set())

    def __getattr__(self, name):
        self.read.add(name)
        return getattr(self._view, name)


# every knob on somewhere: a boxed resized crop with all colour ops, and a padded crop with RandAugment and erasing
EVERYTHING = [View(size=16, scale=(0.3, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, gray_p=0.2, blur_p=0.5,
                   solarize_p=0.3, boxed=True),
              View(size=16, crop="padded", padding=2, randaugment="rand-m9-mstd0.5-inc1", erase_p=0.5,
                   erase_mode="rand")]


def uint8_images(n=4, size=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def pil_images(images):
    return [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in images]


def test_both_realisations_read_every_knob_of_the_description():
    x = uint8_images()
    pil_read, batched_read = set(), set()
    for view in EVERYTHING:
        p = Reads(view)
        pil = PILView(p)
        for img in pil_images(x):
            pil(img)
        b = Reads(view)
        BatchedView(b)(to_float(x), BatchRandom("cpu").reseed(0))
        pil_read |= p.read
        batched_read |= b.read
    knobs = {f.name for f in dataclasses.fields(View)}
    assert pil_read == knobs, knobs - pil_read
    assert batched_read == knobs - PIL_ONLY, (knobs - PIL_ONLY) - batched_read


def test_pinned_draws_give_the_same_pixels_both_ways():
    """With the whole image as the crop, a sure flip, sure grayscale and solarize and a jitter of width 0, the
    two realisations make the same view of the same image."""
    view = View(size=20, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0, jitter=(0.0, 0.0, 0.0, 0.0), jitter_p=1.0,
                gray_p=1.0, solarize_p=1.0, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3), boxed=True)
    x = uint8_images()
    got, boxes, flips = BatchedView(view)(to_float(x), BatchRandom("cpu").reseed(1))
    for k, img in enumerate(pil_images(x)):
        ref, box, flipped = PILView(view)(img)
        assert bool(flipped) and bool(flips[k]) and torch.equal(box, boxes[k])
        assert torch.allclose(got[k], ref, atol=1.01 / 255 / 0.2), k     # PIL's grey is rounded to a level


@pytest.mark.parametrize("name, recipe", [
    ("aps", lambda p: aps_pair(p, 16)),
    ("two-views-no-boxes", lambda p: Pair(View(size=16, mean=p.mean, std=p.std))),
    ("moco-all-switches", lambda p: moco_views(p, 16, num_key_views=2, num_minis=2, mini_size=8, asym_aug=True,
                                               scalemix=True)),
    ("finetune", lambda p: finetune_view(p, 16)),
    ("lincls", lambda p: lincls_view(p, 16)),
])
def test_both_realisations_give_the_same_named_groups(name, recipe):
    """(A plain two-view recipe is just its two views: no crop boxes or flips a method does not ask for.)"""
    r = recipe(get_preset("cifar10"))
    x = uint8_images(3, 32)
    batched = batched_pipeline(r)(x, BatchRandom("cpu").reseed(2))
    per_image = [pil_pipeline(r)(img) for img in pil_images(x)]
    if isinstance(batched, dict):
        assert set(batched) == set(per_image[0])
        assert (set(batched) == {"view1", "view2"}) == (name == "two-views-no-boxes")
        for k, v in batched.items():
            assert v.shape == torch.stack([o[k] for o in per_image]).shape, k
    else:
        assert batched.shape == torch.stack(per_image).shape


def test_the_recipe_flags_default_to_the_recipe():
    preset = get_preset("digits")
    args = main_pretrain.get_args_parser().parse_args([])
    args.img_size = 32
    assert aps_pair_from_args(args, preset) == aps_pair(preset, 32)
    assert aps_pair(preset, 32).view == replace(APS_VIEW, size=32, mean=preset.mean, std=preset.std)
    args = main_finetune.get_args_parser().parse_args([])
    args.img_size = 32
    assert finetune_view_from_args(args, preset) == finetune_view(preset, 32)
    assert finetune_view(preset, 32).randaugment == FINETUNE_VIEW.randaugment and FINETUNE_VIEW.erase_p == 0.25
    args = main_moco.get_args_parser().parse_args([])
    args.img_size = 224
    assert moco_views_from_args(args, preset) == moco_views(preset, 224)
    assert moco_views(preset, 224).query == replace(MOCO_V2_VIEW, size=224, mean=preset.mean, std=preset.std)


def test_a_description_is_checked_when_it_is_made():
    for bad in (dict(crop="squash"), dict(interpolation="lanczos"), dict(erase_mode="noise"),
                dict(randaugment="rand-x9"), dict(crop="padded", boxed=True), dict(crop="resize", flip_p=0.5)):
        with pytest.raises(ValueError):
            View(**bad)
    assert View(randaugment="none").randaugment == ""
    with pytest.raises(ValueError, match="batched realisation"):
        BatchedView(View(interpolation="bicubic"))
    assert np.isclose(View().ratio[0], 0.75)
