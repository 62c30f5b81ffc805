"""The on-device data path: a small dataset held on the training device as uint8, batched and augmented there.

`DeviceLoader` is a drop-in for the training DataLoader of `data.loader.build_train_loader`: the same
per-rank shuffle (a DistributedSampler seeded by (seed, epoch), drop_last), the same batch structure
((augmented views, labels)), but no worker processes, no PIL and no host-to-device copies per step.
"""
import numpy as np
import torch
from torch.utils.data import DistributedSampler

from data.loader import per_rank_batch_size
from utils.dist import get_rank, get_world_size
from utils.errors import UserError

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
    """Yields (augment(uint8 batch), labels) for this rank's share of each global batch, on `device`."""

    def __init__(self, dataset, global_batch: int, seed: int, device: torch.device, augment):
        self.batch = per_rank_batch_size(global_batch)
        images, labels = uint8_images(dataset)
        if len(labels) < global_batch:
            raise UserError(f"--batch-size {global_batch} is larger than the training set ({len(labels)} images); "
                            "use a smaller --batch-size")
        self.images, self.labels = images.to(device), labels.to(device)
        self.sampler = DistributedSampler(range(len(labels)), num_replicas=get_world_size(), rank=get_rank(),
                                          shuffle=True, seed=seed, drop_last=True)
        self.device, self.augment = device, augment
        self.dataset = dataset
        self._skip = 0

    def __len__(self):
        return len(self.sampler) // self.batch

    def skip_next(self, n: int):
        """The next iteration starts at batch n (resuming mid-epoch: skipped batches are not augmented)."""
        self._skip = n

    def __iter__(self):
        order = torch.tensor(list(self.sampler), dtype=torch.long).to(self.device, non_blocking=True)
        start, self._skip = self._skip, 0
        for i in range(start, len(self)):
            idx = order[i * self.batch:(i + 1) * self.batch]
            yield self.augment(self.images[idx]), self.labels[idx]
