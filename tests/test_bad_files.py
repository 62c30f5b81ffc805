"""Every kind of file a user hands us, broken every way we can derive from a valid one: each variant either exits
with status 2 and one line naming the file (no traceback), or is the documented successful read.

For each kind (a --config file, a file list, a subset file, a shard index and its shards, an image, a
checkpoint, the image-list cache, tools.check_data's --state, tools.reproduce's row and state) a valid file is
made, `variants` derives broken ones from its bytes (truncated, bytes flipped, other encodings, empty, NUL
bytes, ...) and the kind adds its own (a value made null, an entry removed, a count changed, a path made absent
or looping), and `outcome` reads each through the same door the scripts use.
"""
import io
import json
import os
import random
import struct
import zlib

import pytest
import torch
import yaml
from PIL import Image

import main_pretrain
from data.datasets import build_dataset
from data.files import ImageReader, cached_scan, scan_images
from data.shards import INDEX, write_shards
from data.subsets import read_subset_file
from utils.checkpoint import load_training_checkpoint
from utils.errors import exit_on_user_error

REFUSED, READ = "refused", "read"


def variants(data: bytes, seed: int = 0, flips: int = 6) -> dict:
    """Broken copies of a file's bytes, by kind of damage (half the flipped bytes in the first 64: the header)."""
    rng = random.Random(seed)
    out = {"empty": b"", "one byte": data[:1], "half": data[: len(data) // 2], "all but the last byte": data[:-1],
           "NUL in the middle": data[: len(data) // 2] + b"\0" + data[len(data) // 2:],
           "UTF-16": data.decode("utf-8", "replace").encode("utf-16"),
           "Latin-1 byte": data + b"# caf\xe9\n", "twice": data + data, "random bytes": rng.randbytes(64)}
    for k in range(flips):
        at = rng.randrange(len(data) if k % 2 else min(64, len(data)))
        out[f"byte {at} flipped"] = data[:at] + bytes([data[at] ^ (1 << rng.randrange(8))]) + data[at + 1:]
    return out


def outcome(read, capsys):
    """(READ, value) when the door reads it; (REFUSED, the line) on exit 2 with one line; anything else (a
    traceback from inside) fails the test."""
    capsys.readouterr()
    try:
        value = exit_on_user_error(read)()
    except SystemExit as e:                            # (a note or a progress line before it is not the error)
        err = capsys.readouterr().err.strip().splitlines()
        errors = [line for line in err if line.startswith("error: ")]
        assert e.code == 2 and len(errors) == 1 and err[-1] == errors[0] and "Traceback" not in str(err), err
        return REFUSED, errors[0]
    return READ, value


def every_variant(path, data: bytes, read, capsys, extra: dict = None, seed: int = 0, flips: int = 6) -> dict:
    """{variant: (outcome, value or line)} of each variant written to `path` and read by `read()`."""
    seen = {}
    for name, body in {**variants(data, seed, flips), **(extra or {})}.items():
        path.write_bytes(body if isinstance(body, bytes) else body.encode())
        seen[name] = outcome(read, capsys)
    path.write_bytes(data)
    return seen


def refused(seen: dict, *names, said: str = "") -> None:
    for name in names:
        kind, line = seen[name]
        assert kind == REFUSED and said in line, (name, seen[name])


# ------------------------------------------------------------------------------------------------------ config
CONFIG = {"nepoch": 3, "batch-size": 64, "temperature": 0.2, "crop-scale": [0.2, 1.0], "dataset": "digits",
          "img-size": 32}


def test_config_files(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    data = yaml.safe_dump(CONFIG).encode()
    parse = lambda: main_pretrain.get_args_parser().parse_args(["--config", str(path)])  # noqa: E731
    extra = {
        "BOM and CRLF": b"\xef\xbb\xbf" + data.replace(b"\n", b"\r\n"),
        "a key given twice": data + b"nepoch: 4\n",
        "one flag under two names": data + b"epochs: 4\n",
        "a list one short": data.replace(b"- 0.2\n", b""),
        "a list one long": data.replace(b"- 0.2\n", b"- 0.2\n- 0.5\n"),
        "a list in a list": data.replace(b"- 0.2\n", b"- [0.2]\n"),
        "a comment after a blank value": data.replace(b"temperature: 0.2", b"temperature:   # the softmax T"),
        "a key removed": data.replace(b"nepoch: 3\n", b""),
        "a checkpoint": torch_bytes({"model": {"w": torch.zeros(2)}}),
    }
    for key, value in CONFIG.items():
        extra[f"{key} made null"] = yaml.safe_dump({**CONFIG, key: None}).encode()
    seen = every_variant(path, data, parse, capsys, extra)
    kind, args = seen["BOM and CRLF"]
    assert kind == READ and (args.epochs, args.batch_size, args.crop_scale) == (3, 64, [0.2, 1.0])
    assert seen["a key removed"][0] == READ and seen["a key removed"][1].epochs == 1600
    assert seen["img-size made null"][0] == READ and seen["img-size made null"][1].img_size is None  # its default
    refused(seen, "nepoch made null", "temperature made null", "batch-size made null", "crop-scale made null",
            "dataset made null", "a comment after a blank value", said="is empty (null)")
    refused(seen, "a list one short", "a list one long", said="exactly 2 values")
    refused(seen, "a key given twice", said="given twice")
    refused(seen, "one flag under two names", said="are the same flag")
    refused(seen, "a list in a list", said="plain values")
    refused(seen, "UTF-16", "Latin-1 byte", "NUL in the middle", "a checkpoint", "random bytes", said=str(path))
    for name, (kind, line) in seen.items():
        assert kind == READ or str(path) in line, (name, line)


def torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------- lists and subsets
@pytest.fixture
def images(tmp_path):
    """tmp/img/{a,b}/{0..2}.png: six small images."""
    for c in "ab":
        (tmp_path / "img" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (12, 10), (40 * i, 90 if c == "a" else 0, 0)).save(tmp_path / "img" / c / f"{i}.png")
    return tmp_path / "img"


def test_file_lists(tmp_path, images, capsys):
    lists = tmp_path / "lists"
    lists.mkdir()
    rows = lambda split, labels: "".join(f"../img/{c}/{i}.png {labels[c]}\n" for c in "ab"  # noqa: E731
                                         for i in range(3) if (i < 2) == (split == "train"))
    (lists / "train.txt").write_text(rows("train", {"a": 0, "b": 1}))
    data = rows("val", {"a": 0, "b": 1}).encode()
    (images / "a" / "folder.png").mkdir()
    os.symlink("loop.png", images / "a" / "loop.png")                    # a link to itself
    val = lambda: build_dataset("filelist", str(lists), train=False).samples  # noqa: E731
    expected = [(str(images / c / "2.png"), k) for k, c in enumerate("ab")]
    extra = {
        "BOM and CRLF": b"\xef\xbb\xbf" + data.replace(b"\n", b"\r\n"),
        "blank lines and comments": b"\n# held out\n\n" + data + b"\n   \n",
        "a path made absent": data.replace(b"b/2.png", b"b/9.png"),
        "a path made a folder": data.replace(b"b/2.png", b"a/folder.png"),
        "a path made a loop": data.replace(b"b/2.png", b"a/loop.png"),
        "a label removed": data.replace(b" 1\n", b"\n"),
        "labels made names": data.replace(b" 0\n", b" cat\n").replace(b" 1\n", b" dog\n"),
        "labels mixed": data.replace(b" 1\n", b" dog\n"),
        "every label removed": data.replace(b" 0\n", b"\n").replace(b" 1\n", b"\n"),
        "a label the training list lacks": data.replace(b" 1\n", b" 7\n"),
        "an entry removed": data.split(b"\n", 1)[1],
    }
    seen = every_variant(lists / "val.txt", data, val, capsys, extra)
    assert seen["BOM and CRLF"] == (READ, expected) and seen["blank lines and comments"] == (READ, expected)
    assert seen["an entry removed"] == (READ, expected[1:])
    refused(seen, "a path made absent", "a path made a loop", said="does not exist")
    refused(seen, "a path made a folder", said="a folder, not an image")
    refused(seen, "a label removed", said="has no label while other lines have one")
    refused(seen, "labels made names", said="use the same kind of label in both lists")
    refused(seen, "labels mixed", said="mixes integer labels and class names")
    refused(seen, "every label removed", said="label both lists or neither")
    refused(seen, "a label the training list lacks", said="which")
    refused(seen, "UTF-16", "Latin-1 byte", "NUL in the middle", "random bytes", said="val.txt")


def test_subset_files(tmp_path, capsys):
    path = tmp_path / "subset.txt"
    names = [f"/data/train/{c}/{i}.jpg" for c in "ab" for i in range(5)]
    data = b"1\n4\n7\n"
    read = lambda: read_subset_file(str(path), len(names), names)  # noqa: E731
    extra = {"BOM and CRLF": b"\xef\xbb\xbf1\r\n4\r\n7\r\n", "an index repeated": data + b"4\n",
             "an index out of range": data + b"10\n", "a negative index": data + b"-1\n",
             "names": b"a/1.jpg\nb/2.jpg\n", "a name absent": b"a/1.jpg\nc/2.jpg\n", "a name matching two": b"1.jpg\n"}
    seen = every_variant(path, data, read, capsys, extra)
    assert seen["BOM and CRLF"] == (READ, [1, 4, 7]) and seen["names"] == (READ, [1, 7])
    refused(seen, "an index repeated", said="repeats index 4 (line 4)")
    refused(seen, "an index out of range", "a negative index", said="line 4")
    refused(seen, "a name absent", said="line 2")
    refused(seen, "a name matching two", said="names 2 training files")
    refused(seen, "empty", "UTF-16", "Latin-1 byte", "NUL in the middle", said="--subset-file")


# ------------------------------------------------------------------------------------------------------ shards
def test_shard_indexes_and_shards(tmp_path, images, capsys):
    folder = build_dataset("folder", str(images))
    out = tmp_path / "shards"
    index = write_shards(folder, str(out), per_shard=4)
    data = (out / INDEX).read_bytes()

    def read_all():
        dataset = build_dataset("shards", str(out))
        return [dataset[i][0].size for i in range(len(dataset))]

    def edited(change):
        copy = json.loads(data)
        change(copy)
        return json.dumps(copy).encode()

    extra = {
        "a sample in a shard not listed": edited(lambda x: x["samples"][2].__setitem__(0, 5)),
        "a sample past its shard's end": edited(lambda x: x["samples"][1].__setitem__(1, 10 ** 7)),
        "a sample's size made larger than its shard": edited(lambda x: x["samples"][5].__setitem__(2, 10 ** 7)),
        "a label outside the classes": edited(lambda x: x["samples"][0].__setitem__(3, 3)),
        "a sample entry removed": edited(lambda x: x["samples"].pop(3)),
        "the last sample removed": edited(lambda x: x["samples"].pop()),
        "a shard removed from the list": edited(lambda x: x["shards"].pop()),
        "a shard's size changed": edited(lambda x: x["shards"][0].__setitem__("bytes", x["shards"][0]["bytes"] + 1)),
        "a shard's name made a path": edited(lambda x: x["shards"][0].__setitem__("name", "../x.tar")),
        "a value made null": edited(lambda x: x["samples"][0].__setitem__(1, None)),
        "a count made text": edited(lambda x: x["shards"][1].__setitem__("bytes", "12")),
        "samples made a dict": edited(lambda x: x.__setitem__("samples", {})),
        "another format": edited(lambda x: x.__setitem__("format", "webdataset")),
        "a list, not an object": b"[]",
    }
    seen = every_variant(out / INDEX, data, read_all, capsys, extra)
    assert read_all() == [(12, 10)] * 6
    for name, (kind, line) in seen.items():                 # (a flipped byte may change only a file's name)
        assert kind == READ or "make the shards again" in line or "cannot read image" in line, (name, line)
    refused(seen, *extra, "empty", "half", "twice", "UTF-16", "NUL in the middle", said="make the shards again")
    refused(seen, "a sample in a shard not listed", said="which it does not list")
    refused(seen, "a sample past its shard's end", "a sample's size made larger than its shard", said="outside its")
    refused(seen, "a sample entry removed", "the last sample removed", said="does not agree with itself")
    refused(seen, "a label outside the classes", said="label 3")

    shard = out / index["shards"][0]["name"]                             # now the shards themselves
    body = shard.read_bytes()
    first = index["samples"][0]
    damaged = {"truncated": body[: len(body) // 2], "emptied": b"",
               "an image's bytes flipped": body[:first[1] + 20] + bytes(40) + body[first[1] + 60:]}
    for name, broken in damaged.items():
        shard.write_bytes(broken)
        kind, line = outcome(read_all, capsys)
        assert kind == REFUSED and (str(shard) in line or "cannot read image" in line), (name, line)
    shard.unlink()
    assert outcome(read_all, capsys)[1].endswith("is missing; copy it back or make the shards again with python "
                                                 "-m tools.make_shards")


def test_make_shards_leaves_nothing_behind_when_a_source_breaks(tmp_path, images, capsys, monkeypatch):
    from data import shards
    from tools import make_shards
    out = tmp_path / "out"
    made = outcome(lambda: make_shards.main(make_shards.get_args_parser().parse_args([str(images), str(out)])),
                   capsys)
    assert made[0] == READ and sorted(os.listdir(out)) == ["index.json", "shard-00000.tar"]
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    files = build_dataset("folder", str(images))
    os.remove(images / "b" / "1.png")                                    # gone between the scan and the write
    kind, line = outcome(lambda: write_shards(files, str(out), per_shard=2), capsys)
    assert kind == REFUSED and "b/1.png cannot be read" in line and "nothing was written" in line
    (images / "b" / "1.png").write_bytes(b"")
    monkeypatch.setattr(shards, "check_sources", lambda samples: None)   # a file that goes while it is written
    files.samples.insert(3, (str(images / "c.png"), -1))
    kind, line = outcome(lambda: write_shards(files, str(out), per_shard=2), capsys)
    assert kind == REFUSED and f"writing {out} failed (FileNotFoundError" in line and "nothing was written" in line
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before       # the old set, and nothing else


# ------------------------------------------------------------------------------------------------------ images
def png_of_size(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (1-bit grey) over almost no data: a decompression bomb."""
    chunk = lambda kind, body: (struct.pack(">I", len(body)) + kind + body  # noqa: E731
                                + struct.pack(">I", zlib.crc32(kind + body)))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_images(tmp_path, capsys, fmt):
    path = tmp_path / f"a.{fmt.lower()}"
    buf = io.BytesIO()
    Image.effect_noise((24, 20), 60).convert("RGB").save(buf, fmt)
    data = buf.getvalue()
    strict, lenient = ImageReader(), ImageReader(str(tmp_path / "bad_images.txt"))
    extra = {"a bomb": png_of_size(30000, 30000), "a text file": b"not an image\n"}
    seen = every_variant(path, data, lambda: strict(str(path)).size, capsys, extra, seed=len(fmt), flips=40)
    assert strict(str(path)).size == (24, 20)
    refused(seen, "empty", "one byte", "random bytes", "a text file", said=str(path))
    refused(seen, "a bomb", said="larger than --max-image-pixels")
    for name, (kind, line) in seen.items():
        assert kind == READ or (str(path) in line and "--skip-bad-images" in line), (name, line)
    lenient_reads = every_variant(path, data, lambda: lenient(str(path)).size, capsys, extra, seed=len(fmt), flips=40)
    assert all(kind == READ for kind, _ in lenient_reads.values()), lenient_reads        # a stand-in, never a stop
    logged = (tmp_path / "bad_images.txt").read_text().splitlines()
    assert len(logged) == sum(kind == REFUSED for kind, _ in seen.values()) and set(logged) == {str(path)}


def test_the_image_size_limit_is_the_flags(tmp_path, capsys):
    from data.device_loaders import EncodedImages, jpeg_frame
    Image.new("RGB", (40, 30)).save(tmp_path / "a.jpg")
    kind, line = outcome(lambda: ImageReader(max_pixels=1000)(str(tmp_path / "a.jpg")), capsys)
    assert kind == REFUSED and "larger than --max-image-pixels 1000 (DecompressionBombError: 40x30" in line
    assert ImageReader(max_pixels=1200)(str(tmp_path / "a.jpg")).size == (40, 30)
    (tmp_path / "bomb.png").write_bytes(png_of_size(30000, 30000))
    kind, line = outcome(lambda: ImageReader(max_pixels=0)(str(tmp_path / "bomb.png")), capsys)
    assert kind == REFUSED and "cannot read image" in line and "truncated" in line     # no limit: decoded, and short
    assert jpeg_frame((tmp_path / "a.jpg").read_bytes()) == (3, 30, 40)

    class Folder:                                # the device path routes an over-limit JPEG through the reader
        samples, loader = [(str(tmp_path / "a.jpg"), 0)], ImageReader(str(tmp_path / "bad.txt"), max_pixels=1000)
    image, label, _ = EncodedImages(Folder(), decode=False)[0]
    assert image.shape == (3, 32, 32) and (tmp_path / "bad.txt").read_text() == f"{tmp_path / 'a.jpg'}\n"


# -------------------------------------------------------------------------------------------------- checkpoints
def test_checkpoints(tmp_path, capsys):
    path = tmp_path / "checkpoint.pth"
    data = torch_bytes({"model": {"w": torch.arange(6.0)}, "optimizer": {}, "epoch": 1, "args": {}})
    extra = {"a list": torch_bytes([1, 2]), "no optimizer": torch_bytes({"model": {}, "epoch": 1, "args": {}}),
             "a YAML file": b"nepoch: 3\n"}
    seen = every_variant(path, data, lambda: load_training_checkpoint(str(path))["epoch"], capsys, extra)
    assert load_training_checkpoint(str(path))["epoch"] == 1
    refused(seen, "empty", "half", "one byte", "random bytes", "a list", "no optimizer", "a YAML file", said=str(path))
    for name, (kind, line) in seen.items():
        assert kind == READ or str(path) in line, (name, line)


# ------------------------------------------------------------------------------------------- scans and caches
def test_scans_follow_links_without_loops_and_say_what_they_left_out(tmp_path):
    root = tmp_path / "photos"
    (root / "a").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    for name in ("a/0.png", "a/1.png", "2.jpg", "3.jpg"):
        Image.new("RGB", (8, 8)).save(root / name)
    Image.new("RGB", (8, 8)).save(tmp_path / "elsewhere" / "4.png")
    os.symlink("..", root / "a" / "up")                                  # a loop
    os.symlink(tmp_path / "elsewhere", root / "b")                     # outside the root: followed
    os.symlink(tmp_path / "elsewhere", root / "c")                     # the same folder again
    os.symlink("nowhere.jpg", root / "dead.jpg")
    os.symlink("2.jpg", root / "same.jpg")
    (root / "notes.txt").write_text("x")
    (root / ".hidden.png").write_bytes(b"")
    skipped = {}
    assert scan_images(str(root), skipped) == ["2.jpg", "3.jpg", "a/0.png", "a/1.png", "b/4.png"]
    assert {k: sorted(v) for k, v in skipped.items()} == {
        "broken_links": ["dead.jpg"], "not_images": ["notes.txt"], "hidden": [".hidden.png"],
        "repeats": ["a/up", "c", "same.jpg"]}
    lines = []
    assert len(cached_scan(str(root), str(tmp_path / "out"), log=lines.append)) == 5
    assert lines == [f"folder: 5 images under {root}; left out 6 entries: 1 not images (by extension), 1 hidden, "
                     f"1 broken link(s), 3 reached again through a link (python -m tools.check_data {root} names "
                     "them)"]


def test_an_image_folder_is_torchvisions_but_does_not_follow_a_loop(tmp_path, capsys):
    import torchvision.datasets as tvd
    train = tmp_path / "train"
    for name in ("c0/1.jpg", "c0/2.gif", "c1/x.jpg", "c1/.h.jpg", "c1/a/y.png", "c1/a/b/z.JPG", "c1/a2/w.jpg",
                 "c2/q.webp"):
        (train / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(train / name, "PNG")
    os.symlink(train / "c0", train / "c2" / "linked")                   # a folder linked into another class
    expected = tvd.ImageFolder(str(train)).samples                       # the same files, in the same order
    os.symlink("..", train / "c1" / "a" / "up")                    # torchvision follows it (8 images become 208)
    capsys.readouterr()
    assert build_dataset("imagefolder", str(tmp_path)).samples == expected and len(expected) == 8
    assert capsys.readouterr().err == (f"imagefolder: {train}: left out 1 link(s) to a folder above them (a loop), "
                                       f"e.g. {train / 'c1' / 'a' / 'up'}\n")


def test_the_image_list_cache_is_checked_on_reuse(tmp_path, images, capsys):
    out = tmp_path / "out"
    first = cached_scan(str(images), str(out), log=print)
    cache = out / "image_list.txt"
    data = cache.read_bytes()
    lines = data.decode().splitlines()
    rescan = lambda: cached_scan(str(images), str(out), log=lambda line: None)  # noqa: E731
    extra = {"an entry made absent": "\n".join(lines[:2] + ["a/9.png"] + lines[3:]) + "\n",
             "an entry made a path out": "\n".join(lines[:2] + ["../../etc/passwd.png"] + lines[3:]) + "\n",
             "another root": "\n".join(["# /elsewhere"] + lines[1:]) + "\n",
             "an entry removed": "\n".join(lines[:2] + lines[3:]) + "\n"}
    seen = every_variant(cache, data, rescan, capsys, extra)
    for name, (kind, names) in seen.items():
        assert kind == READ and names == first, name             # each time rebuilt by a scan
    os.remove(images / lines[2])                                  # the run stopped on this file; the user removed it
    said = []
    assert cached_scan(str(images), str(out), log=said.append) == first[:1] + first[2:]
    assert said == [f"folder: {cache} lists 1 file(s) that are gone since it was written (e.g. {lines[2]}); "
                    f"scanning {images} again"]
    assert cache.read_text().splitlines()[1:] == first[:1] + first[2:] + ["# end: 5 images"]


# ------------------------------------------------------------------------------------------------- tool state
def test_check_data_state_files(tmp_path, images, capsys):
    from tools import check_data
    state = tmp_path / "state.jsonl"
    run = lambda: check_data.main(check_data.get_args_parser().parse_args(  # noqa: E731
        [str(images), "--workers", "1", "--state", str(state)]))["stats"]["files"]
    assert outcome(run, capsys)[0] == READ
    data = state.read_bytes()
    records = data.decode().splitlines()
    extra = {"a record cut by a kill": data[:-20], "a record removed": "\n".join(records[1:]) + "\n",
             "a field made null": data.replace(b'"sha1": "', b'"sha1": null, "x": "', 1),
             "a log of another kind": b'{"epoch": 1, "train_loss": 2.0}\n' + data,
             "a list on a line": b"[1, 2]\n" + data}
    seen = every_variant(state, data, run, capsys, extra)
    for name in ("a record cut by a kill", "a record removed", "twice"):
        assert seen[name] == (READ, {"all": 6}), name
    refused(seen, "a field made null", "a log of another kind", "a list on a line", said="is not a record of")
    refused(seen, "UTF-16", "NUL in the middle", said=str(state))
    for name, (kind, line) in seen.items():
        assert kind == READ or str(state) in line, (name, line)


def test_check_data_reports_images_that_fail_as_defects(tmp_path, images, capsys):
    from tools import check_data
    (images / "a" / "bomb.png").write_bytes(png_of_size(30000, 30000))
    (images / "a" / "cut.png").write_bytes((images / "a" / "0.png").read_bytes()[:40])
    os.symlink("gone.png", images / "b" / "dead.png")
    kind, result = outcome(lambda: check_data.main(check_data.get_args_parser().parse_args(
        [str(images), "--workers", "1"])), capsys)
    assert kind == READ and not result["clean"]
    d = result["defects"]
    assert d["too_large"] == [str(images / "a" / "bomb.png")] and d["undecodable"] == [str(images / "a" / "cut.png")]
    assert d["broken_links"] == [str(images / "b" / "dead.png")]


def test_reproduce_rows_and_state(tmp_path, monkeypatch, capsys):
    from tools import reproduce
    rows = tmp_path / "rows"
    rows.mkdir()
    monkeypatch.setattr(reproduce, "ROWS", str(rows))
    good = (reproduce.ROOT + "/configs/rows/asym-siam-multicrop.yaml")
    data = open(good, "rb").read()
    path = rows / "r.yaml"
    row = yaml.safe_load(data)

    def edited(change):
        copy = yaml.safe_load(data)
        change(copy)
        return yaml.safe_dump(copy).encode()

    extra = {"paper value made null": edited(lambda r: r["paper"].__setitem__("value", None)),
             "a stage removed": edited(lambda r: r["stages"].pop()),
             "every stage removed": edited(lambda r: r.__setitem__("stages", [])),
             "a recipe made absent": edited(lambda r: r["stages"][0].__setitem__("config", "configs/nope.yaml")),
             "a script unknown": edited(lambda r: r["stages"][0].__setitem__("script", "train.py")),
             "weights on the first stage": edited(lambda r: r["stages"][0].__setitem__("weights", "--pretrained")),
             "a stage name made a path": edited(lambda r: r["stages"][1].__setitem__("name", "../x")),
             "metric removed": edited(lambda r: r.pop("metric"))}
    seen = every_variant(path, data, lambda: reproduce.load_row("r")["stages"][0]["script"], capsys, extra)
    assert seen["a stage removed"] == (READ, "main_moco.py") and reproduce.load_row("r")["paper"] == row["paper"]
    for name, (kind, line) in seen.items():
        assert (kind == READ and line == "main_moco.py") or (kind == REFUSED and str(path) in line), (name, line)
    refused(seen, *(name for name in extra if name != "a stage removed"), "twice", "empty", "half", said=str(path))

    out = tmp_path / "chain"                                               # the chain's own state
    for stage in row["stages"]:
        (out / stage["name"]).mkdir(parents=True)
        (out / stage["name"] / "report.md").write_text("done\n")
    (out / "lincls" / "checkpoint.pth").write_bytes(torch_bytes({"metrics": {"test_acc1": 50.0}}))
    chain = lambda: reproduce.run_chain(reproduce.load_row("r"), str(out), True, [], log=lambda line: None)  # noqa
    assert outcome(chain, capsys)[1]["ours"] == 50.0                         # every stage done: the report only
    state = out / reproduce.STATE
    seen = every_variant(state, state.read_bytes(), chain, capsys, {
        "another row": b'{"row": "aps-cifar10-vit-small-1600ep", "smoke": true}',
        "the full chain's": b'{"row": "r", "smoke": false}'})
    refused(seen, "another row", said="holds the chain of row aps-cifar10-vit-small-1600ep (smoke), not r (smoke)")
    refused(seen, "the full chain's", said="holds the chain of row r, not r (smoke)")
    for name, (kind, line) in seen.items():
        assert kind == REFUSED and str(out) in line, (name, line)
    os.remove(out / "lincls" / "checkpoint.pth")
    kind, line = outcome(chain, capsys)
    assert kind == REFUSED and "stage lincls finished earlier" in line and "checkpoint.pth is gone" in line
    (out / "lincls" / "checkpoint.pth").write_bytes(b"PK\x03\x04 cut")
    kind, line = outcome(chain, capsys)
    assert kind == REFUSED and "checkpoint" in line and "lincls/checkpoint.pth" in line


# ------------------------------------------------------------------------------------------ through a script
def test_a_run_stopped_on_a_bad_file_reruns_once_it_is_removed(tmp_path, tiny_flags, capsys):
    """The message says: remove the file and rerun the same command. The rerun must not trust the image list
    cached by the first run (it names the removed file)."""
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(8):
        Image.effect_noise((20, 20), 40 + i).convert("RGB").save(root / f"{i}.png")
    (root / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    os.symlink(".", root / "again")                                  # a loop: not 16 images
    argv = tiny_flags + ["--dataset", "folder", "--data-root", str(root), "--img-size", "16", "--nepoch", "1",
                         "--batch-size", "4", "--num-workers", "0", "--knn-every", "0", "--warmup-epochs", "0",
                         "--output-dir", str(tmp_path / "out")]
    run = lambda: main_pretrain.main(main_pretrain.get_args_parser().parse_args(argv))  # noqa: E731
    kind, line = outcome(run, capsys)
    assert kind == REFUSED and f"cannot read image {root / '3.png'}" in line and "remove or replace" in line
    assert (tmp_path / "out" / "image_list.txt").read_text().splitlines()[-1] == "# end: 8 images"
    os.remove(root / "3.png")
    kind, _ = outcome(run, capsys)
    assert kind == READ and (tmp_path / "out" / "image_list.txt").read_text().splitlines()[-1] == "# end: 7 images"


def test_a_bad_knn_data_root_is_named_as_knn_data(tmp_path, tiny_flags, capsys):
    argv = tiny_flags + ["--dataset", "digits", "--img-size", "16", "--nepoch", "1", "--batch-size", "64",
                         "--num-workers", "0", "--knn-data", f"imagefolder:{tmp_path / 'nope'}",
                         "--output-dir", str(tmp_path / "out")]
    kind, line = outcome(lambda: main_pretrain.main(main_pretrain.get_args_parser().parse_args(argv)), capsys)
    assert kind == REFUSED and line.startswith(f"error: --knn-data imagefolder:{tmp_path / 'nope'}: imagefolder:")
    assert "--data-root" not in line and "its ROOT must hold train/" in line


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_idx_files(tmp_path, capsys, gz):
    import gzip

    from data.datasets import read_idx
    raw = bytes([0, 0, 8, 3]) + struct.pack(">III", 2, 4, 4) + bytes(range(32))
    data = gzip.compress(raw, mtime=0) if gz else raw
    path = tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    seen = every_variant(path, data, lambda: read_idx(str(path)).shape, capsys, seed=gz, flips=20)
    assert read_idx(str(path)).shape == (2, 4, 4)
    refused(seen, "empty", "one byte", "half", "UTF-16", "random bytes", said=str(path))
    for name, (kind, line) in seen.items():
        assert (kind == READ and line == (2, 4, 4)) or (kind == REFUSED and str(path) in line), (name, line)
