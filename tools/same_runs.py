"""Do two checkouts train the same? Runs a fixed set of short, seeded CPU runs of the four scripts, then compares
every tensor their checkpoints hold, bit for bit (a refactor must leave them unchanged).

    python -m tools.same_runs run OUT [--repo PATH]   # the runs below, with the scripts of PATH (default: here)
    python -m tools.same_runs compare A B             # every checkpoint tensor and logged metric of A equal in B

`run` calls the scripts as a user would (`python main_*.py ...`, one process, CPU, seed 0), so it also works
against an older commit checked out elsewhere (`git worktree add /tmp/base <commit>`). The runs cover both
data paths, the README quick start, and the methods' switches; later runs start from earlier runs' checkpoints.
"""
import json
import math
import os
import subprocess
import sys
import time

import torch

from utils.config import ArgumentParser
from utils.errors import UserError, exit_on_user_error
from utils.flags import input_folder, one_of, output_folder, text

TINY_VIT = ["--arch", "vit-tiny", "--depth", "2", "--embed-dim", "128", "--num-heads", "2", "--patch-size", "4"]
# the README's quick start until 2026-12-02 (kept as it was, so that runs compare across commits)
QUICKSTART = TINY_VIT + ["--dataset", "digits", "--batch-size", "128", "--nepoch", "30", "--warmup-epochs", "5",
                         "--knn-every", "10", "--num-workers", "1"]
MOCO = ["-a", "resnet18", "--img-size", "16", "--batch-size", "32", "--moco-k", "256", "--epochs", "1",
        "--knn-every", "1", "--num-workers", "1"]
MOCO_SWITCHES = ["--enable-multicrop", "--num-mini-crops", "2", "--mini-crop-size", "8", "--enable-scalemix",
                 "--enable-asymm-aug", "--enable-mean-encoding"]
# (run name, script, flags); {name} stands for that earlier run's checkpoint
RUNS = (
    ("quickstart", "main_pretrain.py", QUICKSTART),
    ("pretrain-cpu", "main_pretrain.py", TINY_VIT + ["--batch-size", "128", "--nepoch", "2", "--warmup-epochs", "1",
                                                     "--knn-every", "1", "--num-workers", "1", "--data-path", "cpu"]),
    ("finetune", "main_finetune.py", TINY_VIT + ["--pretrained-weights", "{quickstart}", "--batch-size", "128",
                                                 "--epochs", "2", "--warmup-epochs", "1", "--model-ema",
                                                 "--val-split", "0.1", "--num-workers", "1"]),
    ("finetune-cpu", "main_finetune.py", TINY_VIT + ["--batch-size", "128", "--epochs", "1", "--num-workers", "1",
                                                     "--data-path", "cpu"]),
    ("moco", "main_moco.py", MOCO),
    ("moco-switches", "main_moco.py", MOCO + MOCO_SWITCHES),
    ("moco-cpu", "main_moco.py", MOCO + MOCO_SWITCHES + ["--data-path", "cpu"]),
    ("lincls", "main_lincls.py", ["--pretrained", "{moco}", "--img-size", "16", "--lars", "--batch-size", "64",
                                  "--epochs", "2", "--num-workers", "1"]),
    ("lincls-cpu", "main_lincls.py", ["--pretrained", "{moco}", "--img-size", "16", "--batch-size", "64",
                                      "--epochs", "1", "--num-workers", "1", "--data-path", "cpu"]),
    ("lincls-vit", "main_lincls.py", ["--pretrained", "{quickstart}", "--head-bn", "--cache-features",
                                      "--batch-size", "64", "--epochs", "2", "--num-workers", "1"]),
)
UNTIMED = ("epoch_time_s", "train_img_per_s")   # figures (logged and in checkpoints) of the machine, not the run


