"""Batched augmentation on the training device: every op takes a batch and per-sample random parameters.

Images are float [N, C, H, W] in [0, 1] (uint8 sources are converted once). Each op matches torchvision's
functional op applied per sample with the same parameters (tests/test_device_augment.py):

    resized_crop_flip  ~ TF.resized_crop(bilinear, antialias=False) + TF.hflip
                         (= antialias=True whenever the crop is upscaled, as every 32 px crop is)
    color_jitter       ~ TF.adjust_{brightness,contrast,saturation,hue} in a per-sample random order
    grayscale          ~ TF.rgb_to_grayscale(num_output_channels=3)
    gaussian_blur      ~ TF.gaussian_blur(kernel, sigma) (reflect padding)
    solarize           ~ TF.solarize

The view pipelines (APS: SPEC A1; MoCo v2: SPEC C1 with MultiCrop, MeanEnc and ScaleMix) return the same
named groups as the PIL pipelines, crop boxes and flips included.
"""
import functools
import math

import torch
import torch.nn.functional as F

from utils.rng import BatchRandom

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


# ------------------------------------------------------------------ geometry
def crop_boxes(n: int, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), rng: BatchRandom = None):
    """RandomResizedCrop.get_params for n samples at once: [n, 4] = (top, left, h, w), integers as floats.
    height, width: the source size, one for all or one per sample ([n] tensors).

    Ten candidate boxes per sample (area ~ U(scale) * H * W, log-uniform aspect ratio); the first that fits
    wins; samples with none fall back to the centre crop clamped to `ratio`, as torchvision does.
    rng: where the numbers come from (default: the CPU's global generator)."""
    rng = rng or BatchRandom.local("cpu")
    device = rng.device
    H = torch.as_tensor(height, dtype=torch.float32, device=device).reshape(-1).expand(n)      # [n]
    W = torch.as_tensor(width, dtype=torch.float32, device=device).reshape(-1).expand(n)
    tries = 10
    area = (H * W)[:, None] * rng.uniform(n, *scale, tries)
    log_r = rng.uniform(n, math.log(ratio[0]), math.log(ratio[1]), tries)
    r = torch.exp(log_r)
    w = torch.round(torch.sqrt(area * r))
    h = torch.round(torch.sqrt(area / r))
    ok = (w > 0) & (w <= W[:, None]) & (h > 0) & (h <= H[:, None])           # [n, tries]
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.zeros(n, dtype=torch.long, device=device))
    h = h.gather(1, first[:, None])[:, 0]
    w = w.gather(1, first[:, None])[:, 0]
    # the fallback: whole image, cropped to the ratio bounds
    lo, hi = min(ratio), max(ratio)
    in_ratio = W / H
    fw = torch.where(in_ratio > hi, torch.round(H * hi), W)
    fh = torch.where(in_ratio < lo, torch.round(W / lo), H)
    found = ok.any(1)
    h = torch.where(found, h, fh)
    w = torch.where(found, w, fw)
    top = torch.floor(rng.rand(n) * (H - h + 1))
    left = torch.floor(rng.rand(n) * (W - w + 1))
    top = torch.where(found, top, (H - h).div(2, rounding_mode="floor"))
    left = torch.where(found, left, (W - w).div(2, rounding_mode="floor"))
    return torch.stack([top, left, h, w], dim=1)


def crop_resize_list(images, boxes: torch.Tensor, size) -> torch.Tensor:
    """Images of different sizes (uint8 [C, h_i, w_i], on one device) -> float [N, C, S, S] in [0, 1]: each box
    cropped and resized (bilinear, antialiased, as TF.resized_crop with antialias=True). Boxes on the CPU
    (FolderDeviceLoader draws them there) cost no host sync; boxes on a GPU, one."""
    oh, ow = (size, size) if isinstance(size, int) else size
    out = []
    for img, (t, l, h, w) in zip(images, boxes.long().tolist()):
        crop = img[None, :, t:t + h, l:l + w].float().div_(255.0)
        out.append(F.interpolate(crop, size=(oh, ow), mode="bilinear", align_corners=False, antialias=True))
    return torch.cat(out)


