"""The batched realisation of the recipes (augment/recipes.py): whole batches on the training device, every op
with per-sample random parameters (augment/ops.py). `batched_pipeline(recipe)` returns the callable a
data.device_loaders loader applies to each uint8 batch: pipeline(images, rng) with rng a utils.rng.BatchRandom.

Order of one view: crop and flip, RandAugment, colour jitter, grayscale, blur, solarize, normalise, random
erasing. Each view has two halves: `params` draws every random number (a handful of small kernels, no host
syncs), `apply` does the pixel work (what `compile()` hands to torch.compile). The outputs carry the same named
groups as the PIL realisation (augment/pil.py), crop boxes and flips included.
"""
import math

import torch
import torch.nn.functional as F

from augment.ops import (apply_where, color_jitter, crop_boxes, crop_resize_list, erase_boxes, gaussian_blur,
                         grayscale, jitter_params, mean_fill, normalize, per_sample, random_erasing, resized_crop_flip,
                         solarize, to_float)
from augment.randaugment import DeviceRandAugment
from augment.recipes import MoCoViews, Pair, View, realise, realises
from utils.rng import BatchRandom
from utils.runtime import compile_kwargs
from utils.transfer import tree_to_device


def compile_pixels(fn, mode=None, backend: str = "inductor"):
    """torch.compile an augmentation's pixel work for fixed shapes (room for the few a run sees), in --compile's
    mode (None or 'default': torch.compile's default) and --compile-backend."""
    import torch._dynamo
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
    return torch.compile(fn, dynamic=False, **compile_kwargs(mode, backend))


def device_of(images) -> torch.device:
    return images[0].device if isinstance(images, (list, tuple)) else images.device


