"""On-device batched augmentation: each op against torchvision's functional op per sample, same parameters."""
import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

import augment.ops as D
from augment.batched import batched_pipeline
from augment.recipes import aps_pair, moco_views
from data import build_dataset, get_preset
from data.device_loaders import DeviceLoader, uint8_images
from utils.rng import BatchRandom

N = 6


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(N, 3, 20, 24, generator=g)


def test_resized_crop_flip_matches_torchvision_per_sample(images):
    boxes = torch.tensor([[0, 0, 20, 24], [3, 5, 9, 7], [10, 2, 10, 21], [1, 1, 5, 5], [4, 6, 16, 12],
                          [7, 0, 13, 24]], dtype=torch.float32)
    flips = torch.tensor([False, True, False, True, True, False])
    got = D.resized_crop_flip(images, boxes, (16, 18), flips)
    for i in range(N):
        t, l, h, w = boxes[i].int().tolist()
        ref = TF.resized_crop(images[i], t, l, h, w, [16, 18], InterpolationMode.BILINEAR, antialias=False)
        ref = TF.hflip(ref) if flips[i] else ref
        assert torch.allclose(got[i], ref, atol=1e-5), i
        if h <= 16 and w <= 18:  # upscaling: antialiasing changes nothing, so the PIL-path crop is matched too
            assert torch.allclose(got[i], TF.hflip(TF.resized_crop(images[i], t, l, h, w, [16, 18], antialias=True))
                                  if flips[i] else TF.resized_crop(images[i], t, l, h, w, [16, 18], antialias=True),
                                  atol=1e-5), i


def test_crop_boxes_fit_and_follow_the_scale_and_ratio():
    torch.manual_seed(0)
    boxes = D.crop_boxes(4000, 32, 40, scale=(0.15, 1.0), ratio=(3 / 4, 4 / 3))
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 40).all()
    assert torch.equal(boxes, boxes.round())
    frac = h * w / (32 * 40)
    assert frac.min() >= 0.12 and frac.max() <= 1.0
    torch.manual_seed(1)                        # the mean area matches torchvision's sampler
    ref = torch.tensor([T.RandomResizedCrop.get_params(torch.zeros(3, 32, 40), (0.15, 1.0), (3 / 4, 4 / 3))
                        for _ in range(4000)], dtype=torch.float32)
    assert frac.mean().item() == pytest.approx((ref[:, 2] * ref[:, 3] / (32 * 40)).mean().item(), abs=0.02)
    assert (top + h / 2).mean().item() == pytest.approx((ref[:, 0] + ref[:, 2] / 2).mean().item(), abs=0.4)
    wide = D.crop_boxes(3, 10, 40, scale=(2.0, 3.0), ratio=(3 / 4, 4 / 3))  # nothing fits: centre fallback
    assert wide.tolist() == [[0.0, 13.0, 10.0, 13.0]] * 3                   # as torchvision: w = round(10 * 4/3)


# the fused jitter's linear ops, one at a time: torchvision's _blend as linear_blend's weights
def blend_brightness(x, f):
    return D.linear_blend(x, f, torch.zeros_like(f), torch.zeros_like(f))


def blend_contrast(x, f):
    return D.linear_blend(x, f, 1.0 - f, torch.zeros_like(f))


def blend_saturation(x, f):
    return D.linear_blend(x, f, torch.zeros_like(f), 1.0 - f)


@pytest.mark.parametrize("op, ref, low, high", [
    (blend_brightness, TF.adjust_brightness, 0.6, 1.4),
    (blend_contrast, TF.adjust_contrast, 0.6, 1.4),
    (blend_saturation, TF.adjust_saturation, 0.6, 1.4),
    (D.adjust_hue, TF.adjust_hue, -0.1, 0.1),
])
def test_each_colour_op_matches_torchvision(images, op, ref, low, high):
    factors = torch.linspace(low, high, N)
    got = op(images, factors)
    for i in range(N):
        assert torch.allclose(got[i], ref(images[i], factors[i].item()), atol=1e-5), i


