"""Checkpoints, resume and preemption beside the loop: what a checkpoint holds, when it is written, how a run picks
up where one stopped (at an epoch's end, or mid-epoch after a signal), and the stop a signal asks for."""
import os

import torch

from utils.checkpoint import LATEST, RECORD, find_resume_path, load_strict, load_training_checkpoint, save_checkpoint
from utils.dist import get_rank, get_world_size, is_dist, is_main_process
from utils.errors import UserError
from utils.log import get_logger
from utils.preempt import Preempted, StopRequest, rng_state, set_rng_state

BEST = "checkpoint-best.pth"


def all_rng_states() -> list:
    """Every rank's RNG state, in rank order (a collective under torchrun)."""
    state = rng_state()
    if not is_dist():
        return [state]
    states = [None] * get_world_size()
    torch.distributed.all_gather_object(states, state)
    return states


class RunState:
    """The checkpointing part of a Trainer: reads and writes the trainer's position (start_epoch, global_step,
    skip_batches, best, last_metrics, start_metrics) and everything it trains."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.stop = StopRequest()           # SIGTERM/SIGUSR1: checkpoint at the next batch and leave
        self.resume_rng = None              # a mid-epoch checkpoint's RNG state for this rank

    @property
    def output_dir(self) -> str:
        return self.trainer.settings.output_dir

    def state_dict(self, epoch: int, batches_done: int = 0) -> dict:
        """epoch: epochs completed; batches_done > 0: also that many batches of the next one (preemption)."""
        t = self.trainer
        return {
            "batches_done": batches_done,
            "rng": all_rng_states() if batches_done else None,     # one per rank
            "model": t.method.module.state_dict(),
            "optimizer": t.optimizer.state_dict(),
            "scaler": t.scaler.state_dict(),
            "epoch": epoch,
            "global_step": t.global_step,
            "args": dict(t.settings.flags),
            "model_config": t.method.model_config,
            "extra": {k: v.state_dict() for k, v in t.method.extra_state.items()},
            "metrics": t.last_metrics,
            "start_metrics": t.start_metrics,
            "best": t.best,
            **({RECORD: record} if (record := t.method.backbone_record()) else {}),
        }

    def save(self, epoch: int):
        """After an epoch: checkpoint.pth, and checkpoint-<epoch>.pth every --save-every epochs (rank 0)."""
        if not is_main_process():
            return
        state = self.state_dict(epoch)
        save_checkpoint(state, os.path.join(self.output_dir, LATEST))
        every = self.trainer.settings.save_every
        if every and epoch % every == 0:
            save_checkpoint(state, os.path.join(self.output_dir, f"checkpoint-{epoch:04d}.pth"))
        self.trainer.reporter.checkpoint_written()

    def save_best(self, epoch: int):
        if is_main_process():
            save_checkpoint(self.state_dict(epoch), os.path.join(self.output_dir, BEST))

    def resume(self):
        """Continue from --resume, or from <output-dir>/checkpoint.pth if one is there (refused when it belongs to a
        run with other identity flags)."""
        t = self.trainer
        settings = t.settings
        path = find_resume_path(settings.resume, settings.output_dir)
        if path is None:
            return
        ckpt = load_training_checkpoint(path)
        if not settings.resume:  # auto-resume: refuse a checkpoint left there by a different run
            saved, now = ckpt["args"], settings.flags
            diff = [f"--{k.replace('_', '-')} {saved[k]} vs {now[k]}" for k in settings.identity
                    if k in saved and k in now and saved[k] != now[k]]
            if diff:
                raise UserError(f"{path} belongs to a different run ({', '.join(diff)}); use another --output-dir "
                                "or pass --resume explicitly")
        load_strict(t.method.module, ckpt["model"], path)
        try:
            t.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as e:
            raise UserError(f"{path}: optimizer state does not fit this model ({e}); resume with the same flags "
                            "or use another --output-dir") from e
        if ckpt.get("scaler"):
            t.scaler.load_state_dict(ckpt["scaler"])
        for k, obj in t.method.extra_state.items():
            if k in ckpt.get("extra", {}):
                obj.load_state_dict(ckpt["extra"][k])
        t.start_epoch = int(ckpt["epoch"])
        t.global_step = int(ckpt.get("global_step", 0))
        t.skip_batches, self.resume_rng = int(ckpt.get("batches_done") or 0), None
        states = ckpt.get("rng") or []
        if t.skip_batches and len(states) == get_world_size():
            self.resume_rng = states[get_rank()]
        elif t.skip_batches:
            get_logger().warning(f"{path} was written by {len(states)} process(es), not {get_world_size()}: the "
                                 "rest of the epoch resumes with fresh random streams (not bit-exact)")
        t.last_metrics = ckpt.get("metrics", {})
        t.start_metrics = ckpt.get("start_metrics") or {}
        t.best = ckpt.get("best")
        part = f" and {t.skip_batches} batches of the next" if t.skip_batches else ""
        get_logger().info(f"resumed from {path}: {t.start_epoch} epochs{part} done, step {t.global_step}")

    def batches(self, loader, skip: int):
        """The loader's batches from index `skip` on (a GlobalBatchSampler skips them without loading them; any
        other loader loads and drops them); then the saved RNG state returns."""
        sampler = getattr(loader, "batch_sampler", None)
        if hasattr(sampler, "skip_next"):
            sampler.skip_next(skip)
            it = iter(loader)
        else:
            it = iter(loader)
            for _ in range(skip):
                next(it)
        if skip and self.resume_rng is not None:
            set_rng_state(self.resume_rng)
        return it

    def stop_requested(self, sync: bool) -> bool:
        """Whether a signal asked every rank to stop (sync: agree across ranks now)."""
        return self.stop.requested(self.trainer.device, sync=sync)

    def preempt(self, epoch: int, batches_done: int):
        """Save the position mid-epoch and leave with status 0."""
        state = self.state_dict(epoch, batches_done)       # gathers every rank's RNG: all ranks call it
        if is_main_process():
            save_checkpoint(state, os.path.join(self.output_dir, LATEST))
        self.trainer.log.close()
        msg = (f"stopped by signal {self.stop.signum}: checkpoint at epoch {epoch + 1}, batch {batches_done}; "
               "rerun the same command to resume")
        get_logger().warning(msg)
        raise Preempted(msg)

    def stop_after_epoch(self, epoch: int):
        """Between epochs (checkpoint already written): leave if a signal asked to."""
        self.trainer.log.close()
        raise Preempted(f"stopped by signal {self.stop.signum} after epoch {epoch + 1} (checkpoint written); "
                        "rerun the same command to resume")
