"""Reproduce a row of the papers' tables with one command: its chain of runs (pretraining, then the fine-tuning or
the linear probe from the pretraining's final checkpoint), each stage from its recipe in configs/, and
reproduce.md setting our number beside the paper's.

    python -m tools.reproduce --list                              # the rows, with their estimated GPU hours
    python -m tools.reproduce aps-cifar10-vit-small-1600ep        # the whole chain (resumable: rerun it)
    python -m tools.reproduce aps-cifar10-vit-small-1600ep --dry-run    # the commands, nothing run
    python -m tools.reproduce asym-siam-multicrop --smoke         # the same chain, tiny, on the embedded digits

A row is configs/rows/<row>.yaml: the paper's number and where it comes from, the metric to compare, and its
stages (script, recipe, and the flag that takes the previous stage's checkpoint). Each stage runs in its own
folder under --output-dir; a stage whose report.md exists is done and skipped, and a stage that stopped
part-way resumes from its own checkpoint (the scripts resume by themselves), so a rerun continues where it
stopped. Extra flags after `--` go to every stage (e.g. `-- --data-root /data/cifar10`).
"""
import json
import os
import shlex
import subprocess
import sys
import time

import yaml

from utils.errors import ArgumentParser, UserError, exit_on_user_error
from utils.flags import output_folder, text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = os.path.join(ROOT, "configs", "rows")
REPORT = "reproduce.md"

# --smoke: the same chain at a tiny scale on the embedded digits (flags after the recipe's: they win)
SMOKE = {
    "main_pretrain.py": ["--dataset", "digits", "--arch", "vit-tiny", "--depth", "2", "--embed-dim", "32",
                         "--num-heads", "2", "--patch-size", "4", "--img-size", "16", "--nepoch", "2",
                         "--warmup-epochs", "1", "--batch-size", "256", "--proj-hidden-dim", "32", "--proj-dim", "16",
                         "--pred-hidden-dim", "32", "--knn-every", "0", "--num-workers", "0"],
    "main_finetune.py": ["--dataset", "digits", "--arch", "vit-tiny", "--depth", "2", "--embed-dim", "32",
                         "--num-heads", "2", "--patch-size", "4", "--img-size", "16", "--epochs", "1",
                         "--warmup-epochs", "0", "--batch-size", "128", "--num-workers", "0"],
    "main_moco.py": ["--dataset", "digits", "-a", "resnet18", "--img-size", "16", "--batch-size", "64",
                     "--moco-k", "256", "--moco-dim", "16", "--mlp-hidden-dim", "32", "--epochs", "1",
                     "--knn-every", "0", "--num-workers", "0", "--bn-splits", "4", "--num-mini-crops", "2"],
    "main_lincls.py": ["--dataset", "digits", "-a", "resnet18", "--img-size", "16", "--batch-size", "128",
                       "--epochs", "1", "--num-workers", "0", "--lr", "1"],
}
# GPU hours per epoch of each stage's recipe, from the measured rates in docs/SPEED.md (one H100, bf16, eager,
# 2026-11-23: APS batches on the device 2,141 pairs/s for ViT-S/2, scaled by the step rates for T and B; MoCo
# ResNet-50 at 224 px 1,008 img/s); ImageNet APS from the ViT-S/16 step at 224 px being ~ the ViT-S/2 step.
APS_EPOCH_H = {"vit-tiny": 50000 / 3552 / 3600, "vit-small": 50000 / 2141 / 3600, "vit-base": 50000 / 955 / 3600}
IMAGENET_IMAGES, MOCO_IMG_S = 1281167, 1008


def rows() -> list:
    return sorted(f[:-5] for f in os.listdir(ROWS) if f.endswith(".yaml"))


def load_row(name: str) -> dict:
    path = os.path.join(ROWS, f"{name}.yaml")
    if not os.path.isfile(path):
        raise UserError(f"unknown row {name!r}; `python -m tools.reproduce --list` shows the {len(rows())} rows")
    with open(path, encoding="utf-8") as f:
        row = yaml.safe_load(f)
    row["name"] = name
    return row


def recipe(stage: dict) -> dict:
    with open(os.path.join(ROOT, stage["config"]), encoding="utf-8") as f:
        return yaml.safe_load(f)


def estimate_gpu_hours(row: dict) -> float:
    """Pretraining + evaluation GPU hours of a row at the recipes' epochs, from the benchmark's rates."""
    total = 0.0
    for stage in row["stages"]:
        cfg = recipe(stage)
        epochs = cfg.get("nepoch") or cfg.get("epochs")
        if stage["script"] in ("main_pretrain.py", "main_finetune.py"):
            per_epoch = APS_EPOCH_H[cfg["arch"]]
            if cfg["dataset"] == "imagefolder":                    # 1.28 M images, ~ the 32 px step's cost each
                per_epoch *= IMAGENET_IMAGES / 50000
            if stage["script"] == "main_finetune.py":              # one step per batch, not four
                per_epoch /= 4
        elif stage["script"] == "main_moco.py":                    # the switches' cost relative to the baseline's
            per_epoch = IMAGENET_IMAGES / MOCO_IMG_S / 3600 * row.get("paper_pretrain_hours", 23.6) / 23.6
        else:                                                      # the probe: a forward of the frozen trunk
            per_epoch = IMAGENET_IMAGES / MOCO_IMG_S / 3600 * 0.3
        total += epochs * per_epoch
    return total


