"""timm's RandAugment (`rand-m{M}-n{N}-mstd{S}[-inc1]`), batched on the training device.

Per sample and layer, as timm draws them: an op out of the 15 (with replacement), applied with probability
p (0.5), magnitude ~ N(M, S) clipped to [0, 10], a random sign for the signed ops. Images are worked on as
float [N, C, H, W] holding 0..255 integers, each op rounding as its uint8 original does, so the output
matches the PIL pipeline (the ops are in augment/ops.py; tests/test_randaugment.py compares every op with
torchvision's functional op or timm's PIL op, sample by sample). The two differences: geometric ops always
resample bilinearly (timm picks bilinear or bicubic at random), and posterize keeps at least 1 bit (as our PIL
path does).

`params(n, height, width, rng)` draws every random number (no host syncs); `apply(x, params)` does the
pixel work with no data-dependent control flow, so it compiles.
"""
import torch

from augment.ops import (ENHANCE, GEOMETRIC, OP, OPS, affine_matrices, auto_contrast, blend255, equalize, gray255,
                         posterize, smoothed, solarize255, solarize_add, warp)
from utils.rng import BatchRandom

MAX_LEVEL = 10.0
TRANSLATE_PCT = 0.45  # timm's translate_pct: TranslateXRel/YRel move by up to this fraction of the side


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


class DeviceRandAugment:
    """RandAugment on float [N, C, H, W] images in [0, 1] (returned in [0, 1], on the 1/255 grid).

    fill: the geometric ops' fill colour, 0..255 per channel (timm's img_mean)."""

    def __init__(self, config: str, fill=(128, 128, 128), translate_pct=TRANSLATE_PCT):
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
        y = solarize255(y, torch.where(is_op("Solarize"), arg, torch.where(is_op("Invert"), 0.0, 256.0)))
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
