"""timm's RandAugment (`rand-m{M}-n{N}-mstd{S}[-inc1]`), batched on the training device.

Per sample and layer, as timm draws them: an op out of the 15 (with replacement), applied with probability
p (0.5), magnitude ~ N(M, S) clipped to [0, 10], a random sign for the signed ops. Images are worked on as
float [N, C, H, W] holding 0..255 integers, each op rounding as its uint8 original does, so the output
matches the PIL pipeline (tests/test_randaugment.py compares every op with torchvision's functional op or
timm's PIL op, sample by sample). The two differences: geometric ops always resample bilinearly (timm picks
bilinear or bicubic at random), and posterize keeps at least 1 bit (as our PIL path does).

`params(n, height, width, rng)` draws every random number (no host syncs); `apply(x, params)` does the
pixel work with no data-dependent control flow, so it compiles.
"""
import math

import torch
import torch.nn.functional as F

from augment.device import per_sample
from utils.rng import BatchRandom

OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
       "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
OP = {name: i for i, name in enumerate(OPS)}
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
ENHANCE = ("Color", "Contrast", "Brightness", "Sharpness")
MAX_LEVEL = 10.0
TRANSLATE_PCT = 0.45


def parse_policy(config: str) -> dict:
    """'rand-m9-mstd0.5-inc1' -> dict(magnitude=9, num_layers=2, magnitude_std=0.5, increasing=True, prob=0.5)."""
    parts = config.split("-")
    if parts[0] != "rand":
        raise ValueError("a RandAugment policy starts with 'rand-'")
    policy = dict(magnitude=10.0, num_layers=2, magnitude_std=0.0, increasing=False, prob=0.5)
    keys = (("mstd", "magnitude_std", float), ("inc", "increasing", lambda v: bool(int(v))),
            ("m", "magnitude", float), ("n", "num_layers", int), ("p", "prob", float))
    for part in parts[1:]:
        key = next((k for k in keys if part.startswith(k[0])), None)
        try:
            policy[key[1]] = key[2](part[len(key[0]):])
        except (TypeError, ValueError):
            raise ValueError(f"cannot read {part!r} (known parts: m<magnitude>, n<layers>, mstd<std>, inc<0|1>, "
                             "p<prob>)") from None
    return policy


# ------------------------------------------------------------------ ops on 0..255 floats (per-sample args [N])
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


def solarize(x, threshold):
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
    fill = torch.as_tensor(fill, device=x.device, dtype=x.dtype).view(1, C, 1, 1)
    return torch.round(out[:, :-1] + (1.0 - cover) * fill).clamp(0.0, 255.0)


def mean_fill(mean) -> list:
    """timm's img_mean: the normalisation mean on the 0..255 scale, one value per RGB channel."""
    return [round(255 * m) for m in mean] * (3 if len(mean) == 1 else 1)


