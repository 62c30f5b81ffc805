"""Tar shards in webdataset's layout, read with random access through an index of their members.

A shard folder (made by `python -m tools.make_shards`) holds `shard-00000.tar`, `shard-00001.tar`, ... and
`index.json`. Sample i is member `{i:08d}.{ext}` (the image's bytes as they were) and, when labelled,
`{i:08d}.cls` (the class index as text), so webdataset's own readers read the shards too. The index records, for
each shard, its size in bytes, and for each sample its shard, the byte offset and size of its data, its label
and its original file name. A reader seeks straight to a sample: the global-batch order, the same run for any
number of processes and exact mid-epoch resume hold as for a folder. Labelled sets keep train/ and val/ shard
folders side by side.
"""
import io
import json
import os
import shutil
import tarfile
import tempfile

from data.files import NO_LABEL, FileImages, ImageReader
from utils.errors import UserError, describe
from utils.textfile import read_text

INDEX = "index.json"
FORMAT = "asym-shards-1"


def shard_folder(root: str, train: bool) -> str:
    """The shard folder of a split: root itself when it holds index.json, else root/train or root/val."""
    if os.path.isfile(os.path.join(root, INDEX)):
        if not train:
            raise UserError(f"shards: {root} holds one split only; evaluation needs {root}/train and {root}/val "
                            "(make_shards writes both from an ImageNet-style folder or a train.txt/val.txt list)")
        return root
    folder = os.path.join(root, "train" if train else "val")
    if not os.path.isfile(os.path.join(folder, INDEX)):
        raise UserError(f"shards: no {INDEX} in {root} or {folder}; make shards with python -m tools.make_shards "
                        "SRC OUT and pass OUT as --data-root")
    return folder


AGAIN = "make the shards again with python -m tools.make_shards"