def resized_crop_flip(images: torch.Tensor, boxes: torch.Tensor, size, flips: torch.Tensor = None):
    """Crop boxes [N, 4] = (top, left, h, w) out of images [N, C, H, W], resize them to `size` (bilinear, half-
    pixel centres, edges clamped to the box like a resize of the cropped tensor) and mirror where flips [N]."""
    N, C, H, W = images.shape
    oh, ow = (size, size) if isinstance(size, int) else size
    top, left, h, w = (boxes[:, i].to(images.dtype)[:, None] for i in range(4))        # [N, 1] each
    ys = (torch.arange(oh, device=images.device, dtype=images.dtype) + 0.5)[None] * h / oh - 0.5   # [N, oh]
    xs = (torch.arange(ow, device=images.device, dtype=images.dtype) + 0.5)[None] * w / ow - 0.5   # [N, ow]
    ys = top + ys.clamp(min=0).minimum(h - 1)
    xs = left + xs.clamp(min=0).minimum(w - 1)
    if flips is not None:
        xs = torch.where(flips[:, None], xs.flip(1), xs)
    gy = (2 * ys + 1) / H - 1                                                         # grid_sample coordinates
    gx = (2 * xs + 1) / W - 1
    grid = torch.stack([gx[:, None, :].expand(N, oh, ow), gy[:, :, None].expand(N, oh, ow)], dim=-1)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ------------------------------------------------------------------ colour
def per_sample(v: torch.Tensor, like: torch.Tensor):
    """v [N] shaped to broadcast over `like` [N, ...], in its dtype."""
    return v.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


