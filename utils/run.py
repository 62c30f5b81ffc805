"""A run's start, the same in every script: the runtime flags, the output folder (checked writable), the logger
with every flag, and the opening line that says what trains where."""
import os

import torch

from utils.dist import add_reference_launcher_args, get_world_size, is_main_process
from utils.errors import UserError
from utils.log import setup_logger
from utils.runtime import AMP_CHOICES, add_compile_arg


def add_runtime_args(parser, reference_launcher: bool = False):
    """The runtime flags of every script; reference_launcher: also accept (and ignore) the reference scripts'
    launcher flags (torchrun is the launcher)."""
    if reference_launcher:
        add_reference_launcher_args(parser)
    g = parser.add_argument_group("runtime")
    g.add_argument("--seed", type=int, default=0, help="random seed (data order, augmentation, init, sampling)")
    g.add_argument("--resume", default="", help="checkpoint to resume from (default: <output-dir>/checkpoint.pth "
                                               "if it exists)")
    g.add_argument("--device", default="auto", help="auto (GPU if visible), cpu, cuda or cuda:N")
    g.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                   help="autocast precision; auto = bf16 on GPU, off (fp32) on CPU; fp16 adds a grad scaler")
    g.add_argument("--print-freq", type=int, default=20, help="iterations between progress lines / TB points")
    add_compile_arg(g, "the training model and the device augmentation")
    g.add_argument("--skip-nonfinite", type=int, default=0, metavar="N",
                   help="skip up to N optimizer steps whose loss is not finite (checks every step: a host sync) "
                        "instead of stopping at the first")
    g.add_argument("--save-every", type=int, default=0,
                   help="also keep checkpoint-<epoch>.pth every N epochs (checkpoint.pth is updated every epoch)")
    return g


def prepare_output_dir(path: str):
    """Create the output folder and make sure it is writable (rank 0)."""
    if not is_main_process():
        return
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"--output-dir {path} is not writable ({e.strerror or e}); choose another folder") from e


def start_run(args):
    """Create the output folder, set up the logger and log every flag; returns the logger."""
    prepare_output_dir(args.output_dir)
    logger = setup_logger(args.output_dir)
    logger.info("args: " + " ".join(f"{k}={v}" for k, v in vars(args).items()))
    return logger


def describe_run(what: str, data, lr: float, device: torch.device, amp, details: dict = None) -> str:
    """The opening line every script logs: what trains on how many images, the lr, where, on which data path.
    data: a data.pipeline.TrainData; details: {name: value}, shown after the process count."""
    extra = "".join(f", {k} {v}" for k, v in (details or {}).items())
    return (f"{what}, {len(data.dataset)} images, lr {lr:.3g}, device {device}, {get_world_size()} process(es)"
            f"{extra}, precision {amp or torch.float32}, data path {data.path}")
