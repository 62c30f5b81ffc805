"""The on-device data path's loaders: images are augmented in batches on the training device.

`DeviceLoader`: a small dataset held on the device as uint8, no worker processes, no PIL, no host-to-device
copies per step. `FolderDeviceLoader`: an image folder whose JPEGs workers only read, decoded in batches on
the GPU (torchvision.io.decode_jpeg; on a CPU the workers decode them), cropped image by image, then
augmented in batches. Both are drop-ins for the training DataLoader of `data.loader.build_train_loader`:
the same order (data.loader.GlobalBatchSampler), the same batch structure ((augmented views, labels)). The
augmentation's random numbers are drawn per global batch from a stream seeded by (seed, epoch, batch)
(utils.rng.BatchRandom), so they do not depend on the number of processes either.
"""
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from data.files import STAND_IN_GREY, STAND_IN_SIZE, ImageReader
from data.loader import GlobalBatchSampler
from utils.errors import UserError, describe
from utils.rng import BatchRandom
from utils.transfer import to_device, to_device_once
from utils.runtime import seed_worker

# torchvision 0.29 deprecates its decoders for TorchCodec (docs/SPEED.md); the pinned version has them
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities", category=DeprecationWarning)

AUGMENT_STREAM = 1  # key part that keeps the augmentation's stream apart from the training step's


def uint8_images(dataset):
    """(images uint8 [N, C, H, W], labels long [N]) of an in-memory dataset (ours or torchvision's CIFAR),
    or of a torch Subset of one."""
    if isinstance(dataset, Subset):
        images, labels = uint8_images(dataset.dataset)
        idx = torch.as_tensor(list(dataset.indices), dtype=torch.long)
        return images[idx], labels[idx]
    data = np.asarray(dataset.data if hasattr(dataset, "data") else dataset.images)
    if data.dtype != np.uint8:
        raise UserError(f"the on-device path needs uint8 images, this dataset holds {data.dtype}; use --data-path cpu")
    x = torch.from_numpy(np.ascontiguousarray(data))
    x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)                  # [N, H, W] grey or [N, H, W, C]
    return x.contiguous(), torch.as_tensor(list(dataset.targets), dtype=torch.long)


class DeviceLoader:
    """Yields (augment(uint8 batch, rng), labels) for this rank's part of each global batch, on `device` (the
    batch as it is when augment is None).

    augment(images, rng) draws its random numbers from rng (a BatchRandom reseeded per global batch:
    `reseed(i)` for global batch i of the current epoch)."""

    def __init__(self, dataset, global_batch: int, seed: int, device: torch.device, augment,
                 rank: int = None, world: int = None):
        images, labels = uint8_images(dataset)
        self._setup(dataset, len(labels), global_batch, seed, device, augment, rank, world)
        self.images, self.labels = images.to(device), labels.to(device)

    def _setup(self, dataset, n, global_batch, seed, device, augment, rank, world):
        self.batch_sampler = GlobalBatchSampler(n, global_batch, seed, rank, world)
        # the views' random numbers are drawn and worked out on the CPU (the same for any device), then moved
        self.rng = BatchRandom("cpu", self.batch_sampler.rank, self.batch_sampler.world)
        self.dataset, self.seed, self.device, self.augment = dataset, seed, device, augment

    def __len__(self):
        return len(self.batch_sampler)

    def __iter__(self):
        sampler = self.batch_sampler
        order = to_device(sampler.rank_order(), self.device)
        for i in range(sampler.take_start(), len(self)):       # skipped batches are not augmented at all
            idx = order[i]
            images = self.images[idx]
            yield (images if self.augment is None else self.augment(images, self.reseed(i))), self.labels[idx]

    def reseed(self, i: int) -> BatchRandom:
        return self.rng.reseed(self.seed, self.batch_sampler.epoch, i, AUGMENT_STREAM)


class TensorLoader(DeviceLoader):
    """The tensors of a TensorDataset (features, labels), held on `device`, in DeviceLoader's order: (x[idx],
    y[idx]) for this rank's part of each global batch. For data with nothing random to draw per sample (the
    linear probe's cached features): no workers, no per-sample seeding, one gather per batch."""

    def __init__(self, dataset, global_batch: int, seed: int, device: torch.device, rank: int = None,
                 world: int = None):
        self._setup(dataset, len(dataset), global_batch, seed, device, None, rank, world)    # augment None
        self.images, self.labels = (to_device_once(t, device) for t in dataset.tensors)   # once: no pinning


JPEG_MAGIC = (0xFF, 0xD8)
SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}   # start-of-frame markers (not DHT, JPG, DAC)


def jpeg_components(data: bytes) -> int:
    """The number of colour components a JPEG's frame header declares (1 grey, 3 YCbCr, 4 CMYK/YCCK), 0 when no
    frame header is found (not a JPEG, or a broken one)."""
    return jpeg_frame(data)[0]


