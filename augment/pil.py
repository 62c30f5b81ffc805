"""The PIL realisation of the recipes (augment/recipes.py): torchvision and timm transforms on one PIL image at a
time, in loader workers (the reference's way). `pil_pipeline(recipe)` returns the callable a dataset applies.

Order of one view: crop, flip, colour jitter, grayscale, blur, solarize (flip here instead with flip_late, as
MoCo v2's pipeline has it), RandAugment, to tensor, normalise, random erasing. Each op draws its random numbers
from the global generators (torch; Python's for the blur's sigma), as torchvision's transforms do.
"""
import random

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import ImageFilter, ImageOps
from torchvision.transforms import InterpolationMode

from augment.ops import mean_fill
from augment.randaugment import TRANSLATE_PCT
from augment.recipes import RESIZE_FRACTION, MoCoViews, Pair, View, realise, realises

INTERPOLATION = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}


class GaussianBlur:
    """PIL Gaussian blur with sigma drawn uniformly from `sigma` (MoCo v2's blur)."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


def _posterize_at_least_1_bit(img, bits_to_keep, **_):
    return img if bits_to_keep >= 8 else ImageOps.posterize(img, max(1, bits_to_keep))


def safe_posterize(rand_augment):
    """timm's increasing posterize asks for 0 bits at the top magnitude, which current Pillow rejects
    (old Pillow returned a black image); keep 1 bit instead."""
    for op in rand_augment.ops:
        if "posterize" in op.name.lower():
            op.aug_fn = _posterize_at_least_1_bit
    return rand_augment


def rand_augment(policy: str, mean):
    """timm's PIL RandAugment for `policy`, filling with the normalisation mean, translating by up to
    TRANSLATE_PCT of the side (what the batched realisation does)."""
    from timm.data.auto_augment import rand_augment_transform
    return safe_posterize(rand_augment_transform(policy, dict(translate_pct=TRANSLATE_PCT,
                                                              img_mean=tuple(mean_fill(mean)))))


@realises(View, "pil")
class PILView:
    """One View on a PIL image -> tensor [3, S, S]; a boxed view returns (tensor, box [4] = (top, left, h, w) in
    source pixels, flipped: bool tensor)."""

    def __init__(self, view: View):
        v = self.view = view
        interpolation = INTERPOLATION[v.interpolation]
        self.before = {"padded": T.Resize((v.size, v.size), interpolation=interpolation, antialias=True),
                       "resize": T.Resize((v.size, v.size), interpolation=interpolation, antialias=True),
                       "center": T.Resize(int(round(v.size / RESIZE_FRACTION)), interpolation=interpolation)
                       }.get(v.crop)
        self.fixed_crop = {"padded": T.RandomCrop(v.size, padding=v.padding),
                           "center": T.CenterCrop(v.size)}.get(v.crop)
        colour = []
        if v.jitter_p > 0:
            colour.append(T.RandomApply([T.ColorJitter(*v.jitter)], p=v.jitter_p))
        if v.gray_p > 0:
            colour.append(T.RandomGrayscale(p=v.gray_p))
        if v.blur_p > 0:
            colour.append(T.RandomApply([GaussianBlur(v.blur_sigma)], p=v.blur_p))
        if v.solarize_p > 0:
            colour.append(T.RandomSolarize(threshold=128, p=v.solarize_p))
        self.colour = T.Compose(colour)
        self.randaug = rand_augment(v.randaugment, v.mean) if v.randaugment else None
        finish = [T.ToTensor(), T.Normalize(v.mean, v.std)]
        if v.erase_p > 0:
            from timm.data.random_erasing import RandomErasing
            finish.append(RandomErasing(v.erase_p, mode=v.erase_mode, device="cpu"))
        self.finish = T.Compose(finish)

    def crop(self, img):
        """(cropped image, box or None)."""
        v = self.view
        if v.crop == "resized":
            top, left, h, w = T.RandomResizedCrop.get_params(img, v.scale, v.ratio)
            img = TF.resized_crop(img, top, left, h, w, [v.size, v.size], INTERPOLATION[v.interpolation],
                                  antialias=True)
            return img, torch.tensor([top, left, h, w], dtype=torch.float32)
        img = self.before(img)
        return (self.fixed_crop(img) if self.fixed_crop is not None else img), None

    def flip(self, img):
        """(image, flipped), mirrored with probability flip_p (one draw, as RandomHorizontalFlip)."""
        if self.view.flip_p > 0 and bool(torch.rand(1) < self.view.flip_p):
            return TF.hflip(img), True
        return img, False

    def __call__(self, img):
        v = self.view
        img, box = self.crop(img)
        flipped = False
        if not v.flip_late:
            img, flipped = self.flip(img)
        img = self.colour(img)
        if v.flip_late:
            img, flipped = self.flip(img)
        if self.randaug is not None:
            img = self.randaug(img)
        x = self.finish(img)
        return (x, box, torch.tensor(flipped)) if v.boxed else x


@realises(Pair, "pil")
class PILPair:
    """Two independent views of one image, as a dict: view1/view2 tensors (and box1/box2, flip1/flip2 when the
    view is boxed)."""

    def __init__(self, recipe: Pair):
        self.view, self.boxed = PILView(recipe.view), recipe.view.boxed

    def __call__(self, img):
        if not self.boxed:
            return {"view1": self.view(img), "view2": self.view(img)}
        x1, b1, f1 = self.view(img)
        x2, b2, f2 = self.view(img)
        return {"view1": x1, "box1": b1, "flip1": f1, "view2": x2, "box2": b2, "flip2": f2}


@realises(MoCoViews, "pil")
class PILMoCo:
    """One image -> {"query": [3, S, S], "keys": [V, 3, S, S]}, plus "query_mix": [3, S, S] (a second query
    view, for ScaleMix) and "mini_queries": [M, 3, s, s] (MultiCrop) when the recipe asks for them."""

    def __init__(self, recipe: MoCoViews):
        self.recipe = recipe
        views = {}                                       # one realisation per distinct View

        def view_of(view):
            if view not in views:
                views[view] = PILView(view)
            return views[view]
        self.query, self.key = view_of(recipe.query), view_of(recipe.key)
        self.mini = view_of(recipe.mini) if recipe.num_minis else None

    def __call__(self, img):
        r = self.recipe
        out = {"query": self.query(img), "keys": torch.stack([self.key(img) for _ in range(r.num_key_views)])}
        if r.scalemix:
            out["query_mix"] = self.query(img)
        if r.num_minis:
            out["mini_queries"] = torch.stack([self.mini(img) for _ in range(r.num_minis)])
        return out


def pil_pipeline(recipe):
    """The PIL realisation of a recipe: a View, a Pair or MoCoViews."""
    return realise(recipe, "pil")
