"""MoCo v2 views (SPEC C1) and the Asym-Siam view sets (C2), returned as named groups."""
import random

import torch
import torchvision.transforms as T
from PIL import ImageFilter

from augment.transforms import normalize_for
from data.datasets import Preset


class GaussianBlur:
    """PIL Gaussian blur with sigma drawn uniformly from `sigma` (MoCo v2's blur)."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


def moco_v2_transform(preset: Preset, size: int, scale=(0.2, 1.0), blur_prob: float = 0.5):
    """RandomResizedCrop, ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8, grayscale p 0.2, blur p 0.5, flip, normalise."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=scale),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([GaussianBlur()], p=blur_prob),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        normalize_for(preset),
    ])


def asym_query_transform(preset: Preset, size: int, scale=(0.2, 1.0), blur_prob: float = 0.5):
    """AsymAug's stronger source side: the v2 pipeline plus RandAugment rand-m10-n2-mstd0.5 after the flip
    (translate_const 100 at 224 px, scaled with the image size)."""
    from timm.data.auto_augment import rand_augment_transform

    from augment.transforms import safe_posterize
    hparams = dict(translate_const=max(1, round(100 * size / 224)),
                   img_mean=tuple(round(255 * m) for m in preset.mean))
    v2 = moco_v2_transform(preset, size, scale, blur_prob).transforms
    flip_at = next(i for i, t in enumerate(v2) if isinstance(t, T.RandomHorizontalFlip))
    ra = safe_posterize(rand_augment_transform("rand-m10-n2-mstd0.5", hparams))
    return T.Compose(v2[:flip_at + 1] + [ra] + v2[flip_at + 1:])


def asym_key_transform(preset: Preset, size: int):
    """AsymAug's weaker target side: RandomResizedCrop (scale 0.08-1) and flip only, then normalise."""
    return T.Compose([T.RandomResizedCrop(size, scale=(0.08, 1.0)), T.RandomHorizontalFlip(), T.ToTensor(),
                      normalize_for(preset)])


class MoCoViews:
    """One image -> {"query": [3, S, S], "keys": [V, 3, S, S]}, plus "query_mix": [3, S, S] (a second query
    view, for ScaleMix) and "mini_queries": [M, 3, s, s] (MultiCrop) when asked for."""

    def __init__(self, query_tf, key_tf, num_key_views: int = 1, mini_tf=None, num_minis: int = 0,
                 scalemix: bool = False):
        self.query_tf, self.key_tf, self.num_key_views = query_tf, key_tf, num_key_views
        self.mini_tf, self.num_minis, self.scalemix = mini_tf, num_minis, scalemix

    def __call__(self, img):
        out = {"query": self.query_tf(img),
               "keys": torch.stack([self.key_tf(img) for _ in range(self.num_key_views)])}
        if self.scalemix:
            out["query_mix"] = self.query_tf(img)
        if self.num_minis:
            out["mini_queries"] = torch.stack([self.mini_tf(img) for _ in range(self.num_minis)])
        return out


def moco_views(preset: Preset, size: int, blur_prob=0.5, num_key_views=1, num_minis=0, mini_size=96,
               mini_scale=(0.05, 0.14), asym_aug=False, scalemix=False) -> MoCoViews:
    """The baseline views; MultiCrop (num_minis > 0) adds small query crops and moves the large crops' scale
    to (0.14, 1) on both sides, as the reference does; MeanEnc (num_key_views > 1) adds key views; AsymAug
    makes the query stronger and the key weaker."""
    scale = (mini_scale[1], 1.0) if num_minis else (0.2, 1.0)
    large = moco_v2_transform(preset, size, scale, blur_prob)
    query = asym_query_transform(preset, size, scale, blur_prob) if asym_aug else large
    key = asym_key_transform(preset, size) if asym_aug else large
    mini = moco_v2_transform(preset, mini_size, mini_scale, blur_prob) if num_minis else None
    return MoCoViews(query, key, num_key_views, mini, num_minis, scalemix)