def test_jitter_applies_the_four_ops_in_each_samples_order(images):
    torch.manual_seed(3)
    order, factors = D.jitter_params(N, 0.4, 0.4, 0.4, 0.1)
    got = D.color_jitter(images, order, factors)
    refs = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in range(N):
        x = images[i]
        for k in order[i].tolist():
            x = refs[k](x, factors[k, i].item())
        assert torch.allclose(got[i], x, atol=1e-5), i
    assert len({tuple(o) for o in order.tolist()}) > 1              # orders differ between samples
    assert (factors[:3] >= 0.6).all() and (factors[:3] <= 1.4).all() and factors[3].abs().max() <= 0.1


def test_hue_rotation_matches_torchvision_over_the_whole_circle():
    g = torch.Generator().manual_seed(5)
    x = torch.rand(11, 3, 8, 8, generator=g)
    x[:, :, 0, 0] = 0.0                                   # black
    x[:, :, 0, 1] = 0.5                                   # grey: no chroma
    x[:, :, 0, 2] = torch.tensor([1.0, 0.0, 0.0])         # pure primaries and a secondary
    x[:, :, 0, 3] = torch.tensor([0.0, 1.0, 0.0])
    x[:, :, 0, 4] = torch.tensor([0.0, 0.0, 1.0])
    x[:, :, 0, 5] = torch.tensor([1.0, 1.0, 0.0])
    factors = torch.linspace(-0.5, 0.5, 11)
    got = D.adjust_hue(x, factors)
    for i in range(11):
        assert torch.allclose(got[i], TF.adjust_hue(x[i], factors[i].item()), atol=1e-5), i
    assert torch.equal(got[:, :, 0, :2], x[:, :, 0, :2])    # black and grey stay


def test_jitter_leaves_inactive_samples_unchanged(images):
    torch.manual_seed(4)
    order, factors = D.jitter_params(N, 0.4, 0.4, 0.4, 0.1)
    active = torch.tensor([True, False, True, False, False, True])
    got = D.color_jitter(images, order, factors, active)
    full = D.color_jitter(images, order, factors)
    assert torch.equal(got[~active], images[~active])
    assert torch.equal(got[active], full[active])


def test_grayscale_blur_solarize_match_torchvision(images):
    assert torch.allclose(D.grayscale(images), TF.rgb_to_grayscale(images, num_output_channels=3), atol=1e-6)
    sigma = torch.linspace(0.1, 2.0, N)
    got = D.gaussian_blur(images, sigma, 7)
    for i in range(N):
        assert torch.allclose(got[i], TF.gaussian_blur(images[i], [7, 7], [sigma[i].item()] * 2), atol=1e-5), i
    assert torch.allclose(D.solarize(images, 0.5), TF.solarize(images, 0.5))


def test_aps_views_carry_boxes_and_flips_of_their_crop():
    preset = get_preset("digits")
    x = torch.randint(0, 256, (N, 1, 32, 32), dtype=torch.uint8)
    views = batched_pipeline(aps_pair(preset, 16, scale=(0.15, 1.0), ratio=(3 / 4, 4 / 3), flip_p=0.5,
                               jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.0, gray_p=0.0))
    torch.manual_seed(0)
    out = views(x)
    assert set(out) == {"view1", "box1", "flip1", "view2", "box2", "flip2"}
    assert out["view1"].shape == (N, 3, 16, 16) and out["flip1"].dtype == torch.bool
    plain = out["view1"] * preset.std[0] + preset.mean[0]          # no colour ops: undo the normalisation
    expect = D.resized_crop_flip(D.to_float(x), out["box1"], 16, out["flip1"])
    assert torch.allclose(plain, expect, atol=1e-5)
    moco = batched_pipeline(moco_views(preset, 16, num_key_views=2, num_minis=3, mini_size=8, scalemix=True))(x)
    assert moco["query"].shape == (N, 3, 16, 16) and moco["keys"].shape == (N, 2, 3, 16, 16)
    assert moco["mini_queries"].shape == (N, 3, 3, 8, 8) and moco["query_mix"].shape == (N, 3, 16, 16)


