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
import tarfile

from data.files import NO_LABEL, FileImages, ImageReader
from utils.errors import UserError

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


def read_index(folder: str) -> dict:
    path = os.path.join(folder, INDEX)
    try:
        with open(path) as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"shards: cannot read {path} ({e}); make the shards again with python -m tools.make_shards"
                        ) from None
    if index.get("format") != FORMAT:
        raise UserError(f"shards: {path} is not an index this code wrote (format {index.get('format')!r}); make the "
                        "shards again with python -m tools.make_shards")
    return index


def check_shards(folder: str, index: dict):
    """Each shard is there, has the size the index records, and holds the index's first and last members where
    the index says (two header reads per shard): a truncated shard, or an index of other shards, stops here."""
    for shard in index["shards"]:
        path = os.path.join(folder, shard["name"])
        fix = "make the shards again with python -m tools.make_shards"
        if not os.path.isfile(path):
            raise UserError(f"shards: {path} is missing; copy it back or {fix}")
        size = os.path.getsize(path)
        if size != shard["bytes"]:
            raise UserError(f"shards: {path} has {size} bytes, the index says {shard['bytes']} (truncated or "
                            f"replaced); {fix}")
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
                                    f"other shards: {fix}")


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
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = open(os.path.join(self.folder, self.shard_names[shard]), "rb")
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise UserError(f"shards: {self.shard_names[shard]} ends before sample {i} (truncated after the check); "
                            "make the shards again with python -m tools.make_shards")
        return data

    def __getitem__(self, i):
        name, label = self.samples[i]
        img = self.loader(f"{self.folder}/{name}", self.read_bytes(i))
        return (self.transform(img) if self.transform is not None else img), label


def shards(root: str, train: bool, transform=None, reader: ImageReader = None) -> ShardImages:
    return ShardImages(shard_folder(root, train), transform, reader)


def write_shards(dataset, out: str, per_shard: int, progress=None) -> dict:
    """Write `dataset` (a FileImages, image folder or file list: anything with .samples of (path, label) and
    .classes) into tar shards of `per_shard` samples under `out`, and their index; returns the index."""
    os.makedirs(out, exist_ok=True)
    samples, classes = dataset.samples, list(getattr(dataset, "classes", []) or [])
    root = getattr(dataset, "root", "")
    index = {"format": FORMAT, "classes": classes, "shards": [], "samples": []}
    for s, start in enumerate(range(0, len(samples), per_shard)):
        name = f"shard-{s:05d}.tar"
        tmp = os.path.join(out, name + ".tmp")
        first = last = None
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
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
        os.replace(tmp, os.path.join(out, name))
        index["shards"].append({"name": name, "bytes": os.path.getsize(os.path.join(out, name)), "first": first,
                                "last": last})
    with open(os.path.join(out, INDEX + ".tmp"), "w") as f:
        json.dump(index, f)
    os.replace(os.path.join(out, INDEX + ".tmp"), os.path.join(out, INDEX))
    return index

