"""python -m bench --files: the CPU-worker path reading a synthetic JPEG folder against the same images as tar shards
(data.shards), with 1 and 2 workers. On a local disk the two are close; shards pay off where opening millions of
small files is what costs (network filesystems), which this machine cannot show."""
import shutil
import tempfile

import torch

from augment.pil import pil_pipeline
from augment.recipes import lincls_view
from data.datasets import build_dataset, get_preset
from data.loader import build_train_loader
from data.shards import write_shards
from bench.pipeline import data_rate, jpeg_folder


def files_vs_shards(images: int, size: int, crop: int, batch: int, batches: int, workers=(1, 2)) -> list:
    """[{'bench': 'files_vs_shards', 'source': 'folder' | 'shards', 'workers': w, 'img_per_s': ...}, ...]"""
    root = jpeg_folder(images, size)
    out = tempfile.mkdtemp(prefix="bench-shards-")
    try:
        write_shards(build_dataset("imagefolder", root, train=True), out, per_shard=max(1, images // 4))
        view = pil_pipeline(lincls_view(get_preset("imagefolder"), crop))
        sources = {"folder": lambda: build_dataset("imagefolder", root, train=True, transform=view),
                   "shards": lambda: build_dataset("shards", out, train=True, transform=view)}
        records, cpu = [], torch.device("cpu")
        for w in workers:
            for name, make in sources.items():
                rate = data_rate(lambda: build_train_loader(make(), batch, w, 0, cpu), cpu, batches, 1, batch)
                records.append({"bench": "files_vs_shards", "source": name, "workers": w, "images": images,
                                "size": size, "crop": crop, "batch": batch, "img_per_s": round(rate, 1)})
        return records
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)