def read_index(folder: str) -> dict:
    """The index of a shard folder, checked as a whole (check_index) before anything is read through it."""
    path = os.path.join(folder, INDEX)
    try:
        index = json.loads(read_text(path, f"shards: {path}", AGAIN))
    except ValueError as e:
        raise UserError(f"shards: cannot read {path} ({e}); {AGAIN}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        what = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise UserError(f"shards: {path} is not an index this code wrote (format {what!r}); {AGAIN}")
    check_index(path, index)
    return index


def _is_int(v) -> bool:
    return type(v) is int                       # (JSON's true/false are not counts)


def check_index(path: str, index: dict):
    """The index holds together: its classes are names, every shard entry is complete, and every sample's shard
    is listed, its bytes lie inside that shard (as its recorded size says) after a tar header, its label is a
    class of the index (or none, for an unlabelled set), and each shard's first and last members are its first
    and last samples. A UserError names the entry otherwise; nothing downstream then meets an impossible one."""
    def bad(what: str):
        raise UserError(f"shards: {path} {what}; {AGAIN}")

    classes, shards_, samples = index.get("classes", []), index.get("shards"), index.get("samples")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        bad("has classes that are not a list of names")
    if not isinstance(shards_, list) or not shards_:
        bad("lists no shards")
    for k, shard in enumerate(shards_):
        if not (isinstance(shard, dict) and isinstance(shard.get("name"), str) and _is_int(shard.get("bytes"))
                and all(isinstance(shard.get(m), list) and len(shard[m]) == 2 and isinstance(shard[m][0], str)
                        and _is_int(shard[m][1]) for m in ("first", "last"))):
            bad(f"has an incomplete entry for shard {k}")
        if os.path.basename(shard["name"]) != shard["name"] or not shard["name"].endswith(".tar"):
            bad(f"names shard {k} {shard['name']!r}, not a .tar file beside the index")
    if not isinstance(samples, list) or not samples:
        bad("lists no samples")
    edges, last_shard = {}, 0
    for i, sample in enumerate(samples):
        if not (isinstance(sample, list) and len(sample) == 5 and all(map(_is_int, sample[:4]))
                and isinstance(sample[4], str)):
            bad(f"has a malformed entry for sample {i} ({str(sample)[:60]})")
        shard, offset, size, label, _ = sample
        if not 0 <= shard < len(shards_):
            bad(f"puts sample {i} in shard {shard}, which it does not list ({len(shards_)} shards)")
        if shard < last_shard:
            bad(f"puts sample {i} in shard {shard}, after samples of shard {last_shard} (out of order)")
        last_shard = shard
        if offset < tarfile.BLOCKSIZE or size < 0 or offset + size > shards_[shard]["bytes"]:
            bad(f"puts sample {i} at bytes {offset}..{offset + size} of {shards_[shard]['name']}, outside its "
                f"{shards_[shard]['bytes']} bytes")
        if (classes and not 0 <= label < len(classes)) or (not classes and label != NO_LABEL):
            bad(f"gives sample {i} label {label}, not one of its {len(classes)} classes")
        edges.setdefault(shard, [offset, offset])[1] = offset
    for k, shard in enumerate(shards_):
        if k not in edges:
            bad(f"lists shard {shard['name']} without any sample in it")
        if [edges[k][0] - tarfile.BLOCKSIZE, edges[k][1] - tarfile.BLOCKSIZE] != [shard["first"][1], shard["last"][1]]:
            bad(f"does not agree with itself on where the samples of {shard['name']} start and end")


def check_shards(folder: str, index: dict):
    """Each shard is there, has the size the index records, and holds the index's first and last members where
    the index says (two header reads per shard): a truncated shard, or an index of other shards, stops here."""
    for shard in index["shards"]:
        path = os.path.join(folder, shard["name"])
        if not os.path.isfile(path):
            raise UserError(f"shards: {path} is missing; copy it back or {AGAIN}")
        size = os.path.getsize(path)
        if size != shard["bytes"]:
            raise UserError(f"shards: {path} has {size} bytes, the index says {shard['bytes']} (truncated or "
                            f"replaced); {AGAIN}")
        with open(path, "rb") as f:
            for member in (shard["first"], shard["last"]):
                name, header = member
                f.seek(header)
                try:
                    info = tarfile.TarInfo.frombuf(f.read(tarfile.BLOCKSIZE), "utf-8", "surrogateescape")
                except tarfile.TarError:
                    info = None
                if info is None or info.name != name:
                    raise UserError(f"shards: {path} does not hold {name} where {INDEX} says; the index belongs to "
                                    f"other shards: {AGAIN}")


class ShardImages(FileImages):
    """A split's shards as a dataset: dataset[i] = (transform(RGB image), label), read by seeking into the tar.
    samples: [(original file name, label)] (what --subset-file names match); read_bytes(i): the image's bytes."""

    def __init__(self, folder: str, transform=None, reader: ImageReader = None):
        index = read_index(folder)
        check_shards(folder, index)
        self.folder = folder
        self.locations = [(s[0], s[1], s[2]) for s in index["samples"]]        # (shard, data offset, size)
        self.shard_names = [s["name"] for s in index["shards"]]
        samples = [(s[4], s[3]) for s in index["samples"]]
        super().__init__(samples, index.get("classes", []), transform, folder, reader)
        self._files = {}

    def __getstate__(self):                     # open files stay in the process that opened them
        state = dict(self.__dict__)
        state["_files"] = {}
        return state

    def subset(self, indices: list) -> "ShardImages":
        part = super().subset(indices)
        part.locations = [self.locations[i] for i in indices]
        part._files = {}
        return part

    def read_bytes(self, i: int) -> bytes:
        shard, offset, size = self.locations[i]
        try:
            f = self._files.get(shard)
            if f is None:
                f = self._files[shard] = open(os.path.join(self.folder, self.shard_names[shard]), "rb")
            f.seek(offset)
            data = f.read(size)
        except OSError as e:
            raise UserError(f"shards: cannot read {self.shard_names[shard]} in {self.folder} ({describe(e)}; gone "
                            f"since the check?); copy it back or {AGAIN}") from None
        if len(data) != size:
            raise UserError(f"shards: {self.shard_names[shard]} ends before sample {i} (truncated after the check); "
                            f"{AGAIN}")
        return data

    def __getitem__(self, i):
        name, label = self.samples[i]
        img = self.loader(f"{self.folder}/{name}", self.read_bytes(i))
        return (self.transform(img) if self.transform is not None else img), label


def shards(root: str, train: bool, transform=None, reader: ImageReader = None) -> ShardImages:
    return ShardImages(shard_folder(root, train), transform, reader)


def check_sources(samples: list):
    """Every file to be written is there and readable, before a shard is begun (a broken link, say)."""
    for path, _ in samples:
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            what = "is a broken link" if os.path.islink(path) and not os.path.exists(path) else "cannot be read"
            raise UserError(f"make_shards: {path} {what}; remove it or fix it, then rerun (nothing was written)")


def write_shards(dataset, out: str, per_shard: int, progress=None) -> dict:
    """Write `dataset` (a FileImages, image folder or file list: anything with .samples of (path, label) and
    .classes) into tar shards of `per_shard` samples under `out`, and their index; returns the index. The shards
    are written in a hidden folder inside `out` and moved into place (the index last) only when all are whole,
    so a failure, or a kill, leaves `out` as it was (shards made before included)."""
    samples = dataset.samples
    check_sources(samples)
    os.makedirs(out, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".make_shards-", dir=out)
    try:
        index = _write_shards(dataset, staging, per_shard, progress)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError):
            raise UserError(f"make_shards: writing {out} failed ({describe(e)}); nothing was written there: fix "
                            "that (free space? a file that changed?) and rerun") from None
        raise
    kept = {shard["name"] for shard in index["shards"]}
    for name in kept:
        os.replace(os.path.join(staging, name), os.path.join(out, name))
    os.replace(os.path.join(staging, INDEX), os.path.join(out, INDEX))
    for name in os.listdir(out):                       # shards of an earlier, larger set
        if name.startswith("shard-") and name.endswith(".tar") and name not in kept:
            os.remove(os.path.join(out, name))
    shutil.rmtree(staging, ignore_errors=True)
    return index


