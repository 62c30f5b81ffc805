"""The pure tensor ops of the batched (on-device) augmentation: each takes a batch and per-sample parameters.

Images are float [N, C, H, W]: in [0, 1] for the view ops, holding 0..255 integers for RandAugment's ops (the
`*255` names and the op table OPS). The parameter draws (crop_boxes, jitter_params, erase_boxes) take a
utils.rng.BatchRandom. Each op matches torchvision's functional op (or timm's PIL op) applied per sample with the
same parameters (tests/test_device_augment.py, tests/test_randaugment.py):

    resized_crop_flip  ~ TF.resized_crop(bilinear, antialias=False) + TF.hflip
                         (= antialias=True whenever the crop is upscaled, as every 32 px crop is)
    color_jitter       ~ TF.adjust_{brightness,contrast,saturation,hue} in a per-sample random order
    grayscale          ~ TF.rgb_to_grayscale(num_output_channels=3)
    gaussian_blur      ~ TF.gaussian_blur(kernel, sigma) (reflect padding)
    solarize           ~ TF.solarize
    random_erasing     ~ timm's RandomErasing (area 0.02-1/3, log-uniform aspect 0.3-1/0.3, ten tries, one box;
                         'pixel': normal noise per pixel, 'rand': per channel, 'const': zeros) = TF.erase
    RandAugment's 15 ops on 0..255: the colour and histogram ops equal torchvision's uint8 ops exactly, the
                         geometric ones resample bilinearly (PIL's within one level inside the image)

Nothing here imports anything above utils/.
"""
import functools
import math

import torch
import torch.nn.functional as F

from utils.rng import BatchRandom
from utils.transfer import constant, to_device

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
    H = to_device(torch.as_tensor(height, dtype=torch.float32), device).reshape(-1).expand(n)      # [n]
    W = to_device(torch.as_tensor(width, dtype=torch.float32), device).reshape(-1).expand(n)
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
    return constant(values, device, dtype)


def channel_constant(values, like: torch.Tensor) -> torch.Tensor:
    """values as [1, C, 1, 1] on like's device and dtype, made once per device and dtype (no copy per call)."""
    if torch.compiler.is_compiling():             # (the cache is not traceable) fills on the device, no host copy
        return torch.stack([torch.full((), v, dtype=like.dtype, device=like.device) for v in values]).view(1, -1, 1, 1)
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


def to_float(images):
    """uint8 [N, C, H, W] (or [N, H, W] grey) -> float [N, 3, H, W] in [0, 1]. A list (images of different
    sizes, decoded to RGB) is passed through: the views crop it image by image."""
    if isinstance(images, (list, tuple)):
        return images
    if images.dim() == 3:
        images = images[:, None]
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x



# ------------------------------------------------------------------ random erasing
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


# ------------------------------------------------------------------ RandAugment's ops
OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
       "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
OP = {name: i for i, name in enumerate(OPS)}
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
ENHANCE = ("Color", "Contrast", "Brightness", "Sharpness")


