"""A script's data, put together: the dataset, its recipe realised on the path --data-path picks, the loader.

`training_data(args, recipe, device)` is the one place that chooses between the two paths: PIL transforms in
loader workers (augment.pil) or batches on the training device (augment.batched, data.device_loaders).
`eval_loader` and `knn_loaders` give the deterministic evaluation views (augment.recipes.eval_view).
"""
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.data import DataLoader

from augment.batched import batched_pipeline
from augment.pil import pil_pipeline
from augment.recipes import eval_view
from data.datasets import build_dataset, get_preset, num_classes_of
from data.device_loaders import DeviceLoader, FolderDeviceLoader
from data.loader import build_eval_loader, build_train_loader, holdout_split
from data.files import BAD_IMAGES, MAX_PIXELS
from data.subsets import SubsetRecord, chosen_subset, file_names, take, write_subset
from utils.dist import get_world_size, is_main_process
from utils.errors import UserError


FILE_DATASETS = ("imagefolder", "folder", "filelist", "shards")   # from files: the CPU path unless --data-path device


def bad_images_log(args):
    """Where --skip-bad-images notes unreadable files (None: without it, an unreadable file stops the run)."""
    return os.path.join(args.output_dir, BAD_IMAGES) if getattr(args, "skip_bad_images", False) else None


def reading(args) -> dict:
    """build_dataset's image-reading keywords from the flags: --skip-bad-images, --max-image-pixels."""
    return {"bad_images": bad_images_log(args), "max_pixels": getattr(args, "max_image_pixels", MAX_PIXELS)}


def use_device_path(args) -> bool:
    """Resolve --data-path: True for the on-device path (auto: the in-memory datasets)."""
    if args.data_path == "device":
        return True
    return args.data_path == "auto" and args.dataset not in FILE_DATASETS


@dataclass
class TrainData:
    dataset: torch.utils.data.Dataset     # what the loader draws from (a Subset when part is held out)
    loader: object                        # a DataLoader, or a data.device_loaders loader
    on_device: bool
    num_classes: int
    held_out: Optional[list] = None       # indices of the training set held out for validation
    subset: Optional[list] = None         # the few-label subset trained on (indices of the training set)

    @property
    def records(self) -> dict:
        """What a checkpoint keeps of the data (Method.extra_state): the few-label subset's indices."""
        return {} if self.subset is None else {"subset": SubsetRecord(self.subset)}

    @property
    def path(self) -> str:
        """The data path, as the scripts' opening log line names it."""
        return "device" if self.on_device else "cpu workers"


def training_data(args, recipe, device: torch.device, holdout: float = 0.0, on_device: bool = None,
                  few_labels: bool = False) -> TrainData:
    """The training set of --dataset and its loader, with `recipe` (augment.recipes) realised on the device path
    (uint8 images on the device, views made there in batches) or the CPU path (PIL in --num-workers workers).
    few_labels: train on the subset the --label-fraction/--labels-per-class/--subset-file flags choose (written
    to <output-dir>/subset.txt). holdout > 0 keeps a fixed random fraction of that aside (TrainData.held_out).
    on_device overrides --data-path (False: the CPU path)."""
    on_device = use_device_path(args) if on_device is None else on_device
    if on_device:
        try:
            augment = batched_pipeline(recipe)
        except ValueError as e:
            raise UserError(f"--data-path device cannot make this recipe's views ({e}); use --data-path cpu") from e
        if args.compile:
            augment.compile(args.compile, getattr(args, "compile_backend", "inductor"))
    dataset = build_dataset(args.dataset, args.data_root, train=True, download=args.download,
                            transform=None if on_device else pil_pipeline(recipe), cache_dir=args.output_dir,
                            **reading(args))
    num_classes, held = num_classes_of(dataset), None
    if few_labels and num_classes == 0:
        raise UserError(f"--dataset {args.dataset} --data-root {args.data_root} has no labels, and this script trains "
                        "a classifier; pass a labelled set (imagefolder, or a filelist with a label on each line)")
    subset = chosen_subset(args, dataset.targets, file_names(dataset)) if few_labels else None
    if subset is not None and is_main_process():
        write_subset(subset, args.output_dir)
    keep = subset
    if holdout:
        base = subset if subset is not None else range(len(dataset))
        kept, held_pos = holdout_split(len(base), holdout, args.seed)
        keep, held = [base[p] for p in kept], [base[p] for p in held_pos]
    if keep is not None:
        dataset = take(dataset, keep)
    if not on_device:
        loader = build_train_loader(dataset, args.batch_size, args.num_workers, args.seed, device)
    elif hasattr(dataset, "samples"):
        loader = FolderDeviceLoader(dataset, args.batch_size, args.seed, device, augment, args.num_workers)
    else:
        loader = DeviceLoader(dataset, args.batch_size, args.seed, device, augment)
    return TrainData(dataset, loader, on_device, num_classes, held, subset)