def run_all(out: str, repo: str, only=None):
    os.makedirs(out, exist_ok=True)
    for name, script, flags in RUNS:
        if only and name not in only:
            continue
        folder = os.path.join(out, name)
        argv = [f.format(**{n: os.path.join(out, n, "checkpoint.pth") for n, _, _ in RUNS}) for f in flags]
        cmd = [sys.executable, script, *argv, "--device", "cpu", "--seed", "0", "--output-dir", folder]
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
        if done.returncode:
            raise UserError(f"run {name} failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}; "
                            f"command: {' '.join(cmd)}")
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (so that -0.0 != 0.0 and NaN == NaN, as bit-for-bit means)."""
    return t.contiguous().reshape(-1).view(torch.uint8) if t.dtype != torch.bool else t.reshape(-1)


def differences(a, b, where: str = "") -> list:
    """Where two loaded checkpoints differ: tensors bit for bit (dtype, shape, values), other values by ==."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        if not (torch.is_tensor(a) and torch.is_tensor(b)):
            return [f"{where}: tensor vs {type(b if torch.is_tensor(a) else a).__name__}"]
        if a.dtype != b.dtype or a.shape != b.shape:
            return [f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"]
        same = torch.equal(raw_bytes(a), raw_bytes(b))
        gap = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
        return [] if same else [f"{where}: values differ (max |diff| {gap:.3g})"]
    if isinstance(a, dict) and isinstance(b, dict):
        a, b = ({k: v for k, v in d.items() if k not in UNTIMED} for d in (a, b))
        out = [f"{where}.{k}: only in the first" for k in a.keys() - b.keys()]
        out += [f"{where}.{k}: only in the second" for k in b.keys() - a.keys()]
        for k in sorted(a.keys() & b.keys(), key=str):
            out += differences(a[k], b[k], f"{where}.{k}")
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    same = a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
    return [] if same else [f"{where}: {a!r} vs {b!r}"]


def compare_checkpoint(a: str, b: str, ignore=("args",)) -> list:
    """Differences between two checkpoint files, leaving out `ignore` (the flags as saved: names may change)."""
    load = lambda p: {k: v for k, v in torch.load(p, map_location="cpu", weights_only=True).items()  # noqa: E731
                      if k not in ignore}
    return differences(load(a), load(b))


def logged(path: str) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def compare_all(a: str, b: str, ignore=()) -> list:
    """One line per run: 'same' or what differs (checkpoints and log.jsonl's metrics); ignore: checkpoint keys
    (besides args) to leave out, e.g. a record a change adds by design."""
    lines, all_same = [], True
    for name, _, _ in RUNS:
        da, db = os.path.join(a, name), os.path.join(b, name)
        if not (os.path.isdir(da) and os.path.isdir(db)):
            lines.append(f"{name}: missing in {a if not os.path.isdir(da) else b}")
            all_same = False
            continue
        files = sorted(f for f in os.listdir(da) if f.endswith(".pth"))
        diffs = []
        for f in files:
            if not os.path.isfile(os.path.join(db, f)):
                diffs.append(f"{f}: missing in {b}")
                continue
            diffs += [f"{f}{d}" for d in compare_checkpoint(os.path.join(da, f), os.path.join(db, f),
                                                            ("args",) + tuple(ignore))]
        diffs += [f"log.jsonl{d}" for d in differences(logged(os.path.join(da, "log.jsonl")),
                                                       logged(os.path.join(db, "log.jsonl")))]
        all_same &= not diffs
        count = sum(len(torch.load(os.path.join(da, f), map_location="cpu", weights_only=True)["model"]) for f in files)
        lines.append(f"{name}: " + ("same" if not diffs else "DIFFERENT: " + "; ".join(diffs[:6]))
                     + f" ({', '.join(files)}; {count} model tensors)")
    lines.append("all runs bit-identical" if all_same else "some runs differ")
    return lines


def get_args_parser():
    p = ArgumentParser(description=__doc__.split("\n")[0], prog="python -m tools.same_runs")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="the fixed set of seeded CPU runs")
    r.add_argument("out", type=output_folder(), help="folder for the runs (one sub-folder each)")
    r.add_argument("--repo", type=input_folder(), default=".", help="checkout whose scripts to run (default: this one)")
    r.add_argument("--only", type=one_of([n for n, _, _ in RUNS], "run"), nargs="+", default=None,
                   help="only these runs (names as in RUNS)")
    c = sub.add_parser("compare", help="compare two folders written by `run`")
    c.add_argument("a", type=input_folder())
    c.add_argument("b", type=input_folder())
    c.add_argument("--ignore", type=text("a top-level checkpoint key"), nargs="+", default=(), metavar="KEY",
                   help="checkpoint keys to leave out besides args (what a change adds on purpose, e.g. "
                        "backbone_record); say so when you report the comparison")
    return p


@exit_on_user_error
def main(args):
    if args.command == "run":
        run_all(args.out, os.path.abspath(args.repo), args.only)
        return 0
    lines = compare_all(args.a, args.b, args.ignore)
    print("\n".join(lines))
    return 0 if lines[-1] == "all runs bit-identical" else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
