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

from utils.config import UniqueKeyLoader
from utils.config import ArgumentParser
from utils.errors import UserError, exit_on_user_error
from utils.flags import output_folder, text
from utils.textfile import read_text

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


def read_yaml(path: str, what: str, fix: str):
    """A YAML file of ours or the user's (utils.textfile: UTF-8, one line when it is not)."""
    try:
        return yaml.load(read_text(path, what, fix), Loader=UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise UserError(f"{what} is not readable YAML ({' '.join(str(e).split())[:160]}); {fix}") from None


def load_row(name: str) -> dict:
    path = os.path.join(ROWS, f"{name}.yaml")
    if not os.path.isfile(path):
        raise UserError(f"unknown row {name!r}; `python -m tools.reproduce --list` shows the {len(rows())} rows")
    row = read_yaml(path, f"row {path}", "fix the row (the rows in configs/rows show its keys)")
    check_row(path, row)
    row["name"] = name
    return row


def check_row(path: str, row):
    """A row has the paper's number, the metric, and stages each naming a script and an existing recipe."""
    def bad(what: str):
        raise UserError(f"row {path} {what}; fix the row (the rows in configs/rows show its keys)")

    if not isinstance(row, dict):
        bad("is not a mapping of paper, metric and stages")
    paper = row.get("paper")
    if not isinstance(paper, dict) or not isinstance(paper.get("value"), (int, float)) or isinstance(
            paper.get("value"), bool) or not all(isinstance(paper.get(k), str) for k in ("metric", "source")):
        bad("needs paper: {value: NUMBER, metric: TEXT, source: TEXT}")
    if not isinstance(row.get("metric"), str):
        bad("needs metric: the key of the last stage's metrics to compare (e.g. test_acc1)")
    stages = row.get("stages")
    if not isinstance(stages, list) or not stages:
        bad("needs stages: a list of {name, script, config[, weights]}")
    names = set()
    for i, stage in enumerate(stages):
        if not isinstance(stage, dict) or not isinstance(stage.get("name"), str) or stage.get("script") not in SMOKE:
            bad(f"stage {i + 1} needs a name and a script (one of {', '.join(SMOKE)})")
        if stage["name"] in names or os.sep in stage["name"] or stage["name"] in ("", ".", ".."):
            bad(f"stage {i + 1} needs a name of its own that can be a folder ({stage['name']!r})")
        names.add(stage["name"])
        if not isinstance(stage.get("config"), str) or not os.path.isfile(os.path.join(ROOT, stage["config"])):
            bad(f"stage {stage['name']} names recipe {stage.get('config')!r}, which is not a file under {ROOT}")
        if stage.get("weights") is not None and (i == 0 or not str(stage["weights"]).startswith("--")):
            bad(f"stage {stage['name']} takes weights: the flag that reads the previous stage's checkpoint "
                "(not on the first stage)")


def recipe(stage: dict) -> dict:
    path = os.path.join(ROOT, stage["config"])
    cfg = read_yaml(path, f"recipe {path}", "fix the recipe: flag: value lines")
    if not isinstance(cfg, dict):
        raise UserError(f"recipe {path} is not flag: value lines; fix it")
    return cfg


def estimate_gpu_hours(row: dict) -> float:
    """Pretraining + evaluation GPU hours of a row at the recipes' epochs, from the benchmark's rates."""
    total = 0.0
    for stage in row["stages"]:
        cfg = recipe(stage)
        epochs = cfg.get("nepoch") or cfg.get("epochs")
        if not isinstance(epochs, (int, float)) or isinstance(epochs, bool):
            return float("nan")                                    # a recipe of the scripts' default epochs
        if stage["script"] in ("main_pretrain.py", "main_finetune.py"):
            per_epoch = APS_EPOCH_H.get(cfg.get("arch"), APS_EPOCH_H["vit-small"])
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
    from utils.checkpoint import load_file
    metrics = load_file(os.path.join(folder, "checkpoint.pth")).get("metrics")
    return metrics if isinstance(metrics, dict) else {}


STATE = "reproduce.json"


def claim(out: str, row: dict, smoke: bool):
    """<out>/reproduce.json names the chain a folder holds: a rerun continues it, another row (or the smoke chain
    in the full one's folder) is refused rather than taking its stages for done."""
    path, mine = os.path.join(out, STATE), {"row": row["name"], "smoke": bool(smoke)}
    if os.path.exists(path):
        fix = "pass another --output-dir, or remove the file to let this chain take the folder"
        try:
            held = json.loads(read_text(path, f"{path}", fix))
        except ValueError:
            held = None
        if not isinstance(held, dict) or not isinstance(held.get("row"), str):
            raise UserError(f"{path} is not a state file of tools.reproduce; {fix}")
        if held != mine:
            tag = lambda smoke: " (smoke)" if smoke is True else ""  # noqa: E731
            raise UserError(f"--output-dir {out} holds the chain of row {held['row']}{tag(held.get('smoke'))}, not "
                            f"{row['name']}{tag(bool(smoke))}; {fix}")
        return
    os.makedirs(out, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(mine, f)


def done(out: str, row: dict, index: int) -> bool:
    """Stage `index` finished earlier (its report.md is there). Its checkpoint must then still be there when
    something reads it: the next stage, if that one is not done, or the report, if it is the last."""
    folder = stage_dir(out, row["stages"][index])
    if not os.path.isfile(os.path.join(folder, "report.md")):
        return False
    last = index == len(row["stages"]) - 1
    needed = last or not done(out, row, index + 1)
    if needed and not os.path.isfile(os.path.join(folder, "checkpoint.pth")):
        raise UserError(f"stage {row['stages'][index]['name']} finished earlier ({folder}/report.md) but its "
                        f"checkpoint.pth is gone, and {'the report' if last else 'the next stage'} reads it; copy "
                        f"it back, or remove {folder} to run the stage again")
    return True


def run_chain(row: dict, out: str, smoke: bool, extra: list, log=print) -> dict:
    """Run (or resume) every stage; write <out>/reproduce.md; return its numbers."""
    claim(out, row, smoke)
    times, commands = {}, []
    for i, stage in enumerate(row["stages"]):
        argv = command(row, i, out, smoke, extra)
        commands.append(" ".join(shlex.quote(a) for a in [os.path.basename(argv[0])] + argv[1:]))
        if done(out, row, i):
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
