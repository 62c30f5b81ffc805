"""Full training-step throughput through a data path (CPU workers + PIL, or on-device batches), model FLOPs
and MFU. Used by `python -m bench`; synthetic uint8 images stand in for the dataset (no files needed).
"""
import atexit
import os
import shutil
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from augment.batched import batched_pipeline
from augment.pil import pil_pipeline
from augment.recipes import aps_pair, moco_views
from data.datasets import build_imagefolder, get_preset
from data.device_loaders import DeviceLoader, FolderDeviceLoader
from data.loader import build_train_loader
from models import APS, create_vit
from models.aps import aps_training_steps
from models.moco import build_moco, moco_inputs
from samplers.aps import kept_per_view
from utils.runtime import autocast, compile_in_place, fused, make_grad_scaler
from utils.transfer import tree_to_device as to_device

# dense bf16 tensor-core peaks (TFLOP/s) of the accelerators we know; --peak-tflops for others
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
                    "A10": 125.0, "4090": 165.0}


def peak_tflops(device: torch.device, override: float = None):
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


class SyntheticRGB(torch.utils.data.Dataset):
    """Random uint8 RGB images held like torchvision's CIFAR (.data [N, H, W, 3], .targets), PIL on access."""

    def __init__(self, n: int, size: int, transform=None, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.data = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        self.targets = [int(t) for t in rng.integers(0, 10, n)]
        self.transform = transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        img = Image.fromarray(self.data[i])
        return (self.transform(img) if self.transform else img), self.targets[i]


def amp_name(amp) -> str:
    """torch.bfloat16 -> 'bfloat16', None (no autocast) -> 'float32': the precision a record was measured in."""
    return "float32" if amp is None else str(amp).replace("torch.", "")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


BACKEND = "inductor"     # --compile-backend (bench sets it)


def aps_model(arch, img_size, patch, device, compile_model=False):
    """An APS model and its AdamW, as main_pretrain.py builds them (fused on CUDA, optionally compiled)."""
    torch.manual_seed(0)
    model = APS(create_vit(arch, img_size, patch)).to(device)
    compile_in_place(model, compile_model, BACKEND)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, **fused(device))


