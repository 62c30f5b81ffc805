"""PIL/CPU augmentation pipelines (SPEC A1) that also report where each view came from."""
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from data.datasets import Preset


def normalize_for(preset: Preset):
    return T.Normalize(preset.mean, preset.std)


class BoxedView:
    """RandomResizedCrop + horizontal flip, then `post` (colour, normalise) on the result.

    Returns (view [3, S, S], box [4] = (top, left, height, width) in source pixels, flipped: bool tensor).
    """

    def __init__(self, size: int, scale=(0.15, 1.0), ratio=(3 / 4, 4 / 3), flip_p: float = 0.5, post=None):
        self.size, self.scale, self.ratio, self.flip_p = size, scale, ratio, flip_p
        self.post = post

    def __call__(self, img):
        top, left, h, w = T.RandomResizedCrop.get_params(img, self.scale, self.ratio)
        img = TF.resized_crop(img, top, left, h, w, [self.size, self.size], InterpolationMode.BILINEAR,
                              antialias=True)
        flipped = bool(torch.rand(1) < self.flip_p)
        if flipped:
            img = TF.hflip(img)
        if self.post is not None:
            img = self.post(img)
        box = torch.tensor([top, left, h, w], dtype=torch.float32)
        return img, box, torch.tensor(flipped)


class TwoViews:
    """Two independent views of one image, as a dict: view1/view2 tensors, box1/box2, flip1/flip2."""

    def __init__(self, view_transform):
        self.view = view_transform

    def __call__(self, img):
        x1, b1, f1 = self.view(img)
        x2, b2, f2 = self.view(img)
        return {"view1": x1, "box1": b1, "flip1": f1, "view2": x2, "box2": b2, "flip2": f2}


def aps_view_transform(preset: Preset, img_size: int, scale=(0.15, 1.0), ratio=(3 / 4, 4 / 3), flip_p=0.5,
                       jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, gray_p=0.2) -> BoxedView:
    """SPEC A1: crop (scale 0.15-1) + flip, ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8, grayscale p 0.2, normalise."""
    post = T.Compose([
        T.RandomApply([T.ColorJitter(*jitter)], p=jitter_p),
        T.RandomGrayscale(p=gray_p),
        T.ToTensor(),
        normalize_for(preset),
    ])
    return BoxedView(img_size, scale=scale, ratio=ratio, flip_p=flip_p, post=post)


def eval_transform(preset: Preset, img_size: int, mean=None, std=None):
    """Deterministic view for kNN / evaluation: resize (+ centre crop at 224-style sizes), normalise."""
    if preset.img_size >= 96:  # ImageNet-style: resize the short side to size/0.875, then centre crop
        resize = [T.Resize(int(round(img_size / 0.875)), interpolation=InterpolationMode.BICUBIC),
                  T.CenterCrop(img_size)]
    else:
        resize = [T.Resize((img_size, img_size), interpolation=InterpolationMode.BILINEAR, antialias=True)]
    norm = T.Normalize(mean, std) if mean is not None else normalize_for(preset)
    return T.Compose(resize + [T.ToTensor(), norm])


def _posterize_at_least_1_bit(img, bits_to_keep, **_):
    from PIL import ImageOps
    return img if bits_to_keep >= 8 else ImageOps.posterize(img, max(1, bits_to_keep))


def safe_posterize(rand_augment):
    """timm's increasing posterize asks for 0 bits at the top magnitude, which current Pillow rejects
    (old Pillow returned a black image); keep 1 bit instead."""
    for op in rand_augment.ops:
        if "posterize" in op.name.lower():
            op.aug_fn = _posterize_at_least_1_bit
    return rand_augment


def finetune_norm(preset: Preset):
    """(mean, std) of fine-tuning: CIFAR and folders use ImageNet statistics as the reference does."""
    from data.datasets import IMAGENET_MEAN, IMAGENET_STD
    return (IMAGENET_MEAN, IMAGENET_STD) if preset.finetune_imagenet_norm else (preset.mean, preset.std)


def finetune_transforms(preset: Preset, img_size: int, auto_augment: str = "rand-m9-mstd0.5-inc1",
                        reprob: float = 0.25, remode: str = "pixel"):
    """SPEC B: RandomCrop(size, padding 4) (RandomResizedCrop for 224-style data), flip, RandAugment,
    normalisation, random erasing. Returns (train, eval) transforms. CIFAR and folders use ImageNet
    statistics as the reference does; the small grey datasets keep their own."""
    from timm.data.auto_augment import rand_augment_transform
    from timm.data.random_erasing import RandomErasing

    mean, std = finetune_norm(preset)
    if preset.img_size >= 96:
        crop = T.RandomResizedCrop(img_size, interpolation=InterpolationMode.BICUBIC)
    else:
        crop = T.Compose([T.Resize((img_size, img_size), antialias=True), T.RandomCrop(img_size, padding=4)])
    ops = [crop, T.RandomHorizontalFlip()]
    if auto_augment and auto_augment != "none":
        hparams = dict(translate_const=int(img_size * 0.45), img_mean=tuple(round(255 * m) for m in mean))
        ops.append(safe_posterize(rand_augment_transform(auto_augment, hparams)))
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    if reprob > 0:
        ops.append(RandomErasing(reprob, mode=remode, device="cpu"))
    return T.Compose(ops), eval_transform(preset, img_size, mean, std)


def lincls_transforms(preset: Preset, img_size: int):
    """SPEC D: train RandomResizedCrop(size, scale 0.08-1) + flip; eval Resize(size / 0.875) + CenterCrop at
    224-style sizes (a plain resize for the small sets). The pretraining normalisation on both sides.
    Returns (train, eval) transforms."""
    train = T.Compose([T.RandomResizedCrop(img_size, scale=(0.08, 1.0)), T.RandomHorizontalFlip(), T.ToTensor(),
                       normalize_for(preset)])
    return train, eval_transform(preset, img_size)
