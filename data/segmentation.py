"""Segmentation data for the frozen-feature probe (main_segprobe.py): image/mask pairs in the layouts people have,
an embedded generated default, and the joint image/mask augmentation.

Layouts (--seg-dataset, with --data-root):
  voc       JPEGImages/<id>.jpg, SegmentationClass/<id>.png (palette PNG; index = class, 255 = ignore),
            ImageSets/Segmentation/{train,val}.txt; 21 classes
  ade20k    images/{training,validation}/*.jpg, annotations/{training,validation}/*.png; 0 = "other" (ignored),
            1..150 the classes (read as 0..149); 150 classes
  folder    {train,val}/images/<name>.<ext> and {train,val}/masks/<name>.png matched by file name (a palette or a
            grey index PNG; 255 = ignore); --num-classes says how many
  shapes    embedded and generated, no files: discs, squares and triangles (classes 1-3) on textured
            backgrounds (class 0), exact masks; 512 training and 128 validation images at 64 px, fixed by index

A mask whose size differs from its image, a class index beyond the classes (other than 255), and an image without
its mask are one line naming the file.
"""
import math
import os

import numpy as np
import torch
from PIL import Image

from data.files import IMAGE_EXTENSIONS, read_rgb
from utils.errors import UserError
from utils.miou import IGNORE
from utils.textfile import text_lines

SEG_DATASETS = ("shapes", "voc", "ade20k", "folder")
CLASSES = {"shapes": 4, "voc": 21, "ade20k": 150}
SHAPES_SIZE, SHAPES_SPLITS = 64, {True: 512, False: 128}
SHAPE_NAMES = ("background", "disc", "square", "triangle")
SHAPES_MEAN, SHAPES_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)      # the generated images' normalisation (about theirs)


# ---------------------------------------------------------------- the embedded generated set
def shapes_pair(index: int, train: bool, size: int = SHAPES_SIZE, seed: int = 0):
    """(RGB image, mask) number `index` of the generated set: a texture (two mixed sinusoids and noise, random
    colours) with 1-3 shapes of random class, colour, size and place painted over it, later ones on top."""
    rng = np.random.default_rng([seed, int(train), index])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    freq, phase = rng.uniform(0.05, 0.4, 2), rng.uniform(0, 2 * np.pi, 2)
    wave = np.sin(freq[0] * xx + phase[0]) * np.cos(freq[1] * yy + phase[1])
    base, alt = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    img = base + (alt - base) * (0.5 + 0.5 * wave)[..., None] + rng.normal(0, 12, (size, size, 3))
    mask = np.zeros((size, size), np.uint8)
    for _ in range(rng.integers(1, 4)):
        cls = int(rng.integers(1, 4))
        r = rng.uniform(0.12, 0.3) * size
        cx, cy = rng.uniform(r, size - r, 2)
        if cls == 1:
            inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        elif cls == 2:
            inside = (abs(xx - cx) <= r * 0.8) & (abs(yy - cy) <= r * 0.8)
        else:                                            # an upward triangle: below two edges, above the base
            h = r * math.sqrt(3)
            top, bottom = cy - h / 2, cy + h / 2
            inside = (yy <= bottom) & (abs(xx - cx) <= (yy - top) / math.sqrt(3))
        img[inside] = rng.uniform(0, 255, 3) + rng.normal(0, 6, (int(inside.sum()), 3))
        mask[inside] = cls
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), Image.fromarray(mask)


class Shapes(torch.utils.data.Dataset):
    def __init__(self, train: bool, transform=None):
        self.train, self.transform, self.n = train, transform, SHAPES_SPLITS[train]
        self.names = [f"shapes:{'train' if train else 'val'}:{i}" for i in range(self.n)]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        img, mask = shapes_pair(i, self.train)
        return self.transform(img, mask) if self.transform else (img, mask)


# ---------------------------------------------------------------- files
def _stems(folder: str, extensions) -> dict:
    if not os.path.isdir(folder):
        raise UserError(f"{folder} does not exist; check --data-root and --seg-dataset (docs/SEGMENTATION.md)")
    return {os.path.splitext(f)[0]: os.path.join(folder, f) for f in sorted(os.listdir(folder))
            if f.lower().endswith(extensions)}


def pair_up(images: dict, masks: dict, where: str) -> list:
    """(image, mask) paths of every image, by file stem; an image without its mask is one line."""
    lonely = sorted(set(images) - set(masks))
    if lonely:
        raise UserError(f"{images[lonely[0]]} has no mask in {where} ({len(lonely)} image(s) without one); add the "
                        "masks or remove the images")
    if not images:
        raise UserError(f"no images found for {where}; check --data-root")
    return [(images[s], masks[s]) for s in sorted(images)]


def voc_pairs(root: str, train: bool) -> list:
    split = os.path.join(root, "ImageSets", "Segmentation", "train.txt" if train else "val.txt")
    if not os.path.isfile(split):
        raise UserError(f"{split} does not exist; --seg-dataset voc reads a VOC2012 folder (JPEGImages/, "
                        "SegmentationClass/, ImageSets/Segmentation/)")
    ids = [line.split()[0] for _, line in text_lines(split, "VOC split file", "save it as UTF-8 text, one image id a line")]
    images, masks = _stems(os.path.join(root, "JPEGImages"), (".jpg", ".jpeg")), \
        _stems(os.path.join(root, "SegmentationClass"), (".png",))
    missing = [i for i in ids if i not in images]
    if missing:
        raise UserError(f"{split} names {missing[0]}, which is not in {os.path.join(root, 'JPEGImages')} "
                        f"({len(missing)} missing); check the folder")
    return pair_up({i: images[i] for i in ids}, masks, os.path.join(root, "SegmentationClass"))