def stage_dir(out: str, stage: dict) -> str:
    return os.path.join(out, stage["name"])


def command(row: dict, index: int, out: str, smoke: bool, extra: list) -> list:
    """The argv of stage `index`: its recipe, the smoke flags, the previous stage's checkpoint, the extra flags."""
    stage = row["stages"][index]
    argv = [sys.executable, stage["script"], "--config", stage["config"]]
    argv += SMOKE[stage["script"]] if smoke else []
    if stage.get("weights"):
        argv += [stage["weights"], os.path.join(stage_dir(out, row["stages"][index - 1]), "checkpoint.pth")]
    return argv + list(extra) + ["--output-dir", stage_dir(out, stage)]


def final_metrics(folder: str) -> dict:
    import torch
    ckpt = torch.load(os.path.join(folder, "checkpoint.pth"), map_location="cpu", weights_only=True)
    return ckpt.get("metrics") or {}


def run_chain(row: dict, out: str, smoke: bool, extra: list, log=print) -> dict:
    """Run (or resume) every stage; write <out>/reproduce.md; return its numbers."""
    os.makedirs(out, exist_ok=True)
    times, commands = {}, []
    for i, stage in enumerate(row["stages"]):
        argv = command(row, i, out, smoke, extra)
        commands.append(" ".join(shlex.quote(a) for a in [os.path.basename(argv[0])] + argv[1:]))
        if os.path.isfile(os.path.join(stage_dir(out, stage), "report.md")):
            log(f"stage {stage['name']}: done earlier ({stage_dir(out, stage)}), skipped")
            times[stage["name"]] = None
            continue
        log(f"stage {stage['name']}: {commands[-1]}")
        start = time.perf_counter()
        code = subprocess.run(argv, cwd=ROOT).returncode
        times[stage["name"]] = time.perf_counter() - start
        if code:
            raise UserError(f"stage {stage['name']} of {row['name']} stopped with status {code} (its log: "
                            f"{stage_dir(out, stage)}/log.txt); fix that and rerun the same command to continue")
    metrics = final_metrics(stage_dir(out, row["stages"][-1]))
    ours = metrics.get(row["metric"])
    result = {"row": row["name"], "paper": row["paper"]["value"], "ours": ours,
              "difference": None if ours is None else ours - row["paper"]["value"], "smoke": smoke,
              "seconds": times, "commands": commands}
    write_report(row, result, out)
    return result


def write_report(row: dict, result: dict, out: str) -> str:
    import torch
    gpus = torch.cuda.device_count()                    # what each stage may use (one process per GPU under torchrun)
    lines = [f"# {row['name']}", "", f"- paper: {row['paper']['value']} ({row['paper']['metric']}; "
             f"{row['paper']['source']})"]
    ours = result["ours"]
    lines.append(f"- ours: {'not measured' if ours is None else f'{ours:.2f}'} ({row['metric']}"
                 f"{', a --smoke run on digits: not comparable' if result['smoke'] else ''})")
    if ours is not None:
        lines.append(f"- difference: {result['difference']:+.2f}")
    lines += ["", "| stage | wall time | GPU hours |", "|---|---|---|"]
    for name, seconds in result["seconds"].items():
        wall = "done earlier" if seconds is None else f"{seconds / 3600:.2f} h ({seconds:.0f} s)"
        hours = "" if seconds is None else (f"{seconds / 3600 * gpus:.2f}" if gpus else "none (CPU)")
        lines.append(f"| {name} | {wall} | {hours} |")
    lines += ["", "Commands (from the repository root):", "", "```bash", *result["commands"], "```"]
    path = os.path.join(out, REPORT)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def get_args_parser():
    p = ArgumentParser(description=__doc__.split("\n")[0], prog="python -m tools.reproduce")
    p.add_argument("row", nargs="?", type=text("a row of configs/rows (see --list)"), help="the row to reproduce")
    p.add_argument("--list", action="store_true", help="list the rows with their paper number and GPU hours")
    p.add_argument("--smoke", action="store_true", help="the same chain at a tiny scale on the embedded digits")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--output-dir", type=output_folder(), default=None,
                   help="where the chain's runs go (default: output/reproduce/<row>[-smoke])")
    return p


@exit_on_user_error
def main(args, extra=()):
    if args.list:
        lines = [f"{'row':40s} {'paper':>6s}  {'GPU h (est.)':>12s}  metric"]
        for name in rows():
            row = load_row(name)
            lines.append(f"{name:40s} {row['paper']['value']:6.1f}  {estimate_gpu_hours(row):12.0f}  "
                         f"{row['paper']['metric']}")
        print("\n".join(lines))
        return lines
    if not args.row:
        raise UserError("name a row (python -m tools.reproduce --list shows them), or pass --list")
    row = load_row(args.row)
    out = args.output_dir or os.path.join("output", "reproduce", row["name"] + ("-smoke" if args.smoke else ""))
    if args.dry_run:
        cmds = [" ".join(shlex.quote(a) for a in command(row, i, out, args.smoke, extra)[1:])
                for i in range(len(row["stages"]))]
        print("\n".join(f"python {c}" for c in cmds))
        return cmds
    result = run_chain(row, out, args.smoke, extra)
    print(json.dumps({k: result[k] for k in ("row", "paper", "ours", "difference")}))
    print(f"report: {os.path.join(out, REPORT)}")
    return result


if __name__ == "__main__":
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    main(get_args_parser().parse_args(argv[:cut]), argv[cut + 1:])