def test_device_loader_follows_the_cpu_loaders_order():
    from data.loader import build_train_loader
    data = build_dataset("digits")
    loader = DeviceLoader(data, 64, seed=7, device=torch.device("cpu"), augment=lambda u, rng: u)
    cpu = build_train_loader(build_dataset("digits", transform=T.PILToTensor()), 64, 0, seed=7,
                             device=torch.device("cpu"))
    for sampler in (loader.batch_sampler, cpu.batch_sampler):
        sampler.set_epoch(2)
    images, labels = uint8_images(data)
    batches = list(loader)
    assert len(batches) == len(data) // 64 == len(cpu)
    for (x, y), (pil, target) in zip(batches, cpu):
        assert torch.equal(y, target) and torch.equal(x[:, 0], pil[:, 0])
    assert images.shape[1:] == (1, 32, 32) and images.dtype == torch.uint8


# ------------------------------------------------------------------ image folders on the device path
def test_crop_boxes_with_a_size_per_sample_fit_each_image():
    H = torch.tensor([20.0, 64, 33, 100] * 500)
    W = torch.tensor([30.0, 16, 33, 7] * 500)
    boxes = D.crop_boxes(2000, H, W, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= H).all() and (left + w <= W).all()
    assert (h >= 1).all() and (w >= 1).all()
    # nothing fits: the centre crop at the ratio bound, per sample (torchvision: 16 x 64 -> h 21; 100 x 7 -> w 7)
    fallback = D.crop_boxes(2, torch.tensor([64.0, 7]), torch.tensor([16.0, 100]), scale=(2.0, 3.0))
    assert fallback.tolist() == [[21.0, 0.0, 21.0, 16.0], [0.0, 45.0, 7.0, 9.0]]


def test_crop_resize_list_equals_torchvisions_resized_crop_per_image():
    g = torch.Generator().manual_seed(2)
    images = [(torch.rand(3, h, w, generator=g) * 255).to(torch.uint8) for h, w in ((40, 48), (17, 90), (64, 64))]
    boxes = torch.tensor([[3.0, 5, 30, 40], [0, 10, 17, 60], [8, 8, 12, 9]])
    got = D.crop_resize_list(images, boxes, 16)
    for img, (t, l, h, w), out in zip(images, boxes.long().tolist(), got):
        ref = TF.resized_crop(img.float() / 255, t, l, h, w, [16, 16], InterpolationMode.BILINEAR, antialias=True)
        assert torch.allclose(out, ref, atol=1e-5)


def _folder_with_odd_files(root, make_folder):
    """make_folder's JPEGs plus a PNG (workers decode it) and a grey JPEG."""
    make_folder(root, per_class=4)
    Image.new("RGB", (30, 22), (200, 10, 10)).save(root / "train" / "class0" / "extra.png")
    Image.new("L", (26, 26), 90).save(root / "train" / "class1" / "grey.jpg")


