"""The training loop shared by every script: lr per step, autocast, several optimizer steps per loaded batch,
non-finite detection without host syncs, progress lines, TensorBoard/JSON logs, evaluation, atomic
checkpoints and exact resume.

A script hands the Trainer a `Method` (what it trains: the model, its parameter groups, the steps of one loaded
batch, the lr schedule, the evaluation, the hooks and its checkpoints' record), an `OptimizerSpec`
(utils.optim: which optimiser, built here over the method's groups), `TrainSettings` (the runtime flags, and
what the script says about its own flags: which ones a resumed run must share, which one sets the lr) and a
`Reporter` (what the run leaves for people:
utils.report.RunReporter draws curves.png and writes report.md). `Method.training_steps(batch, rng)`
yields (loss, stats) once per optimizer step (APS: one per sampling round; the other methods: one per batch).
rng is a utils.rng.BatchRandom reseeded per global batch from (seed, epoch, batch): per-sample randomness drawn
from it (APS's patch sampling, ScaleMix, shuffle-BN's permutation) is the same for any number of processes.
Every epoch also reseeds the global RNGs from (seed, epoch, rank) (dropout, drop path), and a mid-epoch
checkpoint saves them.
"""
import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch._dynamo

from utils.checkpoint import LATEST, RECORD, find_resume_path, load_strict, load_training_checkpoint, save_checkpoint
from utils.dist import all_reduce_min, cleanup, get_rank, get_world_size, is_dist, is_main_process
from utils.errors import UserError
from utils.failpoints import failpoint
from utils.log import MeanMeter, Progress, RunLog, get_logger
from utils.preempt import Preempted, StopRequest, rng_state, set_rng_state
from utils.recompute import enable_grad_checkpointing, recomputes_buffers
from utils.rng import BatchRandom
from utils.runtime import autocast, compile_in_place, make_grad_scaler, peak_memory_mib, seed_everything
from utils.transfer import tree_to_device
from utils.optim import OptimizerSpec, set_lr


def all_rng_states() -> list:
    """Every rank's RNG state, in rank order (a collective under torchrun)."""
    state = rng_state()
    if not is_dist():
        return [state]
    states = [None] * get_world_size()
    torch.distributed.all_gather_object(states, state)
    return states


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


NO_STEP = 2**62  # "no non-finite loss seen"
STEP_STREAM = 2  # key part that keeps the training step's BatchRandom stream apart from others
BEST = "checkpoint-best.pth"


class NonFiniteLoss(UserError):
    pass


class Method:
    """What a training method gives the Trainer; a new method is one small subclass (methods/).

    module: the unwrapped model (what is saved); model: what is called (DDP-wrapped, or the module itself).
    steps_per_batch: optimizer steps per loaded batch (APS: its sampling rounds). extra_state:
    objects with state_dict()/load_state_dict() saved alongside the model (an EMA, ...). model_config: how to
    build the model again (saved in every checkpoint). select_metric: an evaluate() key whose best value writes
    checkpoint-best.pth.
    """
    steps_per_batch = 1
    select_metric = None
    evaluate_at_start = False   # also evaluate before the first epoch (the kNN monitor's baseline, "epoch 0")
    name = "this method"        # in messages

    def __init__(self, module: torch.nn.Module, model: torch.nn.Module = None, model_config: dict = None,
                 extra_state: dict = None):
        self.module = module
        self.model = module if model is None else model
        self.model_config = model_config or {}
        self.extra_state = extra_state or {}

    def training_steps(self, batch, rng: BatchRandom):
        """Yield (loss, stats) for each optimizer step of one loaded batch (on the device); the Trainer steps the
        optimizer before it asks for the next."""
        raise NotImplementedError

    def lr_at(self, epoch: float) -> float:
        """The learning rate at a fractional epoch (before any group's lr_scale; a group's fixed_lr ignores it)."""
        raise NotImplementedError

    def param_groups(self) -> list:
        """What the optimiser trains, as torch's parameter groups (utils.optim: per group weight_decay, lr_scale,
        fixed_lr); by default one group of every parameter of the module."""
        return [{"params": list(self.module.parameters())}]

    def split_backbone(self, chunks: int):
        """--accum-steps: make the backbone run on `chunks` parts of each batch (utils.recompute.split_batch), the
        heads and the loss on the whole of it, so that the gradient stays the whole batch's; raise UserError when
        this method cannot do that exactly."""
        raise UserError(f"{self.name} cannot accumulate gradients (--accum-steps); leave the flag out")

    def after_step(self, step: int):
        """Called after every optimizer step (e.g. an EMA update)."""

    def after_epoch(self, epoch: int):
        """Called with the epoch's index after its training, before its evaluation."""

    def evaluate(self, epoch: int) -> Optional[dict]:
        """Metrics after `epoch` (None: the method has no evaluation)."""
        return None

    def summary(self, metrics: dict, best=None, start: dict = None) -> str:
        """The run's closing line from its last metrics and those before the first epoch ('' when there is nothing
        to report)."""
        return ""

    def backbone_record(self) -> Optional[dict]:
        """How a reader finds the backbone in this method's checkpoints (utils.checkpoint.backbone_record), saved
        in every one; None: its checkpoints are not read as a backbone."""
        return None