# ------------------------------------------------------------------ the policy
class DeviceRandAugment:
    """RandAugment on float [N, C, H, W] images in [0, 1] (returned in [0, 1], on the 1/255 grid).

    fill: the geometric ops' fill colour, 0..255 per channel (timm's img_mean)."""

    def __init__(self, config: str = "rand-m9-mstd0.5-inc1", fill=(128, 128, 128), translate_pct=TRANSLATE_PCT):
        self.policy = parse_policy(config)
        self.fill = tuple(float(f) for f in fill)
        self.translate_pct = translate_pct

    def level_args(self, op, level, negate):
        """Each sample's op argument from its level in [0, 10] and sign draw (timm's *_level_to_arg)."""
        inc = self.policy["increasing"]
        frac = level / MAX_LEVEL
        signed = lambda v: torch.where(negate, -v, v)  # noqa: E731
        enhance = (1.0 + signed(frac * 0.9)).clamp(min=0.1) if inc else frac * 1.8 + 0.1
        bits = torch.floor(frac * 4)
        bits = (4 - bits) if inc else bits
        threshold = torch.floor(frac * 256).clamp(max=256)
        threshold = (256 - threshold) if inc else threshold
        shear, translate = signed(frac * 0.3), signed(frac * self.translate_pct)
        by_op = {"Rotate": signed(frac * 30.0), "ShearX": shear, "ShearY": shear, "TranslateXRel": translate,
                 "TranslateYRel": translate, "Posterize": bits.clamp(min=1), "Solarize": threshold,
                 "SolarizeAdd": torch.floor(frac * 110).clamp(max=128), **{name: enhance for name in ENHANCE}}
        zero = torch.zeros_like(level)                                    # AutoContrast, Equalize, Invert
        table = torch.stack([by_op.get(name, zero) for name in OPS], dim=1)               # [n, 15]
        return table.gather(1, op.clamp(min=0)[:, None])[:, 0]

    def params(self, n: int, height: int, width: int, rng: BatchRandom) -> dict:
        """Per layer: op [n] (-1: not applied) and its argument [n]. Draws 4 numbers per sample and layer."""
        p = self.policy
        ops, args = [], []
        for _ in range(p["num_layers"]):
            op = torch.floor(rng.rand(n) * len(OPS)).long().clamp(max=len(OPS) - 1)
            applied = rng.rand(n) < p["prob"]
            level = torch.full((n,), p["magnitude"], device=rng.device)
            if p["magnitude_std"] > 0:
                level = level + p["magnitude_std"] * rng.normal(n)
            level = level.clamp(0.0, MAX_LEVEL)
            negate = rng.rand(n) > 0.5
            ops.append(torch.where(applied, op, torch.full_like(op, -1)))
            args.append(self.level_args(op, level, negate))
        return {"ra_ops": torch.stack(ops), "ra_args": torch.stack(args)}

    def apply(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        y = torch.round(x * 255.0)
        for op, arg in zip(params["ra_ops"], params["ra_args"]):
            y = self.layer(y, op, arg.to(y.dtype))
        return y / 255.0

    def layer(self, y: torch.Tensor, op: torch.Tensor, arg: torch.Tensor) -> torch.Tensor:
        """One layer: every sample gets its own op. A sample holds at most one op, so the families below
        commute; the pointwise and enhance families run on the whole batch in one pass each, with neutral
        arguments (exact identities on 0..255 integers) for the samples whose op is elsewhere."""
        H, W = y.shape[-2:]
        hot = op.unsqueeze(0) == torch.arange(len(OPS), device=op.device).unsqueeze(1)   # [15, N]

        def is_op(*names):                                                 # [N] bool
            return hot[OP[names[0]]] if len(names) == 1 else torch.stack([hot[OP[n]] for n in names]).any(0)

        rows = lambda mask: mask.view(-1, 1, 1, 1)  # noqa: E731
        warped = warp(y, affine_matrices(op, arg, H, W), self.fill)
        y = torch.where(rows(is_op(*GEOMETRIC)), warped, y)
        y = auto_contrast(y, is_op("AutoContrast"))
        y = equalize(y, is_op("Equalize"))
        # Invert = Solarize at 0; Posterize keeps 8 bits, Solarize starts at 256, SolarizeAdd adds 0 elsewhere
        y = posterize(y, torch.where(is_op("Posterize"), arg, 8.0))
        y = solarize(y, torch.where(is_op("Solarize"), arg, torch.where(is_op("Invert"), 0.0, 256.0)))
        y = solarize_add(y, torch.where(is_op("SolarizeAdd"), arg, 0.0))
        # Color / Contrast / Brightness / Sharpness: one blend with the sample's degenerate image (ratio 1 elsewhere)
        gray = gray255(y)
        degenerate = torch.where(rows(is_op("Color")), gray,
                                 torch.where(rows(is_op("Contrast")), gray.mean(dim=(1, 2, 3), keepdim=True),
                                             torch.where(rows(is_op("Sharpness")), smoothed(y), 0.0)))
        return blend255(y, degenerate, torch.where(is_op(*ENHANCE), arg, 1.0))

    def __call__(self, x: torch.Tensor, rng: BatchRandom = None) -> torch.Tensor:
        N, _, H, W = x.shape
        return self.apply(x, self.params(N, H, W, rng or BatchRandom.local(x.device)))