def ade_pairs(root: str, train: bool) -> list:
    part = "training" if train else "validation"
    return pair_up(_stems(os.path.join(root, "images", part), (".jpg", ".jpeg", ".png")),
                   _stems(os.path.join(root, "annotations", part), (".png",)), os.path.join(root, "annotations", part))


def folder_pairs(root: str, train: bool) -> list:
    part = os.path.join(root, "train" if train else "val")
    return pair_up(_stems(os.path.join(part, "images"), IMAGE_EXTENSIONS), _stems(os.path.join(part, "masks"),
                                                                                  (".png",)), os.path.join(part, "masks"))


def read_mask(path: str) -> np.ndarray:
    """A mask's class indices (uint8): a palette PNG's indices, a grey PNG's values."""
    try:
        with Image.open(path) as m:
            if m.mode not in ("P", "L", "I;16", "I"):
                raise UserError(f"{path} is a {m.mode} image, not an index mask (a palette or grey PNG of class "
                                "numbers); convert it")
            a = np.asarray(m)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path} is not a readable mask ({type(e).__name__}: {e}); replace it") from e
    if a.max(initial=0) > 255:
        raise UserError(f"{path} holds the value {int(a.max())}; masks hold class indices 0-254 and 255 (ignore)")
    return a.astype(np.uint8)


class SegPairs(torch.utils.data.Dataset):
    """(image, mask) pairs from files; offset: subtracted from every label (ADE20K's 1..150 -> 0..149, its 0 -> 255
    ignore)."""

    def __init__(self, pairs: list, num_classes: int, transform=None, offset: int = 0):
        self.pairs, self.num_classes, self.transform, self.offset = pairs, num_classes, transform, offset
        self.names = [p for p, _ in pairs]

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        image_path, mask_path = self.pairs[i]
        img, mask = read_rgb(image_path), read_mask(mask_path)
        if (mask.shape[1], mask.shape[0]) != img.size:
            raise UserError(f"{mask_path} is {mask.shape[1]}x{mask.shape[0]}, its image {image_path} "
                            f"{img.size[0]}x{img.size[1]}; a mask must have its image's size")
        if self.offset:
            mask = np.where(mask == 0, IGNORE, mask.astype(np.int16) - self.offset).astype(np.uint8)
        bad = (mask >= self.num_classes) & (mask != IGNORE)
        if bad.any():
            raise UserError(f"{mask_path} holds class {int(mask[bad].max())}, beyond the {self.num_classes} classes "
                            f"(0-{self.num_classes - 1}, 255 = ignore); fix the mask or pass --num-classes")
        mask = Image.fromarray(mask)
        return self.transform(img, mask) if self.transform else (img, mask)


def build_seg_dataset(name: str, root: str, train: bool, transform=None, num_classes: int = None):
    """The split of --seg-dataset `name` (SEG_DATASETS) and its class count."""
    if name == "shapes":
        return Shapes(train, transform), CLASSES["shapes"]
    if not root:
        raise UserError(f"--seg-dataset {name} reads files: pass --data-root (docs/SEGMENTATION.md shows the layout)")
    if name == "folder":
        if not num_classes:
            raise UserError("--seg-dataset folder needs --num-classes (the masks' classes are 0..N-1, 255 = ignore)")
        return SegPairs(folder_pairs(root, train), num_classes, transform), num_classes
    classes = num_classes or CLASSES[name]
    if name == "voc":
        return SegPairs(voc_pairs(root, train), classes, transform), classes
    return SegPairs(ade_pairs(root, train), classes, transform, offset=1), classes


# ---------------------------------------------------------------- joint augmentation
class JointTransform:
    """Training: a random resized crop (scale `scale`, the same box for image and mask) to size x size, the image
    bilinear and the mask nearest, and a horizontal flip half the time; evaluation (train False): resize to
    size x size (the mask nearest). Then the image normalised to a tensor, the mask a long tensor."""

    def __init__(self, size: int, mean, std, train: bool, scale=(0.5, 1.0)):
        self.size, self.train, self.scale = size, train, scale
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def box(self, w: int, h: int, rng: np.random.Generator):
        for _ in range(10):
            area = w * h * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                return x, y, x + cw, y + ch
        return 0, 0, w, h

    def __call__(self, img: Image.Image, mask: Image.Image, rng: np.random.Generator = None):
        s = (self.size, self.size)
        if self.train:
            rng = rng or np.random.default_rng(int(torch.randint(0, 2**31, (1,))))
            crop = self.box(*img.size, rng)
            img = img.resize(s, Image.BILINEAR, box=crop)
            mask = mask.resize(s, Image.NEAREST, box=crop)
            if rng.random() < 0.5:
                img, mask = img.transpose(Image.FLIP_LEFT_RIGHT), mask.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            img, mask = img.resize(s, Image.BILINEAR), mask.resize(s, Image.NEAREST)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1).div(255)
        return (x - self.mean) / self.std, torch.from_numpy(np.asarray(mask, dtype=np.int64).copy())
