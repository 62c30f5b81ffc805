"""Device RandAugment: every op against torchvision's functional op or timm's PIL op, per sample; the policy's
draws against timm's level functions; the MoCo AsymAug views on the device."""
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data import auto_augment as timm_aa
from torchvision.transforms import InterpolationMode

import augment.ops as O
import augment.randaugment as R
from augment.batched import batched_pipeline
from augment.recipes import moco_views
from data import get_preset
from utils.rng import BatchRandom

N, H, W = 6, 20, 24
FACTORS = torch.tensor([0.1, 0.4, 1.0, 1.3, 1.6, 1.9])
FILL = (120, 60, 30)


@pytest.fixture(params=["noise", "smooth"])
def images(request):
    """uint8 [N, 3, H, W]: pixel noise, or smooth blobs (where interpolation differences would show)."""
    g = torch.Generator().manual_seed(0)
    if request.param == "noise":
        return (torch.rand(N, 3, H, W, generator=g) * 255).to(torch.uint8)
    small = torch.rand(N, 3, 5, 6, generator=g) * 255
    return F.interpolate(small, size=(H, W), mode="bilinear").round().to(torch.uint8)


def per_sample(fn, images, args=None):
    return torch.stack([fn(img) if args is None else fn(img, a) for img, a in
                        zip(images, args if args is not None else [None] * len(images))])


def to_pil(images):
    return [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in images]


def from_pil(pils):
    return torch.stack([torch.from_numpy(np.array(p)).permute(2, 0, 1) for p in pils])


def test_pointwise_ops_equal_torchvision_per_sample(images):
    x = images.float()
    bits = torch.tensor([1.0, 2, 3, 4, 1, 4])
    thresholds = torch.tensor([0.0, 50, 128, 200, 255, 255])
    cases = [
        (O.auto_contrast(x), per_sample(TF.autocontrast, images)),
        (O.equalize(x), per_sample(TF.equalize, images)),
        (O.posterize(x, bits), per_sample(lambda i, b: TF.posterize(i, int(b)), images, bits)),
        (O.solarize255(x, thresholds), per_sample(lambda i, t: TF.solarize(i, float(t)), images, thresholds)),
        (O.color(x, FACTORS), per_sample(lambda i, f: TF.adjust_saturation(i, float(f)), images, FACTORS)),
        (O.contrast(x, FACTORS), per_sample(lambda i, f: TF.adjust_contrast(i, float(f)), images, FACTORS)),
        (O.brightness(x, FACTORS), per_sample(lambda i, f: TF.adjust_brightness(i, float(f)), images, FACTORS)),
        (O.sharpness(x, FACTORS), per_sample(lambda i, f: TF.adjust_sharpness(i, float(f)), images, FACTORS)),
    ]
    for k, (got, ref) in enumerate(cases):
        assert torch.equal(got, ref.float()), k


def test_ops_match_timms_pil_ops_within_one_level(images):
    x, pils = images.float(), to_pil(images)
    add = torch.tensor([0.0, 10, 50, 110, 128, 30])
    got = O.solarize_add(x, add)
    assert torch.equal(got, from_pil([timm_aa.solarize_add(p, int(a)) for p, a in zip(pils, add)]).float())
    for ours, theirs in ((O.color, timm_aa.color), (O.contrast, timm_aa.contrast), (O.sharpness, timm_aa.sharpness)):
        ref = from_pil([theirs(p, float(f)) for p, f in zip(pils, FACTORS)]).float()
        assert (ours(x, FACTORS) - ref).abs().max() <= 1            # PIL rounds where torchvision truncates
    assert torch.equal(O.equalize(x), from_pil([timm_aa.equalize(p) for p in pils]).float())


GEOMETRY = [("Rotate", [0.0, 10, -20, 30, -30, 5], timm_aa.rotate),
            ("ShearX", [0.0, 0.1, -0.2, 0.3, -0.3, 0.05], timm_aa.shear_x),
            ("ShearY", [0.0, 0.1, -0.2, 0.3, -0.3, 0.05], timm_aa.shear_y),
            ("TranslateXRel", [0.0, 0.1, -0.2, 0.45, -0.45, 0.05], timm_aa.translate_x_rel),
            ("TranslateYRel", [0.0, 0.1, -0.2, 0.45, -0.45, 0.05], timm_aa.translate_y_rel)]