def _write_shards(dataset, out: str, per_shard: int, progress=None) -> dict:
    samples, classes = dataset.samples, list(getattr(dataset, "classes", []) or [])
    root = getattr(dataset, "root", "")
    index = {"format": FORMAT, "classes": classes, "shards": [], "samples": []}
    for s, start in enumerate(range(0, len(samples), per_shard)):
        name = f"shard-{s:05d}.tar"
        first = last = None
        with tarfile.open(os.path.join(out, name), "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(start, min(start + per_shard, len(samples))):
                path, label = samples[i]
                with open(path, "rb") as f:
                    data = f.read()
                ext = os.path.splitext(path)[1].lower().lstrip(".") or "img"
                key = f"{i:08d}"
                header = tar.offset
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
                index["samples"].append([s, header + tarfile.BLOCKSIZE, len(data), label,
                                         os.path.relpath(path, root) if root and os.path.isdir(root) else path])
                first = first or [info.name, header]
                last = [info.name, header]
                if label != NO_LABEL and classes:
                    cls = str(label).encode()
                    info = tarfile.TarInfo(f"{key}.cls")
                    info.size, info.mtime, info.mode = len(cls), 0, 0o644
                    tar.addfile(info, io.BytesIO(cls))
                if progress:
                    progress(i + 1, len(samples))
        index["shards"].append({"name": name, "bytes": os.path.getsize(os.path.join(out, name)), "first": first,
                                "last": last})
    with open(os.path.join(out, INDEX), "w") as f:
        json.dump(index, f)
    return index
