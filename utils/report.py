"""report.md: what a run was and what it gave, as plain Markdown a user can paste into an issue (the command, the
code's commit, the data and model, the final metrics, the time, images/s, peak memory, the pictures); and the
RunReporter that the training loop calls to draw curves.png and write report.md."""
import os
import shlex
import subprocess
import sys

from utils.config import write_config
from utils.dist import is_main_process
from utils.errors import describe
from utils.log import get_logger
from utils.plots import CURVES, plot_curves

REPORT = "report.md"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit(folder: str = ROOT) -> str:
    """The checkout's commit ('<sha> (with uncommitted changes)' when dirty), or 'unknown' without git."""
    try:
        sha = subprocess.run(["git", "-C", folder, "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", folder, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not sha:
        return "unknown"
    return sha + (" (with uncommitted changes)" if dirty else "")


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable)] + sys.argv)


def fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_report(output_dir: str, description: str, flags: dict, model_config: dict, metrics: dict,
                 start_metrics: dict, seconds: float, images_per_s: float, peak_memory_mib: float, epochs: str,
                 notes=()) -> str:
    """Write <output_dir>/report.md (the command as run, then every flag's value, then `notes`); returns its path."""
    pictures = sorted(f for f in os.listdir(output_dir) if f.endswith(".png"))
    lines = ["# Run report", "", "```", command_line(), "```", "",
             f"- code: commit {git_commit()}",
             f"- flags: {' '.join(f'{k}={v}' for k, v in flags.items())}",
             f"- run: {description or 'see log.txt'}",
             f"- model: {', '.join(f'{k}={v}' for k, v in model_config.items()) or 'see the checkpoint'}",
             f"- epochs: {epochs}",
             f"- time: {seconds:.0f} s" + (f" ({seconds / 3600:.2f} h)" if seconds >= 3600 else "")
             + f" of training, {images_per_s:.1f} images/s",
             f"- peak memory: {peak_memory_mib:.0f} MiB", *[f"- note: {n}" for n in notes], "",
             "| metric | at the end |" + (" at the start |" if start_metrics else ""),
             "|---|---|" + ("---|" if start_metrics else "")]
    for k in sorted(metrics):
        start = f" {fmt(start_metrics[k])} |" if start_metrics and k in start_metrics else (" |" if start_metrics
                                                                                            else "")
        lines.append(f"| {k} | {fmt(metrics[k])} |{start}")
    if pictures:
        lines += ["", "Pictures: " + ", ".join(f"[{p}]({p})" for p in pictures)]
    path = os.path.join(output_dir, REPORT)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


class RunReporter:
    """An engine.Reporter: config.yaml (the resolved flags, utils.config) at the start, curves.png (from log.jsonl)
    after every checkpoint and at the end, report.md at the end; rank 0 only. A picture that cannot be drawn is a
    warning, never a stop."""

    def __init__(self, output_dir: str):
        self.output_dir, self.logger = output_dir, get_logger()

    def draw_curves(self):
        if not is_main_process():
            return
        try:
            plot_curves(self.output_dir)
        except Exception as e:  # matplotlib can fail in many ways (fonts, a full disk): the run goes on
            self.logger.warning(f"could not draw {os.path.join(self.output_dir, CURVES)} ({describe(e)})")

    def started(self, flags: dict):
        if is_main_process():
            write_config(self.output_dir, flags)

    def checkpoint_written(self):
        self.draw_curves()

    def finished(self, **run) -> str:
        self.draw_curves()
        if not is_main_process():
            return ""
        path = write_report(self.output_dir, **run)
        self.logger.info(f"report: {path}")
        return path
