"""Host-to-device copies that do not stall the device.

A CPU tensor copied to a GPU from ordinary (pageable) memory, or built there from Python data
(`torch.tensor(..., device="cuda")`), makes the host wait for every kernel already queued: a host sync. Copies
from pinned (page-locked) memory with non_blocking=True are queued on the stream like a kernel instead.
`to_device` is the one way this code moves host data to a device; the tests (tests/conftest.py's `no_syncs`)
fail on any other.
"""
import contextlib
import threading

import torch

_local = threading.local()


def in_transfer() -> bool:
    """True inside to_device (what the tests' sync guard allows)."""
    return getattr(_local, "depth", 0) > 0


@contextlib.contextmanager
def _transferring():
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """t on `device` without a host sync: from pinned memory, non-blocking, on CUDA; a plain move elsewhere
    (a tensor already there is returned as it is)."""
    device = torch.device(device)
    if t.device == device or (device.index is None and t.device.type == device.type):
        return t
    with _transferring():
        if device.type == "cuda" and t.device.type == "cpu":
            return t.pin_memory().to(device, non_blocking=True)
        return t.to(device, non_blocking=True)


def to_device_once(t: torch.Tensor, device) -> torch.Tensor:
    """t on `device` by a plain copy, for data moved once at setup (cached features): pinning it first would keep
    a page-locked staging copy of the whole tensor in torch's host allocator (rounded up to a power of two) for
    the rest of the run, for one copy's sake."""
    with _transferring():
        return t.to(device)


def tree_to_device(tree, device):
    """Every tensor of a (nested dict / list / tuple) moved with to_device."""
    if torch.is_tensor(tree):
        return to_device(tree, device)
    if isinstance(tree, dict):
        return {k: tree_to_device(v, device) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(tree_to_device(v, device) for v in tree)
    return tree


def constant(values, device, dtype=torch.float32) -> torch.Tensor:
    """A tensor of Python numbers on `device`, made on the host and moved with to_device."""
    return to_device(torch.tensor(values, dtype=dtype), device)