@pytest.mark.parametrize("worker_decode", [True, False], ids=["workers-decode", "batched-decode_jpeg"])
def test_folder_device_loader_yields_the_cpu_loaders_images_and_order(tmp_path, worker_decode, make_folder):
    from data.datasets import build_imagefolder
    from data.device_loaders import FolderDeviceLoader
    from data.loader import GlobalBatchSampler
    _folder_with_odd_files(tmp_path, make_folder)
    folder = build_imagefolder(str(tmp_path), train=True)
    loader = FolderDeviceLoader(folder, 5, seed=3, device=torch.device("cpu"), augment=lambda imgs, rng: imgs,
                                num_workers=1, worker_decode=worker_decode)
    order = GlobalBatchSampler(len(folder), 5, seed=3, rank=0, world=1)      # the CPU path's order
    assert len(loader) == len(order) == 2
    for sampler in (loader.batch_sampler, order):
        sampler.set_epoch(1)
    batches = list(loader)
    assert len(batches) == 2
    for (images, labels), idx in zip(batches, order):
        assert labels.tolist() == [folder.targets[i] for i in idx]
        for img, i in zip(images, idx):
            ref = TF.pil_to_tensor(folder[i][0])                           # PIL's decode (the CPU path's)
            assert img.shape == ref.shape and (img.float() - ref.float()).abs().max() <= 1


def test_folder_device_loader_names_a_corrupt_jpeg(tmp_path, make_folder):
    from data.datasets import build_imagefolder
    from data.device_loaders import FolderDeviceLoader
    from utils.errors import UserError
    _folder_with_odd_files(tmp_path, make_folder)
    bad = tmp_path / "train" / "class0" / "0.jpg"
    bad.write_bytes(bad.read_bytes()[:200])                       # a JPEG header, then nothing
    folder = build_imagefolder(str(tmp_path), train=True)
    for worker_decode in (True, False):
        loader = FolderDeviceLoader(folder, 10, seed=0, device=torch.device("cpu"), augment=lambda imgs, rng: imgs,
                                    num_workers=0, worker_decode=worker_decode)
        with pytest.raises(UserError, match="cannot read image .*0.jpg"):
            list(loader)


def test_device_views_of_images_of_different_sizes():
    preset = get_preset("digits")
    views = batched_pipeline(aps_pair(preset, 16, jitter_p=0.0, gray_p=0.0))
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in ((20, 30), (40, 24), (33, 33))]
    out = views(images)
    assert out["view1"].shape == (3, 3, 16, 16) and out["box2"].shape == (3, 4)
    plain = out["view1"] * preset.std[0] + preset.mean[0]
    for k, img in enumerate(images):
        t, l, h, w = out["box1"][k].long().tolist()
        assert t + h <= img.shape[1] and l + w <= img.shape[2]
        ref = D.crop_resize_list([img], out["box1"][k:k + 1], 16)[0]
        assert torch.allclose(plain[k], ref.flip(-1) if out["flip1"][k] else ref, atol=1e-5)


def test_views_of_images_elsewhere_take_parameters_drawn_on_the_cpu(tmp_path):
    """The folder loader draws the views' numbers on the CPU (no host sync in the crop loop) while the images
    are on the GPU. 'meta' stands in for the GPU here: any op mixing the two devices raises."""
    from data.datasets import build_imagefolder
    from data.device_loaders import FolderDeviceLoader
    preset = get_preset("imagefolder")
    images = [torch.empty(3, 40 + 3 * i, 50, dtype=torch.uint8, device="meta") for i in range(4)]
    rng = BatchRandom("cpu", 0, 1).reseed(1, 2)
    moco = batched_pipeline(moco_views(preset, 24, asym_aug=True, num_minis=2, mini_size=8, scalemix=True))(images, rng)
    aps = batched_pipeline(aps_pair(preset, 16, blur_p=0.5))(images, rng)
    assert all(v.device.type == "meta" for v in [*moco.values(), *aps.values()])
    assert moco["mini_queries"].shape == (4, 2, 3, 8, 8) and aps["box1"].shape == (4, 4)
    for c in range(2):
        (tmp_path / "train" / f"c{c}").mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "train" / f"c{c}" / "0.jpg")
    loader = FolderDeviceLoader(build_imagefolder(str(tmp_path), True), 2, 0, torch.device("cpu"),
                                batched_pipeline(aps_pair(preset, 8)), 0)
    assert loader.rng.device.type == "cpu" and loader.rng.generator is not None
