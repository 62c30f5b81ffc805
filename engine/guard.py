"""The non-finite policy beside the loop: stop at the first non-finite loss, found without a host sync per step
(the first bad step stays on the device and is read at each progress line, before a preemption checkpoint and at
the epoch's end), or, with --skip-nonfinite N, skip up to N such steps (a host sync per step) and then stop."""
import os

import torch

from utils.checkpoint import LATEST
from utils.dist import all_reduce_min
from utils.errors import UserError
from utils.log import get_logger

NO_STEP = 2**62  # "no non-finite loss seen"


class NonFiniteLoss(UserError):
    pass


class NonFiniteGuard:
    """settings: the run's TrainSettings (skip_nonfinite, known_ranges, flags, lr_flag, output_dir); name: the
    method's name, in the advice."""

    def __init__(self, settings, device: torch.device, name: str):
        self.settings, self.device, self.name = settings, device, name
        self.skipped = 0                # steps skipped under --skip-nonfinite, over the whole run
        self.first_bad = None           # the epoch's first non-finite step, on the device (NO_STEP: none)

    def start_epoch(self):
        self.first_bad = torch.full((), NO_STEP, dtype=torch.long, device=self.device)

    def skip(self, loss: torch.Tensor, step: int, epoch: int) -> bool:
        """--skip-nonfinite N: True (skip this step) for up to N non-finite losses, then stop; False without it."""
        limit = self.settings.skip_nonfinite
        if not limit:
            return False
        finite = torch.isfinite(loss.detach()).all().to(torch.int64)
        if int(all_reduce_min(finite).item()):      # the ranks agree: all step, or all skip (DDP)
            return False
        self.skipped += 1
        if self.skipped > limit:
            raise NonFiniteLoss(f"loss became non-finite at step {step} (epoch {epoch + 1}), "
                                f"more than --skip-nonfinite {limit} times; lower the lr")
        get_logger().warning(f"skipped step {step}: non-finite loss ({self.skipped} of --skip-nonfinite {limit})")
        return True

    def watch(self, loss: torch.Tensor, step: int):
        """Note `step` as the first bad one if its loss is not finite (on the device: no host sync)."""
        self.first_bad = torch.where((self.first_bad == NO_STEP) & ~torch.isfinite(loss.detach()),
                                     torch.full_like(self.first_bad, step), self.first_bad)

    def check(self, epoch: int):
        """Stop (on every rank together) if any rank saw a non-finite loss since the start of the epoch."""
        bad = int(all_reduce_min(self.first_bad).item())
        if bad != NO_STEP:
            ckpt = os.path.join(self.settings.output_dir, LATEST)
            kept = f"the last good checkpoint {ckpt} is kept" if os.path.exists(ckpt) else "no checkpoint was written"
            raise NonFiniteLoss(f"loss became non-finite at step {bad} (epoch {epoch + 1}); {kept}; "
                                + self.advice(bad))

    def advice(self, step: int) -> str:
        """What to change: in the first steps, a flag outside the range the method is known to train in (the
        likely cause), else the lr or the precision."""
        settings = self.settings
        flags = settings.flags
        if step <= 1:
            off = [(d, flags[d], lo, hi) for d, (lo, hi) in settings.known_ranges.items()
                   if d in flags and isinstance(flags[d], (int, float)) and not lo <= flags[d] <= hi]
            if off:
                d, value, lo, hi = off[0]
                return (f"--{d.replace('_', '-')} {value:g} is outside the range {self.name} is known to train in "
                        f"({lo:g} to {hi:g}): use a value in it")
        return f"lower {settings.lr_flag} or use --amp bf16/off"
