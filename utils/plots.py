"""Pictures of a run, from its log.jsonl (one line per epoch): the training curves of one run (curves.png, written
by the Trainer at every checkpoint and at the end) and several runs overlaid (tools.plot_runs). matplotlib,
without a screen (the Agg backend)."""
import json
import math
import os

CURVES = "curves.png"
# what is plotted, in this order, when the log has it: (log key, axis title)
PANELS = (("train_loss", "training loss"), ("train_lr", "learning rate"), ("train_pos_cos", "positive cosine"),
          ("knn_top1", "kNN top-1 (%)"), ("test_acc1", "test top-1 (%)"), ("val_acc1", "held-out top-1 (%)"))


def read_log(path: str) -> list:
    """The records of a log.jsonl (a line that is not a JSON record, e.g. cut by a crash or the zeros a power loss
    leaves, is skipped)."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def series(records: list, key: str):
    """(epochs, values) of `key` over the records that have it (the last record of an epoch wins: a resumed
    run may log an epoch twice)."""
    points = {r["epoch"]: r[key] for r in records
              if isinstance(r.get(key), (int, float)) and isinstance(r.get("epoch"), (int, float))}
    epochs = sorted(points)
    return epochs, [points[e] for e in epochs]


def pyplot():
    """matplotlib.pyplot without a screen (Agg)."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def save(fig, out: str):
    """Lay out, write `out` (PNG) and free the figure."""
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    pyplot().close(fig)


def _figure(n_panels: int):
    plt = pyplot()
    cols = min(3, n_panels)
    rows = math.ceil(n_panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[n_panels:]:
        ax.axis("off")
    return plt, fig, list(axes.flat[:n_panels])


def plot_runs(logs: dict, out: str, title: str = "") -> list:
    """Overlay the runs {label: log.jsonl path} on one panel per quantity they log; returns the panels drawn."""
    runs = {label: read_log(path) for label, path in logs.items()}
    panels = [(k, t) for k, t in PANELS if any(series(r, k)[0] for r in runs.values())]
    if not panels:
        return []
    _, fig, axes = _figure(len(panels))
    for ax, (key, name) in zip(axes, panels):
        for label, records in runs.items():
            epochs, values = series(records, key)
            if epochs:
                ax.plot(epochs, values, marker="o" if len(epochs) < 30 else None, markersize=3, label=label)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    save(fig, out)
    return [k for k, _ in panels]


def plot_curves(output_dir: str) -> str:
    """<output_dir>/curves.png from <output_dir>/log.jsonl; the PNG's path, or None when there is nothing yet."""
    log = os.path.join(output_dir, "log.jsonl")
    if not os.path.isfile(log):
        return None
    out = os.path.join(output_dir, CURVES)
    return out if plot_runs({os.path.basename(os.path.normpath(output_dir)): log}, out) else None
