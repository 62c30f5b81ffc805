"""Logging on rank 0: a python logger (console + log.txt), TensorBoard scalars and a JSON-lines file."""
import datetime
import json
import logging
import math
import os
import sys
import time

import torch

from utils.dist import all_reduce_mean, is_main_process

LOGGER_NAME = "asym"


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def setup_logger(output_dir: str = None) -> logging.Logger:
    """Console (rank 0 only; other ranks show warnings) and <output_dir>/log.txt."""
    logger = get_logger()
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main_process() else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if output_dir and is_main_process():
        fh = logging.FileHandler(os.path.join(output_dir, "log.txt"))
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    return logger


class RunLog:
    """TensorBoard + JSON lines in `output_dir`, and the trackers `loggers` names (utils.trackers: wandb, mlflow); a
    no-op on ranks other than 0 or without a folder."""

    def __init__(self, output_dir: str = None, loggers=("tensorboard",)):
        from utils.trackers import Trackers, require
        self.enabled = bool(output_dir) and is_main_process()
        self.tb = None
        self.jsonl = None
        self.trackers = None
        if self.enabled:
            require(loggers)                        # a missing package: one line now, not after the first epoch
            if "tensorboard" in loggers:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(log_dir=os.path.join(output_dir, "tensorboard"))
            self.jsonl = open(os.path.join(output_dir, "log.jsonl"), "a")
            self.trackers = Trackers(output_dir, loggers)

    def start(self, flags: dict, resumed: bool):
        """Open the trackers (continuing their runs when the training run resumes) and give them the config."""
        if self.trackers is not None:
            self.trackers.start(flags, resumed)

    def scalars(self, metrics: dict, step: int, prefix: str = "train/"):
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(prefix + k, v, step)
        if self.trackers is not None:
            self.trackers.scalars(metrics, step, prefix)

    def record(self, entry: dict):
        """One JSON line (per epoch, or per evaluation)."""
        if self.jsonl is None:
            return
        self.jsonl.write(json.dumps(entry) + "\n")
        self.jsonl.flush()

    def close(self):
        """TensorBoard and the JSON lines (the trackers stay open for the final metrics: end)."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None

    def end(self, status: str, metrics: dict = None, files=()):
        """Close the trackers: finished (with the final metrics and files), preempted or failed."""
        if self.trackers is not None:
            self.trackers.end(status, metrics, files)


class MeanMeter:
    """Running sums of scalar tensors, kept on the device so that updating never syncs with the host."""

    def __init__(self):
        self.sums, self.finite_counts = {}, {}
        self.count = 0

    def update(self, **values):
        for k, v in values.items():
            v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v))
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.count += 1

    def update_finite(self, **values):
        """Add each tensor value only where it is finite (its mean is over those updates; decided on the device,
        no host sync): e.g. the gradient norm of the steps that fp16's grad scaler did not skip."""
        for k, v in values.items():
            v = v.detach().float()
            ok = torch.isfinite(v)
            v, n = torch.where(ok, v, torch.zeros_like(v)), ok.float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.finite_counts[k] = self.finite_counts[k] + n if k in self.finite_counts else n

    def averages(self, sync: bool = False) -> dict:
        """Mean of each value since the last reset (one host sync); averaged over ranks if `sync`. A value with no
        finite update is nan."""
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        counts = [self.finite_counts.get(k, torch.full_like(self.sums[k], max(self.count, 1))) for k in keys]
        vec = torch.stack([self.sums[k] for k in keys]) / torch.stack(counts)     # no finite update: 0 / 0 = nan
        if sync:
            vec = all_reduce_mean(vec)
        return dict(zip(keys, vec.tolist()))

    def reset(self):
        self.sums, self.finite_counts = {}, {}
        self.count = 0


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=int(seconds)))


class Progress:
    """Prints `header [i/n] metrics img/s eta` every `every` iterations and at the end."""

    def __init__(self, total: int, header: str, every: int, images_per_iter: int):
        self.total, self.header, self.every = total, header, max(1, every)
        self.images_per_iter = images_per_iter
        self.start = time.perf_counter()
        self.last_rate = 0.0

    def due(self, i: int) -> bool:
        return (i + 1) % self.every == 0 or i + 1 == self.total

    def line(self, i: int, metrics: dict) -> str:
        elapsed = time.perf_counter() - self.start
        done = i + 1
        self.last_rate = done * self.images_per_iter / max(elapsed, 1e-9)
        eta = elapsed / done * (self.total - done)
        w = len(str(self.total))
        parts = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        return f"{self.header} [{done:>{w}}/{self.total}] {parts} img/s {self.last_rate:.1f} eta {format_eta(eta)}"
