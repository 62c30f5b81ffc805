"""Every augmentation recipe of the two papers, described once, as data.

A `View` says how one view of an image is made: the crop (kind, area scale, aspect ratio, padding), the flip,
the colour jitter and its probability, grayscale, blur, solarize, the RandAugment policy, random erasing and
the normalisation. A recipe is a View (one view per image), a `Pair` (APS: two independent views that report
their crop boxes and flips) or `MoCoViews` (query, key views and mini crops, with the Asym-Siam switches).

Two realisations read the same description: augment/pil.py (PIL transforms in loader workers, the reference's
way) and augment/batched.py (batches on the training device). Each realisation class registers itself for the
recipe type it realises (`@realises(Pair, "pil")`), and `realise(recipe, "pil")` finds it: a new recipe type is a
dataclass here and one class in each realisation, with no dispatch table to edit. The paper's values live in the named views
below and in the recipe functions; the command-line flags of a recipe take their defaults from here too, so a
recipe change is a one-line edit.
"""
from dataclasses import dataclass, replace
from typing import Optional

from augment.ops import ERASE_MODES
from augment.randaugment import parse_policy
from utils.errors import UserError
from utils.flags import count, fraction, nonnegative, positive, probability, text

CROPS = ("resized", "padded", "resize", "center")
_REALISERS = {}                 # (recipe type, realisation) -> the class that makes its views
INTERPOLATIONS = ("bilinear", "bicubic")
RESIZE_FRACTION = 0.875  # 'center': the short side is resized to size / 0.875, then the centre is cropped


