"""Datasets with presets. Every dataset yields (PIL RGB image, int label) and has `.targets`."""
import gzip
import os
import struct
import sys
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.datasets as tvd
from PIL import Image
from torchvision.datasets.folder import has_file_allowed_extension

from data.files import MAX_PIXELS, ImageReader, file_list, read_rgb, unlabelled_folder
from data.shards import shards
from utils.errors import UserError, describe

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preset:
    img_size: int          # training resolution
    patch_size: int        # ViT patch size at that resolution
    mean: tuple
    std: tuple
    num_classes: int       # 0: read from the data (image folders)
    note: str
    finetune_imagenet_norm: bool = False  # the reference fine-tunes CIFAR/ImageNet with ImageNet statistics

    @property
    def finetune_stats(self) -> tuple:
        """(mean, std) of fine-tuning: ImageNet statistics for CIFAR and folders, as the reference uses."""
        return (IMAGENET_MEAN, IMAGENET_STD) if self.finetune_imagenet_norm else (self.mean, self.std)


PRESETS = {
    "digits": Preset(32, 2, (0.3054,) * 3, (0.3233,) * 3, 10,
                     "embedded: scikit-learn's 1797 handwritten digits, 8x8 upscaled to 32x32, fixed 80/20 split"),
    "mnist": Preset(32, 2, (0.1307,) * 3, (0.3081,) * 3, 10, "idx files in --data-root, 28 px upscaled to 32"),
    "fashion-mnist": Preset(32, 2, (0.2860,) * 3, (0.3530,) * 3, 10,
                            "idx files in --data-root, 28 px upscaled to 32"),
    "cifar10": Preset(32, 2, CIFAR_MEAN, CIFAR_STD, 10, "torchvision layout in --data-root", True),
    "cifar100": Preset(32, 2, CIFAR_MEAN, CIFAR_STD, 100, "torchvision layout in --data-root", True),
    "imagefolder": Preset(224, 16, IMAGENET_MEAN, IMAGENET_STD, 0, "<data-root>/train/<class>/*.jpg and val/",
                          True),
    "folder": Preset(224, 16, IMAGENET_MEAN, IMAGENET_STD, 0, "every image under <data-root>, any layout, no labels",
                     True),
    "filelist": Preset(224, 16, IMAGENET_MEAN, IMAGENET_STD, 0, "a list of image paths (and labels): <data-root> "
                       "is the list, or a folder with train.txt and val.txt", True),
    "shards": Preset(224, 16, IMAGENET_MEAN, IMAGENET_STD, 0, "tar shards made by tools.make_shards (an index.json; "
                     "train/ and val/ for labelled sets)", True),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UserError(f"unknown --dataset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def default_root(name: str) -> str:
    return os.path.join(".", "dataset", name)


class ArrayDataset(torch.utils.data.Dataset):
    """Images held in memory as uint8 [N, H, W] (grey, shown as RGB) with integer labels."""

    def __init__(self, images: np.ndarray, targets, transform=None):
        self.images = images
        self.targets = [int(t) for t in targets]
        self.transform = transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i], mode="L").convert("RGB")
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[i]