class BatchedView:
    """One random view per image of a float batch [N, 3, H, W] in [0, 1] (or a list of uint8 [3, h_i, w_i] images
    of different sizes, 'resized' crops only): view(x, rng) -> views [N, 3, S, S]; a boxed view returns (views,
    boxes [N, 4] = (top, left, h, w) in source pixels, flips [N]), as the PIL realisation does."""

    def __init__(self, view: View):
        if view.crop not in ("resized", "padded") or view.interpolation != "bilinear":
            raise ValueError(f"the batched realisation makes only bilinear 'resized' and 'padded' crops, not a "
                             f"{view.interpolation} {view.crop!r} crop")
        self.view = view
        self.randaug = DeviceRandAugment(view.randaugment, mean_fill(view.mean)) if view.randaugment else None

    def params(self, n: int, height, width, rng: BatchRandom, device=None) -> dict:
        """Every random number of n views, worked out where rng returns its draws (the CPU, as __call__ draws
        them); `device`: where the images are, for the one draw made there (random erasing's per-pixel noise,
        counter-based: the same on any device)."""
        v, S = self.view, self.view.size
        if v.crop == "padded":
            offsets = torch.floor(rng.rand(n, 2) * (2 * v.padding + 1))            # RandomCrop's top, left
            boxes = torch.cat([offsets, torch.full_like(offsets, S)], dim=1)
        else:
            boxes = crop_boxes(n, height, width, v.scale, v.ratio, rng)
        flips = rng.rand(n) < v.flip_p if v.flip_p > 0 else torch.zeros(n, dtype=torch.bool, device=rng.device)
        p = {"boxes": boxes, "flips": flips}
        if self.randaug is not None:
            p.update(self.randaug.params(n, S, S, rng))
        if v.jitter_p > 0:
            p["jitter"] = rng.rand(n) < v.jitter_p
            p["order"], p["factors"] = jitter_params(n, *v.jitter, rng)
        if v.gray_p > 0:
            p["gray"] = rng.rand(n) < v.gray_p
        if v.blur_p > 0:
            p["sigma"] = rng.uniform(n, *v.blur_sigma)
            p["blur"] = rng.rand(n) < v.blur_p
        if v.solarize_p > 0:
            p["solarize"] = rng.rand(n) < v.solarize_p
        if v.erase_p > 0:
            p["erase_boxes"], found = erase_boxes(n, S, S, rng)
            p["erase"] = (rng.rand(n) < v.erase_p) & found
            if v.erase_mode == "pixel":
                p["erase_values"] = rng.noise(n, 3, S, S, device=device)
            else:             # 'rand' (a value per channel) or 'const' (zeros): [n, 3, 1, 1], broadcast over the
                noise = rng.normal(n, 3, 1, 1)                # box on the device (never a full-size host copy)
                p["erase_values"] = noise if v.erase_mode != "const" else torch.zeros_like(noise)
        return p

    def apply(self, x, p: dict):
        """x: float [N, 3, H, W], or a list of uint8 [3, h_i, w_i] (cropped image by image, outside the
        compiled part). Parameters drawn on the CPU move to the images' device here, from pinned memory without
        a host sync (utils.transfer); for a list, after the crop loop has read its boxes on the host."""
        if isinstance(x, (list, tuple)):
            if self.view.crop != "resized":
                raise ValueError("images of different sizes take 'resized' crops only")
            v = crop_resize_list(x, p["boxes"], self.view.size)
            p = tree_to_device(p, v.device)
            return self._finish(torch.where(per_sample(p["flips"], v).bool(), v.flip(-1), v), p)
        return self._apply_batch(x, tree_to_device(p, x.device))

    def _apply_batch(self, x: torch.Tensor, p: dict):
        S = self.view.size
        if self.view.crop == "padded":
            if x.shape[-2:] != (S, S):                                           # Resize((S, S)), antialiased
                x = F.interpolate(x, size=(S, S), mode="bilinear", align_corners=False, antialias=True)
            x = F.pad(x, [self.view.padding] * 4)                                # zero padding; exact integer crops
        return self._finish(resized_crop_flip(x, p["boxes"], S, p["flips"]), p)

    def _finish(self, x: torch.Tensor, p: dict):
        """Everything after the crop and flip."""
        v = self.view
        if self.randaug is not None:
            x = self.randaug.apply(x, p)
        if v.jitter_p > 0:
            x = color_jitter(x, p["order"], p["factors"], p["jitter"])
        if v.gray_p > 0:
            x = apply_where(p["gray"], grayscale, x)
        if v.blur_p > 0:
            size = 2 * math.ceil(3 * v.blur_sigma[1]) + 1                                # covers 3 sigma
            size = min(size, 2 * ((v.size - 1) // 2) + 1)                               # reflect pad < side
            x = apply_where(p["blur"], lambda y: gaussian_blur(y, p["sigma"], size), x)
        if v.solarize_p > 0:
            x = apply_where(p["solarize"], lambda y: solarize(y, 0.5), x)
        x = normalize(x, v.mean, v.std)
        if v.erase_p > 0:
            x = random_erasing(x, p["erase_boxes"], p["erase"], p["erase_values"])
        return x, p["boxes"], p["flips"]

    def __call__(self, x, rng: BatchRandom = None):
        device = device_of(x)
        if isinstance(x, (list, tuple)):                     # images of different sizes (their sizes: host data)
            H = torch.tensor([img.shape[-2] for img in x])
            W = torch.tensor([img.shape[-1] for img in x])
            N = len(x)
        else:
            N, _, H, W = x.shape
        rng = (rng or BatchRandom.local(device)).host()        # parameters worked out on the CPU, then moved
        out = self.apply(x, self.params(N, H, W, rng, device))
        return out if self.view.boxed else out[0]

    def compile(self, mode=None, backend: str = "inductor") -> "BatchedView":
        """torch.compile the pixel work: its ~100 small element-wise kernels fused into a few."""
        self._apply_batch = compile_pixels(self._apply_batch, mode, backend)
        self._finish = compile_pixels(self._finish, mode, backend)
        return self


class _Pipeline:
    """A recipe's realisation over one or more BatchedViews (one per distinct View)."""

    def __init__(self):
        self._views = {}

    def realise(self, view: View) -> BatchedView:
        if view not in self._views:
            self._views[view] = BatchedView(view)
        return self._views[view]

    def compile(self, mode=None, backend: str = "inductor"):
        for view in self._views.values():
            view.compile(mode, backend)
        return self


@realises(View, "batched")
class BatchedSingle(_Pipeline):
    """One view per image: uint8 images -> normalised float views [N, 3, S, S] (with boxes and flips if boxed)."""

    def __init__(self, view: View):
        super().__init__()
        self.view = self.realise(view)

    def __call__(self, images, rng: BatchRandom = None):
        return self.view(to_float(images), rng)


@realises(Pair, "batched")
class BatchedPair(_Pipeline):
    """Two views on the device (APS's, docs/REFERENCE.md#aps-views): uint8 images -> the PIL pair's dict (view1/2,
    and box1/2, flip1/2 when the view is boxed)."""

    def __init__(self, recipe: Pair):
        super().__init__()
        self.view, self.boxed = self.realise(recipe.view), recipe.view.boxed

    def __call__(self, images, rng: BatchRandom = None):
        x = to_float(images)
        rng = rng or BatchRandom.local(device_of(x))
        if not self.boxed:
            return {"view1": self.view(x, rng), "view2": self.view(x, rng)}
        v1, b1, f1 = self.view(x, rng)
        v2, b2, f2 = self.view(x, rng)
        return {"view1": v1, "box1": b1, "flip1": f1, "view2": v2, "box2": b2, "flip2": f2}


@realises(MoCoViews, "batched")
class BatchedMoCo(_Pipeline):
    """MoCo's views (docs/REFERENCE.md#moco-switches) on the device: {"query", "keys" [N, V, ...], "query_mix"?, "mini_queries" [N, M,
    ...]?}, the PIL realisation's groups. The blur is a true Gaussian (the PIL realisation uses PIL's box
    approximation)."""

    def __init__(self, recipe: MoCoViews):
        super().__init__()
        self.recipe = recipe
        self.query, self.key = self.realise(recipe.query), self.realise(recipe.key)
        self.mini = self.realise(recipe.mini) if recipe.num_minis else None

    def __call__(self, images, rng: BatchRandom = None):
        r = self.recipe
        x = to_float(images)
        rng = rng or BatchRandom.local(device_of(x))
        out = {"query": self.query(x, rng), "keys": torch.stack([self.key(x, rng) for _ in range(r.num_key_views)], 1)}
        if r.scalemix:
            out["query_mix"] = self.query(x, rng)
        if r.num_minis:
            out["mini_queries"] = torch.stack([self.mini(x, rng) for _ in range(r.num_minis)], dim=1)
        return out


def batched_pipeline(recipe):
    """The batched realisation of a recipe: a View, a Pair or MoCoViews."""
    return realise(recipe, "batched")
