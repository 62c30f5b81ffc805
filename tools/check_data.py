"""Check a dataset before a long run: every file opened and decoded, in parallel, with a progress line, resumable.

    python -m tools.check_data ROOT                 # an ImageNet-style folder, any folder of images, or a file list
    python -m tools.check_data ROOT --workers 16 --state check.jsonl   # a big set: rerun to continue where it stopped

Reports: files that do not decode, empty and tiny images, grey / CMYK / alpha / 16-bit counts, duplicate files
(same bytes), classes per split and the classes one split has and the other lacks, image size statistics. Writes
the report as JSON (--out) and a summary on the terminal. Exit status 0: nothing wrong; 1: defects found (each
named); 2: bad input.
"""
import contextlib
import functools
import hashlib
import io
import json
import os
import sys
import time
from collections import Counter
from multiprocessing import Pool

from PIL import Image

from data.files import MAX_PIXELS, list_paths, open_image, read_list, scan_images
from utils.config import ArgumentParser
from utils.errors import UserError, exit_on_user_error
from utils.flags import count, data_root, output_file
from utils.textfile import read_text

LAYOUTS = ("auto", "imagefolder", "folder", "filelist")
GREY = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


def detect_layout(root: str) -> str:
    if os.path.isfile(root) or os.path.isfile(os.path.join(root, "train.txt")):
        return "filelist"
    splits = [os.path.join(root, s) for s in ("train", "val")]
    if all(os.path.isdir(s) for s in splits) and any(
            os.path.isdir(os.path.join(splits[0], d)) for d in os.listdir(splits[0])):
        return "imagefolder"
    return "folder"


def gather(root: str, layout: str, skipped: dict = None) -> dict:
    """{split: [(path, class name or None)]} of the dataset at root; skipped ({kind: [paths]}) gets what a folder
    scan left out (data.files.scan_images)."""
    if layout == "filelist":
        paths = list_paths(root)
        return {split: read_list(p) for split, p in paths.items() if p}
    skipped = {} if skipped is None else skipped

    def scan(folder):
        left = {}
        names = scan_images(folder, left)
        for kind, items in left.items():
            skipped.setdefault(kind, []).extend(os.path.join(folder, n) for n in items)
        return names

    if layout == "imagefolder":
        out = {}
        for split in ("train", "val"):
            folder = os.path.join(root, split)
            if not os.path.isdir(folder):
                raise UserError(f"check_data: {folder} is not a folder; an ImageNet-style root holds train/ and val/")
            out[split] = [(os.path.join(folder, n), n.split(os.sep)[0]) for n in scan(folder) if os.sep in n]
        return out
    if not os.path.isdir(root):
        raise UserError(f"check_data: {root} does not exist; pass a folder of images or a list file")
    return {"all": [(os.path.join(root, n), None) for n in scan(root)]}


def inspect(path: str, max_pixels: int = MAX_PIXELS) -> dict:
    """One file: bytes, hash, and what PIL decodes (mode, size) or why it cannot (any error a damaged file raises;
    an image of more than max_pixels pixels is not decoded: `too_large`)."""
    record = {"path": path}
    try:
        with open(path, "rb") as f:
            data = f.read()
        record.update(bytes=len(data), sha1=hashlib.sha1(data).hexdigest())
        img = open_image(io.BytesIO(data), max_pixels)            # the scripts' reader, before its RGB conversion
        record.update(mode=img.mode, width=img.width, height=img.height, transparency="transparency" in img.info)
    except Image.DecompressionBombError as e:
        record["too_large"] = str(e)
    except Exception as e:  # noqa: BLE001  (a damaged file can fail in many ways inside PIL)
        record["error"] = f"{type(e).__name__}: {e}"[:200]
    return record


def is_record(r) -> bool:
    """r is what inspect() returns: a path, and its bytes and hash unless it could not be opened, and an error,
    a too-large size or what PIL decoded."""
    return (isinstance(r, dict) and isinstance(r.get("path"), str)
            and ("error" in r or (isinstance(r.get("bytes"), int) and isinstance(r.get("sha1"), str)))
            and ("error" in r or "too_large" in r or all(k in r for k in ("mode", "width", "height"))))


def read_state(state: str) -> dict:
    """{path: record} of a --state file this tool wrote (JSON lines); a last line cut by a kill is checked again.
    Anything else (another kind of file, a record without its fields) is one line naming the file and line."""
    fix = "pass the --state file an earlier check wrote, or a new path"
    lines = read_text(state, f"--state {state}", fix).splitlines()
    done = {}
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError:
            if n == len(lines):
                continue                                       # a line cut by a kill: checked again
            r = None
        if not is_record(r):
            raise UserError(f"--state {state} line {n} is not a record of tools.check_data; {fix}")
        done[r["path"]] = r
    return done


def inspect_all(paths: list, workers: int, state: str = None, max_pixels: int = MAX_PIXELS) -> dict:
    """{path: record}, in parallel; with `state`, records already there are reused and new ones appended."""
    done = read_state(state) if state and os.path.isfile(state) else {}
    todo = [p for p in paths if p not in done]
    sink = open(state, "a") if state else None
    start, last = time.perf_counter(), 0.0
    one = functools.partial(inspect, max_pixels=max_pixels)
    try:
        with Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
            results = pool.imap_unordered(one, todo, chunksize=64) if pool else map(one, todo)
            for i, record in enumerate(results, start=1):
                done[record["path"]] = record
                if sink:
                    sink.write(json.dumps(record) + "\n")
                now = time.perf_counter()
                if now - last > 2 or i == len(todo):
                    last = now
                    rate = i / max(now - start, 1e-9)
                    print(f"\rchecked {len(done)}/{len(paths)} files ({rate:.0f}/s)", end="", file=sys.stderr)
    finally:
        if sink:
            sink.close()
    if todo:
        print(file=sys.stderr)
    return done