@dataclass(frozen=True)
class View:
    """How one view of an image is made. The defaults are a plain crop + flip with every other op off.

    crop: 'resized' (RandomResizedCrop with scale and ratio), 'padded' (resize to size, then RandomCrop(size,
    padding)), 'resize' (to size x size) or 'center' (short side to size / 0.875, centre crop). The last two
    are deterministic (evaluation). boxed: also report the crop box (top, left, h, w) in source pixels and
    the flip (the APS sampler needs them; 'resized' crops only). flip_late: the PIL realisation flips after
    the colour ops and blur, the order of MoCo v2's torchvision pipeline (the pixels are the same either way,
    the random numbers are drawn in another order; the batched realisation always flips with the crop).
    """
    size: int = 32
    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.5, 0.5, 0.5)
    crop: str = "resized"
    scale: tuple = (0.08, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    padding: int = 0
    interpolation: str = "bilinear"
    flip_p: float = 0.5
    jitter: tuple = (0.0, 0.0, 0.0, 0.0)      # ColorJitter brightness, contrast, saturation, hue
    jitter_p: float = 0.0
    gray_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple = (0.1, 2.0)
    solarize_p: float = 0.0
    randaugment: str = ""                       # a timm policy string; '' (or 'none'): no RandAugment
    erase_p: float = 0.0
    erase_mode: str = "pixel"
    boxed: bool = False
    flip_late: bool = False

    def __post_init__(self):
        if self.crop not in CROPS:
            raise ValueError(f"crop {self.crop!r} is not one of {', '.join(CROPS)}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {self.interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
        if self.erase_mode not in ERASE_MODES:
            raise ValueError(f"random erasing mode {self.erase_mode!r} is not one of {', '.join(ERASE_MODES)}")
        if self.randaugment == "none":
            object.__setattr__(self, "randaugment", "")
        if self.randaugment:
            parse_policy(self.randaugment)                                  # ValueError names the bad part
        if self.boxed and (self.crop != "resized" or self.flip_late):
            raise ValueError("only a 'resized' crop that flips with the crop reports its box")
        if self.crop in ("resize", "center") and self.flip_p > 0:
            raise ValueError(f"a '{self.crop}' view is deterministic: set flip_p=0")


@dataclass(frozen=True)
class Pair:
    """Two independent views of each image by the same View: {"view1", "view2"}; with a boxed View (what the APS
    sampler asks for, docs/REFERENCE.md#aps-views) each also with its crop box and flip (box1/2, flip1/2)."""
    view: View


@dataclass(frozen=True)
class MoCoViews:
    """MoCo's named groups (docs/REFERENCE.md#moco-switches): a query view, num_key_views key views (MeanEnc when
    > 1), num_minis mini query crops (MultiCrop) and, with scalemix, a second query view to paste a box of (ScaleMix).
    """
    query: View
    key: View
    num_key_views: int = 1
    mini: Optional[View] = None
    num_minis: int = 0
    scalemix: bool = False


def realises(recipe_type: type, how: str):
    """Class decorator: the class realises recipes of `recipe_type` the `how` way ('pil', 'batched')."""
    def register(cls):
        _REALISERS[(recipe_type, how)] = cls
        return cls
    return register


def realise(recipe, how: str):
    """The `how` realisation of `recipe` (its module must have been imported: augment.pil, augment.batched)."""
    cls = _REALISERS.get((type(recipe), how))
    if cls is None:
        raise TypeError(f"no {how} realisation of a {type(recipe).__name__} recipe")
    return cls(recipe)


# ------------------------------------------------------------------ the papers' recipes
# the papers' recipes as docs/REFERENCE.md states them (#aps-views, #moco-baseline, #moco-switches, #fine-tuning,
# #linear-probe)
COLOR_JITTER = (0.4, 0.4, 0.4, 0.1)                  # APS and MoCo v2

# APS: crop 0.15-1 + flip (both reported), jitter p 0.8, grayscale p 0.2, normalise; no blur, no solarize
APS_VIEW = View(scale=(0.15, 1.0), jitter=COLOR_JITTER, jitter_p=0.8, gray_p=0.2, boxed=True)
# MoCo v2: crop 0.2-1, jitter p 0.8, grayscale p 0.2, blur sigma 0.1-2 p 0.5, flip, normalise
MOCO_V2_VIEW = View(scale=(0.2, 1.0), jitter=COLOR_JITTER, jitter_p=0.8, gray_p=0.2, blur_p=0.5, flip_late=True)
ASYM_QUERY_POLICY = "rand-m10-n2-mstd0.5"            # AsymAug: the stronger query adds it after the flip
WEAK_KEY_VIEW = View()                               # AsymAug: the weaker key, crop 0.08-1 + flip only
MINI_CROPS, MINI_CROP_SCALE, MINI_SIZE_AT_224 = 6, (0.05, 0.14), 96   # MultiCrop
# fine-tuning (32 px sets): RandomCrop(size, padding 4), flip, RandAugment, normalise, random erasing p 0.25 (pixel)
FINETUNE_VIEW = View(crop="padded", padding=4, randaugment="rand-m9-mstd0.5-inc1", erase_p=0.25)
# fine-tuning (224 px folders): RandomResizedCrop(size) with bicubic resampling in place of the padded crop
FINETUNE_FOLDER_CROP = dict(crop="resized", interpolation="bicubic")
LINCLS_VIEW = View()                                 # linear probe: RandomResizedCrop(size, 0.08-1) + flip


def imagenet_style(preset) -> bool:
    """224 px-style data (image folders) crops and evaluates the ImageNet way."""
    return preset.img_size >= 96


def aps_pair(preset, size: int, **knobs) -> Pair:
    """APS's two views (docs/REFERENCE.md#aps-views) at `size`, normalised with the dataset's statistics; knobs override
    APS_VIEW."""
    return Pair(replace(APS_VIEW, size=size, mean=preset.mean, std=preset.std, **knobs))


def moco_views(preset, size: int, blur_p: float = MOCO_V2_VIEW.blur_p, num_key_views: int = 1, num_minis: int = 0,
               mini_size: int = MINI_SIZE_AT_224, mini_scale=MINI_CROP_SCALE, asym_aug: bool = False,
               scalemix: bool = False) -> MoCoViews:
    """MoCo v2's views with the switches (docs/REFERENCE.md#moco-switches): MultiCrop (num_minis > 0) adds small query
    crops and moves the large crops' scale to (max mini scale, 1) on both sides, as the reference does; MeanEnc
    (num_key_views > 1) adds key views; AsymAug makes the query stronger (RandAugment after the flip) and the key weaker
    (crop + flip)."""
    scale = (mini_scale[1], 1.0) if num_minis else MOCO_V2_VIEW.scale
    large = replace(MOCO_V2_VIEW, size=size, mean=preset.mean, std=preset.std, scale=scale, blur_p=blur_p)
    query, key = large, large
    if asym_aug:
        query = replace(large, randaugment=ASYM_QUERY_POLICY)
        key = replace(WEAK_KEY_VIEW, size=size, mean=preset.mean, std=preset.std)
    mini = replace(large, size=mini_size, scale=tuple(mini_scale)) if num_minis else None
    return MoCoViews(query, key, num_key_views, mini, num_minis, scalemix)


def finetune_view(preset, size: int, **knobs) -> View:
    """Fine-tuning's training view (docs/REFERENCE.md#fine-tuning-recipe). CIFAR and folders are normalised with
    ImageNet statistics as the reference does (preset.finetune_stats); the small grey datasets keep their own."""
    mean, std = preset.finetune_stats
    base = replace(FINETUNE_VIEW, **FINETUNE_FOLDER_CROP) if imagenet_style(preset) else FINETUNE_VIEW
    return replace(base, size=size, mean=mean, std=std, **knobs)


def lincls_view(preset, size: int) -> View:
    """The linear probe's training view (docs/REFERENCE.md#linear-probe), with the pretraining normalisation."""
    return replace(LINCLS_VIEW, size=size, mean=preset.mean, std=preset.std)


def eval_view(preset, size: int, mean=None, std=None) -> View:
    """The deterministic view of kNN and evaluation: a resize for the small sets; for 224 px-style data the
    short side resized (bicubic) to size / 0.875, then the centre crop. Normalised with (mean, std), by default
    the dataset's statistics."""
    style = dict(crop="center", interpolation="bicubic") if imagenet_style(preset) else dict(crop="resize")
    return View(size=size, mean=mean or preset.mean, std=std or preset.std, flip_p=0.0, **style)


# ------------------------------------------------------------------ the recipes' flags
def add_aps_view_args(parser):
    """The APS view flags (docs/REFERENCE.md#aps-views), defaults from APS_VIEW."""
    v = APS_VIEW
    g = parser.add_argument_group("augmentation (each view)")
    g.add_argument("--crop-scale", type=fraction(high_closed=True), nargs=2, default=v.scale, metavar=("MIN", "MAX"),
                   help="RandomResizedCrop area range")
    g.add_argument("--crop-ratio", type=positive(), nargs=2, default=v.ratio, metavar=("MIN", "MAX"),
                   help="RandomResizedCrop aspect-ratio range")
    g.add_argument("--flip-prob", type=probability(), default=v.flip_p, help="horizontal flip probability")
    g.add_argument("--color-jitter", type=nonnegative(), nargs=4, default=v.jitter, metavar=("B", "C", "S", "H"),
                   help="ColorJitter brightness, contrast, saturation, hue")
    g.add_argument("--color-jitter-prob", type=probability(), default=v.jitter_p,
                   help="probability of applying ColorJitter")
    g.add_argument("--grayscale-prob", type=probability(), default=v.gray_p, help="RandomGrayscale probability")
    return g


def aps_pair_from_args(args, preset) -> Pair:
    return aps_pair(preset, args.img_size, scale=tuple(args.crop_scale), ratio=tuple(args.crop_ratio),
                    flip_p=args.flip_prob, jitter=tuple(args.color_jitter), jitter_p=args.color_jitter_prob,
                    gray_p=args.grayscale_prob)


def add_moco_view_args(parser):
    """MoCo v2's view flags and the view switches of Asym-Siam (MultiCrop, ScaleMix, AsymAug, MeanEnc)."""
    g = parser.add_argument_group("augmentation and asymmetries")
    g.add_argument("--blur-prob", type=probability(), default=MOCO_V2_VIEW.blur_p, help="Gaussian blur probability")
    g.add_argument("--enable-multicrop", action="store_true", help="MultiCrop: small query crops")
    g.add_argument("--num-mini-crops", type=count(), default=MINI_CROPS, help="mini query crops with MultiCrop")
    g.add_argument("--mini-crop-size", type=count(), default=None, help="mini crop size (default 96/224 of the image)")
    g.add_argument("--mini-crop-scale", type=fraction(high_closed=True), nargs=2,
                   default=MINI_CROP_SCALE, metavar=("MIN", "MAX"),
                   help="mini crop area range; the large crops then use (MAX, 1)")
    g.add_argument("--enable-scalemix", action="store_true",
                   help="ScaleMix: the query pastes a box of a second query view into the first")
    g.add_argument("--enable-asymm-aug", action="store_true",
                   help="AsymAug: RandAugment on the query side, crop + flip only on the key side")
    g.add_argument("--enable-mean-encoding", action="store_true", help="MeanEnc: average several key views")
    g.add_argument("--num-key-views", type=count(), default=2, help="key views with MeanEnc")
    return g


def moco_views_from_args(args, preset) -> MoCoViews:
    """The MoCo recipe of the flags; fills in --mini-crop-size (96/224 of the image, at least 8 px)."""
    args.mini_crop_size = args.mini_crop_size or max(8, round(args.img_size * MINI_SIZE_AT_224 / 224))
    return moco_views(preset, args.img_size, args.blur_prob,
                      num_key_views=args.num_key_views if args.enable_mean_encoding else 1,
                      num_minis=args.num_mini_crops if args.enable_multicrop else 0, mini_size=args.mini_crop_size,
                      mini_scale=tuple(args.mini_crop_scale), asym_aug=args.enable_asymm_aug,
                      scalemix=args.enable_scalemix)


def add_finetune_view_args(parser):
    """Fine-tuning's augmentation flags (docs/REFERENCE.md#fine-tuning-recipe), defaults from FINETUNE_VIEW."""
    v = FINETUNE_VIEW
    g = parser.add_argument_group("augmentation and regularisation")
    g.add_argument("--aa", type=text("a RandAugment policy rand-m<M>[-n<N>][-mstd<S>][-inc<0|1>], or none",
                                     check=policy_problem), default=v.randaugment, help="RandAugment policy")
    g.add_argument("--reprob", type=probability(), default=v.erase_p, help="random erasing probability")
    g.add_argument("--remode", default=v.erase_mode, choices=ERASE_MODES, help="random erasing mode")
    return g


def policy_problem(value: str) -> str:
    """'' for 'none' or a policy parse_policy reads, else why not (the --aa flag's domain)."""
    if value == "none":
        return ""
    try:
        parse_policy(value)
    except ValueError as e:
        return f": {e}; use e.g. --aa {FINETUNE_VIEW.randaugment}, or --aa none"
    return ""


def finetune_view_from_args(args, preset) -> View:
    try:
        return finetune_view(preset, args.img_size, randaugment=args.aa, erase_p=args.reprob, erase_mode=args.remode)
    except ValueError as e:
        raise UserError(f"--aa {args.aa}: {e}; use e.g. --aa {FINETUNE_VIEW.randaugment}, or --aa none") from e