@functools.lru_cache(maxsize=64)
def _constant(values: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def channel_constant(values, like: torch.Tensor) -> torch.Tensor:
    """values as [1, C, 1, 1] on like's device and dtype, made once per device and dtype (no copy per call)."""
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
    return _constant(tuple(values), like.device, like.dtype).view(1, -1, 1, 1)


def gray(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] -> [N, 1, H, W] luma, torchvision's weights (two kernels)."""
    return (images * channel_constant(GRAY_WEIGHTS, images)).sum(dim=1, keepdim=True)


def linear_blend(x, f, w_mean, w_grey):
    """clamp(f x + w_mean * grey mean + w_grey * grey), per-sample coefficients [N]: torchvision's _blend,
    ratio * x + (1 - ratio) * base, for brightness (weights 0), contrast (w_mean = 1 - f) and saturation
    (w_grey = 1 - f). f = 1 with zero weights leaves x exactly as it is."""
    g = gray(x)                                                                       # [N, 1, H, W]
    base = torch.addcmul(g.mean(dim=(1, 2, 3), keepdim=True) * per_sample(w_mean, g), g, per_sample(w_grey, g))
    return torch.addcmul(base, x, per_sample(f, x)).clamp_(0.0, 1.0)


def adjust_brightness(x, factor):
    return linear_blend(x, factor, torch.zeros_like(factor), torch.zeros_like(factor))


def adjust_contrast(x, factor):
    return linear_blend(x, factor, 1.0 - factor, torch.zeros_like(factor))


def adjust_saturation(x, factor):
    return linear_blend(x, factor, torch.zeros_like(factor), 1.0 - factor)


def adjust_hue(x, factor):
    """TF.adjust_hue per sample, without building HSV images. A hue rotation keeps each pixel's max (V) and
    chroma C = max - min, so channel c of the result is max - C * clamp(min(k, 4 - k), 0, 1) with
    k = (6 * hue + n_c) mod 6, n = 5, 3, 1 for R, G, B: the closed form of torchvision's HSV -> RGB table.
    The hue itself (x 6) is (x[c+1] - x[c+2]) / C + 2c for the first channel c holding the max (worked out
    on the one-channel planes: only the max channel's difference is ever used)."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    maxc = x.amax(dim=1, keepdim=True)                                     # [N, 1, H, W]
    chroma = maxc - x.amin(dim=1, keepdim=True)
    safe = torch.where(chroma > 0, chroma, 1.0)
    diff = torch.where(r == maxc, g - b, torch.where(g == maxc, torch.add(b - r, chroma, alpha=2.0),
                                                     torch.add(r - g, chroma, alpha=4.0)))
    hue6 = diff / safe                                                     # the first max, as torchvision
    hue6 = hue6 + 6.0 * per_sample(factor, x)                              # rotated hue (x 6), [N, 1, H, W]
    k = torch.remainder(hue6 + channel_constant((5.0, 3.0, 1.0), x), 6.0)   # [N, 3, H, W]
    return maxc - chroma * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)


def jitter_params(n, brightness, contrast, saturation, hue, rng: BatchRandom = None):
    """ColorJitter.get_params per sample: (order [n, 4], factors [4, n])."""
    rng = rng or BatchRandom.local("cpu")
    order = rng.rand(n, 4).argsort(dim=1)
    factors = torch.stack([rng.uniform(n, max(0.0, 1 - brightness), 1 + brightness),
                           rng.uniform(n, max(0.0, 1 - contrast), 1 + contrast),
                           rng.uniform(n, max(0.0, 1 - saturation), 1 + saturation),
                           rng.uniform(n, -hue, hue)])
    return order, factors


BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # op ids in jitter_params' order and factors


def color_jitter(x, order, factors, active=None):
    """TF.adjust_{brightness,contrast,saturation,hue} in each sample's own order (order[i, k]: the op applied
    k-th to sample i), only where active [N] (default: everywhere).

    Each sample's ops split around its hue rotation: the linear ops before it (positions 0-2), the rotation
    (once, for the whole batch), the linear ops after it (positions 1-3). The three linear ops are one blend
    per position, clamp(f * x + (1 - f) * base) as torchvision computes it, whose base is 0 (brightness), the
    grey mean (contrast) or the grey image (saturation): base * (1 - f) = mean * w_mean + grey * w_grey with
    per-sample weights (linear_blend). A sample with no op at a position has f = 1 and zero weights: it stays
    exactly as it is. Every per-sample coefficient is made up front ([N, 6]), so each blend is a handful of
    kernels."""
    hue_at = (order == HUE).long().argmax(dim=1, keepdim=True)                       # [N, 1]
    pos = torch.arange(4, device=order.device)
    slots = torch.cat([order[:, :3].masked_fill(pos[:3] >= hue_at, -1),              # before the rotation
                       order[:, 1:].masked_fill(pos[1:] <= hue_at, -1)], dim=1)      # after it; [N, 6]
    if active is not None:
        slots = slots.masked_fill(~active[:, None], -1)
    dt = x.dtype
    f = torch.ones_like(slots, dtype=dt)
    for op_id in (BRIGHTNESS, CONTRAST, SATURATION):
        f = torch.where(slots == op_id, factors[op_id].to(dt)[:, None], f)
    rest = 1.0 - f
    w_mean = torch.where(slots == CONTRAST, rest, 0.0)
    w_grey = torch.where(slots == SATURATION, rest, 0.0)

    for j in range(3):
        x = linear_blend(x, f[:, j], w_mean[:, j], w_grey[:, j])
    rotated = adjust_hue(x, factors[HUE])
    x = rotated if active is None else torch.where(per_sample(active, x).bool(), rotated, x)
    for j in range(3, 6):
        x = linear_blend(x, f[:, j], w_mean[:, j], w_grey[:, j])
    return x


def grayscale(x):
    return gray(x).expand_as(x)


def gaussian_kernels(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """[N, size] normalised 1-D Gaussians, one per sigma, as torchvision builds them."""
    half = (size - 1) * 0.5
    xs = torch.linspace(-half, half, size, device=sigma.device, dtype=sigma.dtype)
    k = torch.exp(-0.5 * (xs[None] / sigma[:, None]) ** 2)
    return k / k.sum(dim=1, keepdim=True)


def gaussian_blur(x, sigma: torch.Tensor, size: int):
    """Per-sample separable Gaussian blur with reflect padding: one grouped conv per direction."""
    N, C, H, W = x.shape
    k = gaussian_kernels(sigma.to(x.dtype), size).repeat_interleave(C, dim=0)          # [N * C, size]
    pad = size // 2
    y = F.pad(x.reshape(1, N * C, H, W), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=N * C)                                  # along W
    y = F.conv2d(y, k[:, None, :, None], groups=N * C)                                  # along H
    return y.view(N, C, H, W)


def solarize(x, threshold: float):
    return torch.where(x >= threshold, 1.0 - x, x)


def normalize(x, mean, std):
    return (x - channel_constant(mean, x)) / channel_constant(std, x)


def apply_where(mask, fn, x):
    """fn(x) where mask [N] holds, x elsewhere (computed on the whole batch: no host sync, no gather)."""
    return torch.where(per_sample(mask, x).bool(), fn(x), x)


# ------------------------------------------------------------------ view pipelines
def to_float(images):
    """uint8 [N, C, H, W] (or [N, H, W] grey) -> float [N, 3, H, W] in [0, 1]. A list (images of different
    sizes, decoded to RGB) is passed through: the views crop it image by image."""
    if isinstance(images, (list, tuple)):
        return images
    if images.dim() == 3:
        images = images[:, None]
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def compile_pixels(fn):
    """torch.compile an augmentation's pixel work for fixed shapes (room for the few a run sees)."""
    import torch._dynamo
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
    return torch.compile(fn, dynamic=False)


