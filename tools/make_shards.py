"""Write a dataset as tar shards (webdataset's layout) with an index for random access:

    python -m tools.make_shards SRC OUT [--dataset folder|filelist|imagefolder] [--per-shard 1000]

SRC is read as --dataset reads it (auto: a file list if SRC is a list file or a folder with train.txt, an
ImageNet-style folder if SRC holds train/<class>/ and val/, else every image under SRC). Labelled sets with two
splits get OUT/train and OUT/val. Train on them with `--dataset shards --data-root OUT` (docs/DATA.md). The images'
bytes are stored as they are; the sample order is the dataset's, so a run on the shards is the run on SRC.
"""
import os
import sys

from data.datasets import build_dataset
from data.shards import check_sources, write_shards
from tools.check_data import detect_layout
from utils.config import ArgumentParser
from utils.errors import UserError, exit_on_user_error
from utils.flags import count, data_root, output_folder

LAYOUTS = ("auto", "folder", "filelist", "imagefolder")


def get_args_parser():
    p = ArgumentParser(description=__doc__.split("\n")[0], prog="python -m tools.make_shards")
    p.add_argument("src", type=data_root(), help="the dataset: any folder of images, a file list, or train/ + val/")
    p.add_argument("out", type=output_folder(), help="the folder the shards and index.json go to")
    p.add_argument("--dataset", default="auto", choices=LAYOUTS, help="how to read SRC (auto: guessed from it)")
    p.add_argument("--per-shard", type=count(), default=1000, help="samples per shard")
    return p


def progress(done: int, total: int):
    if done == total or done % 500 == 0:
        print(f"\rwritten {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)


@exit_on_user_error
def main(args) -> dict:
    layout = detect_layout(args.src) if args.dataset == "auto" else args.dataset
    if os.path.abspath(args.out) == os.path.abspath(args.src):
        raise UserError(f"OUT {args.out} is SRC; write the shards to another folder")
    splits = {"": build_dataset(layout, args.src, train=True)}
    try:
        val = build_dataset(layout, args.src, train=False)
        splits = {"train": splits[""], "val": val}
    except UserError:
        if layout == "imagefolder":
            raise
    for dataset in splits.values():                 # every file of every split readable, before anything is written
        check_sources(dataset.samples)
    written = {}
    for name, dataset in splits.items():
        folder = os.path.join(args.out, name) if name else args.out
        index = write_shards(dataset, folder, args.per_shard, progress)
        written[name or "train"] = {"folder": folder, "samples": len(index["samples"]), "shards": len(index["shards"]),
                                    "classes": len(index["classes"])}
        print(f"{folder}: {len(index['samples'])} images in {len(index['shards'])} shard(s), "
              f"{len(index['classes'])} classes")
    return written


if __name__ == "__main__":
    main(get_args_parser().parse_args())
