"""SPEC B's fine-tuning view on the training device, for the in-memory datasets: resize to the training size,
RandomCrop(size, padding 4), flip, RandAugment, normalise, random erasing, batched with per-sample random
parameters drawn from a utils.rng.BatchRandom (the twin of augment.transforms.finetune_transforms).

random_erasing ~ timm's RandomErasing (area 0.02-1/3 of the image, log-uniform aspect 0.3-1/0.3, ten tries,
one box; 'pixel': normal noise per pixel, 'rand': per channel, 'const': zeros) = TF.erase per sample.
"""
import math

import torch
import torch.nn.functional as F

from augment.device import compile_pixels, normalize, resized_crop_flip, to_float
from augment.randaugment import DeviceRandAugment, mean_fill
from utils.rng import BatchRandom

ERASE_MODES = ("pixel", "rand", "const")


def erase_boxes(n: int, height: int, width: int, rng: BatchRandom, area=(0.02, 1 / 3), aspect=(0.3, 1 / 0.3)):
    """timm's RandomErasing box per sample: [n, 4] (top, left, h, w) and found [n] (False: no try fit)."""
    tries = 10
    target = rng.uniform(n, *area, tries) * (height * width)
    ratio = torch.exp(rng.uniform(n, math.log(aspect[0]), math.log(aspect[1]), tries))
    h = torch.round(torch.sqrt(target * ratio))
    w = torch.round(torch.sqrt(target / ratio))
    ok = (w < width) & (h < height)
    first = ok.float().argmax(dim=1, keepdim=True)
    h, w = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0]
    top = torch.floor(rng.rand(n) * (height - h + 1))
    left = torch.floor(rng.rand(n) * (width - w + 1))
    return torch.stack([top, left, h, w], dim=1), ok.any(dim=1)


def random_erasing(x: torch.Tensor, boxes: torch.Tensor, erase: torch.Tensor, values: torch.Tensor):
    """x [N, C, H, W] with box i filled from values[i] ([C, H, W]: only the box is used) where erase[i]."""
    N, C, H, W = x.shape
    top, left, h, w = (boxes[:, k].view(N, 1, 1) for k in range(4))
    rows = torch.arange(H, device=x.device).view(1, H, 1)
    cols = torch.arange(W, device=x.device).view(1, 1, W)
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w) & erase.view(N, 1, 1)
    return torch.where(inside[:, None], values.to(x.dtype), x)


class DeviceFinetuneView:
    """uint8 images [N, C, h, w] -> normalised float views [N, 3, S, S] (SPEC B, small datasets)."""

    def __init__(self, size: int, mean, std, auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25, remode="pixel",
                 padding=4):
        if remode not in ERASE_MODES:
            raise ValueError(f"random erasing mode {remode!r} is not one of {', '.join(ERASE_MODES)}")
        self.size, self.mean, self.std, self.padding = size, mean, std, padding
        self.reprob, self.remode = reprob, remode
        self.randaug = (DeviceRandAugment(auto_augment, mean_fill(mean)) if auto_augment and auto_augment != "none"
                        else None)

    def params(self, n: int, rng: BatchRandom) -> dict:
        S, pad = self.size, self.padding
        offsets = torch.floor(rng.rand(n, 2) * (2 * pad + 1))                    # RandomCrop's top, left
        p = {"boxes": torch.cat([offsets, torch.full_like(offsets, S)], dim=1), "flips": rng.rand(n) < 0.5}
        if self.randaug is not None:
            p.update(self.randaug.params(n, S, S, rng))
        if self.reprob > 0:
            p["erase_boxes"], found = erase_boxes(n, S, S, rng)
            p["erase"] = (rng.rand(n) < self.reprob) & found
            shape = (3, S, S) if self.remode == "pixel" else (3, 1, 1)
            noise = rng.normal(n, *shape).expand(n, 3, S, S)
            p["erase_values"] = noise if self.remode != "const" else torch.zeros_like(noise)
        return p

    def apply(self, images: torch.Tensor, p: dict) -> torch.Tensor:
        x = to_float(images)
        if x.shape[-2:] != (self.size, self.size):                              # Resize((S, S)), antialiased
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        x = F.pad(x, [self.padding] * 4)                                        # zero padding
        v = resized_crop_flip(x, p["boxes"], self.size, p["flips"])            # exact integer crops
        if self.randaug is not None:
            v = self.randaug.apply(v, p)
        v = normalize(v, self.mean, self.std)
        if self.reprob > 0:
            v = random_erasing(v, p["erase_boxes"], p["erase"], p["erase_values"])
        return v

    def __call__(self, images: torch.Tensor, rng: BatchRandom = None) -> torch.Tensor:
        rng = rng or BatchRandom.local(images.device)
        return self.apply(images, self.params(images.shape[0], rng))

    def compile(self) -> "DeviceFinetuneView":
        self.apply = compile_pixels(self.apply)
        return self


def finetune_device_view(preset, img_size: int, auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25,
                         remode="pixel") -> DeviceFinetuneView:
    """The device twin of augment.transforms.finetune_transforms' training half (same arguments)."""
    from augment.transforms import finetune_norm
    return DeviceFinetuneView(img_size, *finetune_norm(preset), auto_augment, reprob, remode)

