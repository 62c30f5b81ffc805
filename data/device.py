"""The on-device data path: a small dataset held on the training device as uint8, batched and augmented there.

`DeviceLoader` is a drop-in for the training DataLoader of `data.loader.build_train_loader`: the same
order (data.loader.GlobalBatchSampler), the same batch structure ((augmented views, labels)), but no worker
processes, no PIL and no host-to-device copies per step. The augmentation's random numbers are drawn per
global batch from a stream seeded by (seed, epoch, batch) (utils.rng.BatchRandom), so they too do not depend
on the number of processes.
"""
import numpy as np
import torch

from data.loader import GlobalBatchSampler
from utils.errors import UserError
from utils.rng import BatchRandom

AUGMENT_STREAM = 1  # key part that keeps the augmentation's stream apart from the training step's

DATA_PATHS = ("auto", "cpu", "device")


def add_data_path_arg(group):
    group.add_argument("--data-path", default="auto", choices=DATA_PATHS,
                       help="device: keep the dataset on the training device as uint8 and augment batches there; "
                            "cpu: PIL transforms in worker processes (the reference's way); auto: device for the "
                            "in-memory datasets (digits, MNIST, Fashion-MNIST, CIFAR), cpu for image folders")


def use_device_path(args, unsupported: str = None) -> bool:
    """Resolve --data-path: True for the on-device path. `unsupported` names a flag the device path lacks."""
    in_memory = args.dataset != "imagefolder"
    if args.data_path == "device":
        if not in_memory:
            raise UserError("--data-path device needs an in-memory dataset (digits, mnist, fashion-mnist, cifar10/100); "
                            "image folders use --data-path cpu")
        if unsupported:
            raise UserError(f"--data-path device does not implement {unsupported}; use --data-path cpu")
        return True
    return args.data_path == "auto" and in_memory and not unsupported


def uint8_images(dataset):
    """(images uint8 [N, C, H, W], labels long [N]) of an in-memory dataset (ours or torchvision's CIFAR)."""
    data = np.asarray(dataset.data if hasattr(dataset, "data") else dataset.images)
    if data.dtype != np.uint8:
        raise UserError(f"the on-device path needs uint8 images, this dataset holds {data.dtype}; use --data-path cpu")
    x = torch.from_numpy(np.ascontiguousarray(data))
    x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)                  # [N, H, W] grey or [N, H, W, C]
    return x.contiguous(), torch.as_tensor(list(dataset.targets), dtype=torch.long)


class DeviceLoader:
    """Yields (augment(uint8 batch, rng), labels) for this rank's part of each global batch, on `device`.

    augment(images, rng) draws its random numbers from rng (a BatchRandom reseeded per global batch)."""

    def __init__(self, dataset, global_batch: int, seed: int, device: torch.device, augment,
                 rank: int = None, world: int = None):
        images, labels = uint8_images(dataset)
        self.batch_sampler = GlobalBatchSampler(len(labels), global_batch, seed, rank, world)
        self.images, self.labels = images.to(device), labels.to(device)
        self.rng = BatchRandom(device, self.batch_sampler.rank, self.batch_sampler.world)
        self.device, self.augment, self.seed = device, augment, seed
        self.dataset = dataset

    def __len__(self):
        return len(self.batch_sampler)

    def __iter__(self):
        sampler = self.batch_sampler
        order = sampler.rank_order().to(self.device, non_blocking=True)
        start, sampler._skip = sampler._skip, 0                 # skipped batches are not augmented at all
        for i in range(start, len(self)):
            idx = order[i]
            self.rng.reseed(self.seed, sampler.epoch, i, AUGMENT_STREAM)
            yield self.augment(self.images[idx], self.rng), self.labels[idx]
