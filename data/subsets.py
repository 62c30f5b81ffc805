"""Few labels: a class-balanced subset of the training set (the semi-supervised protocol's 1 % / 10 %), drawn from
a seed of its own so that two methods can be compared on exactly the same images.

`--label-fraction F` keeps round(F * n_c) images of each class c (at least one), `--labels-per-class N` keeps N
of each; `--subset-seed` draws them (default 0, whatever --seed is); `--subset-file` reuses a list (one index per
line, as written to <output-dir>/subset.txt). Fine-tuning and the linear probe train on the subset; the
pretraining scripts use it as the kNN monitor's memory bank. Every rank computes the same subset.
"""
import copy
import os

import torch
from torch.utils.data import Subset

from utils.errors import UserError
from utils.flags import count, fraction, input_file, integer
from utils.textfile import text_lines

SUBSET_FILE = "subset.txt"


def add_subset_args(parser, what: str):
    """The few-label flags; `what` says what the subset is for (the training set, the kNN memory bank)."""
    g = parser.add_argument_group(f"few labels ({what})")
    g.add_argument("--label-fraction", type=fraction(high_closed=True), default=None, metavar="F",
                   help=f"keep this fraction (0 < F <= 1) of each class's images as {what}")
    g.add_argument("--labels-per-class", type=count(), default=None, metavar="N",
                   help=f"keep N images of each class as {what}")
    g.add_argument("--subset-seed", type=integer(low=0), default=0, help="seed of the subset's draw (not --seed)")
    g.add_argument("--subset-file", type=input_file(), default=None,
                   help=f"{what} from a file of training-set indices (e.g. a run's {SUBSET_FILE}) or file names "
                        "(SimCLR's ImageNet 1 %% / 10 %% lists), one per line")
    return g