def device_of(images) -> torch.device:
    return images[0].device if isinstance(images, (list, tuple)) else images.device


class DeviceView:
    """One random view per image: crop (scale, ratio) + flip, RandAugment (optional: an
    augment.randaugment.DeviceRandAugment), colour jitter with p, grayscale with p, blur with p (sigma
    range), normalise. view(x, rng) -> (views [N, 3, S, S], boxes [N, 4], flips [N]).

    Two halves: `params` draws every random number from rng (a handful of small kernels), `apply` does
    the pixel work (what `compile()` hands to torch.compile)."""

    def __init__(self, size, mean, std, scale=(0.15, 1.0), ratio=(3 / 4, 4 / 3), flip_p=0.5,
                 jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, gray_p=0.2, blur_p=0.0, blur_sigma=(0.1, 2.0),
                 randaug=None):
        self.size, self.mean, self.std, self.randaug = size, mean, std, randaug
        self.scale, self.ratio, self.flip_p = scale, ratio, flip_p
        self.jitter, self.jitter_p, self.gray_p = jitter, jitter_p, gray_p
        self.blur_p, self.blur_sigma = blur_p, blur_sigma

    def params(self, n: int, height: int, width: int, rng: BatchRandom) -> dict:
        p = {"boxes": crop_boxes(n, height, width, self.scale, self.ratio, rng), "flips": rng.rand(n) < self.flip_p}
        if self.randaug is not None:
            p.update(self.randaug.params(n, self.size, self.size, rng))
        if self.jitter_p > 0:
            p["jitter"] = rng.rand(n) < self.jitter_p
            p["order"], p["factors"] = jitter_params(n, *self.jitter, rng)
        if self.gray_p > 0:
            p["gray"] = rng.rand(n) < self.gray_p
        if self.blur_p > 0:
            p["sigma"] = rng.uniform(n, *self.blur_sigma)
            p["blur"] = rng.rand(n) < self.blur_p
        return p

    def apply(self, x, p: dict):
        """x: float [N, 3, H, W], or a list of uint8 [3, h_i, w_i] (cropped image by image, outside the
        compiled part). For a list, parameters drawn on the CPU (a CPU rng) give the crop loop its boxes
        without a host sync; they move to the images' device after it."""
        if isinstance(x, (list, tuple)):
            v = crop_resize_list(x, p["boxes"], self.size)
            p = {k: t.to(v.device, non_blocking=True) if torch.is_tensor(t) else t for k, t in p.items()}
            return self._finish(torch.where(per_sample(p["flips"], v).bool(), v.flip(-1), v), p)
        return self._apply_batch(x, p)

    def _apply_batch(self, x: torch.Tensor, p: dict):
        return self._finish(resized_crop_flip(x, p["boxes"], self.size, p["flips"]), p)

    def _finish(self, v: torch.Tensor, p: dict):
        """Everything after the crop and flip."""
        if self.randaug is not None:
            v = self.randaug.apply(v, p)
        if self.jitter_p > 0:
            v = color_jitter(v, p["order"], p["factors"], p["jitter"])
        if self.gray_p > 0:
            v = apply_where(p["gray"], grayscale, v)
        if self.blur_p > 0:
            size = 2 * math.ceil(3 * self.blur_sigma[1]) + 1                             # covers 3 sigma
            size = min(size, 2 * ((self.size - 1) // 2) + 1)                            # reflect pad < side
            v = apply_where(p["blur"], lambda y: gaussian_blur(y, p["sigma"], size), v)
        return normalize(v, self.mean, self.std), p["boxes"], p["flips"]

    def __call__(self, x, rng: BatchRandom = None):
        device = device_of(x)
        if isinstance(x, (list, tuple)):                     # images of different sizes (their sizes: host data)
            H = torch.tensor([img.shape[-2] for img in x])
            W = torch.tensor([img.shape[-1] for img in x])
            N = len(x)
        else:
            N, _, H, W = x.shape
        return self.apply(x, self.params(N, H, W, rng or BatchRandom.local(device)))

    def compile(self) -> "DeviceView":
        """torch.compile the pixel work: its ~100 small element-wise kernels fused into a few."""
        self._apply_batch = compile_pixels(self._apply_batch)
        self._finish = compile_pixels(self._finish)
        return self


class _OneView:
    """A pipeline built on one DeviceView."""

    def __init__(self, view: DeviceView):
        self.view = view

    def compile(self):
        self.view.compile()
        return self


class DeviceAPSViews(_OneView):
    """SPEC A1 on the device: uint8 images -> the TwoViews dict (view1/2, box1/2, flip1/2)."""

    def __call__(self, images, rng: BatchRandom = None):
        x = to_float(images)
        rng = rng or BatchRandom.local(device_of(x))
        v1, b1, f1 = self.view(x, rng)
        v2, b2, f2 = self.view(x, rng)
        return {"view1": v1, "box1": b1, "flip1": f1, "view2": v2, "box2": b2, "flip2": f2}


class DeviceMoCoViews:
    """SPEC C1/C2 on the device: {"query", "keys" [N, V, ...], "query_mix"?, "mini_queries" [N, M, ...]?},
    the same groups as augment.moco.MoCoViews. query and key: the two sides' views (the same one unless
    AsymAug); query_mix is a second query view (ScaleMix)."""

    def __init__(self, query: DeviceView, key: DeviceView = None, num_key_views=1, mini: DeviceView = None,
                 num_minis=0, scalemix=False):
        self.query, self.key = query, key or query
        self.num_key_views, self.mini, self.num_minis, self.scalemix = num_key_views, mini, num_minis, scalemix

    def compile(self):
        for view in {id(v): v for v in (self.query, self.key, self.mini) if v is not None}.values():
            view.compile()
        return self

    def __call__(self, images, rng: BatchRandom = None):
        x = to_float(images)
        rng = rng or BatchRandom.local(device_of(x))
        out = {"query": self.query(x, rng)[0],
               "keys": torch.stack([self.key(x, rng)[0] for _ in range(self.num_key_views)], dim=1)}
        if self.scalemix:
            out["query_mix"] = self.query(x, rng)[0]
        if self.num_minis:
            out["mini_queries"] = torch.stack([self.mini(x, rng)[0] for _ in range(self.num_minis)], dim=1)
        return out


def aps_device_views(preset, img_size: int, **kwargs) -> DeviceAPSViews:
    """The device twin of augment.transforms.aps_view_transform + TwoViews (same keyword arguments)."""
    return DeviceAPSViews(DeviceView(img_size, preset.mean, preset.std, **kwargs))


class DeviceSingleView(_OneView):
    """One view per image, without its box and flip: lincls's RandomResizedCrop(0.08-1) + flip, normalised."""

    def __call__(self, images, rng: BatchRandom = None):
        return self.view(to_float(images), rng)[0]


def lincls_device_view(preset, img_size: int) -> DeviceSingleView:
    """The device twin of augment.transforms.lincls_transforms' training half."""
    return DeviceSingleView(DeviceView(img_size, preset.mean, preset.std, scale=(0.08, 1.0), jitter_p=0.0,
                                       gray_p=0.0))


def moco_device_views(preset, size: int, blur_prob=0.5, num_key_views=1, num_minis=0, mini_size=96,
                      mini_scale=(0.05, 0.14), asym_aug=False, scalemix=False) -> DeviceMoCoViews:
    """The device twin of augment.moco.moco_views (same scales: MultiCrop moves the large crops to (max mini
    scale, 1)). AsymAug: the query adds RandAugment rand-m10-n2-mstd0.5 after the flip, the key is crop
    (0.08-1) + flip only. The blur is a true Gaussian (the PIL path uses PIL's box approximation)."""
    from augment.randaugment import DeviceRandAugment, mean_fill
    scale = (mini_scale[1], 1.0) if num_minis else (0.2, 1.0)
    common = dict(mean=preset.mean, std=preset.std, ratio=(3 / 4, 4 / 3), flip_p=0.5, jitter=(0.4, 0.4, 0.4, 0.1),
                  jitter_p=0.8, gray_p=0.2, blur_p=blur_prob)
    large = DeviceView(size, scale=scale, **common)
    query, key = large, large
    if asym_aug:
        randaug = DeviceRandAugment("rand-m10-n2-mstd0.5", mean_fill(preset.mean))
        query = DeviceView(size, scale=scale, randaug=randaug, **common)
        key = DeviceView(size, preset.mean, preset.std, scale=(0.08, 1.0), jitter_p=0.0, gray_p=0.0)
    mini = DeviceView(mini_size, scale=tuple(mini_scale), **common) if num_minis else None
    return DeviceMoCoViews(query, key, num_key_views, mini, num_minis, scalemix)
