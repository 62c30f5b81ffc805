"""Correctness on a GPU, one JSON line per check (bench.gpu_report's first phase; also runs alone):

    python -m bench.gpu_checks --out DIR [--skip-compile]

- train/<script>/<precision>: one short epoch of each script on digits, on the device path, in bf16, fp16 and
  bf16 with --compile, with torch.cuda's sync debug mode set to "error" around every step and batch (a host
  sync there fails the check, naming the line);
- same-views: the device path on the GPU and on the CPU, same seed: every crop box and flip equal, the views
  equal to float round-off (mean |diff| <= VIEW_TOL);
- same-patches: APS's patch sampling on both, same seed and boxes: view 1's patches equal, view 2's equal for
  at least PATCH_AGREEMENT of the pairs (near-ties of covered area may round either way);
- jpeg: a folder of JPEGs decoded on the GPU (nvJPEG) and by the CPU workers: the same boxes and flips, pixels
  within JPEG_MEAN_TOL (mean) and JPEG_MAX_TOL (max) levels of 255 (the decoders' IDCTs differ slightly);
- nccl: 2 processes against 1 (pretraining, fp32): every checkpoint tensor within NCCL_TOL (relative); needs 2
  GPUs (NCCL puts no two ranks on one GPU);
- deterministic: two runs with --deterministic give bit-identical checkpoints (fine-tuning at 32 px, patch 2, bf16:
  SDPA's shapes; and MoCo).
"""
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np
import torch

from utils.config import ArgumentParser
from utils.errors import exit_on_user_error
from utils.flags import count, output_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIEW_TOL = 1e-3          # mean |diff| of normalised views, GPU vs CPU (grid_sample, blur and colour round-off)
PATCH_AGREEMENT = 0.99   # share of pairs whose view-2 patches are the same set on both devices
JPEG_MEAN_TOL, JPEG_MAX_TOL = 1.5, 24.0   # levels of 255: nvJPEG vs libjpeg
NCCL_TOL = 1e-3          # relative, per checkpoint tensor, after one epoch in fp32

TINY_VIT = ["--arch", "vit-tiny", "--depth", "2", "--embed-dim", "32", "--num-heads", "2", "--patch-size", "4",
            "--dataset", "digits", "--num-workers", "0", "--print-freq", "5", "--data-path", "device"]
SCRIPTS = {
    "pretrain": ("main_pretrain", TINY_VIT + ["--batch-size", "128", "--nepoch", "1", "--warmup-epochs", "1",
                                              "--knn-every", "1"]),
    "moco": ("main_moco", ["-a", "resnet18", "--dataset", "digits", "--img-size", "16", "--batch-size", "64",
                           "--moco-k", "256", "--epochs", "1", "--knn-every", "1", "--num-workers", "0",
                           "--data-path", "device", "--enable-multicrop", "--num-mini-crops", "2",
                           "--mini-crop-size", "8", "--enable-scalemix", "--enable-asymm-aug",
                           "--enable-mean-encoding"]),
    "finetune": ("main_finetune", TINY_VIT + ["--batch-size", "128", "--epochs", "1", "--warmup-epochs", "1"]),
    "lincls": ("main_lincls", ["--pretrained", "{moco}", "--dataset", "digits", "--img-size", "16",
                               "--batch-size", "64", "--epochs", "1", "--num-workers", "0", "--data-path", "device"]),
}
PRECISIONS = {"bf16": ["--amp", "bf16"], "fp16": ["--amp", "fp16"], "compile": ["--amp", "bf16", "--compile"]}


@contextlib.contextmanager
def sync_errors():
    """torch.cuda's sync debug mode at "error" inside the block: any host sync raises (nothing without CUDA)."""
    if not torch.cuda.is_available():
        yield
        return
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


