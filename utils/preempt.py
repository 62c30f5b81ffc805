"""Preemption: SIGTERM / SIGUSR1 (what SLURM and cloud schedulers send before they kill a job) ask the
training loop to write a checkpoint at the next batch boundary and exit cleanly; rerunning resumes there.
Also the RNG state that a mid-epoch checkpoint carries, in a form `torch.load(weights_only=True)` reads."""
import random
import signal

import numpy as np
import torch

from utils.dist import all_reduce_min, is_dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written: exits the process with status 0."""

    def __init__(self, message: str):
        super().__init__(0)
        self.message = message


class StopRequest:
    """Remembers that a stop signal arrived; `requested()` is the same answer on every rank."""

    def __init__(self):
        self.signum, self._previous = None, {}

    def install(self):
        for s in SIGNALS:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner's worker): no handler
                pass
        return self

    def restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        self.signum = signum

    def requested(self, device: torch.device, sync: bool) -> bool:
        """One process: the local flag, at every batch. Many: agreed over ranks (a collective), so call it at
        the same batches on every rank (sync=True there, False elsewhere)."""
        if not is_dist():
            return self.signum is not None
        if not sync:
            return False
        flag = torch.tensor(0 if self.signum is not None else 1, device=device)
        return int(all_reduce_min(flag).item()) == 0


def rng_state() -> dict:
    """Python, numpy, torch CPU (and CUDA) generator states as tensors and plain lists."""
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out = {"python": [version, list(state), gauss], "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
           "numpy": [kind, int(pos), int(has_gauss), float(cached)], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict):
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    kind, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
