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
import sys
import warnings

import numpy as np
from PIL import Image

from utils.errors import UserError, describe
from utils.textfile import read_text, text_lines

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


MAX_PIXELS = 2 * 89_478_485    # PIL's own refusal (twice its warning limit): what decoded before decodes now


def open_image(f, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Image.open(f), loaded, with our size limit instead of PIL's: an image of more than max_pixels pixels (0: no
    limit) raises DecompressionBombError from its header, before anything is decoded. PIL's notes on damaged
    files are silenced: whether the file is usable is the caller's verdict."""
    Image.MAX_IMAGE_PIXELS = None                                  # the limit is max_pixels, checked here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = Image.open(f)
        if max_pixels and img.width * img.height > max_pixels:
            raise Image.DecompressionBombError(f"{img.width}x{img.height}")
        img.load()
    return img


def read_rgb(path: str, data: bytes = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The image at `path` (or its bytes, `data`, read already) as RGB (to_rgb), or a one-line error naming it:
    whatever way the file fails to decode (PIL raises many kinds of error on a damaged file), and an image of more
    than max_pixels pixels (open_image)."""
    try:
        with (open(path, "rb") if data is None else io.BytesIO(data)) as f:
            return to_rgb(open_image(f, max_pixels))
    except Image.DecompressionBombError as e:
        raise UserError(f"image {path} is larger than --max-image-pixels {max_pixels} ({describe(e)}; a guard "
                        "against decompression bombs); if it is a real image raise the limit (0: none), else remove "
                        "the file or pass --skip-bad-images") from None
    except Exception as e:  # noqa: BLE001  (OSError, SyntaxError, ValueError, struct.error, EOFError, ...)
        raise UserError(f"cannot read image {path} ({describe(e)}); remove or replace the file, or pass "
                        "--skip-bad-images") from None


BAD_IMAGES = "bad_images.txt"
STAND_IN_SIZE = 32
STAND_IN_GREY = 128


class ImageReader:
    """reader(path[, its bytes]) -> RGB image (read_rgb, at most max_pixels pixels). log: None (an unreadable file
    stops the run with one line naming it) or the file (<output-dir>/bad_images.txt, --skip-bad-images) to which
    an unreadable file's path is appended; the sample then becomes a mid-grey stand-in, the same whatever process
    or worker reads it."""

    def __init__(self, log: str = None, max_pixels: int = MAX_PIXELS):
        self.log, self.max_pixels = log, max_pixels

    def fits(self, height: int, width: int) -> bool:
        """An image of this size is within the limit (and not empty)."""
        return height > 0 and width > 0 and (not self.max_pixels or height * width <= self.max_pixels)

    def __call__(self, path: str, data: bytes = None) -> Image.Image:
        try:
            return read_rgb(path, data, self.max_pixels)
        except UserError:
            if self.log is None:
                raise
            self.note(path)
            return Image.new("RGB", (STAND_IN_SIZE, STAND_IN_SIZE), (STAND_IN_GREY,) * 3)

    def note(self, path: str):
        with open(self.log, "a") as f:              # one short write per line: appends from many processes stay whole
            f.write(path + "\n")


SKIPPED = {"not_images": "not images (by extension)", "hidden": "hidden", "broken_links": "broken link(s)",
           "repeats": "reached again through a link", "unreadable_folders": "folder(s) that cannot be listed"}


def scan_images(root: str, skipped: dict = None) -> list:
    """Every image file under root (by extension, recursively; hidden files and folders skipped), as sorted
    relative paths. Links are followed, but each real folder is entered once and each real file listed once (a
    link back up the tree is not a loop, a folder linked twice is not its images twice): within a folder the
    entries are taken in name order, so the name kept is the same on any filesystem. `skipped` (a dict) gets, for
    each kind of entry left out (SKIPPED's keys), their relative names."""
    skipped = {} if skipped is None else skipped
    note = lambda kind, name=None: skipped.setdefault(kind, []).append(name)  # noqa: E731
    found, seen_dirs, seen_files = [], set(), set()
    try:
        st = os.stat(root)
    except OSError:
        return []
    stack = [(root, ".", (st.st_dev, st.st_ino))]
    while stack:
        folder, rel, real = stack.pop()
        if real in seen_dirs:
            note("repeats", rel)
            continue
        seen_dirs.add(real)
        dev = real[0]
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            note("unreadable_folders", rel)
            continue
        subdirs = []
        for e in entries:
            name = os.path.normpath(os.path.join(rel, e.name))
            try:
                is_dir, is_file = e.is_dir(), e.is_file()
                st = os.stat(e.path) if e.is_symlink() and (is_dir or is_file) else None
            except OSError:
                is_dir = is_file = False
            if e.name.startswith("."):
                if is_file:
                    note("hidden", name)
                continue
            if is_dir:
                st = st or e.stat()
                subdirs.append((e.path, name, (st.st_dev, st.st_ino)))
            elif not is_file:
                note("broken_links" if e.is_symlink() else "not_images", name)
            elif not e.name.lower().endswith(IMAGE_EXTENSIONS):
                note("not_images", name)
            else:
                real = (st.st_dev, st.st_ino) if st else (dev, e.inode())      # a link: what it points at
                if real in seen_files:
                    note("repeats", name)
                    continue
                seen_files.add(real)
                found.append(name)
        stack += reversed(subdirs)                    # depth first, in name order
    return sorted(found)


def skipped_line(root: str, skipped: dict, kept: int) -> str:
    """One line: how many files a scan of root kept and left out, and why ('' when it left nothing out that
    matters: files that are not images are counted but not worth a line on their own)."""
    if not any(v for k, v in skipped.items() if k != "not_images"):
        return ""
    parts = ", ".join(f"{len(skipped[k])} {what}" for k, what in SKIPPED.items() if skipped.get(k))
    n = sum(map(len, skipped.values()))
    return (f"folder: {kept} images under {root}; left out {n} {'entry' if n == 1 else 'entries'}: {parts} "
            f"(python -m tools.check_data {root} names them)")


def cached_scan(root: str, cache_dir: str = None, log=None) -> list:
    """scan_images(root), read from / written to <cache_dir>/image_list.txt (its first line names the root, its
    last counts the images). A cache is reused only while it is whole and every file it lists is still there;
    otherwise (a file removed since, as after a run stopped on it, or a cache that is not a list this code wrote)
    the folder is scanned again and `log` (a function of one line; default: stderr on the main process) says
    why."""
    root = os.path.abspath(root)
    log = log or _main_process_line
    cache = os.path.join(cache_dir, LIST_CACHE) if cache_dir else None
    if cache and os.path.isfile(cache):
        names, why = cached_names(cache, root)
        if why is None:
            return names
        if why:
            log(f"folder: {cache} {why}; scanning {root} again")
    skipped = {}
    names = scan_images(root, skipped)
    line = skipped_line(root, skipped, len(names))
    if line:
        log(line)
    if cache and names:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{cache}.tmp.{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\n".join([f"# {root}"] + names + [f"# end: {len(names)} images"]) + "\n")
        os.replace(tmp, cache)
    return names


def cached_names(cache: str, root: str):
    """(names, None) of a cache that still holds, else (None, why: '' for a cache of another root, which is
    simply rebuilt, or a reason worth a line)."""
    try:
        lines = read_text(cache, cache, "").splitlines()
    except UserError:
        return None, "is not a list this code wrote"
    if not lines or lines[0] != f"# {root}":
        return None, ""
    names = lines[1:-1]
    if lines[-1] != f"# end: {len(names)} images":
        return None, "is cut short or was edited (its last line does not count its images)"
    for k, n in enumerate(names):
        if not n or os.path.isabs(n) or n.split(os.sep)[0] == ".." or not n.lower().endswith(IMAGE_EXTENSIONS) or (
                k and n <= names[k - 1]):
            return None, "is not a list this code wrote"
        if not os.path.isfile(os.path.join(root, n)):
            gone = sum(1 for m in names if not os.path.isfile(os.path.join(root, m)))
            return None, f"lists {gone} file(s) that are gone since it was written (e.g. {n})"
    return names, None


def _main_process_line(line: str):
    from utils.dist import is_main_process
    if is_main_process():
        print(line, file=sys.stderr, flush=True)


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
    """[(absolute path, label text or None)] of a list file (utils.textfile: UTF-8 with or without a BOM, any line
    ending; blank lines and # comments skipped); one line naming the file and line on a problem."""
    lines = text_lines(path, f"filelist: {path}", "pass a text file of image paths, one per line")
    base, entries = os.path.dirname(os.path.abspath(path)), []
    for n, text in lines:
        parts = text.rsplit(None, 1)
        if len(parts) == 2 and not parts[1].lower().endswith(IMAGE_EXTENSIONS) and not os.path.exists(
                os.path.join(base, text)):
            name, label = parts
        else:
            name, label = text, None
        entries.append((os.path.normpath(os.path.join(base, name)), label, n))
    if not entries:
        raise UserError(f"filelist: {path} lists no image; write one path per line (optionally a label after it)")
    for p, _, n in entries:
        if not os.path.isfile(p):
            what = "a folder, not an image" if os.path.isdir(p) else "which does not exist"
            raise UserError(f"filelist: {path} line {n} names {p}, {what}; fix the path (absolute, or relative to "
                            "the list's folder) or remove the line")
    labelled = [label is not None for _, label, _ in entries]
    if any(labelled) and not all(labelled):
        n = next(n for (_, label, n) in entries if label is None)
        raise UserError(f"filelist: {path} line {n} has no label while other lines have one; label every line or "
                        "none")
    if all(labelled):
        kinds = {is_integer(label) for _, label, _ in entries}
        if len(kinds) == 2:
            n, label = next((n, label) for _, label, n in entries if not is_integer(label))
            raise UserError(f"filelist: {path} mixes integer labels and class names (line {n}: {label!r}); label "
                            "every line with a class index or every line with a class name")
    return [(p, label) for p, label, _ in entries]


def is_integer(label: str) -> bool:
    return label.lstrip("-").isdigit()


def class_names(labels: list) -> list:
    """Sorted class names: integers in numeric order, other names in text order."""
    if all(is_integer(label) for label in labels):
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
    train_entries = entries if train else read_list(paths["train"])
    if (entries[0][1] is None) != (train_entries[0][1] is None):
        has, lacks = (path, paths["train"]) if train_entries[0][1] is None else (paths["train"], path)
        raise UserError(f"filelist: {has} has labels and {lacks} has none; label both lists or neither")
    if entries[0][1] is None:
        return FileImages([(p, NO_LABEL) for p, _ in entries], [], transform, path, reader)
    if is_integer(entries[0][1]) != is_integer(train_entries[0][1]):
        kind = lambda e: "class indices" if is_integer(e[0][1]) else "class names"  # noqa: E731
        raise UserError(f"filelist: {paths['train']} labels with {kind(train_entries)} and {path} with "
                        f"{kind(entries)}; use the same kind of label in both lists")
    classes = class_names([label for _, label in train_entries])
    index = {c: i for i, c in enumerate(classes)}
    normal = (lambda s: str(int(s))) if all(is_integer(c) for c in classes) else (lambda s: s)
    unknown = next((label for _, label in entries if normal(label) not in index), None) if not train else None
    if unknown is not None:
        raise UserError(f"filelist: {path} has label {unknown!r}, which {paths['train']} lacks; the training list must "
                        "hold every class (fix the label, or add images of it to the training list)")
    return FileImages([(p, index[normal(label)]) for p, label in entries], classes, transform, path, reader)