def gray255(x):
    """torchvision's rgb_to_grayscale on uint8: the weighted sum, truncated. [N, 1, H, W]."""
    r, g, b = x.unbind(dim=1)
    return torch.floor(0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def blend255(a, b, ratio):
    """torchvision's uint8 _blend: ratio * a + (1 - ratio) * b, clamped, truncated."""
    r = per_sample(ratio, a)
    return torch.floor((r * a + (1.0 - r) * b).clamp(0.0, 255.0))


def auto_contrast(x, active=None):
    """Each channel stretched to 0..255 (unchanged when flat, or where active [N] is False)."""
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    stretch = hi > lo if active is None else (hi > lo) & per_sample(active, hi).bool()
    scale = torch.where(stretch, 255.0 / torch.where(stretch, hi - lo, 1.0), 1.0)
    return torch.floor(((x - torch.where(stretch, lo, 0.0)) * scale).clamp(0.0, 255.0))


def equalize(x, active=None):
    """Per sample and channel histogram equalisation, the PIL/torchvision way (lut from the cumulative
    histogram in steps of (pixels - count of the top value) // 255; identity when that step is 0, or where
    active [N] is False)."""
    N, C, H, W = x.shape
    v = x.reshape(N * C, H * W).long()
    hist = torch.zeros(N * C, 256, device=x.device, dtype=x.dtype).scatter_add_(1, v, torch.ones_like(x).view(N * C, -1))
    top = hist.gather(1, v.amax(dim=1, keepdim=True))                         # count of the brightest value
    step = torch.floor((H * W - top) / 255.0)                                 # [N*C, 1]
    safe = torch.where(step > 0, step, torch.ones_like(step))
    lut = torch.floor((hist.cumsum(dim=1) + torch.floor(step / 2)) / safe)
    lut = F.pad(lut, (1, 0))[:, :-1].clamp(0.0, 255.0)
    keep = step > 0 if active is None else (step > 0) & active.view(N, 1).expand(N, C).reshape(N * C, 1)
    lut = torch.where(keep, lut, torch.arange(256, device=x.device, dtype=x.dtype))
    return lut.gather(1, v).view(N, C, H, W)


def posterize(x, bits):
    shift = torch.exp2(8.0 - per_sample(bits, x))
    return torch.floor(x / shift) * shift


def solarize255(x, threshold):
    return torch.where(x >= per_sample(threshold, x), 255.0 - x, x)


def solarize_add(x, add, threshold=128.0):
    return torch.where(x < threshold, (x + per_sample(add, x)).clamp(max=255.0), x)


def color(x, factor):
    return blend255(x, gray255(x), factor)


def contrast(x, factor):
    mean = gray255(x).mean(dim=(1, 2, 3), keepdim=True)
    return blend255(x, mean, factor)


def brightness(x, factor):
    return blend255(x, torch.zeros_like(x), factor)


def smoothed(x):
    """PIL's SMOOTH filter (3x3, centre weight 5 of 13, rounded) inside; the border pixels stay."""
    C = x.shape[1]
    k = torch.ones(3, 3, device=x.device, dtype=x.dtype)
    k[1, 1] = 5.0
    k = (k / k.sum()).expand(C, 1, 3, 3)
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = torch.round(F.conv2d(x, k, groups=C))
    return out


def sharpness(x, factor):
    return blend255(x, smoothed(x), factor)


def affine_matrices(op, arg, height, width):
    """[N, 2, 3] maps from output to input pixel coordinates (pixel centres at +0.5), as PIL's transforms:
    rotation about the centre (counter-clockwise degrees), shear and translation about the origin."""
    n = op.shape[0]
    m = torch.zeros(n, 2, 3, device=arg.device, dtype=arg.dtype)
    m[:, 0, 0] = 1.0
    m[:, 1, 1] = 1.0
    a = -arg * math.pi / 180.0
    cos, sin = torch.cos(a), torch.sin(a)
    cx, cy = width / 2.0, height / 2.0
    rot = torch.stack([torch.stack([cos, sin, cx - cos * cx - sin * cy], 1),
                       torch.stack([-sin, cos, cy + sin * cx - cos * cy], 1)], 1)
    m = torch.where(per_sample(op == OP["Rotate"], m).bool(), rot, m)
    m[:, 0, 1] = torch.where(op == OP["ShearX"], arg, m[:, 0, 1])
    m[:, 1, 0] = torch.where(op == OP["ShearY"], arg, m[:, 1, 0])
    m[:, 0, 2] = torch.where(op == OP["TranslateXRel"], arg * width, m[:, 0, 2])
    m[:, 1, 2] = torch.where(op == OP["TranslateYRel"], arg * height, m[:, 1, 2])
    return m


def warp(x, matrices, fill):
    """Bilinear resampling at matrices @ (x + 0.5, y + 0.5, 1); outside the image counts as `fill` [C]."""
    N, C, H, W = x.shape
    ys, xs = torch.meshgrid(torch.arange(H, device=x.device, dtype=x.dtype) + 0.5,
                            torch.arange(W, device=x.device, dtype=x.dtype) + 0.5, indexing="ij")
    pts = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1).view(1, H * W, 3)
    src = pts @ matrices.transpose(1, 2)                                        # [N, H*W, 2] (x, y)
    grid = torch.stack([2 * src[..., 0] / W - 1, 2 * src[..., 1] / H - 1], dim=-1).view(N, H, W, 2)
    ones = torch.ones(N, 1, H, W, device=x.device, dtype=x.dtype)
    out = F.grid_sample(torch.cat([x, ones], dim=1), grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    cover = out[:, -1:]
    fill = channel_constant(tuple(fill), x)
    return torch.round(out[:, :-1] + (1.0 - cover) * fill).clamp(0.0, 255.0)


def mean_fill(mean) -> list:
    """timm's img_mean: the normalisation mean on the 0..255 scale, one value per RGB channel."""
    return [round(255 * m) for m in mean] * (3 if len(mean) == 1 else 1)
