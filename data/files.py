"""Your own images: an unlabelled folder (any layout, recursively) or a file list, as datasets of (path, label).

`--dataset folder --data-root DIR`: every image under DIR, in any sub-folder layout, no labels. The list is built
once, sorted by path relative to DIR (the same order on any filesystem), and cached in the output folder
(`image_list.txt`), so a restart does not rescan a million files.

`--dataset filelist --data-root LIST.txt` (training only) or `--data-root DIR` (DIR/train.txt and DIR/val.txt):
one image per line, an absolute path or one relative to the list's folder, optionally followed by a label
(whitespace between; an integer, or a class name). Labels, where given, are mapped to 0..C-1 in sorted order of
the training list's labels; a label the validation list has and the training list lacks is an error.

Every format and mode PIL reads becomes the same RGB image on both data paths (`to_rgb`).
"""
import copy
import io
import os

import numpy as np
from PIL import Image

from utils.errors import UserError, describe

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm")
LIST_CACHE = "image_list.txt"
NO_LABEL = -1


def to_rgb(img: Image.Image) -> Image.Image:
    """An RGB image of any PIL mode: grey and palette expanded, CMYK converted, alpha dropped (composited on
    nothing: the colour channels as stored), 16- and 32-bit integer greys scaled to 8 bits (not clipped)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img, dtype=np.float64)
        scale = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(np.round(a * (255.0 / scale)), 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.round(np.asarray(img) * 255.0), 0, 255).astype(np.uint8), mode="L")
    elif img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    return img.convert("RGB") if img.mode != "RGB" else img


def read_rgb(path: str, data: bytes = None) -> Image.Image:
    """The image at `path` (or its bytes, `data`, read already) as RGB (to_rgb), or a one-line error naming it."""
    from PIL import UnidentifiedImageError
    try:
        with (open(path, "rb") if data is None else io.BytesIO(data)) as f:
            img = Image.open(f)
            img.load()
            return to_rgb(img)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise UserError(f"cannot read image {path} ({describe(e)}); remove or replace the file, or pass "
                        "--skip-bad-images") from None


BAD_IMAGES = "bad_images.txt"
STAND_IN_SIZE = 32
STAND_IN_GREY = 128


class ImageReader:
    """reader(path[, its bytes]) -> RGB image (read_rgb). log: None (an unreadable file stops the run with one line
    naming it) or the file (<output-dir>/bad_images.txt, --skip-bad-images) to which an unreadable file's path is
    appended; the sample then becomes a mid-grey stand-in, the same whatever process or worker reads it."""

    def __init__(self, log: str = None):
        self.log = log

    def __call__(self, path: str, data: bytes = None) -> Image.Image:
        try:
            return read_rgb(path, data)
        except UserError:
            if self.log is None:
                raise
            self.note(path)
            return Image.new("RGB", (STAND_IN_SIZE, STAND_IN_SIZE), (STAND_IN_GREY,) * 3)

    def note(self, path: str):
        with open(self.log, "a") as f:              # one short write per line: appends from many processes stay whole
            f.write(path + "\n")


def scan_images(root: str) -> list:
    """Every image file under root (by extension, recursively, hidden folders skipped), as sorted relative paths."""
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = os.path.relpath(folder, root)
        found += [os.path.normpath(os.path.join(rel, f)) for f in files
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    return sorted(found)


def cached_scan(root: str, cache_dir: str = None) -> list:
    """scan_images(root), read from / written to <cache_dir>/image_list.txt (its first line names the root)."""
    root = os.path.abspath(root)
    cache = os.path.join(cache_dir, LIST_CACHE) if cache_dir else None
    if cache and os.path.isfile(cache):
        with open(cache) as f:
            lines = f.read().splitlines()
        if lines and lines[0] == f"# {root}":
            return lines[1:]
    names = scan_images(root)
    if cache and names:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{cache}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write("\n".join([f"# {root}"] + names) + "\n")
        os.replace(tmp, cache)
    return names


class FileImages:
    """A dataset of image files: dataset[i] = (transform(RGB image), label). samples: [(path, label)];
    targets: the labels (NO_LABEL for unlabelled sets); classes: the class names ([] when unlabelled)."""

    def __init__(self, samples: list, classes: list, transform=None, root: str = "", reader: ImageReader = None):
        self.samples, self.classes, self.transform, self.root = samples, classes, transform, root
        self.targets = [label for _, label in samples]
        self.loader = reader or ImageReader()

    @property
    def labelled(self) -> bool:
        return bool(self.classes)

    def subset(self, indices: list) -> "FileImages":
        """This dataset restricted to `indices` (in that order)."""
        part = copy.copy(self)
        part.samples = [self.samples[i] for i in indices]
        part.targets = [label for _, label in part.samples]
        return part

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        img = self.loader(path)
        return (self.transform(img) if self.transform is not None else img), label


def unlabelled_folder(root: str, transform=None, cache_dir: str = None, reader: ImageReader = None) -> FileImages:
    if not os.path.isdir(root):
        raise UserError(f"folder: --data-root {root} is not a folder; point it at the folder of your images")
    names = cached_scan(root, cache_dir)
    if not names:
        raise UserError(f"folder: no images under {root} (looked for {', '.join(IMAGE_EXTENSIONS)}, in every "
                        "sub-folder); point --data-root at the folder that holds them")
    return FileImages([(os.path.join(root, n), NO_LABEL) for n in names], [], transform, root, reader)


def read_list(path: str) -> list:
    """[(absolute path, label text or None)] of a list file; one line naming the file and line on a problem."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"filelist: cannot read {path} ({describe(e)}); pass a text file of image paths") from None
    base, entries = os.path.dirname(os.path.abspath(path)), []
    for n, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.rsplit(None, 1)
        if len(parts) == 2 and not parts[1].lower().endswith(IMAGE_EXTENSIONS) and not os.path.exists(
                os.path.join(base, text)):
            name, label = parts
        else:
            name, label = text, None
        entries.append((os.path.normpath(os.path.join(base, name)), label, n))
    if not entries:
        raise UserError(f"filelist: {path} lists no image; write one path per line (optionally a label after it)")
    missing = next(((p, n) for p, _, n in entries if not os.path.isfile(p)), None)
    if missing:
        raise UserError(f"filelist: {path} line {missing[1]} names {missing[0]}, which does not exist; fix the "
                        "path (absolute, or relative to the list's folder) or remove the line")
    labelled = [label is not None for _, label, _ in entries]
    if any(labelled) and not all(labelled):
        n = next(n for (_, label, n) in entries if label is None)
        raise UserError(f"filelist: {path} line {n} has no label while other lines have one; label every line or "
                        "none")
    return [(p, label) for p, label, _ in entries]


