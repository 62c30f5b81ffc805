"""The Trainer: the epoch loop and the step loop. Beside it: engine.state (checkpoints, resume, preemption),
engine.guard (the non-finite policy), engine.progress (an epoch's figures and progress lines) and engine.hooks (the
callbacks tests and tools install)."""
import os
import time
from typing import Optional

import numpy as np
import torch
import torch._dynamo

from engine.contracts import Method, Reporter, TrainSettings
from engine.guard import NonFiniteGuard
from engine.hooks import Callbacks
from engine.progress import EpochLog
from engine.state import RunState
from utils.checkpoint import LATEST
from utils.config import CONFIG
from utils.dist import cleanup, get_rank, get_world_size, is_dist
from utils.errors import UserError
from utils.log import RunLog, get_logger
from utils.optim import OptimizerSpec, set_lr
from utils.plots import CURVES
from utils.preempt import Preempted
from utils.recompute import enable_grad_checkpointing, recomputes_buffers
from utils.report import REPORT
from utils.rng import BatchRandom
from utils.runtime import autocast, compile_in_place, make_grad_scaler, peak_memory_mib, seed_everything
from utils.transfer import tree_to_device

STEP_STREAM = 2  # key part that keeps the training step's BatchRandom stream apart from others


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


class Trainer:
    """Runs epochs [start, settings.epochs) of `method` over `loader`, evaluating and checkpointing as it goes."""

    def __init__(self, method: Method, optimizer, loader, settings: TrainSettings, device: torch.device,
                 amp: Optional[torch.dtype], reporter: Reporter = None, callbacks=()):
        """optimizer: a utils.optim.OptimizerSpec (built here over method.param_groups()), or an optimiser;
        callbacks: engine.hooks.Callback objects (besides those installed)."""
        if isinstance(optimizer, OptimizerSpec):
            optimizer = optimizer.build(method.param_groups(), device)
        self.method, self.optimizer, self.loader, self.settings = method, optimizer, loader, settings
        self.reporter = reporter or Reporter()
        self.device, self.amp = device, amp
        self.scaler = make_grad_scaler(device, amp)
        self.best = None
        self.start_epoch, self.global_step = 0, 0
        self.skip_batches = 0                           # a mid-epoch (preemption) checkpoint's position
        self.state = RunState(self)
        self.guard = NonFiniteGuard(settings, device, method.name)
        self.hooks = Callbacks(callbacks)
        self.rng = BatchRandom(device)
        self.log = RunLog(settings.output_dir, settings.loggers)
        self.logger = get_logger()
        self.last_metrics, self.start_metrics = {}, {}
        self.train_seconds, self.train_images = 0.0, 0      # this process's training time and images (for report.md)
        self.params = [p for g in optimizer.param_groups for p in g["params"]]   # what --clip-grad clips
        if settings.grad_checkpointing:
            enable_grad_checkpointing(method.module)
        if settings.accum_steps > 1:
            self.split_backbone(settings.accum_steps)
        if settings.compile and is_dist() and recomputes_buffers(method.module):
            # dynamo's DDP graph splitting cuts a recomputed region whose batch norms update their statistics, and
            # the backward then finds a saved statistic overwritten: one graph instead, reduced after the backward
            torch._dynamo.config.optimize_ddp = "no_optimization"
            self.logger.info("--compile with batch norms recomputed under several processes: the model compiles "
                             "as one graph (DDP's graph splitting off; gradients reduced after the backward pass)")
        compile_in_place(method.model, settings.compile, settings.compile_backend)

    def split_backbone(self, chunks: int):
        """--accum-steps: the method's backbone runs in `chunks` parts of each process's batch."""
        per = self.settings.batch_size // get_world_size()
        if chunks > per:
            raise UserError(f"--accum-steps {chunks} is more than the {per} images each process gets from --batch-size "
                            f"{self.settings.batch_size}; use at most {per}")
        self.method.split_backbone(chunks)
        self.logger.info(f"--accum-steps {chunks}: the backbone runs on each process's batch of {per} in {chunks} "
                         f"chunks of about {-(-per // chunks)}, the heads and the loss on the whole batch (the same "
                         "gradient)")

    # ---------------------------------------------------------------- the step loop
    def fetched(self, batches):
        """The batches, each loaded inside the callbacks' step context."""
        it = iter(batches)
        while True:
            with self.hooks.step_context():
                batch = next(it, None)
            if batch is None:
                return
            yield batch

    def train_one_epoch(self, epoch: int, skip: int = 0) -> dict:
        """One epoch from batch `skip` on: per optimizer step, set the lr, forward, backward, step, log."""
        method, optimizer, settings, scaler = self.method, self.optimizer, self.settings, self.scaler
        method.model.train()
        n_iter, per_batch = len(self.loader), method.steps_per_batch
        log = EpochLog(epoch, settings.epochs, n_iter, settings.print_freq, settings.batch_size, self.log,
                       finite_norms=scaler.is_enabled())
        self.guard.start_epoch()
        lr = optimizer.param_groups[0]["lr"]
        for it, batch in enumerate(self.fetched(self.state.batches(self.loader, skip)), start=skip):
            self.rng.reseed(settings.seed, epoch, it, STEP_STREAM)
            steps = method.training_steps(tree_to_device(batch, self.device), self.rng)
            for t in range(per_batch):
                lr = method.lr_at(epoch + (it * per_batch + t) / (n_iter * per_batch))
                set_lr(optimizer, lr)
                with self.hooks.step_context(), autocast(self.device, self.amp):
                    loss, stats = next(steps)
                optimizer.zero_grad(set_to_none=True)
                if self.guard.skip(loss, self.global_step, epoch):
                    self.global_step += 1
                    continue
                with self.hooks.step_context():
                    self.guard.watch(loss, self.global_step)
                    scaler.scale(loss).backward()
                    self.hooks.after_backward(self)
                    norm = self.clip_gradients(settings.clip_grad) if settings.clip_grad else None
                    scaler.step(optimizer)
                    scaler.update()
                    method.after_step(self.global_step)
                    log.update(loss, stats, norm)
                self.global_step += 1
            due = log.due(it)
            if due:
                self.guard.check(epoch)
                log.line(it, lr, self.global_step)
            if it + 1 < n_iter and self.state.stop_requested(sync=due):
                self.guard.check(epoch)
                self.state.preempt(epoch, it + 1)
        self.guard.check(epoch)
        out = log.close(lr)
        self.train_seconds += log.seconds
        self.train_images += (n_iter - skip) * settings.batch_size
        return out

    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        """Clip the gradients' global norm to max_norm (unscaled first under fp16); the norm before clipping, as a
        tensor (no host sync)."""
        self.scaler.unscale_(self.optimizer)
        return torch.nn.utils.clip_grad_norm_(self.params, max_norm)     # (those without a gradient are skipped)

    # ---------------------------------------------------------------- the epoch loop
    def fit(self) -> dict:
        self.state.stop.install()
        try:
            return self._fit()
        except BaseException as e:                  # the trackers' runs end too (resumable after a preemption)
            self.log.end("preempted" if isinstance(e, Preempted) else "failed")
            raise
        finally:
            self.state.stop.restore()

    def dry_run(self) -> dict:
        """One batch through the data path and one forward pass of the first training step (no update): the
        data and the model's shapes check out, or fail with one line."""
        self.method.model.train()
        batch = next(iter(self.loader))
        self.rng.reseed(self.settings.seed, 0, 0, STEP_STREAM)
        with torch.no_grad(), autocast(self.device, self.amp):
            loss, _ = next(self.method.training_steps(tree_to_device(batch, self.device), self.rng))
        self.logger.info(f"dry run: the flags, the data and the model's shapes check out (first loss "
                         f"{float(loss):.4g}); nothing trained, nothing saved")
        return {"dry_run_loss": float(loss)}

    def evaluate_start(self):
        """The method's metrics before any training (epoch 0), logged like an epoch's evaluation."""
        ev = self.method.evaluate(-1)
        if ev:
            self.start_metrics = ev
            self.log.scalars(ev, 0, prefix="eval/")
            self.log.record({"epoch": 0, "step": 0, **ev})
            self.logger.info("before training: " + " ".join(f"{k} {v:.2f}" for k, v in ev.items()))

    def _fit(self) -> dict:
        method, settings, epochs = self.method, self.settings, self.settings.epochs
        self.hooks.fit_start(self)
        if settings.description:
            self.logger.info(settings.description)
        for note in settings.notes:
            self.logger.info(note)
        if settings.dry_run:
            return self.dry_run()
        self.reporter.started(settings.flags)
        self.state.resume()
        self.log.start(settings.flags, resumed=self.start_epoch > 0 or self.skip_batches > 0)
        if self.start_epoch == 0 and not self.skip_batches and settings.eval_every > 0 and method.evaluate_at_start:
            self.evaluate_start()
        if self.start_epoch >= epochs:
            self.logger.info(f"nothing to train: {self.start_epoch} of {epochs} epochs already done")
        for epoch in range(self.start_epoch, epochs):
            seed_everything(epoch_seed(settings.seed, epoch, get_rank()))
            for sampler in (getattr(self.loader, "batch_sampler", None), getattr(self.loader, "sampler", None)):
                if hasattr(sampler, "set_epoch"):
                    sampler.set_epoch(epoch)
            t0 = time.perf_counter()
            train = self.train_one_epoch(epoch, self.skip_batches if epoch == self.start_epoch else 0)
            method.after_epoch(epoch)
            metrics = {f"train_{k}": v for k, v in train.items()}
            last = epoch + 1 == epochs
            ev = None
            if settings.eval_every > 0 and ((epoch + 1) % settings.eval_every == 0 or last):
                ev = method.evaluate(epoch)
            if ev is not None:
                metrics.update(ev)
                self.log.scalars(ev, epoch + 1, prefix="eval/")
                self.logger.info(f"epoch {epoch + 1}: " + " ".join(f"{k} {v:.2f}" for k, v in ev.items()))
            self.last_metrics = metrics
            self.log.record({"epoch": epoch + 1, "step": self.global_step,
                             "epoch_time_s": round(time.perf_counter() - t0, 3), **metrics})
            key = method.select_metric
            improved = key in metrics and (self.best is None or metrics[key] > self.best)
            if improved:
                self.best = metrics[key]
            self.hooks.epoch_end(self, epoch)
            self.state.save(epoch + 1)
            if improved:
                self.state.save_best(epoch + 1)
                self.logger.info(f"best {key} so far: {self.best:.2f} (epoch {epoch + 1})")
            if epoch + 1 < epochs and self.state.stop_requested(sync=True):
                self.state.stop_after_epoch(epoch)
        self.log.close()
        return self.last_metrics

    def finish(self, metrics: dict) -> dict:
        """Log the method's closing line and where the checkpoint is, tell the reporter (curves.png, report.md), leave
        the process group; return metrics."""
        settings = self.settings
        if settings.dry_run:
            cleanup()
            return metrics
        line = self.method.summary(metrics, self.best, self.start_metrics)
        if line:
            self.logger.info(line)
        self.logger.info(f"checkpoint: {os.path.join(settings.output_dir, LATEST)}")
        resumed = f" (resumed after epoch {self.start_epoch})" if self.start_epoch else ""
        self.reporter.finished(
            description=settings.description, flags=settings.flags, model_config=self.method.model_config,
            metrics=metrics, start_metrics=self.start_metrics, seconds=self.train_seconds,
            images_per_s=self.train_images / max(self.train_seconds, 1e-9) * get_world_size(),
            peak_memory_mib=peak_memory_mib(self.device), epochs=f"{settings.epochs}{resumed}", notes=settings.notes)
        self.log.end("finished", metrics, [os.path.join(settings.output_dir, f) for f in (CURVES, REPORT, CONFIG)])
        cleanup()
        return metrics
