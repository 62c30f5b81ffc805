"""What would stall or change on a GPU, seen on the CPU: run code with its data on the `meta` device (shapes only)
under a DeviceGuard, and count.

    python tests/device_guard.py        # host syncs and kernels per batch of every device pipeline and step

A DeviceGuard notes:
- syncs: host reads of device values (.item(), .tolist(), .cpu(), bool(), ...), data-dependent shapes
  (nonzero, masked_select, unique, boolean-mask indexing), tensors built from Python data on a device, and
  host-to-device copies that do not go through utils.transfer (pinned, non-blocking). Each is a host sync on
  CUDA: the host waits for every kernel already queued.
- device_draws: random numbers drawn on a device's generator (whose stream depends on the GPU model).

Host reads on `meta` return zeros, so code that reads once per pass (an accuracy at the end) runs on. The tests
use it through tests/conftest.py's `device_guard` fixture; `kernels()` counts the aten ops a block dispatches
(about one GPU kernel each).
"""
import contextlib
import json
import os
import sys
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:               # run as a script (python tests/device_guard.py): the project's modules
    sys.path.insert(0, ROOT)
try:
    from utils.transfer import in_transfer
except ImportError:                    # (a checkout from before utils.transfer: every host copy counts)
    def in_transfer():
        return False

RANDOM_FACTORIES = ("rand", "randn", "randint", "randperm")
RANDOM_LIKE = ("rand_like", "randn_like", "randint_like", "bernoulli", "multinomial", "normal", "poisson")
RANDOM_IN_PLACE = ("uniform_", "normal_", "random_", "bernoulli_", "exponential_", "geometric_", "log_normal_",
                   "cauchy_")
PYTHON_DATA_FACTORIES = ("tensor", "as_tensor", "asarray")
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
DATA_DEPENDENT = ("nonzero", "masked_select", "unique", "unique_consecutive", "argwhere")


def _off_host(device) -> bool:
    return device is not None and torch.device(device).type != "cpu"