class Reporter:
    """What the Trainer tells about a run besides its checkpoints (utils.report.RunReporter: config.yaml,
    curves.png and report.md); this one writes nothing."""

    def started(self, flags: dict):
        """Before training (not on a dry run): the run's resolved flags."""

    def checkpoint_written(self):
        """After every epoch's checkpoint."""

    def finished(self, **run) -> str:
        """After the last epoch; `run`: utils.report.write_report's arguments after output_dir."""
        return ""


@dataclass(frozen=True)
class TrainSettings:
    """The loop's settings: how long, where to write, how often to log, evaluate and save (the runtime flags)."""
    output_dir: str
    epochs: int
    batch_size: int                  # global: images per loaded batch, for the images/s figures
    seed: int = 0
    resume: str = ""
    print_freq: int = 20
    eval_every: int = 0              # 0: never; else every N epochs and after the last
    save_every: int = 0
    skip_nonfinite: int = 0
    compile: Optional[str] = None
    compile_backend: str = "inductor"
    grad_checkpointing: bool = False            # recompute ViT blocks / ResNet stages in the backward pass
    clip_grad: Optional[float] = None           # clip the gradients' global norm to this (None: no clipping)
    accum_steps: int = 1                        # run the backbone in this many chunks of each batch (exact)
    flags: dict = field(default_factory=dict)   # the run's flags, saved in every checkpoint
    description: str = ""                       # the opening line (utils.run.describe_run), logged and reported
    dry_run: bool = False                       # check the data and one forward pass, then stop
    notes: tuple = ()                           # lines for report.md (e.g. why no kNN was run)
    identity: tuple = ()                        # flags (dests) a checkpoint found by auto-resume must share
    lr_flag: str = "--lr"                       # the flag a non-finite loss's advice names
    known_ranges: dict = field(default_factory=dict)  # flag dest -> (low, high) the method is known to train in

    @classmethod
    def from_args(cls, args, eval_every: int, description: str = "", notes=(), identity=(), lr_flag: str = "--lr",
                  known_ranges: dict = None) -> "TrainSettings":
        return cls(output_dir=args.output_dir, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                   resume=args.resume, print_freq=args.print_freq, eval_every=eval_every, save_every=args.save_every,
                   skip_nonfinite=args.skip_nonfinite, compile=args.compile,
                   compile_backend=getattr(args, "compile_backend", "inductor"),
                   grad_checkpointing=getattr(args, "grad_checkpointing", False),
                   clip_grad=getattr(args, "clip_grad", None), accum_steps=getattr(args, "accum_steps", 1),
                   flags=dict(vars(args)),
                   description=description, dry_run=args.dry_run, notes=tuple(notes), identity=tuple(identity),
                   lr_flag=lr_flag, known_ranges=dict(known_ranges or {}))