@pytest.mark.parametrize("name, args, pil_op", GEOMETRY, ids=[g[0] for g in GEOMETRY])
def test_geometric_ops_match_timms_pil_ops(name, args, pil_op, images):
    """Inside the image: within one level of PIL's bilinear transform; outside: the fill colour exactly.
    (The one-pixel band along the edge is where PIL and torch treat the border differently.)"""
    args = torch.tensor(args)
    m = O.affine_matrices(torch.full((N,), O.OP[name]), args, H, W)
    got = O.warp(images.float(), m, FILL)
    ref = from_pil([pil_op(p, float(a), fillcolor=FILL, resample=Image.BILINEAR) for p, a in zip(to_pil(images), args)])
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    src = (torch.stack([xs, ys, torch.ones_like(xs)], -1).view(1, H * W, 3) @ m.transpose(1, 2)).view(N, H, W, 2)
    sx, sy = src[..., 0], src[..., 1]
    inside = (sx >= 1) & (sx <= W - 1) & (sy >= 1) & (sy <= H - 1)
    outside = (sx < -0.5) | (sx > W + 0.5) | (sy < -0.5) | (sy > H + 0.5)
    diff = (got - ref.float()).abs().amax(dim=1)
    assert inside.float().mean() > 0.6 and diff[inside].max() <= 1
    if outside.any():
        assert diff[outside].max() == 0
    if name == "Rotate":                                 # and torchvision's rotate (up to ties in rounding)
        tv = per_sample(lambda i, a: TF.rotate(i, float(a), InterpolationMode.BILINEAR, fill=list(FILL)), images, args)
        tv_diff = (got - tv.float()).abs().amax(dim=1)
        assert tv_diff[inside].max() <= 1 and (tv_diff[inside] > 0).float().mean() < 0.01
    assert torch.equal(got[0], images[0].float())                  # argument 0: the identity


def test_parse_policy_reads_timm_strings():
    assert R.parse_policy("rand-m9-mstd0.5-inc1") == dict(magnitude=9.0, num_layers=2, magnitude_std=0.5,
                                                          increasing=True, prob=0.5)
    assert R.parse_policy("rand-m10-n3-p0.7") == dict(magnitude=10.0, num_layers=3, magnitude_std=0.0,
                                                      increasing=False, prob=0.7)
    for bad in ("auto-m9", "rand-x9", "rand-mfoo"):
        with pytest.raises(ValueError):
            R.parse_policy(bad)


@pytest.mark.parametrize("increasing", [False, True])
def test_level_arguments_follow_timms_level_functions(increasing):
    ra = R.DeviceRandAugment("rand-m9-inc1" if increasing else "rand-m9")
    names = [n for n in O.OPS if timm_aa.LEVEL_TO_ARG.get(n) or timm_aa.LEVEL_TO_ARG.get(n + "Increasing")]
    for level in (0.0, 3.3, 7.0, 9.0, 10.0):
        for negate in (False, True):
            for name in names:
                timm_name = name + "Increasing" if increasing and name + "Increasing" in timm_aa.LEVEL_TO_ARG else name
                expected = _timm_arg(timm_aa.LEVEL_TO_ARG[timm_name], level, negate)
                if name == "Posterize":
                    expected = max(1, expected)                      # at least 1 bit, as our PIL path keeps
                got = ra.level_args(torch.tensor([O.OP[name]]), torch.tensor([level]), torch.tensor([negate]))
                assert got.item() == pytest.approx(expected, abs=1e-5), (name, level, negate)


def _timm_arg(fn, level, negate):
    """timm's argument for `level`, its coin (negate when random.random() > 0.5) forced to `negate`."""
    real = random.random
    random.random = lambda: 0.9 if negate else 0.1
    try:
        return fn(level, {"translate_pct": R.TRANSLATE_PCT})[0]
    finally:
        random.random = real