def eval_loader(args, view, device: torch.device, batch: int, train: bool = False, indices=None) -> DataLoader:
    """A sharded, ordered loader of the test split (or the training split, or `indices` of it) through the
    deterministic `view` (PIL, in --num-workers workers)."""
    dataset = build_dataset(args.dataset, args.data_root, train=train, transform=pil_pipeline(view),
                            download=args.download, cache_dir=args.output_dir, **reading(args))
    if indices is not None:
        dataset = take(dataset, indices)
    return build_eval_loader(dataset, batch, args.num_workers, device)


def knn_source(args, labelled: bool = True):
    """(dataset, root) of the kNN monitor's labelled set: --knn-data NAME[:ROOT], else the training set itself;
    None when the training set has no labels (labelled False) and --knn-data is not given (no kNN then)."""
    spec = getattr(args, "knn_data", None)
    if spec:
        name, _, root = spec.partition(":")
        return name, root or None
    return (args.dataset, args.data_root) if labelled else None


def knn_loaders(args, preset, device: torch.device, labelled: bool = True):
    """(memory-bank loader, query loader, classes) of the kNN monitor, or None when there is no labelled set to
    monitor with (knn_source). The bank is the labelled set's training split (or the few-label subset its flags
    choose, written to <output-dir>/subset.txt), the queries its test split, through the evaluation view at the
    training size and normalisation, batch --batch-size / processes."""
    source = knn_source(args, labelled)
    if source is None:
        return None
    name, root = source
    flag = f"--knn-data {args.knn_data}" if getattr(args, "knn_data", None) else f"--dataset {name}"
    view = eval_view(get_preset(name), args.img_size, mean=preset.mean, std=preset.std)
    batch = max(1, args.batch_size // get_world_size())
    def build(train: bool):
        try:
            return build_dataset(name, root, train=train, transform=pil_pipeline(view), download=args.download,
                                 **reading(args))
        except UserError as e:                         # its messages name --data-root: say which flag it was
            if not getattr(args, "knn_data", None):
                raise
            raise UserError(f"--knn-data {args.knn_data}: {str(e).replace('--data-root', 'its ROOT')}") from None

    bank = build(True)
    classes = num_classes_of(bank)
    if classes == 0:
        raise UserError(f"{flag}: the kNN monitor needs labels and {root or name} has none; point --knn-data at a "
                        "labelled set (imagefolder:DIR, filelist:DIR with labels, or a named dataset), or pass "
                        "--knn-every 0")
    subset = chosen_subset(args, bank.targets, file_names(bank))
    if subset is not None:
        bank = take(bank, subset)
        if is_main_process():
            write_subset(subset, args.output_dir)
    test = build(False)
    return build_eval_loader(bank, batch, args.num_workers, device), build_eval_loader(test, batch, args.num_workers,
                                                                                       device), classes


def knn_setup(args, preset, device: torch.device, backbone, amp, data: TrainData):
    """The pretraining scripts' kNN monitor: (evaluate(epoch) or None, notes for report.md). None with a note when
    the training images (data) have no labels and --knn-data names no labelled set."""
    from utils.knn import knn_monitor
    if args.knn_every <= 0:
        return None, []
    loaders = knn_loaders(args, preset, device, labelled=data.num_classes > 0)
    if loaders is None:
        return None, [NO_KNN_NOTE]
    return knn_monitor(backbone, *loaders, device, amp, args.knn_k, args.knn_t), []


NO_KNN_NOTE = ("no kNN was run: the training images have no labels; pass --knn-data (e.g. imagefolder:DIR) to "
               "monitor with a labelled set")
