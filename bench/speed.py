"""Benchmark: the APS sampler against a per-pair loop; APS training-step throughput, memory, FLOPs and MFU per
arch; and full steps (data included) through the CPU-worker and the on-device data paths, for APS and MoCo.

    python -m bench                  # all archs; batch 512 on GPU, 32 on CPU
    python -m bench --archs vit-small --batch-size 256 --steps 20

Prints one JSON line per measurement. The model step uses synthetic data already on the device, so it
measures the model (forward of both views on the kept patches, backward, AdamW), not the data pipeline.
"""
import json
import os
import time

import numpy as np
import torch

from models import ARCHS
from models.resnet import RESNETS
from samplers.aps import kept_per_view, random_boxes, sample_aps
from bench import pipeline as P
from bench.pipeline import sync
from bench.memory import SAVINGS
from bench.targets import check_targets
from utils.dist import resolve_device
from utils.config import ArgumentParser
from utils.errors import UserError, exit_on_user_error
from utils.flags import count, device_name, fraction, one_of, positive
from utils.runtime import (AMP_CHOICES, add_compile_arg, amp_dtype, autocast, configure_device, make_grad_scaler,
                           peak_memory_mib)


# kernel-name fragments; Hopper's cuBLAS runs "nvjet_*" and "sm90_xmma_gemm_*" kernels, CUTLASS 3 "*wgmma*"
MATMUL_KERNELS = ("gemm", "gemv", "cutlass", "xmma", "wgmma", "nvjet", "cublas", "matmul", "aten::mm", "aten::addmm",
                  "aten::bmm", "aten::baddbmm", "aten::linear")
ATTENTION_KERNELS = ("flash", "fmha", "attention", "sdpa")     # FlashAttention, cutlass/cuDNN fused attention


def kernel_kind(name: str) -> str:
    """'attention', 'matmul' or 'other' (attention first: its fused kernels' names often hold 'gemm' too)."""
    low = name.lower()
    if any(s in low for s in ATTENTION_KERNELS):
        return "attention"
    return "matmul" if any(s in low for s in MATMUL_KERNELS) else "other"


def time_split(prof, device, steps: int, top: int = 8) -> dict:
    """Where a profiled step's time goes: the share of matmul, attention and other kernels (GPU kernels on
    CUDA, aten ops' self time on the CPU), and the `top` kernels in ms per step."""
    from torch.autograd import DeviceType
    times = {}
    for e in prof.key_averages():
        if device.type == "cuda":
            t = e.device_time_total if e.device_type == DeviceType.CUDA else 0.0
        else:
            t = e.self_cpu_time_total
        if t > 0:
            times[e.key] = times.get(e.key, 0.0) + t / 1000.0 / steps              # us -> ms per step
    total = sum(times.values()) or 1.0

    def share(kind):
        return round(sum(t for k, t in times.items() if kernel_kind(k) == kind) / total, 3)

    matmul, attention = share("matmul"), share("attention")
    ranked = sorted(times.items(), key=lambda kv: -kv[1])[:top]
    return {"matmul": matmul, "attention": attention, "other": round(1.0 - matmul - attention, 3),
            "top_ms": [[k[:80], round(t, 3)] for k, t in ranked]}


def bench_step(arch, batch, img_size, patch, ratio, device, amp, steps, warmup, compile_model=False,
               profile_steps=0):
    """Pairs/s of one APS optimizer step (one sampling round) at `batch` pairs; with profile_steps, also
    where that many more steps spend their time (time_split)."""
    model, opt = P.aps_model(arch, img_size, patch, device, compile_model)
    scaler = make_grad_scaler(device, amp)
    grid = img_size // patch
    n = kept_per_view(grid * grid, ratio, 1)
    x1 = torch.randn(batch, 3, img_size, img_size, device=device)
    x2 = torch.randn(batch, 3, img_size, img_size, device=device)
    idx1 = torch.rand(batch, grid * grid, device=device).argsort(1)[:, :n]
    idx2 = torch.rand(batch, grid * grid, device=device).argsort(1)[:, :n]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        with autocast(device, amp):
            loss, _ = model(x1, x2, idx1, idx2)
        P.backward_step(loss, opt, scaler)
    sync(device)
    elapsed = time.perf_counter() - start
    rec = {"bench": "aps_step", "arch": arch, "patch": patch, "img_size": img_size, "batch": batch,
           "compile": compile_model or False,
           "kept": n, "device": str(device), "amp": P.amp_name(amp),
           "pairs_per_s": round(steps * batch / elapsed, 1), "step_ms": round(1000 * elapsed / steps, 2),
           "peak_mem_mib": round(peak_memory_mib(device), 1)}
    if profile_steps:
        from torch.profiler import ProfilerActivity, profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(profile_steps):
                with autocast(device, amp):
                    loss, _ = model(x1, x2, idx1, idx2)
                P.backward_step(loss, opt, scaler)
            sync(device)
        rec["time_split"] = time_split(prof, device, profile_steps)
    return rec


