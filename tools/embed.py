"""Embeddings to a file, for retrieval, clustering and plots outside our code: the backbone features of every image of
a dataset we read, from any checkpoint the reader takes.

    python -m tools.embed output/quickstart/checkpoint.pth --dataset digits --out digits.npy
    python -m tools.embed r50.pth --dataset imagefolder --data-root IMAGES --split train --out feats.safetensors
    torchrun --nproc_per_node 2 -m tools.embed ...          # the same rows in the same order

Writes OUT (.npy: float32 [N, D]; .safetensors: `features` and `labels`), OUT's labels beside a .npy
(<stem>.labels.npy, when the data has labels) and <stem>.index.txt: one line per row, the image's file path (image
folders, file lists) or its index in the split (in-memory datasets). Images go through the evaluation view (resize
and centre crop at the checkpoint's size, the dataset's normalisation): on the device for the in-memory sets (their
uint8 images moved there, resized with antialiasing as PIL does; --data-path cpu: PIL instead), in --num-workers
workers for files; features are not normalised.
"""
import os

import numpy as np
import torch

from augment.pil import pil_pipeline
from augment.recipes import eval_view
from data import add_data_args, apply_preset
from data.datasets import build_dataset, is_labelled
from data.device_loaders import uint8_images
from data.loader import ShardSampler, build_eval_loader, per_rank_batch_size
from data.pipeline import reading, use_device_path
from models.loading import load_backbone, open_checkpoint
from models.registry import is_registry_name
from utils.config import ArgumentParser
from utils.dist import cleanup, get_world_size, init_distributed, is_main_process
from utils.errors import UserError, exit_on_user_error
from utils.flags import count, device_name, input_weights, text
from utils.knn import extract_features
from utils.log import get_logger, setup_logger
from utils.runtime import AMP_CHOICES, amp_dtype
from utils.transfer import to_device

SPLITS = ("test", "train")


def get_args_parser():
    p = ArgumentParser(description=__doc__.split("\n")[0], prog="python -m tools.embed")
    p.add_argument("checkpoint", type=input_weights(registry=is_registry_name),
                   help="weights: any checkpoint the reader takes, a hub folder or a registry name")
    add_data_args(p, batch_size=256, output_dir="./output/embed")
    p.add_argument("--split", default="test", choices=SPLITS, help="which split of --dataset to embed")
    p.add_argument("--out", type=text("a .npy or .safetensors file to write", check=out_problem), required=True,
                   help="where the features go (.npy, or .safetensors with features and labels)")
    p.add_argument("--device", type=device_name(), default="auto", help="auto: the GPU if one is visible")
    p.add_argument("--amp", default="auto", choices=AMP_CHOICES, help="autocast precision (auto: bf16 on GPU)")
    p.add_argument("--print-freq", type=count(), default=20, help="batches between progress lines (and every 30 s)")
    return p


def out_problem(path: str) -> str:
    if not path.endswith((".npy", ".safetensors")):
        return "must end in .npy or .safetensors"
    folder = os.path.dirname(os.path.abspath(path))
    return "" if os.path.isdir(folder) else f"is in {folder}, which is not an existing folder"


def row_names(dataset) -> list:
    """What each row is: the file path (image folders, lists), else its index in the split."""
    samples = getattr(dataset, "samples", None)
    return [str(s[0]) for s in samples] if samples is not None else [str(i) for i in range(len(dataset))]


class DeviceImages:
    """The device path of an in-memory dataset: its uint8 images moved to the device in ordered batches of this
    process's shard, resized there (antialiased bilinear, as the PIL path's resize) and normalised."""

    def __init__(self, dataset, batch: int, device, size: int, mean, std):
        self.images, self.labels = uint8_images(dataset)
        self.indices = ShardSampler(len(self.labels)).indices
        self.batch_size, self.device, self.size = batch, device, size
        self.mean = to_device(torch.tensor(mean).view(1, -1, 1, 1), device)
        self.std = to_device(torch.tensor(std).view(1, -1, 1, 1), device)

    def __len__(self):
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self):
        from torchvision.transforms.v2.functional import resize
        for start in range(self.indices.start, self.indices.stop, self.batch_size):
            end = min(start + self.batch_size, self.indices.stop)
            x = to_device(self.images[start:end], self.device)
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            if tuple(x.shape[-2:]) != (self.size, self.size):
                x = resize(x, [self.size, self.size], antialias=True)
            yield (x.float() / 255 - self.mean) / self.std, self.labels[start:end]


def write(out: str, features: torch.Tensor, labels, names: list) -> list:
    """The files of one embedding (written through temporary names, then renamed); their paths."""
    stem = out.rsplit(".", 1)[0]
    paths = [out]
    if out.endswith(".safetensors"):
        from safetensors.torch import save_file
        tensors = {"features": features.contiguous(), **({"labels": labels} if labels is not None else {})}
        save_file(tensors, out + ".tmp", metadata={"rows": str(len(names))})
        os.replace(out + ".tmp", out)
    else:
        with open(out + ".tmp", "wb") as f:
            np.save(f, features.numpy())
        os.replace(out + ".tmp", out)
        if labels is not None:
            with open(stem + ".labels.npy.tmp", "wb") as f:
                np.save(f, labels.numpy())
            os.replace(stem + ".labels.npy.tmp", stem + ".labels.npy")
            paths.append(stem + ".labels.npy")
    with open(stem + ".index.txt.tmp", "w", encoding="utf-8") as f:
        f.write("".join(n + "\n" for n in names))
    os.replace(stem + ".index.txt.tmp", stem + ".index.txt")
    return paths + [stem + ".index.txt"]


@exit_on_user_error
def main(args):
    device = init_distributed(args.device, False)
    ck = open_checkpoint(args.checkpoint)
    size = ck.vit_config()["img_size"] if ck.family == "vit" else None
    given = args.img_size
    preset = apply_preset(args)
    if size and given and given != size:
        raise UserError(f"{ck.name} was trained at --img-size {size}, not {given}; pass --img-size {size} or leave "
                        "it out")
    args.img_size = size or given or preset.img_size
    os.makedirs(args.output_dir, exist_ok=True)
    setup_logger(args.output_dir)
    model = load_backbone(ck).to(device)
    view = eval_view(preset, args.img_size)
    on_device = use_device_path(args) and view.crop == "resize"       # the in-memory sets (their eval view: a resize)
    dataset = build_dataset(args.dataset, args.data_root, train=args.split == "train", download=args.download,
                            transform=None if on_device else pil_pipeline(view), cache_dir=args.output_dir,
                            **reading(args))
    batch = max(1, per_rank_batch_size(args.batch_size))
    loader = DeviceImages(dataset, batch, device, args.img_size, view.mean, view.std) if on_device else \
        build_eval_loader(dataset, batch, args.num_workers, device)
    features, labels = extract_features(model, loader, device, amp_dtype(args.amp, device), normalize=False,
                                        print_freq=args.print_freq)
    features, labels = features.cpu(), labels.cpu()
    labelled = is_labelled(dataset)
    paths = []
    if is_main_process():
        paths = write(args.out, features, labels if labelled else None, row_names(dataset))
        get_logger().info(f"wrote {', '.join(paths)}: {features.shape[0]} rows of {features.shape[1]} features "
                          f"({get_world_size()} process(es))")
    cleanup()
    return features, labels, paths


if __name__ == "__main__":
    main(get_args_parser().parse_args())