def class_names(labels: list) -> list:
    """Sorted class names: integers in numeric order, other names in text order."""
    if all(label.lstrip("-").isdigit() for label in labels):
        return [str(v) for v in sorted({int(label) for label in labels})]
    return sorted(set(labels))


def list_paths(root: str) -> dict:
    """{'train': path, 'val': path or None} of --data-root for filelist (a list file, or a folder of train.txt
    and val.txt)."""
    if os.path.isdir(root):
        train, val = os.path.join(root, "train.txt"), os.path.join(root, "val.txt")
        if not os.path.isfile(train):
            raise UserError(f"filelist: {root} is a folder without train.txt; put train.txt (and val.txt) there, or "
                            "pass the list file itself as --data-root")
        return {"train": train, "val": val if os.path.isfile(val) else None}
    if not os.path.isfile(root):
        raise UserError(f"filelist: --data-root {root} does not exist; pass a list file or a folder with train.txt")
    return {"train": root, "val": None}


def file_list(root: str, train: bool, transform=None, reader: ImageReader = None) -> FileImages:
    """The train (or val) list of --data-root as a dataset, labels mapped through the training list's classes."""
    paths = list_paths(root)
    path = paths["train" if train else "val"]
    if path is None:
        raise UserError(f"filelist: no validation list for {root}; pass --data-root a folder holding train.txt and "
                        "val.txt")
    entries = read_list(path)
    if entries[0][1] is None:
        return FileImages([(p, NO_LABEL) for p, _ in entries], [], transform, path, reader)
    train_entries = entries if train else read_list(paths["train"])
    classes = class_names([label for _, label in train_entries])
    index = {c: i for i, c in enumerate(classes)}
    normal = (lambda s: str(int(s))) if all(c.lstrip("-").isdigit() for c in classes) else (lambda s: s)
    unknown = next((label for _, label in entries if normal(label) not in index), None) if not train else None
    if unknown is not None:
        raise UserError(f"filelist: {path} has label {unknown!r}, which {paths['train']} lacks; the training list must "
                        "hold every class (fix the label, or add images of it to the training list)")
    return FileImages([(p, index[normal(label)]) for p, label in entries], classes, transform, path, reader)
