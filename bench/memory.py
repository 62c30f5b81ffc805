"""python -m bench --memory: the peak memory and step time of the papers' heaviest steps with each memory saving.

Steps: APS with ViT-S/2 and ViT-B/2 (32 px, batch 512 pairs, one sampling round) and MoCo v2 with ResNet-50 (224 px,
batch 256, BN in 8 splits); each with no saving, --grad-checkpointing, --accum-steps 2/4/8, and both. On a GPU the
peak is torch.cuda.max_memory_allocated over the steps. On the CPU each configuration runs in its own process at
smaller shapes (--memory-scale), and the peak is the process's resident memory (Linux's VmHWM, reset once the model,
optimizer and inputs exist): the CPU allocator keeps what it freed, so one process per configuration is the only
fair comparison. `step_mib` is the peak above what the process held before its first step: the activations, the
gradients and the optimizer's state.

    python -m bench --memory --device cpu --skip-model --skip-pipeline
    python -m bench.memory --one '{"step": "aps-vit-small", ...}'      # one configuration (what --memory runs)
"""
import argparse
import json
import os
import subprocess
import sys

import torch

from methods.aps import APSPretraining
from methods.moco import MoCoPretraining
from models.moco import build_moco, shuffle_permutation
from bench import pipeline as P
from utils.dist import resolve_device
from utils.recompute import enable_grad_checkpointing
from utils.rng import BatchRandom
from utils.runtime import amp_dtype, fused, make_grad_scaler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, arch, image size, batch) at the papers' scale; the CPU divides the batch (and MoCo's image size)
STEPS = [("aps-vit-small", "vit-small", 32, 512), ("aps-vit-base", "vit-base", 32, 512),
         ("moco-resnet50", "resnet50", 224, 256)]
SAVINGS = [("none", False, 1), ("grad-checkpointing", True, 1), ("accum-2", False, 2), ("accum-4", False, 4),
           ("accum-8", False, 8), ("both-4", True, 4), ("both-8", True, 8)]
MOCO_SPLITS = 8                               # one process standing in for 8 GPUs: every --accum-steps above divides


def aps_step(arch, img_size, batch, device, accum, ckpt):
    model, opt = P.aps_model(arch, img_size, 2, device)
    if accum > 1:
        APSPretraining(model, model, 16, 0.25, 1, 1.0, 1e-4, 0, 1).split_backbone(accum)
    if ckpt:
        enable_grad_checkpointing(model)
    grid, g = img_size // 2, torch.Generator().manual_seed(0)
    n = grid * grid // 4                                             # the paper's ratio 0.25
    x1, x2 = (torch.randn(batch, 3, img_size, img_size, generator=g).to(device) for _ in range(2))
    idx1, idx2 = (torch.rand(batch, grid * grid, generator=g).argsort(1)[:, :n].to(device) for _ in range(2))
    return lambda: model(x1, x2, idx1, idx2)[0], opt


def moco_step(arch, img_size, batch, device, accum, ckpt):
    model = build_moco(arch, img_size <= 64, MOCO_SPLITS, queue_size=65536 // batch * batch, device=device)
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4, **fused(device))
    if accum > 1:
        MoCoPretraining(model, model, 0.03, 1).split_backbone(accum)
    if ckpt:
        enable_grad_checkpointing(model)
    g = torch.Generator().manual_seed(0)
    query = torch.randn(batch, 3, img_size, img_size, generator=g).to(device)
    keys = torch.randn(1, batch, 3, img_size, img_size, generator=g).to(device)
    rng = BatchRandom(device)
    return lambda: model(query, keys, None, perm=shuffle_permutation(keys, rng.reseed(0, 0, 0)))[0], opt


def rss_mib(field: str) -> float:
    """A field of /proc/self/status (VmRSS, VmHWM) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(spec: dict) -> dict:
    """One configuration: its peak memory and step time (spec: step, arch, img_size, batch, saving, accum, ckpt,
    device, amp, steps)."""
    device = resolve_device(spec["device"])
    amp = amp_dtype(spec["amp"], device)
    build = aps_step if spec["step"].startswith("aps") else moco_step
    torch.manual_seed(0)
    loss_fn, opt = build(spec["arch"], spec["img_size"], spec["batch"], device, spec["accum"], spec["ckpt"])
    scaler = make_grad_scaler(device, amp)
    model_params = sum(p.numel() for g in opt.param_groups for p in g["params"])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) / 2**20
    else:
        base = rss_mib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:               # VmHWM starts again from VmRSS
            f.write("5")
    times = []
    for _ in range(1 + spec["steps"]):                              # the first step allocates the optimizer's state
        times.append(P.timed_step(loss_fn, opt, scaler, device, amp))
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else rss_mib("VmHWM")
    return {"bench": "memory", **{k: spec[k] for k in ("step", "arch", "img_size", "batch", "saving", "accum")},
            "grad_checkpointing": spec["ckpt"], "device": str(device), "amp": P.amp_name(amp),
            "params_m": round(model_params / 1e6, 1), "peak_mib": round(peak, 1), "step_mib": round(peak - base, 1),
            "step_ms": round(1000 * min(times[1:]), 1)}


def shapes(gpu: bool, scale: int, full_size: bool = False) -> list:
    """The steps at the papers' shapes (GPU) or scaled down by `scale` (CPU: batch / scale, and unless full_size
    MoCo at 224 / scale px, at least 32)."""
    if gpu:
        return STEPS
    return [(name, arch, size if full_size or name.startswith("aps") else max(32, size // scale),
             max(8, batch // scale)) for name, arch, size, batch in STEPS]


def memory_table(device: torch.device, amp: str, scale: int, steps: int, only=None, full_size: bool = False,
                 savings=None) -> list:
    """Every step with every saving (or those named in `savings`; no saving is always measured, for the ratios),
    each in its own process; the ratios to no saving added."""
    records = []
    for name, arch, size, batch in shapes(device.type == "cuda", scale, full_size):
        if only and name not in only:
            continue
        plain = None
        for saving, ckpt, accum in SAVINGS:
            if savings and saving != "none" and saving not in savings:
                continue
            spec = dict(step=name, arch=arch, img_size=size, batch=batch, saving=saving, accum=accum, ckpt=ckpt,
                        device=str(device), amp=amp, steps=steps)
            rec = run_one(spec)
            if plain is None:
                plain = rec
            rec["memory_ratio"] = round(rec["step_mib"] / max(plain["step_mib"], 1e-9), 3)
            rec["time_ratio"] = round(rec["step_ms"] / max(plain["step_ms"], 1e-9), 3)
            records.append(rec)
            print(json.dumps(rec), flush=True)
    return records


def run_one(spec: dict) -> dict:
    """measure(spec) in a fresh process (its own peak)."""
    out = subprocess.run([sys.executable, "-m", "bench.memory", "--one", json.dumps(spec)], cwd=ROOT,
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"memory bench {spec['step']} {spec['saving']} failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one configuration of bench --memory (JSON spec)")
    parser.add_argument("--one", required=True)
    print(json.dumps(measure(json.loads(parser.parse_args().one))), flush=True)