def test_policy_draws_ops_uniformly_half_of_the_time():
    ra = R.DeviceRandAugment("rand-m9-mstd0.5-inc1")
    p = ra.params(30000, 32, 32, BatchRandom("cpu").reseed(1))
    ops = p["ra_ops"]
    assert ops.shape == (2, 30000)
    assert (ops >= 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    counts = torch.bincount(ops[ops >= 0], minlength=15).float()
    assert counts.min() / counts.max() > 0.9                          # 15 ops, equally likely
    rotate = p["ra_args"][ops == O.OP["Rotate"]]
    assert rotate.abs().mean().item() == pytest.approx(27.0, abs=0.3)  # |N(9, 0.5)| / 10 * 30 (clipped at 10)
    assert (rotate > 0).float().mean().item() == pytest.approx(0.5, abs=0.03)


def test_randaugment_output_stays_on_the_pixel_grid_and_identity_without_ops():
    x = torch.rand(4, 3, 16, 16)
    ra = R.DeviceRandAugment("rand-m9-mstd0.5-inc1")
    y = ra(x, BatchRandom("cpu").reseed(3))
    assert torch.allclose(y * 255, (y * 255).round(), atol=1e-4) and 0 <= y.min() and y.max() <= 1
    none = {"ra_ops": torch.full((2, 4), -1), "ra_args": torch.zeros(2, 4)}
    assert torch.allclose(ra.apply(x, none), (x * 255).round() / 255)


def test_moco_asym_aug_views_on_the_device():
    preset = get_preset("digits")
    views = batched_pipeline(moco_views(preset, 16, num_key_views=2, asym_aug=True))
    x = torch.randint(0, 256, (8, 1, 32, 32), dtype=torch.uint8)
    out = views(x, BatchRandom("cpu").reseed(0))
    assert out["query"].shape == (8, 3, 16, 16) and out["keys"].shape == (8, 2, 3, 16, 16)
    assert views.query.randaug is not None and views.key.randaug is None
    assert views.key.view.jitter_p == 0 and views.key.view.gray_p == 0 and views.key.view.scale == (0.08, 1.0)
    assert views.query.randaug.policy == dict(magnitude=10.0, num_layers=2, magnitude_std=0.5, increasing=False,
                                              prob=0.5)


def test_policy_applies_each_samples_own_op_and_nothing_else(images):
    """Two layers, every op (and none) somewhere in each: the batched policy equals running each sample's two ops
    one after the other on that sample alone (the single ops are checked against torchvision above)."""
    singles = {"AutoContrast": lambda y, a: O.auto_contrast(y), "Equalize": lambda y, a: O.equalize(y),
               "Invert": lambda y, a: 255.0 - y, "Posterize": O.posterize, "Solarize": O.solarize255,
               "SolarizeAdd": O.solarize_add, "Color": O.color, "Contrast": O.contrast, "Brightness": O.brightness,
               "Sharpness": O.sharpness}
    singles.update({g: (lambda name: lambda y, a: O.warp(y, O.affine_matrices(torch.full((1,), O.OP[name]), a,
                                                                               H, W), FILL))(g)
                    for g in O.GEOMETRIC})
    args = {"Rotate": 20.0, "ShearX": 0.2, "ShearY": -0.25, "TranslateXRel": 0.3, "TranslateYRel": -0.2,
            "Posterize": 2.0, "Solarize": 100.0, "SolarizeAdd": 60.0, "Color": 1.7, "Contrast": 0.4,
            "Brightness": 1.5, "Sharpness": 0.3}
    n = len(O.OPS) + 1                                                   # op -1: none
    x = torch.cat([images, images, images])[:n].float()
    x[:, :, 2:4, 2:5] = 255.0                                           # the ends of the range, inside
    x[:, :, 5:7, 2:5] = 0.0
    ops = torch.stack([torch.arange(-1, n - 1), torch.arange(n - 2, -2, -1)])
    arg = torch.tensor([[args.get(O.OPS[o], 0.0) if o >= 0 else 0.0 for o in row.tolist()] for row in ops])
    ra = R.DeviceRandAugment("rand-m9", fill=FILL)
    got = ra.apply(x / 255.0, {"ra_ops": ops, "ra_args": arg}) * 255.0
    for i in range(n):
        y = x[i:i + 1]
        for layer in range(2):
            o = ops[layer, i].item()
            if o >= 0:
                y = singles[O.OPS[o]](y, arg[layer, i:i + 1])
        assert torch.allclose(got[i:i + 1], y, atol=1e-3), (i, [O.OPS[o] for o in ops[:, i].tolist() if o >= 0])
