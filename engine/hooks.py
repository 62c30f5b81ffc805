"""Callbacks: what tests and tools install beside the loop, so that the loop itself names none of them.

A Callback sees the Trainer as built when training starts (tests/test_host_sync.py takes a script's method and
data there), may wrap the work of every step and the loading of every batch (step_context: bench.gpu_checks turns
host syncs there into errors), act after each backward pass (the `step` failpoint of utils.failpoints), and see
the end of every epoch's training and evaluation, on every rank, before its checkpoint (tests/compile_probe.py
counts recompilations there). Give them to a Trainer (`callbacks=`), or install them around code that builds its
own Trainer (a script's main) with `with installed(callback): ...`.
"""
import contextlib

from utils.failpoints import failpoint


class Callback:
    def fit_start(self, trainer):
        """When training starts (before the dry run, the resume and the first epoch): the Trainer as built."""

    def step_context(self):
        """A context around each step's work and each batch's loading."""
        return contextlib.nullcontext()

    def after_backward(self, trainer):
        """After a step's backward pass, before the optimiser (or clipping) touches the gradients."""

    def epoch_end(self, trainer, epoch: int):
        """After epoch `epoch` (0-based) trained and was evaluated, before its checkpoint."""


class Failpoints(Callback):
    """The `step` failpoint (ASYM_FAILPOINT=step[@k]: the process kills itself after the k-th backward)."""

    def after_backward(self, trainer):
        failpoint("step")


_installed = []


@contextlib.contextmanager
def installed(*callbacks: Callback):
    """Every Trainer built inside this block also runs `callbacks`."""
    _installed.extend(callbacks)
    try:
        yield
    finally:
        for c in callbacks:
            _installed.remove(c)


class Callbacks:
    """The run's callbacks, called in order: the failpoints, those installed, those given."""

    def __init__(self, given=()):
        self.all = [Failpoints(), *_installed, *given]
        wrapping = [c for c in self.all if type(c).step_context is not Callback.step_context]
        self.step_context = self._nested(wrapping) if wrapping else contextlib.nullcontext

    @staticmethod
    def _nested(wrapping):
        @contextlib.contextmanager
        def nested():
            with contextlib.ExitStack() as stack:
                for c in wrapping:
                    stack.enter_context(c.step_context())
                yield
        return nested

    def fit_start(self, trainer):
        for c in self.all:
            c.fit_start(trainer)

    def after_backward(self, trainer):
        for c in self.all:
            c.after_backward(trainer)

    def epoch_end(self, trainer, epoch: int):
        for c in self.all:
            c.epoch_end(trainer, epoch)