def upscale(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of uint8 [N, h, w] to [N, size, size]."""
    x = torch.from_numpy(images).float().unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return x.squeeze(1).round().clamp(0, 255).to(torch.uint8).numpy()


def load_digits_arrays(train: bool):
    """scikit-learn's digits (values 0..16 at 8x8) as uint8 32x32, split 80/20 with a fixed permutation."""
    from sklearn.datasets import load_digits
    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    perm = np.random.RandomState(0).permutation(len(images))
    n_train = int(round(0.8 * len(images)))
    sel = perm[:n_train] if train else perm[n_train:]
    return upscale(images[sel], 32), d.target[sel]


IDX_NAMES = {True: "train", False: "t10k"}
IDX_SUBDIRS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


def _find_idx(root: str, name: str, stem: str) -> str:
    folders = [root, os.path.join(root, "raw"), os.path.join(root, IDX_SUBDIRS[name], "raw")]
    for folder in folders:
        for suffix in ("", ".gz"):
            path = os.path.join(folder, stem + suffix)
            if os.path.isfile(path):
                return path
    raise UserError(f"{name}: {stem}[.gz] not found in {root} (looked in {', '.join(folders)}); put the four idx "
                    "files (train/t10k images and labels) there, or pass --download")


def read_idx(path: str) -> np.ndarray:
    """Parse an idx file (the MNIST format: magic, dims, big-endian uint8 payload), gzipped or not."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:                  # (zlib.error: a damaged .gz)
        raise UserError(f"cannot read {path} ({describe(e)}); re-download the file") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError(f"{path} is not a uint8 idx file (bad magic number); re-download it")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise UserError(f"{path} is truncated or corrupt (its header claims {ndim} dimensions); re-download it")
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise UserError(f"{path} is truncated or corrupt (header says {dims}, file has {len(data) - offset} "
                        f"bytes of data); re-download it")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims).copy()


def load_idx_arrays(name: str, root: str, train: bool):
    split = IDX_NAMES[train]
    images = read_idx(_find_idx(root, name, f"{split}-images-idx3-ubyte"))
    labels = read_idx(_find_idx(root, name, f"{split}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise UserError(f"{name} idx files in {root} do not match (images {images.shape}, labels {labels.shape}); "
                        "re-download them")
    return upscale(images, 32), labels


def _torchvision_download(name: str, root: str):
    cls = {"mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST}[name]
    try:
        for train in (True, False):
            cls(root, train=train, download=True)
    except Exception as e:  # network errors come in many types
        raise UserError(f"could not download {name} into {root} ({describe(e)}); fetch the idx files "
                        f"elsewhere and put them in {root}") from e


def build_cifar(name: str, root: str, train: bool, download: bool, transform=None):
    cls, folder, url = {
        "cifar10": (tvd.CIFAR10, "cifar-10-batches-py", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
        "cifar100": (tvd.CIFAR100, "cifar-100-python", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
    }[name]
    try:
        return cls(root, train=train, transform=transform, download=download)
    except Exception as e:  # URLError, socket errors, checksum failures, a missing folder, ...
        if download:
            raise UserError(f"could not download {name} into {root} ({describe(e)}); download {url} "
                            f"elsewhere and extract it into {root}") from e
        if isinstance(e, RuntimeError) and "not found or corrupted" in str(e):
            raise UserError(f"{name} not found (or corrupt) at {os.path.join(root, folder)}; download {url}, "
                            f"extract it into {root}, or pass --download") from e
        raise


def read_image(path: str):
    """An image file as RGB (data.files.to_rgb: every PIL mode), with a one-line error naming an unreadable file."""
    return read_rgb(path)


def _is_dir(entry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def walk_without_loops(top: str, loops: list):
    """os.walk(top, followlinks=True), but a link to a folder above it (a loop, which os.walk follows until the
    path is too long) is not entered; its path goes to `loops`."""
    def walk(folder, ancestors):
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError:
            return
        is_dir = {e.name: _is_dir(e) for e in entries}
        dirs = [n for n, d in is_dir.items() if d]
        yield folder, dirs, [n for n, d in is_dir.items() if not d]
        for name in dirs:
            path = os.path.join(folder, name)
            st = os.stat(path)
            if (st.st_dev, st.st_ino) in ancestors:
                loops.append(path)
                continue
            yield from walk(path, ancestors | {(st.st_dev, st.st_ino)})
    st = os.stat(top)
    yield from walk(top, {(st.st_dev, st.st_ino)})


class LoopSafeImageFolder(tvd.ImageFolder):
    """torchvision's ImageFolder, its files found by the same rule and in the same order, but without following
    links that loop (each class folder walked by walk_without_loops; one line says how many were left out)."""

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        valid = is_valid_file or (lambda path: has_file_allowed_extension(path, extensions))
        samples, loops, found = [], [], set()
        for name in sorted(class_to_idx):
            folder = os.path.join(directory, name)
            if not os.path.isdir(folder):
                continue
            for here, _, files in sorted(walk_without_loops(folder, loops)):
                for f in sorted(files):
                    if valid(os.path.join(here, f)):
                        samples.append((os.path.join(here, f), class_to_idx[name]))
                        found.add(name)
        empty = sorted(set(class_to_idx) - found)
        if empty and not allow_empty:
            raise FileNotFoundError(f"Found no valid file for the classes {', '.join(empty)}.")
        if loops:
            print(f"imagefolder: {directory}: left out {len(loops)} link(s) to a folder above them (a loop), "
                  f"e.g. {loops[0]}", file=sys.stderr, flush=True)
        return samples


def build_imagefolder(root: str, train: bool, transform=None, reader: ImageReader = None):
    split = os.path.join(root, "train" if train else "val")
    if not os.path.isdir(split):
        raise UserError(f"imagefolder: {split} is not a folder; --data-root must hold train/<class>/*.jpg and "
                        "val/<class>/*.jpg (the ImageNet layout)")
    try:
        folder = LoopSafeImageFolder(split, transform=transform, loader=reader or ImageReader())
    except FileNotFoundError as e:
        raise UserError(f"imagefolder: {split} holds no images in class sub-folders ({e}); "
                        "use the layout <split>/<class>/<image>.jpg") from e
    if not train:
        check_class_agreement(os.path.join(root, "train"), split, folder.classes)
    return folder


def check_class_agreement(train_dir: str, val_dir: str, val_classes: list):
    """The splits' class folders must be the same: a class that one split lacks would shift every later class's
    index in the other (ImageFolder numbers its own sorted sub-folders)."""
    if not os.path.isdir(train_dir):
        return
    train_classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
    if train_classes == list(val_classes):
        return
    extra, missing = sorted(set(val_classes) - set(train_classes)), sorted(set(train_classes) - set(val_classes))
    parts = ([f"{val_dir} has {len(extra)} class(es) {train_dir} lacks ({', '.join(extra[:3])})"] if extra else []) + \
            ([f"{val_dir} lacks {len(missing)} of its classes ({', '.join(missing[:3])})"] if missing else [])
    raise UserError(f"imagefolder: {'; '.join(parts)}; the class indices would not match: give train/ and val/ the "
                    "same class folders (python -m tools.check_data ROOT lists them)")


def build_dataset(name: str, root: str = None, train: bool = True, transform=None, download: bool = False,
                  cache_dir: str = None, bad_images: str = None, max_pixels: int = MAX_PIXELS):
    """The train or test split of `name`, yielding (transform(PIL RGB image), label). cache_dir: where an unlabelled
    folder's image list is cached (the output folder); bad_images: where the paths of unreadable files go, each
    replaced by a stand-in (--skip-bad-images; None: an unreadable file stops the run); max_pixels: the largest
    image read (--max-image-pixels; 0: no limit)."""
    get_preset(name)
    root = root or default_root(name)
    reader = ImageReader(bad_images, max_pixels)
    if name == "folder":
        if not train:
            raise UserError(f"folder: {root} has no labels, so no test split; a classifier's evaluation needs a "
                            "labelled set (imagefolder, or a filelist with labels), pretraining's kNN --knn-data "
                            "(e.g. imagefolder:DIR) or --knn-every 0")
        return unlabelled_folder(root, transform, cache_dir, reader)
    if name == "filelist":
        return file_list(root, train, transform, reader)
    if name == "shards":
        return shards(root, train, transform, reader)
    if name == "digits":
        return ArrayDataset(*load_digits_arrays(train), transform=transform)
    if name in IDX_SUBDIRS:
        if download:
            _torchvision_download(name, root)
        elif not os.path.isdir(root):
            raise UserError(f"{name}: --data-root {root} does not exist; create it and put the idx files "
                            "(train/t10k images and labels, *-ubyte or *-ubyte.gz) there, or pass --download")
        return ArrayDataset(*load_idx_arrays(name, root, train), transform=transform)
    if name in ("cifar10", "cifar100"):
        return build_cifar(name, root, train, download, transform)
    return build_imagefolder(root, train, transform, reader)


def num_classes_of(dataset) -> int:
    """The number of classes (0: an unlabelled set)."""
    if hasattr(dataset, "classes") and dataset.classes:
        return len(dataset.classes)
    return int(max(dataset.targets, default=-1)) + 1


def is_labelled(dataset) -> bool:
    return num_classes_of(dataset) > 0