class Checks:
    """The checks' records, each printed and appended to <out>/checks.jsonl as it ends (a phase stopped by its time
    limit keeps what it finished); `deadline` (time.perf_counter() seconds): the checks that would start after it
    are recorded as skipped."""

    def __init__(self, out_dir: str, deadline: float = float("inf")):
        self.records, self.deadline = [], deadline
        self.path = os.path.join(out_dir, "checks.jsonl")
        open(self.path, "w").close()

    def passed(self, name: str) -> bool:
        return any(r["check"] == name and r["passed"] for r in self.records)

    def add(self, record: dict):
        self.records.append(record)
        print(json.dumps(record), flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class LastLines(io.TextIOBase):
    """stderr, passed through, keeping its last lines (what a script that exits said before it did)."""

    def __init__(self, stream, keep: int = 3):
        self.stream, self.lines, self.keep = stream, [], keep

    def write(self, text):
        self.stream.write(text)
        self.lines = (self.lines + [line for line in text.splitlines() if line.strip()])[-self.keep:]
        return len(text)

    def flush(self):
        self.stream.flush()


def last_line(e: BaseException, stderr: LastLines) -> str:
    """What a failed check says: its message, or for an exit its code and the last line it printed."""
    if isinstance(e, SystemExit):
        said = stderr.lines[-1][:400] if stderr.lines else ""
        return f"exit {e.code}" + (f": {said}" if said else "")
    return f"{type(e).__name__}: {str(e)[:400]}"


def check(name: str, fn, out: Checks, needs: str = None):
    """Run one check: fn() -> (passed, details). Whatever it raises, a script's exit (SystemExit: a UserError, a
    non-finite loss) included, fails it with its last line, and the next check runs; `needs`: a check that must
    have passed first (else this one fails saying so, without running)."""
    start = time.perf_counter()
    if start > out.deadline:
        out.add({"check": name, "passed": None, "skipped": "no time left in the phase", "seconds": 0.0})
        return
    if needs and not out.passed(needs):
        out.add({"check": name, "passed": False, "error": f"not run: it needs {needs}, which did not pass",
                 "seconds": 0.0})
        return
    stderr = LastLines(sys.stderr)
    try:
        with contextlib.redirect_stderr(stderr):
            passed, details = fn()
        record = {"check": name, "passed": None if passed is None else bool(passed), **details}
    except (Exception, SystemExit) as e:                           # a failed check is a result, not a stop
        tb = traceback.format_exception(type(e), e, e.__traceback__)
        ours = [line.strip() for line in tb if ROOT in line and "/.venv/" not in line][-3:]
        record = {"check": name, "passed": False, "error": last_line(e, stderr), "where": ours}
    record["seconds"] = round(time.perf_counter() - start, 1)
    out.add(record)


def run_script(module: str, argv: list):
    """main(args) of a script, in this process, with every step and batch under sync_errors()."""
    import importlib
    from engine import Callback, installed

    class SyncErrors(Callback):
        def step_context(self):
            return sync_errors()
    script = importlib.import_module(module)
    args = script.get_args_parser().parse_args(argv)
    with installed(SyncErrors()):
        return script.main(args)


def train_checks(out_dir: str, out: Checks, precisions=tuple(PRECISIONS), scripts=tuple(SCRIPTS), device="cuda"):
    """train/<script>/<precision> for each; lincls probes the MoCo run's checkpoint of the same precision (and
    fails, not run, when that run did not pass)."""
    for precision in precisions:
        for name in scripts:
            module, argv = SCRIPTS[name]
            folder = os.path.join(out_dir, f"{name}-{precision}")
            moco = os.path.join(out_dir, f"moco-{precision}", "checkpoint.pth")
            argv = [a.format(moco=moco) for a in argv] + PRECISIONS[precision] + ["--device", device,
                                                                                  "--output-dir", folder]

            def one(module=module, argv=argv):
                metrics = run_script(module, argv)
                floats = {k: v for k, v in metrics.items() if isinstance(v, float)}
                bad = sorted(k for k, v in floats.items() if not np.isfinite(v))
                return not bad and bool(floats), {"metrics": {k: round(v, 4) for k, v in floats.items()},
                                                  **({"not_finite": bad} if bad else {})}
            needs = f"train/moco/{precision}" if "{moco}" in SCRIPTS[name][1] else None
            check(f"train/{name}/{precision}", one, out, needs=needs)


def same_views():
    from augment.batched import batched_pipeline
    from augment.recipes import aps_pair, finetune_view, moco_views
    from data.datasets import get_preset
    from utils.rng import BatchRandom
    preset, worst, details = get_preset("cifar10"), 0.0, {}
    g = torch.Generator().manual_seed(0)
    imgs = (torch.rand(64, 3, 32, 32, generator=g) * 255).to(torch.uint8)
    recipes = {"aps": aps_pair(preset, 32), "finetune": finetune_view(preset, 32),
               "moco": moco_views(preset, 32, num_key_views=2, num_minis=2, mini_size=16, asym_aug=True)}
    same_params = True
    for name, recipe in recipes.items():
        outs = [batched_pipeline(recipe)(imgs.to(d), BatchRandom("cpu", 0, 1).reseed(1)) for d in ("cpu", "cuda")]
        flat = [dict(o) if isinstance(o, dict) else {"view": o} for o in outs]
        for key in flat[0]:
            a, b = flat[0][key], flat[1][key].cpu()
            if key.startswith(("box", "flip")):
                same_params &= torch.equal(a, b)
            else:
                diff = (a.float() - b.float()).abs().mean().item()
                worst = max(worst, diff)
                details[f"{name}/{key}"] = round(diff, 6)
    return same_params and worst <= VIEW_TOL, {"boxes_and_flips_equal": same_params, "mean_abs_diff": details,
                                                "tolerance": VIEW_TOL}


def same_patches():
    from samplers.aps import random_boxes, sample_aps
    from utils.rng import BatchRandom
    torch.manual_seed(0)
    b1, f1, b2, f2 = random_boxes(512, 32)
    idx = [sample_aps(*(t.to(d) for t in (b1, f1, b2, f2)), 16, 0.25, 2, 2.0, BatchRandom(d, 0, 1).reseed(3))
           for d in ("cpu", "cuda")]
    first = torch.equal(idx[0][0], idx[1][0].cpu())
    second = (idx[0][1].sort(-1).values == idx[1][1].cpu().sort(-1).values).all(-1).float().mean().item()
    return first and second >= PATCH_AGREEMENT, {"view1_equal": first, "view2_agreement": round(second, 4),
                                                 "required": PATCH_AGREEMENT}


def jpeg_views(tmp: str):
    from PIL import Image
    from augment.batched import batched_pipeline
    from augment.recipes import lincls_view
    from data.datasets import get_preset
    from data.device_loaders import FolderDeviceLoader
    from torchvision.datasets import ImageFolder
    yy, xx = np.mgrid[0:96, 0:128]
    for c in range(2):
        os.makedirs(os.path.join(tmp, "jpeg", f"c{c}"), exist_ok=True)
        for i in range(16):
            img = np.stack([(xx * (i + 1)) % 256, (yy * (c + 2)) % 256, ((xx + yy) * 3) % 256], -1).astype(np.uint8)
            Image.fromarray(img).save(os.path.join(tmp, "jpeg", f"c{c}", f"{i}.jpg"), quality=90)
    folder = ImageFolder(os.path.join(tmp, "jpeg"))
    view = lincls_view(get_preset("imagenet"), 64)
    outs = []
    for device in ("cpu", "cuda"):
        loader = FolderDeviceLoader(folder, 16, 0, torch.device(device), batched_pipeline(view), num_workers=2,
                                    rank=0, world=1)
        outs.append([x.cpu() for x, _ in loader])
    mean, std = torch.tensor(view.mean).view(1, 3, 1, 1), torch.tensor(view.std).view(1, 3, 1, 1)
    diffs = [((a - b) * std * 255).abs() for a, b in zip(*outs)]
    mean_diff = torch.stack([d.mean() for d in diffs]).mean().item()
    max_diff = max(d.max().item() for d in diffs)
    return mean_diff <= JPEG_MEAN_TOL and max_diff <= JPEG_MAX_TOL, {
        "mean_levels": round(mean_diff, 3), "max_levels": round(max_diff, 2),
        "tolerance": [JPEG_MEAN_TOL, JPEG_MAX_TOL]}


def checkpoint_gap(a: str, b: str) -> float:
    """The largest relative difference between two checkpoints' model tensors."""
    sa, sb = (torch.load(p, map_location="cpu", weights_only=True)["model"] for p in (a, b))
    gap = 0.0
    for k, v in sa.items():
        if v.is_floating_point():
            gap = max(gap, ((v - sb[k]).abs().max() / v.abs().max().clamp_min(1e-12)).item())
    return gap


def run_command(argv: list):
    """python argv in the repo, output captured; one that fails raises with its last line of stderr."""
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        lines = done.stderr.strip().splitlines() or ["(nothing on stderr)"]
        raise RuntimeError(f"{' '.join(argv[:3])} ... exited {done.returncode}: {lines[-1][:300]}")


PRETRAIN_FP32 = ["main_pretrain.py", *SCRIPTS["pretrain"][1], "--amp", "off", "--knn-every", "0", "--seed", "0"]


def nccl(tmp: str):
    if torch.cuda.device_count() < 2:
        return None, {"skipped": "one GPU: NCCL puts no two ranks on one GPU (run on a machine with two)"}
    one, two = os.path.join(tmp, "nccl-1"), os.path.join(tmp, "nccl-2")
    run_command([*PRETRAIN_FP32, "--output-dir", one])
    run_command(["-m", "torch.distributed.run", "--nproc_per_node", "2", *PRETRAIN_FP32, "--output-dir", two])
    gap = checkpoint_gap(os.path.join(one, "checkpoint.pth"), os.path.join(two, "checkpoint.pth"))
    return gap <= NCCL_TOL, {"max_relative_gap": gap, "tolerance": NCCL_TOL}


# --deterministic at the shapes where it matters: a fine-tuning step at 32 px with patch 2 (257 tokens: the shapes
# where SDPA would pick its flash or memory-efficient kernels) in bf16, and a MoCo step (cuDNN convolutions, the
# ResNet's pooling)
DETERMINISTIC_RUNS = {
    "finetune": ["main_finetune.py", "--arch", "vit-tiny", "--depth", "2", "--dataset", "digits", "--img-size", "32",
                 "--patch-size", "2", "--batch-size", "128", "--epochs", "1", "--warmup-epochs", "1",
                 "--num-workers", "0", "--amp", "bf16", "--data-path", "device"],
    "moco": ["main_moco.py", *SCRIPTS["moco"][1][:-8], "--amp", "bf16", "--knn-every", "0"],
}


def deterministic(tmp: str):
    gaps = {}
    for name, argv in DETERMINISTIC_RUNS.items():
        runs = []
        for i in range(2):
            folder = os.path.join(tmp, f"det-{name}-{i}")
            run_command([*argv, "--deterministic", "--device", "cuda", "--output-dir", folder])
            runs.append(os.path.join(folder, "checkpoint.pth"))
        gaps[name] = checkpoint_gap(*runs)
    return all(g == 0.0 for g in gaps.values()), {"max_relative_gap": gaps}


def get_args_parser():
    p = ArgumentParser(description=__doc__.split("\n")[0], prog="python -m bench.gpu_checks")
    p.add_argument("--out", type=output_folder(), required=True,
                   help="where the runs go; checks.jsonl is written there")
    p.add_argument("--skip-compile", action="store_true", help="leave out the --compile runs (minutes of compiling)")
    p.add_argument("--small", action="store_true",
                   help="no GPU needed: only the pretraining epoch in bf16 on the CPU (checks this tool itself)")
    p.add_argument("--budget", type=count(), default=None, metavar="SECONDS",
                   help="start no check after this many seconds (those left are recorded as skipped)")
    return p


# tests plant checks here (name -> fn() -> (passed, details)); they run after the --small ones
EXTRA_CHECKS = {}


@exit_on_user_error
def main(args):
    os.makedirs(args.out, exist_ok=True)
    out = Checks(args.out, time.perf_counter() + args.budget if args.budget else float("inf"))
    if args.small:
        train_checks(args.out, out, ("bf16",), ("pretrain",), device="cpu")
        for name, fn in EXTRA_CHECKS.items():
            check(name, fn, out)
    elif not torch.cuda.is_available():
        check("cuda", lambda: (False, {"error": "no CUDA device visible; --small checks this tool on the CPU"}), out)
    else:
        run_gpu_checks(args, out)
    return out.records


def run_gpu_checks(args, out: Checks):
    """What matters first: each script in bf16 (the default), the views and patches, then fp16, the compiled
    runs, --deterministic and NCCL."""
    with tempfile.TemporaryDirectory() as tmp:
        train_checks(args.out, out, ("bf16",))
        check("same-views", same_views, out)
        check("same-patches", same_patches, out)
        check("jpeg", lambda: jpeg_views(tmp), out)
        train_checks(args.out, out, [p for p in PRECISIONS if p != "bf16" and (p != "compile" or not args.skip_compile)])
        check("deterministic", lambda: deterministic(tmp), out)
        check("nccl", lambda: nccl(tmp), out)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