def bench_sampler(batch, grid, ratio, steps_per_batch, power, device, loop_pairs, repeats):
    n = kept_per_view(grid * grid, ratio, steps_per_batch)
    boxes = [b.to(device) for b in random_boxes(batch, grid * 2)]
    for _ in range(2):
        sample_aps(*boxes, grid, ratio, steps_per_batch, power)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        sample_aps(*boxes, grid, ratio, steps_per_batch, power)
    sync(device)
    batched = repeats * batch / (time.perf_counter() - start)
    rng = np.random.default_rng(0)
    cpu = [b.cpu().numpy() for b in boxes]
    start = time.perf_counter()
    for i in range(loop_pairs):
        P.numpy_per_pair_sampler(cpu[0][i], cpu[1][i], cpu[2][i], cpu[3][i], grid, n, steps_per_batch, power, rng)
    loop = loop_pairs / (time.perf_counter() - start)
    return {"bench": "aps_sampler", "device": str(device), "batch": batch, "grid": grid, "nsampling": steps_per_batch,
            "kept": n, "pairs_per_s": round(batched, 1), "loop_pairs_per_s": round(loop, 1),
            "loop_ms_per_pair": round(1000 / loop, 3), "speedup": round(batched / loop, 1)}


def get_args_parser():
    p = ArgumentParser(description=__doc__, prog="python -m bench")
    p.add_argument("--device", type=device_name(), default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", default="auto", choices=AMP_CHOICES, help="precision (auto: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--archs", type=one_of(ARCHS, "arch"), default=",".join(ARCHS),
                   help="comma-separated archs to time")
    p.add_argument("--batch-size", type=count(), default=None, help="pairs per step (default 512 on GPU, 32 on CPU)")
    p.add_argument("--img-size", type=count(), default=32, help="image size (32 px CIFAR shapes)")
    p.add_argument("--patch-size", type=count(), default=2, help="patch size")
    p.add_argument("--sampling-ratio", type=fraction(), default=0.25, help="fraction of patches kept")
    p.add_argument("--steps", type=count(), default=None, help="timed steps (default 20 on GPU, 3 on CPU)")
    p.add_argument("--warmup", type=count(zero="none"), default=None,
                   help="untimed steps first (default 5 on GPU, 1 on CPU)")
    p.add_argument("--sampler-batch", type=count(), default=512, help="pairs per sampler call")
    p.add_argument("--loop-pairs", type=count(), default=200, help="pairs timed with the per-pair numpy loop")
    p.add_argument("--skip-model", action="store_true", help="only time the sampler")
    p.add_argument("--profile", type=count(zero="off"), default=0, metavar="N",
                   help="also profile N more APS steps per arch: the time's split into matmul, attention and other "
                        "kernels, and the top kernels (time_split in the aps_step record)")
    p.add_argument("--skip-pipeline", action="store_true", help="skip the data-path comparisons")
    add_compile_arg(p, "the models and the device augmentation (as the scripts' --compile)")
    p.add_argument("--pipeline-archs", type=one_of(ARCHS, "arch"), default=None,
                   help="APS archs timed through both data paths (default: all on GPU, vit-tiny on CPU)")
    p.add_argument("--pipeline-batches", type=count(), default=None, help="timed batches per data path "
                                                                       "(default 10 on GPU, 2 on CPU)")
    p.add_argument("--workers", type=count(zero="the main process"), default=None,
                   help="CPU-path loader workers (default: min(16, cores))")
    p.add_argument("--moco-arch", type=one_of(RESNETS, "ResNet"), default=None,
                   help="MoCo ResNet (default resnet50 on GPU, resnet18 on CPU)")
    p.add_argument("--moco-batch", type=count(), default=None, help="MoCo batch (default 256 on GPU, 16 on CPU)")
    p.add_argument("--moco-img-size", type=count(), default=None, help="MoCo crop size (default 224 on GPU, 64 on CPU)")
    p.add_argument("--reference", action="store_true",
                   help="also time APS batches as the reference's code makes them (PIL views and a per-pair numpy "
                        "sampler in workers, two encoder calls per step, eager fp16 with a grad scaler) and the "
                        "ratio of ours over it, with a 1600-epoch CIFAR projection")
    p.add_argument("--moco-jpeg", action="store_true",
                   help="also time MoCo from a (temporary, synthetic) folder of JPEGs: PIL in workers vs decoded on "
                        "the device")
    p.add_argument("--files", action="store_true",
                   help="also time the CPU-worker path on a synthetic JPEG folder against the same images as tar "
                        "shards, with 1 and 2 workers (files_vs_shards records)")
    p.add_argument("--files-images", type=count(), default=512, help="images in --files' synthetic folder")
    p.add_argument("--memory", action="store_true",
                   help="the memory table: APS ViT-S/2 and ViT-B/2 at batch 512, MoCo ResNet-50 at 224 px and batch 256 "
                        "(smaller on the CPU), each with no saving, --grad-checkpointing, --accum-steps 2/4/8 and both "
                        "(bench/memory.py)")
    p.add_argument("--memory-scale", type=count(), default=8,
                   help="CPU only: divide the memory table's batches (and MoCo's image size) by this")
    p.add_argument("--memory-full-size", action="store_true",
                   help="CPU only: keep the papers' image sizes in the memory table (only the batch is divided)")
    p.add_argument("--memory-steps", type=count(), default=None, help="timed steps per memory configuration "
                   "(default 5 on GPU, 2 on CPU)")
    p.add_argument("--memory-only", type=one_of(("aps-vit-small", "aps-vit-base", "moco-resnet50"), "step"),
                   default=None, help="comma-separated steps of the memory table to run (default: all)")
    p.add_argument("--memory-savings", type=one_of([s[0] for s in SAVINGS], "saving"), default=None,
                   help="comma-separated savings of the memory table to run (default: all)")
    p.add_argument("--skip-aps-pipeline", action="store_true", help="in the data-path comparisons, leave out APS")
    p.add_argument("--skip-moco-pipeline", action="store_true", help="in the data-path comparisons, leave out MoCo")
    p.add_argument("--compile-cost", action="store_true",
                   help="compile time, steady-state step eager vs compiled and recompilations over 3 epochs, for APS "
                        "ViT-T/2 and MoCo ResNet-18 (bench/compile_cost.py; --compile-backend chooses the backend)")
    p.add_argument("--peak-tflops", type=positive(), default=None,
                   help="the device's dense bf16 peak, for MFU (default: known GPUs, e.g. 989 for H100/H200)")
    return p


@exit_on_user_error
def main(args):
    P.BACKEND = args.compile_backend
    device = resolve_device(args.device)
    configure_device(device)
    gpu = device.type == "cuda"
    amp = amp_dtype(args.amp, device)
    batch = args.batch_size or (512 if gpu else 32)
    steps = args.steps or (20 if gpu else 3)
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    grid = args.img_size // args.patch_size
    peak = P.peak_tflops(device, args.peak_tflops)
    archs = arch_list(args.archs, "--archs")
    pipeline_archs = arch_list(args.pipeline_archs or (",".join(ARCHS) if gpu else "vit-tiny"), "--pipeline-archs")
    results = [bench_sampler(args.sampler_batch, grid, args.sampling_ratio, 4, 3.0, device, args.loop_pairs,
                             50 if gpu else 10)]
    print(json.dumps(results[-1]), flush=True)
    if not args.skip_model:
        for arch in archs:
            rec = bench_step(arch, batch, args.img_size, args.patch_size, args.sampling_ratio, device, amp, steps,
                             warmup, args.compile, args.profile)
            flops = P.aps_step_flops(arch, min(batch, 8), args.img_size, args.patch_size, args.sampling_ratio,
                                     device, amp)
            rec["gflops_per_pair"] = round(flops / 1e9, 3)
            if peak:
                rec["mfu"] = round(flops * rec["pairs_per_s"] / (peak * 1e12), 4)
            results.append(rec)
            print(json.dumps(rec), flush=True)
    if not args.skip_pipeline:
        results += pipelines(args, device, amp, gpu, batch, peak, pipeline_archs)
    if args.memory:
        from bench.memory import memory_table
        results += memory_table(device, args.amp, args.memory_scale, args.memory_steps or (5 if gpu else 2),
                                args.memory_only.split(",") if args.memory_only else None, args.memory_full_size,
                                args.memory_savings.split(",") if args.memory_savings else None)
    if args.compile_cost:
        from bench.compile_cost import compile_cost
        for rec in compile_cost(device, amp, args.compile_backend, batch=batch if gpu else 32):
            results.append(rec)
            print(json.dumps(rec), flush=True)
    if args.files:
        from bench.files import files_vs_shards
        for rec in files_vs_shards(args.files_images, 160, 128, 64, max(2, args.files_images // 64 - 1)):
            results.append(rec)
            print(json.dumps(rec), flush=True)
    results.append(check_targets(results, gpu, torch.cuda.get_device_name(device) if gpu else "cpu"))
    print(json.dumps(results[-1]), flush=True)
    return results


def arch_list(value: str, flag: str) -> list:
    archs = [a.strip() for a in value.split(",") if a.strip()]
    for arch in archs:
        if arch not in ARCHS:
            raise UserError(f"unknown arch {arch!r} in {flag}; choose from {', '.join(ARCHS)}")
    return archs


def ratio_record(kind, arch, dev, cpu, rate, data_rate) -> dict:
    """device_over_cpu: the on-device path's full-step rate over the CPU-worker path's. cpu_data_over_training:
    the CPU workers' rate alone over the CPU path's full-step rate; near 1 the workers set the pace, well
    above 1 the model does, and then no data path can make the step faster (device_over_cpu <= ~1)."""
    return {"bench": kind, "arch": arch, **{k: dev[k] for k in ("batch", "img_size", "patch", "amp") if k in dev},
            "device_over_cpu": round(dev[rate] / cpu[rate], 2),
            "cpu_data_over_training": round(cpu[data_rate] / cpu[rate], 2),
            "device_data_over_training": round(dev[data_rate] / dev[rate], 2)}


def pipelines(args, device, amp, gpu, batch, peak, archs):
    """APS and MoCo full steps through the CPU-worker and the on-device data paths, and their ratio."""
    out = []

    def emit(rec):
        out.append(rec)
        print(json.dumps(rec), flush=True)

    workers = args.workers if args.workers is not None else min(16, os.cpu_count() or 1)
    batches = args.pipeline_batches or (10 if gpu else 2)
    warm = 3 if gpu else 1
    if not args.skip_aps_pipeline:
        aug = P.aps_augment(batch, args.img_size, device, 20 if gpu else 3, args.compile)
        emit(aug)
    for arch in ([] if args.skip_aps_pipeline else archs):
        recs = {path: P.aps_pipeline(arch, path, batch, args.img_size, args.patch_size, args.sampling_ratio, 4,
                                     device, amp, batches, warm, workers, args.compile) for path in ("cpu", "device")}
        for rec in recs.values():
            if peak and "gflops_per_img" in rec:  # steps_per_batch optimizer steps per pair per batch
                rec["mfu"] = round(rec["gflops_per_img"] * 1e9 * rec["pairs_per_s"] / (peak * 1e12), 4)
            emit(rec)
        model_rate = recs["device"]["pairs_per_s"]
        emit({**ratio_record("aps_ratio", arch, recs["device"], recs["cpu"], "pairs_per_s", "data_pairs_per_s"),
              "augment_over_training": round(aug["pairs_per_s"] / model_rate, 1)})
        if args.reference:
            ref = P.aps_reference_pipeline(arch, batch, args.img_size, args.patch_size, args.sampling_ratio, 4, device,
                                           batches, warm, workers)
            emit(ref)
            ours = max(recs.values(), key=lambda r: r["pairs_per_s"])       # what auto would be tuned to pick
            emit({"bench": "aps_reference_ratio", "arch": arch, "batch": batch, "img_size": args.img_size,
                  "patch": args.patch_size, "amp": ours["amp"], "ours_path": ours["path"],
                  "ours_over_reference": round(ours["pairs_per_s"] / ref["pairs_per_s"], 3),
                  # a 1600-epoch CIFAR pretraining (50,000 pairs an epoch) at our measured rate
                  "projected_1600_epoch_gpu_hours" if gpu else "projected_1600_epoch_hours":
                      round(1600 * 50000 / ours["pairs_per_s"] / 3600, 2)})
    if args.skip_moco_pipeline:
        return out
    arch = args.moco_arch or ("resnet50" if gpu else "resnet18")
    mb = args.moco_batch or (256 if gpu else 16)
    size = args.moco_img_size or (224 if gpu else 64)
    recs = {path: P.moco_pipeline(path, arch, mb, size, device, amp, batches, warm, workers, args.compile)
            for path in ("cpu", "device")}
    for rec in recs.values():
        if peak and "gflops_per_img" in rec:
            rec["mfu"] = round(rec["gflops_per_img"] * 1e9 * rec["img_per_s"] / (peak * 1e12), 4)
        emit(rec)
    emit(ratio_record("moco_ratio", arch, recs["device"], recs["cpu"], "img_per_s", "data_img_per_s"))
    if args.moco_jpeg:
        recs = {path: P.moco_pipeline(path, arch, mb, size, device, amp, batches, warm, workers, args.compile)
                for path in ("jpeg-cpu", "jpeg-device")}
        for rec in recs.values():
            emit(rec)
        emit(ratio_record("moco_jpeg_ratio", arch, recs["jpeg-device"], recs["jpeg-cpu"], "img_per_s",
                          "data_img_per_s"))
    return out


if __name__ == "__main__":
    main(get_args_parser().parse_args())
