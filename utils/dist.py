"""Distributed setup, read once from torchrun's environment, and the collectives the methods need.

Every helper works without a process group (one process, CPU or one GPU): then it is the identity.
"""
import datetime
import os

import torch
import torch.distributed as dist

from utils.errors import UserError
from utils.flags import text
from utils.runtime import configure_device


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' picks cuda:<local_rank> when a GPU is visible, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} was asked for but no CUDA device is visible; use --device cpu")
        if name == "cuda":
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N")


def init_distributed(device_name: str = "auto", deterministic: bool = False) -> torch.device:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); return this process's device
    (configured: utils.runtime.configure_device, deterministic for --deterministic)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    configure_device(device, deterministic)
    if world_size > 1 and not is_dist():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return device


def cleanup():
    if is_dist():
        dist.destroy_process_group()


def barrier():
    if is_dist():
        dist.barrier()


@torch.no_grad()
def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0 (rank order). No gradient flows back."""
    if not is_dist():
        return x
    out = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


@torch.no_grad()
def all_gather_uneven(x: torch.Tensor) -> torch.Tensor:
    """Like all_gather, for tensors whose first dimension differs between ranks, a rank with none included (more
    ranks than items: its x may be [0, 0] when it never saw an item's width; the others' trailing shape is used)."""
    if not is_dist():
        return x
    shape = torch.tensor([x.shape[0], *x.shape[1:]], device=x.device)
    shapes = all_gather(shape[None]).tolist()                     # one collective: every rank's size and shape
    sizes = [s[0] for s in shapes]
    trailing = next((tuple(s[1:]) for s in shapes if s[0] > 0), tuple(x.shape[1:]))
    if x.shape[0] == 0:
        x = x.new_zeros((0,) + trailing)
    if max(sizes) == 0:
        return x
    pad = max(sizes) - x.shape[0]
    if pad:
        x = torch.cat([x, x.new_zeros((pad,) + tuple(x.shape[1:]))])
    gathered = all_gather(x).split(max(sizes))
    return torch.cat([g[:s] for g, s in zip(gathered, sizes)])


@torch.no_grad()
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(x) / get_world_size() if is_dist() else x


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if not is_dist():
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x


@torch.no_grad()
def all_reduce_min(x: torch.Tensor) -> torch.Tensor:
    if not is_dist():
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.MIN)
    return x


@torch.no_grad()
def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    if is_dist():
        dist.broadcast(x, src)
    return x


def rank_group(group_size: int):
    """This rank's process group when the ranks are cut into consecutive groups of `group_size`.

    Every rank creates every group (new_group is collective). Raises UserError if the size does not divide
    the world size.
    """
    world, rank = get_world_size(), get_rank()
    if group_size < 1 or world % group_size:
        raise UserError(f"--syncbn-group-size {group_size} does not divide the {world} processes; use a divisor")
    mine = None
    for start in range(0, world, group_size):
        group = dist.new_group(list(range(start, start + group_size)))
        if start <= rank < start + group_size:
            mine = group
    return mine


def data_parallel(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around `module` under torchrun (several processes); the module itself otherwise."""
    if get_world_size() == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)


def add_reference_launcher_args(parser):
    """The reference scripts' launcher flags, accepted and ignored: torchrun is the launcher."""
    g = parser.add_argument_group("reference launcher flags (accepted, ignored: use torchrun)")
    for flag in ("--dist-url", "--dist-backend", "--world-size", "--rank", "--gpu"):
        g.add_argument(flag, type=text("anything (ignored)"), default=None, help="ignored")
    g.add_argument("--multiprocessing-distributed", action="store_true", help="ignored")
    return g