def jpeg_frame(data: bytes) -> tuple:
    """(components, height, width) of a JPEG's frame header; (0, 0, 0) when none is found."""
    if data[:2] != bytes(JPEG_MAGIC):
        return 0, 0, 0
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return 0, 0, 0
        marker = data[i + 1]
        if marker == 0xFF:                                       # fill byte
            i += 1
            continue
        if marker in SOF_MARKERS:
            return data[i + 9], data[i + 5] << 8 | data[i + 6], data[i + 7] << 8 | data[i + 8]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:     # markers without a length
            i += 2
            continue
        i += 2 + (data[i + 2] << 8 | data[i + 3])
    return 0, 0, 0


def pil_tensor(img) -> torch.Tensor:
    """A PIL RGB image as uint8 [3, h, w]."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class EncodedImages(Dataset):
    """An image folder's samples as (image, label, index): a grey or colour JPEG's bytes (uint8 [L]) to decode on
    the device, or, with decode=True or for every other file (PNG, WebP, BMP, TIFF, CMYK JPEGs, ...), the image
    decoded to RGB (uint8 [3, h, w]) the way the CPU path decodes it (data.files.to_rgb, through the folder's
    reader, which also applies --skip-bad-images)."""

    def __init__(self, folder, decode: bool):
        self.samples, self.decode = folder.samples, decode
        self.reader = getattr(folder, "loader", None) or ImageReader()
        self.read_bytes = getattr(folder, "read_bytes", None)        # shards: a member's bytes, by seeking

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        try:
            if self.read_bytes is not None:
                raw = self.read_bytes(i)
            else:
                with open(path, "rb") as f:   # (read_file's tensor cannot be sent back from a worker process)
                    raw = f.read()
        except OSError:
            return pil_tensor(self.reader(path)), label, i          # stops with one line, or a stand-in
        components, height, width = jpeg_frame(raw)
        fits = getattr(self.reader, "fits", None)                 # (a reader of our own: --max-image-pixels)
        if components not in (1, 3) or (fits is not None and not fits(height, width)):   # PIL refuses, or a stand-in
            return pil_tensor(self.reader(path, raw)), label, i
        data = torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).copy())
        if self.decode:
            try:
                data = decode_image(data, mode=ImageReadMode.RGB)
            except (RuntimeError, ValueError):
                return pil_tensor(self.reader(path, raw)), label, i
        return data, label, i


def _as_list(batch):
    data, labels, idx = zip(*batch)
    return list(data), torch.tensor(labels), list(idx)


def order_decoder(device: torch.device):
    """Before a batched GPU decode: wait for the kernels already queued on the current stream. nvJPEG decodes on
    its own stream, and some torchvision versions do not order its outputs with the caller's stream, so a decode
    could overwrite memory that earlier kernels of the training step still read. One stream sync per batch (the
    decode is the batch's first device work, so little waits); nothing on other devices."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


class FolderDeviceLoader(DeviceLoader):
    """An image folder on the device path: `num_workers` processes read the files, the device decodes the
    JPEGs in one batched call (GPU; on a CPU the workers decode, unless worker_decode=False), and augment
    gets the list of images."""

    def __init__(self, folder, global_batch: int, seed: int, device: torch.device, augment, num_workers: int,
                 rank: int = None, world: int = None, worker_decode: bool = None):
        worker_decode = device.type != "cuda" if worker_decode is None else worker_decode
        self._setup(folder, len(folder), global_batch, seed, device, augment, rank, world)
        self.loader = DataLoader(EncodedImages(folder, decode=worker_decode), batch_sampler=self.batch_sampler,
                                 num_workers=num_workers, collate_fn=_as_list, pin_memory=device.type == "cuda",
                                 worker_init_fn=seed_worker)

    def __iter__(self):
        start = self.batch_sampler.next_start                     # the sampler skips (and resets) it itself
        for i, (data, labels, idx) in enumerate(self.loader, start=start):
            images = self.decode(data, idx)
            yield self.augment(images, self.reseed(i)), to_device(labels, self.device)

    def decode(self, data: list, idx: list) -> list:
        """The batch's images on the device, uint8 [3, h, w] each: JPEG bytes decoded there in one call."""
        encoded = [k for k, d in enumerate(data) if d.dim() == 1]
        if encoded:
            order_decoder(self.device)
            try:
                images = decode_jpeg([data[k] for k in encoded], mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:                                  # find (and name) the file it could not decode
                images = [self._decode_one(data[k], idx[k]) for k in encoded]
            for k, img in zip(encoded, images):
                data[k] = img
        return [to_device(img, self.device) for img in data]

    def _decode_one(self, data, i):
        path = self.dataset.samples[i][0]
        try:
            return decode_image(data, mode=ImageReadMode.RGB)
        except RuntimeError as e:
            reader = self.loader.dataset.reader
            if reader.log is None:
                raise UserError(f"cannot read image {path} ({describe(e)}); remove or replace the file, or pass "
                                "--skip-bad-images") from None
            reader.note(path)
            return torch.full((3, STAND_IN_SIZE, STAND_IN_SIZE), STAND_IN_GREY, dtype=torch.uint8)
