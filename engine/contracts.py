"""What a script hands the Trainer: its `Method` (what trains), its `TrainSettings` (the runtime flags) and a
`Reporter` (what the run leaves for people)."""
from dataclasses import dataclass, field
from typing import Optional

import torch

from utils.errors import UserError
from utils.rng import BatchRandom
from utils.trackers import parse_loggers


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
    loggers: tuple = ("tensorboard",)           # where scalars go besides log.jsonl (utils.trackers)

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
                   lr_flag=lr_flag, known_ranges=dict(known_ranges or {}),
                   loggers=parse_loggers(getattr(args, "logger", "tensorboard")))