def _where() -> str:
    """file:line of the first frame outside torch and this file (what a finding names)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/torch/" not in frame.filename and not frame.filename.endswith("device_guard.py"):
            return f"{os.path.relpath(frame.filename, ROOT)}:{frame.lineno}"
    return "?"


class DeviceGuard:
    """install() patches torch (uninstall() undoes it); syncs and device_draws list what was seen, with where."""

    def __init__(self):
        self.syncs, self.device_draws, self._undo = [], [], []

    def _flag(self, kind: list, what: str):
        kind.append(f"{what} at {_where()}")

    def _set(self, owner, name, value):
        self._undo.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def uninstall(self):
        while self._undo:
            owner, name, value = self._undo.pop()
            setattr(owner, name, value)

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.uninstall()

    def reset(self):
        self.syncs.clear()
        self.device_draws.clear()

    def install(self) -> "DeviceGuard":
        guard, T = self, torch.Tensor

        def factory(name, original):
            def wrapped(data, *args, **kwargs):
                device = kwargs.get("device", args[1] if name == "as_tensor" and len(args) > 1 else None)
                if _off_host(device) and not torch.is_tensor(data):
                    guard._flag(guard.syncs, f"torch.{name}(Python data, device={device})")
                return original(data, *args, **kwargs)
            return wrapped

        def drawing(name, original, device_of):
            def wrapped(*args, **kwargs):
                device = device_of(args, kwargs)
                if _off_host(device):
                    guard._flag(guard.device_draws, f"{name} on {device}")
                return original(*args, **kwargs)
            return wrapped

        def host_read(name, original):
            def wrapped(self, *args, **kwargs):
                if self.device.type != "cpu":
                    guard._flag(guard.syncs, f".{name}() of a {self.device.type} tensor")
                    if self.device.type == "meta":
                        zeros = torch.zeros(self.shape, dtype=self.dtype)
                        return zeros if name == "cpu" else getattr(zeros, name)(*args, **kwargs)
                return original(self, *args, **kwargs)
            return wrapped

        def data_dependent(name, original):
            def wrapped(self, *args, **kwargs):
                if torch.is_tensor(self) and self.device.type != "cpu":
                    guard._flag(guard.syncs, f"{name} (a data-dependent shape) on {self.device.type}")
                return original(self, *args, **kwargs)
            return wrapped

        def moving(name, original):
            def wrapped(self, *args, **kwargs):
                out = original(self, *args, **kwargs)
                if self.device.type == "cpu" and out.device.type != "cpu" and not in_transfer():
                    guard._flag(guard.syncs, f"host-to-device .{name}() outside utils.transfer")
                return out
            return wrapped

        def copying(original):
            def wrapped(self, src, *args, **kwargs):
                if (self.device.type != "cpu" and torch.is_tensor(src) and src.device.type == "cpu"
                        and not in_transfer()):
                    guard._flag(guard.syncs, "host-to-device .copy_() outside utils.transfer")
                return original(self, src, *args, **kwargs)
            return wrapped

        def indexing(original):
            def wrapped(self, index):
                parts = index if isinstance(index, tuple) else (index,)
                if self.device.type != "cpu" and any(torch.is_tensor(i) and i.dtype == torch.bool for i in parts):
                    guard._flag(guard.syncs, f"boolean-mask indexing (a data-dependent shape) on {self.device.type}")
                return original(self, index)
            return wrapped

        def factory_device(args, kwargs):
            return kwargs.get("device")

        def like_device(args, kwargs):
            return kwargs.get("device") or next((a.device for a in args if torch.is_tensor(a)), None)

        for name in PYTHON_DATA_FACTORIES:
            self._set(torch, name, factory(name, getattr(torch, name)))
        for name in RANDOM_FACTORIES:
            self._set(torch, name, drawing(f"torch.{name}", getattr(torch, name), factory_device))
        for name in RANDOM_LIKE:
            self._set(torch, name, drawing(f"torch.{name}", getattr(torch, name), like_device))
        for name in RANDOM_IN_PLACE:
            self._set(T, name, drawing(f".{name}()", getattr(T, name), like_device))
        for name in HOST_READS:
            self._set(T, name, host_read(name, getattr(T, name)))
        for name in DATA_DEPENDENT:
            self._set(torch, name, data_dependent(f"torch.{name}", getattr(torch, name)))
            self._set(T, name, data_dependent(f".{name}()", getattr(T, name)))
        for name in ("to", "cuda"):
            self._set(T, name, moving(name, getattr(T, name)))
        self._set(T, "copy_", copying(T.copy_))
        self._set(T, "__getitem__", indexing(T.__getitem__))
        return self


class _Group:
    """A stand-in process group of the simulated world (what torch's SyncBatchNorm asks of one)."""

    def __init__(self, ranks):
        self.ranks = list(ranks)

    def size(self):
        return len(self.ranks)

    def _get_backend_name(self):
        return "fake"


@contextlib.contextmanager
def simulated_world(world: int = 2, rank: int = 0):
    """Inside the block this process is rank `rank` of `world` for torch.distributed: the collectives keep their
    outputs' shapes (on `meta` tensors the values do not exist anyway) and do nothing else. The code between the
    collectives, the multi-process step's own (SyncBN, shuffle-BN, the all-gathered targets), runs for real under a
    DeviceGuard; whether the real collectives agree across ranks is tests/test_distributed.py's business."""
    import torch.distributed as dist
    world_group = _Group(range(world))

    def size_of(group=None):
        return (group or world_group).size()

    def all_gather(out, x, group=None, async_op=False):
        return None

    def all_gather_into_tensor(out, x, group=None, async_op=False):
        return None

    def none(*args, **kwargs):
        return None
    patches = {"is_available": lambda: True, "is_initialized": lambda: True, "get_world_size": size_of,
               "get_rank": lambda group=None: rank, "all_reduce": none, "broadcast": none, "barrier": none,
               "all_gather": all_gather, "all_gather_into_tensor": all_gather_into_tensor,
               "all_gather_single": all_gather_into_tensor, "new_group": lambda ranks=None, **kw: _Group(ranks)}
    saved = {name: getattr(dist, name) for name in patches if hasattr(dist, name)}
    for name, fn in patches.items():
        setattr(dist, name, fn)
    try:
        yield world_group
    finally:
        for name in patches:
            if name in saved:
                setattr(dist, name, saved[name])
            else:
                delattr(dist, name)


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.host_ops = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        if any(t.device.type != "cpu" for t in tensors):
            self.ops += 1
        else:
            self.host_ops += 1
        return out


@contextlib.contextmanager
def kernels():
    """Counts the aten ops dispatched inside the block: `ops` touch a device tensor (on a GPU about one kernel, or
    one copy, each), `host_ops` only CPU tensors (parameters worked out on the host)."""
    mode = _Count()
    with mode:
        yield mode


def per_batch(make_batch_fn, batches: int = 3) -> dict:
    """Host syncs, device draws and aten ops per batch of fn(batch) for batch in range(batches)."""
    fn = make_batch_fn()
    fn(0)                                                     # first call: cached constants, lazy set-up
    with DeviceGuard() as guard, kernels() as k:
        for b in range(1, batches + 1):
            fn(b)
    return {"host_syncs": len(guard.syncs) / batches, "device_draws": len(guard.device_draws) / batches,
            "kernels": round(k.ops / batches), "host_ops": round(k.host_ops / batches),
            "where": sorted(set(s.split(" at ")[-1] for s in guard.syncs))}


def pipelines() -> dict:
    """Every device pipeline (and the APS sampler) at CIFAR shapes, batch 64, on meta."""
    from augment.batched import batched_pipeline
    from augment.recipes import aps_pair, finetune_view, lincls_view, moco_views
    from data.datasets import get_preset
    from samplers.aps import random_boxes, sample_aps
    from utils.rng import BatchRandom
    preset, meta = get_preset("cifar10"), torch.device("meta")
    x = torch.zeros(64, 3, 32, 32, dtype=torch.uint8, device=meta)
    recipes = {"aps pair": aps_pair(preset, 32), "moco v2": moco_views(preset, 32),
               "moco, 2 keys + 2 minis + AsymAug": moco_views(preset, 32, num_key_views=2, num_minis=2,
                                                              mini_size=16, asym_aug=True),
               "fine-tuning (RandAugment, erasing)": finetune_view(preset, 32), "linear probe": lincls_view(preset, 32)}

    def pipeline(recipe):
        def make():
            pipe = batched_pipeline(recipe)
            try:                                              # today's streams: a host generator
                rng = BatchRandom("cpu", 0, 1)
            except TypeError:
                rng = BatchRandom("cpu")
            return lambda b: pipe(x, rng.reseed(0, 0, b))
        return make

    out = {name: per_batch(pipeline(r)) for name, r in recipes.items()}
    boxes = [t.to(meta) for t in random_boxes(64, 32)]

    def sampler():
        rng = BatchRandom(meta, 0, 1)
        return lambda b: sample_aps(*boxes, 16, 0.25, 2, 2.0, rng.reseed(b))
    out["APS sampler (K=2)"] = per_batch(sampler)
    return out


def main():
    torch.set_num_threads(1)
    for name, counts in pipelines().items():
        print(json.dumps({"pipeline": name, **counts}), flush=True)


if __name__ == "__main__":
    main()