def backward_step(loss, opt, scaler):
    """zero_grad, (scaled) backward, step, scaler update: one optimizer step as the Trainer takes it."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


def timed_step(loss_fn, opt, scaler, device, amp) -> float:
    """Seconds of one whole optimizer step: loss_fn() under autocast, backward_step, synchronised."""
    start = time.perf_counter()
    with autocast(device, amp):
        loss = loss_fn()
    backward_step(loss, opt, scaler)
    sync(device)
    return time.perf_counter() - start


def count_flops(fn) -> int:
    """FLOPs of fn() (forward and backward, as torch.utils.flop_counter counts matmuls/convs/attention)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def run_pipeline(loader, step, batches: int, warmup: int, device, per_batch: int, count: bool = True) -> dict:
    """Images/s of `step(batch)` over `batches` loaded batches, after `warmup` (workers started, kernels warm);
    the first warm-up step is also counted for model FLOPs per image (count=False: not, for compiled models)."""
    it = iter(loader)
    flops = count_flops(lambda: step(next(it))) / per_batch if count else step(next(it))
    for _ in range(warmup - 1):
        step(next(it))
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(batches):
        step(next(it))
    sync(device)
    elapsed = time.perf_counter() - start
    out = {"img_per_s": round(batches * per_batch / elapsed, 1), "batch_ms": round(1000 * elapsed / batches, 2),
           **({"gflops_per_img": round(flops / 1e9, 3)} if count else {})}
    if device.type == "cuda":
        out["peak_mem_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def data_rate(make_loader_fn, device, batches: int, warmup: int, per_batch: int) -> float:
    """Images/s of a fresh loader alone (loaded, moved to the device, augmented there if that is its path; no
    model): what the data path could feed a model that took no time."""
    loader = make_loader_fn()
    return run_pipeline(loader, lambda b: to_device(b, device), batches, warmup, device, per_batch,
                        count=False)["img_per_s"]


def jpeg_folder(n: int, size: int, seed: int = 0) -> str:
    """A temporary ImageNet-style folder (train/<class>/<i>.jpg) of n smooth random size x size JPEGs."""
    root = tempfile.mkdtemp(prefix="bench-jpeg-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = os.path.join(root, "train", f"c{i % 10}")
        os.makedirs(d, exist_ok=True)
        small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        small.resize((size, size), Image.BILINEAR).save(os.path.join(d, f"{i}.jpg"), quality=90)
    return root


def make_loader(path, dataset_size, img_size, batch, workers, device, recipe, compile_views):
    """path: cpu / device (in-memory uint8 images), jpeg-cpu / jpeg-device (a folder of JPEGs); `recipe`
    (augment.recipes) realised for that path."""
    if path.endswith("device"):
        views = batched_pipeline(recipe)
        views = views.compile(backend=BACKEND) if compile_views else views
    if path.startswith("jpeg"):
        root = jpeg_folder(dataset_size, img_size)
        if path == "jpeg-device":
            return FolderDeviceLoader(build_imagefolder(root, True), batch, 0, device, views, workers)
        return build_train_loader(build_imagefolder(root, True, pil_pipeline(recipe)), batch, workers, 0, device)
    if path == "device":
        return DeviceLoader(SyntheticRGB(dataset_size, img_size), batch, 0, device, views)
    return build_train_loader(SyntheticRGB(dataset_size, img_size, pil_pipeline(recipe)), batch, workers, 0, device)


def aps_pipeline(arch, path, batch, img_size, patch, ratio, steps_per_batch, device, amp, batches, warmup, workers,
                 compile_model=False):
    """Image pairs/s of whole APS batches (data, sampler, steps_per_batch optimizer steps) through `path`."""
    recipe = aps_pair(get_preset("cifar10"), img_size)
    model, opt = aps_model(arch, img_size, patch, device, compile_model)
    scaler = make_grad_scaler(device, amp)

    def new_loader():
        return make_loader(path, batch * (batches + warmup + 1), img_size, batch, workers, device, recipe,
                           compile_model)
    loader = new_loader()

    def step(b):
        views = to_device(b[0], device)
        steps = aps_training_steps(model, views, img_size // patch, ratio, steps_per_batch, 3.0)
        for _ in range(steps_per_batch):
            with autocast(device, amp):
                loss, _ = next(steps)
            backward_step(loss, opt, scaler)

    out = run_pipeline(loader, step, batches, warmup, device, batch, count=not compile_model)
    out["data_pairs_per_s"] = data_rate(new_loader, device, batches, warmup, batch)
    return {"bench": "aps_pipeline", "arch": arch, "path": path, "batch": batch, "img_size": img_size, "patch": patch,
            "nsampling": steps_per_batch, "amp": amp_name(amp), "compile": compile_model or False,
            "device": str(device), "workers": workers if path == "cpu" else 0, "pairs_per_s": out.pop("img_per_s"),
            **out}


def numpy_per_pair_sampler(box1, flip1, box2, flip2, grid, n, steps_per_batch, power, rng):
    """The per-pair loop the reference uses, in numpy: the baseline the batched sampler is compared with."""
    def spans(box, flip, axis):
        start, length = box[axis], box[axis + 2]
        e = start + length * np.arange(grid + 1) / grid
        s = np.stack([e[:-1], e[1:]], 1)
        return s[::-1] if (axis == 1 and flip) else s

    def overlap(a, b):
        return np.clip(np.minimum(a[:, None, 1], b[None, :, 1]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)

    oy = overlap(spans(box1, flip1, 0), spans(box2, flip2, 0))
    ox = overlap(spans(box1, flip1, 1), spans(box2, flip2, 1))
    area = box2[2] * box2[3] / grid ** 2
    perm = rng.permutation(grid * grid)
    out1, out2 = [], []
    for t in range(steps_per_batch):
        sel = perm[t * n:(t + 1) * n]
        covered = np.zeros((grid, grid))
        for c in sel:
            covered += np.outer(oy[c // grid], ox[c % grid])
        r = np.clip(1 - covered / area, 0, 1).ravel()
        p = r ** power
        if (p > 0).sum() < n:
            p = p + 1e-12
        out1.append(sel)
        out2.append(rng.choice(grid * grid, n, replace=False, p=p / p.sum()))
    return out1, out2


class ReferenceViews(torch.utils.data.Dataset):
    """The reference's data path, imitated: a sample's two PIL views (with their boxes and flips) made in a loader
    worker, then its per-pair numpy sampler run there too (numpy_per_pair_sampler, seeded per sample)."""

    def __init__(self, dataset, grid: int, kept: int, steps_per_batch: int, power: float):
        self.dataset, self.grid, self.kept, self.steps, self.power = dataset, grid, kept, steps_per_batch, power

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        views, label = self.dataset[i]
        rng = np.random.default_rng(i)
        idx1, idx2 = numpy_per_pair_sampler(views["box1"].numpy(), bool(views["flip1"]), views["box2"].numpy(),
                                            bool(views["flip2"]), self.grid, self.kept, self.steps, self.power, rng)
        return {**views, "idx1": torch.as_tensor(np.stack(idx1)), "idx2": torch.as_tensor(np.stack(idx2))}, label


def reference_step_loss(model, x1, x2, idx1, idx2):
    """The reference's step: each view through the encoder in a call of its own (two calls), then the heads and
    the symmetric contrastive loss (our APS.forward runs the encoder once over both views)."""
    from models.aps import contrastive_loss
    z1, p1 = model.heads(model.encoder.forward_kept(x1, idx1))
    z2, p2 = model.heads(model.encoder.forward_kept(x2, idx2))
    return contrastive_loss(p1, z2, model.temperature)[0] + contrastive_loss(p2, z1, model.temperature)[0]


def aps_reference_pipeline(arch, batch, img_size, patch, ratio, steps_per_batch, device, batches, warmup, workers):
    """Image pairs/s of whole APS batches as the reference's code makes them (docs/REFERENCE.md#aps-pretraining): PIL
    views and a per-pair numpy sampler in CPU workers, two encoder calls per step, eager, fp16 autocast with a grad
    scaler, steps_per_batch optimizer steps per batch. The baseline our end-to-end pipeline is compared with."""
    grid = img_size // patch
    kept = kept_per_view(grid * grid, ratio, steps_per_batch)
    fp16 = torch.float16
    model, opt = aps_model(arch, img_size, patch, device)
    scaler = make_grad_scaler(device, fp16)

    def new_loader():
        data = SyntheticRGB(batch * (batches + warmup + 1), img_size, pil_pipeline(aps_pair(get_preset("cifar10"),
                                                                                            img_size)))
        return build_train_loader(ReferenceViews(data, grid, kept, steps_per_batch, 3.0), batch, workers, 0, device)

    def step(b):
        v = to_device(b[0], device)
        for t in range(steps_per_batch):
            with autocast(device, fp16):
                loss = reference_step_loss(model, v["view1"], v["view2"], v["idx1"][:, t], v["idx2"][:, t])
            backward_step(loss, opt, scaler)

    out = run_pipeline(new_loader(), step, batches, warmup, device, batch, count=False)
    out["data_pairs_per_s"] = data_rate(new_loader, device, batches, warmup, batch)
    return {"bench": "aps_reference_pipeline", "arch": arch, "path": "reference", "batch": batch, "img_size": img_size,
            "patch": patch, "nsampling": steps_per_batch, "amp": "float16", "compile": False, "device": str(device),
            "workers": workers, "pairs_per_s": out.pop("img_per_s"), **out}


def aps_augment(batch, img_size, device, repeats, compile_views=False):
    """Image pairs/s of the on-device APS views alone (two views, boxes, flips) from uint8 images."""
    views = batched_pipeline(aps_pair(get_preset("cifar10"), img_size))
    if compile_views:
        views.compile(backend=BACKEND)
    x = torch.randint(0, 256, (batch, 3, img_size, img_size), dtype=torch.uint8, device=device)
    for _ in range(3):
        views(x)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        views(x)
    sync(device)
    return {"bench": "aps_augment", "device": str(device), "batch": batch, "compile": compile_views or False,
            "pairs_per_s": round(repeats * batch / (time.perf_counter() - start), 1)}


def aps_step_flops(arch, batch, img_size, patch, ratio, device, amp) -> float:
    """Model FLOPs per image pair of one APS optimizer step (both views, forward and backward)."""
    model = APS(create_vit(arch, img_size, patch)).to(device)
    grid = img_size // patch
    n = kept_per_view(grid * grid, ratio, 1)
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    idx = torch.rand(batch, grid * grid, device=device).argsort(1)[:, :n]

    def fwd_bwd():
        with autocast(device, amp):
            loss, _ = model(x, x, idx, idx)
        loss.backward()
    return count_flops(fwd_bwd) / batch


def moco_pipeline(path, arch, batch, img_size, device, amp, batches, warmup, workers, compile_model=False):
    """Images/s of MoCo v2 steps (one query + one key view per image) through `path`, and FLOPs per image."""
    preset = get_preset("imagefolder")
    torch.manual_seed(0)
    model = build_moco(arch, False, max(1, min(8, batch // 32)), queue_size=65536 // batch * batch,
                       device=device)                                         # split BN as main_moco.py
    compile_in_place(model.encoder_q, compile_model, BACKEND)
    compile_in_place(model.encoder_k, compile_model, BACKEND)
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4, **fused(device))
    src = max(img_size, round(img_size * 256 / 224))                           # stored images a bit larger

    def new_loader():
        return make_loader(path, batch * (batches + warmup + 1), src, batch, workers, device,
                           moco_views(preset, img_size), compile_model)
    loader = new_loader()
    scaler = make_grad_scaler(device, amp)

    def step(b):
        with autocast(device, amp):
            loss, _ = model(*moco_inputs(to_device(b[0], device)))
        backward_step(loss, opt, scaler)

    out = run_pipeline(loader, step, batches, warmup, device, batch, count=not compile_model)
    out["data_img_per_s"] = data_rate(new_loader, device, batches, warmup, batch)
    return {"bench": "moco_pipeline", "arch": arch, "path": path, "batch": batch, "img_size": img_size,
            "amp": amp_name(amp), "compile": compile_model or False,
            "device": str(device), "workers": 0 if path == "device" else workers, **out}