class Trainer:
    """Runs epochs [start, settings.epochs) of `method` over `loader`, evaluating and checkpointing as it goes."""

    def __init__(self, method: Method, optimizer, loader, settings: TrainSettings, device: torch.device,
                 amp: Optional[torch.dtype], reporter: Reporter = None):
        """optimizer: a utils.optim.OptimizerSpec (built here over method.param_groups()), or an optimiser."""
        if isinstance(optimizer, OptimizerSpec):
            optimizer = optimizer.build(method.param_groups(), device)
        self.method, self.optimizer, self.loader, self.settings = method, optimizer, loader, settings
        self.reporter = reporter or Reporter()
        self.device, self.amp = device, amp
        self.scaler = make_grad_scaler(device, amp)
        self.best = None
        self.start_epoch, self.global_step = 0, 0
        self.skip_batches, self.resume_rng = 0, None    # a mid-epoch (preemption) checkpoint's position
        self.stop = StopRequest()
        self.rng = BatchRandom(device)
        self.skipped_nonfinite = 0
        self.log = RunLog(settings.output_dir)
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

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self, epoch: int, batches_done: int = 0) -> dict:
        """epoch: epochs completed; batches_done > 0: also that many batches of the next one (preemption)."""
        return {
            "batches_done": batches_done,
            "rng": all_rng_states() if batches_done else None,     # one per rank
            "model": self.method.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "global_step": self.global_step,
            "args": dict(self.settings.flags),
            "model_config": self.method.model_config,
            "extra": {k: v.state_dict() for k, v in self.method.extra_state.items()},
            "metrics": self.last_metrics,
            "start_metrics": self.start_metrics,
            "best": self.best,
            **({RECORD: record} if (record := self.method.backbone_record()) else {}),
        }

    def save(self, epoch: int):
        if not is_main_process():
            return
        state = self.state_dict(epoch)
        save_checkpoint(state, os.path.join(self.settings.output_dir, LATEST))
        every = self.settings.save_every
        if every and epoch % every == 0:
            save_checkpoint(state, os.path.join(self.settings.output_dir, f"checkpoint-{epoch:04d}.pth"))
        self.reporter.checkpoint_written()

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
        cleanup()
        return metrics

    def resume(self):
        path = find_resume_path(self.settings.resume, self.settings.output_dir)
        if path is None:
            return
        ckpt = load_training_checkpoint(path)
        if not self.settings.resume:  # auto-resume: refuse a checkpoint left there by a different run
            saved, now = ckpt["args"], self.settings.flags
            diff = [f"--{k.replace('_', '-')} {saved[k]} vs {now[k]}" for k in self.settings.identity
                    if k in saved and k in now and saved[k] != now[k]]
            if diff:
                raise UserError(f"{path} belongs to a different run ({', '.join(diff)}); use another --output-dir "
                                "or pass --resume explicitly")
        load_strict(self.method.module, ckpt["model"], path)
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as e:
            raise UserError(f"{path}: optimizer state does not fit this model ({e}); resume with the same flags "
                            "or use another --output-dir") from e
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        for k, obj in self.method.extra_state.items():
            if k in ckpt.get("extra", {}):
                obj.load_state_dict(ckpt["extra"][k])
        self.start_epoch = int(ckpt["epoch"])
        self.global_step = int(ckpt.get("global_step", 0))
        self.skip_batches, self.resume_rng = int(ckpt.get("batches_done") or 0), None
        states = ckpt.get("rng") or []
        if self.skip_batches and len(states) == get_world_size():
            self.resume_rng = states[get_rank()]
        elif self.skip_batches:
            self.logger.warning(f"{path} was written by {len(states)} process(es), not {get_world_size()}: the "
                                "rest of the epoch resumes with fresh random streams (not bit-exact)")
        self.last_metrics = ckpt.get("metrics", {})
        self.start_metrics = ckpt.get("start_metrics") or {}
        self.best = ckpt.get("best")
        part = f" and {self.skip_batches} batches of the next" if self.skip_batches else ""
        self.logger.info(f"resumed from {path}: {self.start_epoch} epochs{part} done, step {self.global_step}")

    # ---------------------------------------------------------------- loop
    # Wraps the work of every step and the loading of every batch (not the progress lines, evaluation or
    # checkpoints): bench.gpu_checks sets it to torch.cuda's sync debug mode, so a host sync there is an error.
    step_context = staticmethod(contextlib.nullcontext)

    def guarded(self, batches):
        """The batches, each fetched inside step_context."""
        it = iter(batches)
        while True:
            with self.step_context():
                batch = next(it, None)
            if batch is None:
                return
            yield batch

    def batches(self, skip: int):
        """The loader's batches from index `skip` on (a GlobalBatchSampler skips them without loading them;
        any other loader loads and drops them); then the saved RNG state returns."""
        sampler = getattr(self.loader, "batch_sampler", None)
        if hasattr(sampler, "skip_next"):
            sampler.skip_next(skip)
            it = iter(self.loader)
        else:
            it = iter(self.loader)
            for _ in range(skip):
                next(it)
        if skip and self.resume_rng is not None:
            set_rng_state(self.resume_rng)
        return it

    def _preempt(self, epoch: int, batches_done: int):
        """Save the position (mid-epoch) and leave with status 0."""
        state = self.state_dict(epoch, batches_done)       # gathers every rank's RNG: all ranks call it
        if is_main_process():
            save_checkpoint(state, os.path.join(self.settings.output_dir, LATEST))
        self.log.close()
        msg = (f"stopped by signal {self.stop.signum}: checkpoint at epoch {epoch + 1}, batch {batches_done}; "
               "rerun the same command to resume")
        self.logger.warning(msg)
        raise Preempted(msg)

    def _finite_or_skip(self, loss: torch.Tensor, epoch: int) -> bool:
        """--skip-nonfinite N: False (skip this step) for up to N non-finite losses, then stop."""
        limit = self.settings.skip_nonfinite
        if not limit:
            return True
        finite = torch.isfinite(loss.detach()).all().to(torch.int64)
        if int(all_reduce_min(finite).item()):      # the ranks agree: all step, or all skip (DDP)
            return True
        self.skipped_nonfinite += 1
        if self.skipped_nonfinite > limit:
            raise NonFiniteLoss(f"loss became non-finite at step {self.global_step} (epoch {epoch + 1}), "
                                f"more than --skip-nonfinite {limit} times; lower the lr")
        self.logger.warning(f"skipped step {self.global_step}: non-finite loss "
                            f"({self.skipped_nonfinite} of --skip-nonfinite {limit})")
        return False

    def train_one_epoch(self, epoch: int, skip: int = 0) -> dict:
        method, settings = self.method, self.settings
        method.model.train()
        n_iter = len(self.loader)
        steps_per_batch = method.steps_per_batch
        meter, window = MeanMeter(), MeanMeter()
        first_bad = torch.full((), NO_STEP, dtype=torch.long, device=self.device)  # first non-finite step
        progress = Progress(n_iter, f"epoch {epoch + 1}/{settings.epochs}", settings.print_freq, settings.batch_size)
        start = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        for it, batch in enumerate(self.guarded(self.batches(skip)), start=skip):
            self.rng.reseed(settings.seed, epoch, it, STEP_STREAM)
            steps = method.training_steps(tree_to_device(batch, self.device), self.rng)
            for t in range(steps_per_batch):
                lr = method.lr_at(epoch + (it * steps_per_batch + t) / (n_iter * steps_per_batch))
                set_lr(self.optimizer, lr)
                with self.step_context(), autocast(self.device, self.amp):
                    loss, stats = next(steps)
                self.optimizer.zero_grad(set_to_none=True)
                if not self._finite_or_skip(loss, epoch):
                    self.global_step += 1
                    continue
                with self.step_context():
                    first_bad = torch.where((first_bad == NO_STEP) & ~torch.isfinite(loss.detach()),
                                            torch.full_like(first_bad, self.global_step), first_bad)
                    self.scaler.scale(loss).backward()
                    failpoint("step")
                    norm = self.clip_gradients(settings.clip_grad) if settings.clip_grad else None
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    method.after_step(self.global_step)
                    values = {"loss": loss, **stats}
                    for m in (meter, window):
                        m.update(**values)
                        if norm is not None:     # fp16: the steps the scaler skips (inf/nan gradients) left out
                            (m.update_finite if self.scaler.is_enabled() else m.update)(grad_norm=norm)
                self.global_step += 1
            due = progress.due(it)
            if due:
                self._check_finite(first_bad, epoch)
                avg = window.averages()
                window.reset()
                self.logger.info(progress.line(it, {**avg, "lr": lr}))
                self.log.scalars({**avg, "lr": lr, "img_per_s": progress.last_rate}, self.global_step)
            if it + 1 < n_iter and self.stop.requested(self.device, sync=due):
                self._check_finite(first_bad, epoch)
                self._preempt(epoch, it + 1)
        self._check_finite(first_bad, epoch)
        out = meter.averages(sync=True)
        out["lr"] = lr
        elapsed = time.perf_counter() - start
        out["img_per_s"] = n_iter * settings.batch_size / max(elapsed, 1e-9)
        self.train_seconds += elapsed
        self.train_images += (n_iter - skip) * settings.batch_size
        return out

    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        """Clip the gradients' global norm to max_norm (unscaled first under fp16); the norm before clipping, as a
        tensor (no host sync)."""
        self.scaler.unscale_(self.optimizer)
        return torch.nn.utils.clip_grad_norm_(self.params, max_norm)     # (those without a gradient are skipped)

    def _check_finite(self, first_bad: torch.Tensor, epoch: int):
        """Stop (on every rank together) if any rank saw a non-finite loss since the start of the epoch."""
        bad = int(all_reduce_min(first_bad).item())
        if bad != NO_STEP:
            ckpt = os.path.join(self.settings.output_dir, LATEST)
            kept = f"the last good checkpoint {ckpt} is kept" if os.path.exists(ckpt) else "no checkpoint was written"
            raise NonFiniteLoss(f"loss became non-finite at step {bad} (epoch {epoch + 1}); {kept}; "
                                + self.nonfinite_advice(bad))

    def nonfinite_advice(self, step: int) -> str:
        """What to change: in the first steps, a flag outside the range the method is known to train in (the
        likely cause), else the lr or the precision."""
        settings, method = self.settings, self.method
        flags = settings.flags
        if step <= 1:
            off = [(d, flags[d], lo, hi) for d, (lo, hi) in settings.known_ranges.items()
                   if d in flags and isinstance(flags[d], (int, float)) and not lo <= flags[d] <= hi]
            if off:
                d, value, lo, hi = off[0]
                return (f"--{d.replace('_', '-')} {value:g} is outside the range {method.name} is known to train in "
                        f"({lo:g} to {hi:g}): use a value in it")
        return f"lower {settings.lr_flag} or use --amp bf16/off"

    def fit(self) -> dict:
        self.stop.install()
        try:
            return self._fit()
        finally:
            self.stop.restore()

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
        if settings.description:
            self.logger.info(settings.description)
        for note in settings.notes:
            self.logger.info(note)
        if settings.dry_run:
            return self.dry_run()
        self.reporter.started(settings.flags)
        self.resume()
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
            self.save(epoch + 1)
            if improved and is_main_process():
                save_checkpoint(self.state_dict(epoch + 1), os.path.join(settings.output_dir, BEST))
                self.logger.info(f"best {key} so far: {self.best:.2f} (epoch {epoch + 1})")
            if epoch + 1 < epochs and self.stop.requested(self.device, sync=True):
                self.log.close()
                raise Preempted(f"stopped by signal {self.stop.signum} after epoch {epoch + 1} (checkpoint written); "
                                "rerun the same command to resume")
        self.log.close()
        return self.last_metrics
