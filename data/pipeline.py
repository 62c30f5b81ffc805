"""A script's data, put together: the dataset, its recipe realised on the path --data-path picks, the loader.

`training_data(args, recipe, device)` is the one place that chooses between the two paths: PIL transforms in
loader workers (augment.pil) or batches on the training device (augment.batched, data.device_loaders).
`eval_loader` and `knn_loaders` give the deterministic evaluation views (augment.recipes.eval_view).
"""
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.data import DataLoader

from augment.batched import batched_pipeline
from augment.pil import pil_pipeline
from augment.recipes import eval_view
from data.datasets import build_dataset, num_classes_of
from data.device_loaders import DeviceLoader, FolderDeviceLoader
from data.loader import build_eval_loader, build_train_loader, holdout_split
from data.subsets import SubsetRecord, chosen_subset, take, write_subset
from utils.dist import get_world_size, is_main_process
from utils.errors import UserError


def use_device_path(args) -> bool:
    """Resolve --data-path: True for the on-device path (auto: the in-memory datasets)."""
    if args.data_path == "device":
        return True
    return args.data_path == "auto" and args.dataset != "imagefolder"


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
            augment.compile(args.compile)
    dataset = build_dataset(args.dataset, args.data_root, train=True, download=args.download,
                            transform=None if on_device else pil_pipeline(recipe))
    num_classes, held = num_classes_of(dataset), None
    subset = chosen_subset(args, dataset.targets) if few_labels else None
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
                            download=args.download)
    if indices is not None:
        dataset = take(dataset, indices)
    return build_eval_loader(dataset, batch, args.num_workers, device)


def knn_loaders(args, preset, device: torch.device):
    """(memory-bank loader, query loader, classes) of the kNN monitor: the training split (or the few-label subset
    its flags choose, written to <output-dir>/subset.txt) and the test split, through the evaluation view, batch
    --batch-size / processes."""
    view = eval_view(preset, args.img_size)
    batch = max(1, args.batch_size // get_world_size())
    bank = build_dataset(args.dataset, args.data_root, train=True, transform=pil_pipeline(view), download=args.download)
    classes = num_classes_of(bank)
    subset = chosen_subset(args, bank.targets)
    if subset is not None:
        bank = take(bank, subset)
        if is_main_process():
            write_subset(subset, args.output_dir)
    return build_eval_loader(bank, batch, args.num_workers, device), eval_loader(args, view, device, batch), classes