def class_balanced_subset(targets, fraction: float = None, per_class: int = None, seed: int = 0) -> list:
    """Sorted indices: per class c of n_c images, max(1, round(fraction * n_c)) of them, or `per_class`, drawn
    without replacement by a generator seeded with `seed` (class by class, in class order)."""
    if (fraction is None) == (per_class is None):
        raise UserError("pass one of --label-fraction and --labels-per-class")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise UserError(f"--label-fraction {fraction} must lie in (0, 1]; e.g. 0.01 or 0.1 for 1 % or 10 % of labels")
    if per_class is not None and per_class < 1:
        raise UserError(f"--labels-per-class {per_class} must be at least 1")
    targets = torch.as_tensor(list(targets), dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for c in torch.unique(targets).tolist():
        members = (targets == c).nonzero()[:, 0]                                  # this class's indices
        k = per_class if per_class is not None else max(1, round(fraction * len(members)))
        if k > len(members):
            raise UserError(f"--labels-per-class {k} is more than class {c} has ({len(members)} images); "
                            f"use at most {len(members)}")
        chosen += members[torch.randperm(len(members), generator=g)[:k]].tolist()
    return sorted(chosen)


def read_subset_file(path: str, n: int, names: list = None) -> list:
    """The subset in `path`, checked against a training set of n images: one index per line, or one file name per
    line (as SimCLR's 1 % / 10 % ImageNet subsets are), matched against `names` (the training set's file paths) by
    base name, or by a longer tail of the path where base names repeat."""
    fix = "pass a file of indices or file names, one per line"
    if not os.path.exists(path):
        raise UserError(f"--subset-file {path} does not exist; {fix}")
    numbered = text_lines(path, f"--subset-file {path}", fix)
    lines = [line for _, line in numbered]
    if lines and not all(line.lstrip("-").isdigit() for line in lines):
        return names_to_indices(path, numbered, names)
    indices = [int(line) for line in lines]
    unknown = next(((k, i) for (k, _), i in zip(numbered, indices) if not 0 <= i < n), None)
    if unknown or not indices:
        what = f"an unknown index (line {unknown[0]}: {unknown[1]} is not in 0..{n - 1})" if unknown else "no index"
        raise UserError(f"--subset-file {path} holds {what} for the {n} training images; write it for this dataset")
    seen = set()
    for (k, _), i in zip(numbered, indices):
        if i in seen:
            raise UserError(f"--subset-file {path} repeats index {i} (line {k}); list each image once")
        seen.add(i)
    return sorted(indices)


def names_to_indices(path: str, numbered: list, names: list) -> list:
    """Sorted training-set indices of the file names in `numbered` ([(line number, name)]; a name: a base name, or
    a path's tail)."""
    if names is None:
        bad = next(line for _, line in numbered if not line.lstrip("-").isdigit())
        raise UserError(f"--subset-file {path}: {bad!r} is not an index; write one integer per line (file names "
                        "work for datasets of files: imagefolder, folder, filelist, shards)")
    index = {}
    for i, p in enumerate(names):
        parts = os.path.normpath(p).split(os.sep)
        for k in range(1, len(parts) + 1):
            index.setdefault("/".join(parts[-k:]), []).append(i)
    chosen = []
    for n, line in numbered:
        hits = index.get(os.path.normpath(line).replace(os.sep, "/").lstrip("./"), [])
        if not hits:
            raise UserError(f"--subset-file {path} line {n}: {line!r} is not a file of the training set; fix the name "
                            "or use the list made for this dataset")
        if len(hits) > 1:
            raise UserError(f"--subset-file {path} line {n}: {line!r} names {len(hits)} training files; write more of "
                            "its path (e.g. class/name.jpg)")
        chosen.append(hits[0])
    if len(set(chosen)) != len(chosen):
        raise UserError(f"--subset-file {path} names an image twice; list each image once")
    return sorted(chosen)


def file_names(dataset) -> list:
    """The training set's file paths (image folders, file lists), or None (in-memory datasets)."""
    return [p for p, _ in dataset.samples] if hasattr(dataset, "samples") else None


def chosen_subset(args, targets, names: list = None) -> list:
    """The few-label subset the flags ask for (indices into the training set), or None for all of it. names: the
    training set's file paths, for a --subset-file of file names."""
    if args.subset_file:
        if args.label_fraction is not None or args.labels_per_class is not None:
            raise UserError("--subset-file fixes the subset; leave out --label-fraction/--labels-per-class")
        return read_subset_file(args.subset_file, len(targets), names)
    if args.label_fraction is None and args.labels_per_class is None:
        return None
    return class_balanced_subset(targets, args.label_fraction, args.labels_per_class, args.subset_seed)


def write_subset(indices: list, output_dir: str):
    with open(os.path.join(output_dir, SUBSET_FILE), "w") as f:
        f.write("".join(f"{i}\n" for i in indices))


def take(dataset, indices: list):
    """`dataset` restricted to `indices`: an image folder stays an image folder (its samples cut), so that both
    data paths read it; other datasets become a torch Subset."""
    if hasattr(dataset, "subset"):                      # data.files / data.shards datasets cut themselves
        return dataset.subset(indices)
    if hasattr(dataset, "samples"):
        folder = copy.copy(dataset)
        folder.samples = [dataset.samples[i] for i in indices]
        folder.imgs = folder.samples
        folder.targets = [s[1] for s in folder.samples]
        return folder
    return Subset(dataset, indices)


class SubsetRecord:
    """The subset's indices, saved in every checkpoint (Method.extra_state); resuming with another subset stops."""

    def __init__(self, indices: list):
        self.indices = list(indices)

    def state_dict(self) -> dict:
        return {"indices": torch.tensor(self.indices, dtype=torch.long)}

    def load_state_dict(self, state: dict):
        saved = state["indices"].tolist()
        if saved != self.indices:
            raise UserError(f"the checkpoint was trained on another subset ({len(saved)} images, not "
                            f"{len(self.indices)}); resume with the same --label-fraction/--labels-per-class/"
                            "--subset-seed or --subset-file, or use another --output-dir")