def percentiles(values: list) -> dict:
    if not values:
        return {}
    v = sorted(values)
    pick = lambda q: v[min(len(v) - 1, int(q * (len(v) - 1) + 0.5))]  # noqa: E731
    return {"min": v[0], "p5": pick(0.05), "median": pick(0.5), "p95": pick(0.95), "max": v[-1]}


def report(splits: dict, records: dict, min_size: int, skipped: dict = None) -> dict:
    """The findings: defects (each a list of paths or names) and the statistics. skipped: {kind: [paths]} the
    scan left out (broken links are a defect)."""
    skipped = skipped or {}
    every = [p for items in splits.values() for p, _ in items]
    recs = [records[p] for p in every]
    good = [r for r in recs if "error" not in r and "too_large" not in r]
    by_hash = {}
    for r in recs:
        if r.get("bytes"):
            by_hash.setdefault(r["sha1"], []).append(r["path"])
    classes = {s: sorted({c for _, c in items if c is not None}) for s, items in splits.items()}
    labelled = [s for s in classes if classes[s]]
    disagree = {}
    if len(labelled) == 2:
        a, b = labelled
        disagree = {f"only in {a}": sorted(set(classes[a]) - set(classes[b])),
                    f"only in {b}": sorted(set(classes[b]) - set(classes[a]))}
    defects = {
        "undecodable": sorted(r["path"] for r in recs if "error" in r and r.get("bytes")),
        "empty": sorted(r["path"] for r in recs if r.get("bytes") == 0),
        "unreadable": sorted(r["path"] for r in recs if "error" in r and "bytes" not in r),
        "too_large": sorted(r["path"] for r in recs if "too_large" in r),
        "broken_links": sorted(skipped.get("broken_links", [])),
        "tiny": sorted(r["path"] for r in good if min(r["width"], r["height"]) < min_size),
        "duplicates": sorted(sorted(paths) for paths in by_hash.values() if len(paths) > 1),
        "class_disagreement": {k: v for k, v in disagree.items() if v},
        "no_images": [s for s, items in splits.items() if not items],
    }
    modes = Counter(r["mode"] for r in good)
    stats = {
        "files": {s: len(items) for s, items in splits.items()},
        "skipped": {kind: len(items) for kind, items in skipped.items()},
        "classes": {s: len(c) for s, c in classes.items()},
        "modes": dict(modes),
        "grey": sum(n for m, n in modes.items() if m in GREY),
        "cmyk": modes.get("CMYK", 0),
        "alpha": sum(1 for r in good if r["mode"] in ALPHA or (r["mode"] == "P" and r.get("transparency"))),
        "sixteen_bit": sum(n for m, n in modes.items() if m.startswith("I;16") or m == "I"),
        "width": percentiles([r["width"] for r in good]),
        "height": percentiles([r["height"] for r in good]),
    }
    return {"defects": defects, "stats": stats, "clean": not any(defects.values())}


def summary_lines(result: dict) -> list:
    s, d = result["stats"], result["defects"]
    lines = [f"files: {s['files']}, classes: {s['classes']}",
             f"modes: {s['modes']} (grey {s['grey']}, CMYK {s['cmyk']}, alpha {s['alpha']}, 16-bit {s['sixteen_bit']})",
             f"width: {s['width']}", f"height: {s['height']}"]
    for name, found in d.items():
        if found:
            shown = found if isinstance(found, dict) else found[:5]
            more = "" if isinstance(found, dict) or len(found) <= 5 else f" (and {len(found) - 5} more)"
            lines.append(f"DEFECT {name}: {len(found)}: {shown}{more}")
    lines.append("clean: nothing wrong found" if result["clean"] else "defects found (see above)")
    return lines


def get_args_parser():
    p = ArgumentParser(description=__doc__.split("\n")[0], prog="python -m tools.check_data")
    p.add_argument("root", type=data_root(), help="the dataset: an ImageNet-style folder, any folder, or a file list")
    p.add_argument("--layout", default="auto", choices=LAYOUTS, help="how to read ROOT (auto: guessed from it)")
    p.add_argument("--workers", type=count(zero="check in this process"), default=min(8, os.cpu_count() or 1),
                   help="processes that open the files")
    p.add_argument("--min-size", type=count(), default=16, help="an image with a side shorter than this is tiny")
    p.add_argument("--max-image-pixels", type=count(zero="no limit"), default=MAX_PIXELS, metavar="N",
                   help="an image of more pixels is a defect (too_large), as the training scripts refuse it")
    p.add_argument("--out", type=output_file(), default=None, help="write the full report (JSON) here")
    p.add_argument("--state", type=output_file(), default=None,
                   help="keep each file's result here (JSON lines); a rerun skips the files already checked")
    return p


@exit_on_user_error
def main(args) -> dict:
    layout = detect_layout(args.root) if args.layout == "auto" else args.layout
    skipped = {}
    splits = gather(args.root, layout, skipped)
    paths = sorted({p for items in splits.values() for p, _ in items})
    records = inspect_all(paths, args.workers, args.state, args.max_image_pixels)
    result = {"root": os.path.abspath(args.root), "layout": layout,
              **report(splits, records, args.min_size, skipped)}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print("\n".join(summary_lines(result)))
    return result


if __name__ == "__main__":
    result = main(get_args_parser().parse_args())
    sys.exit(0 if result["clean"] else 1)
