"""One epoch's running figures: the epoch's means (its record) and the window since the last progress line (the
line, and the TensorBoard points), kept on the device until a line is due."""
import time

from utils.log import MeanMeter, Progress, get_logger


class EpochLog:
    def __init__(self, epoch: int, epochs: int, batches: int, print_freq: int, batch_size: int, run_log,
                 finite_norms: bool):
        """finite_norms: leave out the gradient norms of steps the fp16 scaler skips (inf/nan gradients)."""
        self.epoch_meter, self.window = MeanMeter(), MeanMeter()
        self.progress = Progress(batches, f"epoch {epoch + 1}/{epochs}", print_freq, batch_size)
        self.run_log, self.finite_norms = run_log, finite_norms
        self.batches, self.batch_size = batches, batch_size
        self.start = time.perf_counter()

    def update(self, loss, stats: dict, norm=None):
        for m in (self.epoch_meter, self.window):
            m.update(**{"loss": loss, **stats})
            if norm is not None:
                (m.update_finite if self.finite_norms else m.update)(grad_norm=norm)

    def due(self, it: int) -> bool:
        return self.progress.due(it)

    def line(self, it: int, lr: float, step: int):
        """The progress line after batch `it`, and its TensorBoard points (reads the window: one host sync)."""
        avg = self.window.averages()
        self.window.reset()
        get_logger().info(self.progress.line(it, {**avg, "lr": lr}))
        self.run_log.scalars({**avg, "lr": lr, "img_per_s": self.progress.last_rate}, step)

    def close(self, lr: float) -> dict:
        """The epoch's means over every rank, its last lr and its images/s."""
        out = self.epoch_meter.averages(sync=True)
        out["lr"] = lr
        self.seconds = time.perf_counter() - self.start
        out["img_per_s"] = self.batches * self.batch_size / max(self.seconds, 1e-9)
        return out
