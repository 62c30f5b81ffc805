"""Optimisers, built by the Trainer from the method's parameter groups (Method.param_groups) and the script's
choice of optimiser (OptimizerSpec): no script constructs one.

A parameter group is a dict as torch takes it ({"params": [...], ...}); besides any of the optimiser's own
settings (weight_decay: a group without decay on norms and biases), it may carry
- lr_scale: the group's lr is the schedule's times this (layer-wise decay, a head at 10x);
- fixed_lr: the group's lr stays this whatever the schedule (a predictor at a fixed lr, as SimSiam's).
set_lr applies both at every step.
"""
import dataclasses

import torch

from utils.flags import momentum, nonnegative, positive
from utils.lars import LARS
from utils.runtime import fused

KINDS = ("sgd", "adamw", "lars")


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """Which optimiser, at which base lr (the schedule's peak), with which settings (those of `kind` only)."""
    kind: str
    lr: float
    weight_decay: float = 0.0
    momentum: float = 0.9                       # sgd, lars
    betas: tuple = (0.9, 0.999)                 # adamw
    eps: float = 1e-8                           # adamw
    trust_coefficient: float = 0.001            # lars

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown optimiser {self.kind!r}; one of {', '.join(KINDS)}")

    def build(self, groups: list, device: torch.device) -> torch.optim.Optimizer:
        if self.kind == "adamw":
            return torch.optim.AdamW(groups, lr=self.lr, betas=tuple(self.betas), eps=self.eps,
                                     weight_decay=self.weight_decay, **fused(device))
        if self.kind == "lars":
            return LARS(groups, self.lr, self.momentum, self.weight_decay, self.trust_coefficient)
        return torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                               **fused(device))


def set_lr(optimizer, lr: float):
    """Every param group's lr at this step: its fixed_lr if it has one, else lr times its lr_scale (default 1)."""
    for group in optimizer.param_groups:
        group["lr"] = group["fixed_lr"] if "fixed_lr" in group else lr * group.get("lr_scale", 1.0)


def add_sgd_args(group, lr: float, weight_decay: float):
    """SGD's flags, as the MoCo-family scripts and the linear probe take them: --lr per 256 images, --momentum,
    --wd/--weight-decay."""
    group.add_argument("--lr", type=positive(), default=lr, help="lr per 256 images (scaled by batch / 256)")
    group.add_argument("--momentum", type=momentum(), default=0.9, help="SGD momentum")
    group.add_argument("--wd", "--weight-decay", dest="weight_decay", type=nonnegative(), default=weight_decay,
                       help="weight decay")


def sgd_from_args(args, kind: str = "sgd") -> tuple:
    """(the lr after batch scaling, the OptimizerSpec) of add_sgd_args' flags (kind: sgd or lars)."""
    lr = args.lr * args.batch_size / 256
    return lr, OptimizerSpec(kind, lr, args.weight_decay, momentum=args.momentum,
                             trust_coefficient=getattr(args, "trust_coefficient", 0.001))


def add_adamw_args(group, weight_decay: float, decay_on: str, betas: bool = False, eps: bool = False):
    """AdamW's flags: --weight-decay (decay_on: which parameters it applies to, for the help), and where a script
    offers them, --betas B1 B2 and --opt-eps."""
    group.add_argument("--weight-decay", type=nonnegative(), default=weight_decay,
                       help=f"AdamW weight decay ({decay_on})")
    if betas:
        group.add_argument("--betas", type=momentum(), nargs=2, default=(0.9, 0.999), metavar=("B1", "B2"),
                           help="AdamW betas")
    if eps:
        group.add_argument("--opt-eps", type=positive(), default=1e-8, help="AdamW epsilon")


def adamw_from_args(args, lr: float) -> OptimizerSpec:
    """The OptimizerSpec of add_adamw_args' flags at `lr` (the flags a script leaves out: torch's defaults)."""
    return OptimizerSpec("adamw", lr, args.weight_decay, betas=tuple(getattr(args, "betas", (0.9, 0.999))),
                         eps=getattr(args, "opt_eps", 1e-8))


def add_lars_args(group):
    """--lars (LARS around SGD: sgd_from_args(args, "lars")) and --trust-coefficient."""
    group.add_argument("--lars", action="store_true", help="LARS (trust ratio on the weight matrix) around SGD")
    group.add_argument("--trust-coefficient", type=positive(), default=0.001, help="LARS trust coefficient")
