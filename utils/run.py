"""A run's start, the same in every script: the runtime flags, the output folder (checked writable), the logger
with every flag, and the opening line that says what trains where."""
import os

import torch

from utils.dist import add_reference_launcher_args, get_world_size, is_main_process
from utils.errors import UserError
from utils.log import setup_logger
from utils.runtime import AMP_CHOICES, add_compile_arg
from utils.flags import count, device_name, input_file, integer, positive, text
from utils.trackers import loggers_problem


# what auto-resume must find unchanged in a checkpoint it finds (the ViT scripts; MoCo has no patch size)
VIT_IDENTITY = ("dataset", "arch", "patch_size", "img_size")


def add_runtime_args(parser, reference_launcher: bool = False, resume_names=None):
    """The runtime flags of every script; reference_launcher: also accept (and ignore) the reference scripts'
    launcher flags (torchrun is the launcher); resume_names(name) -> True for registry names --resume takes."""
    if reference_launcher:
        add_reference_launcher_args(parser)
    g = parser.add_argument_group("runtime")
    g.add_argument("--config", type=input_file(), default=None, metavar="FILE.yaml",
                   help="flags from a YAML file (flag: value lines; the flags given on the command line win); every "
                        "run writes its resolved flags to <output-dir>/config.yaml, which reruns it")
    g.add_argument("--seed", type=integer(low=0), default=0,
                   help="random seed (data order, augmentation, init, sampling)")
    g.add_argument("--resume", type=input_file(empty="<output-dir>/checkpoint.pth if it exists", registry=resume_names),
                   default="", help="checkpoint to resume from")
    g.add_argument("--device", type=device_name(), default="auto", help="auto: the GPU if one is visible")
    g.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                   help="autocast precision; auto = bf16 on GPU, off (fp32) on CPU; fp16 adds a grad scaler")
    g.add_argument("--print-freq", type=count(), default=20, help="iterations between progress lines / TB points")
    g.add_argument("--logger", type=text("a comma-separated list of tensorboard, wandb, mlflow", check=loggers_problem),
                   default="tensorboard",
                   help="where scalars, the config, curves.png and the final metrics go besides log.jsonl; wandb and "
                        "mlflow need pip install -r requirements-extras.txt (docs/RUNNING.md#trackers)")
    add_compile_arg(g, "the training model and the device augmentation")
    g.add_argument("--deterministic", action="store_true",
                   help="reproducible GPU kernels: cuDNN benchmark off, deterministic cuDNN/cuBLAS and torch "
                        "algorithms (slower; docs/RUNNING.md says what is bit-exact with and without it)")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="activation checkpointing of the ViT blocks and ResNet stages: less memory, about a third "
                        "more compute, the same numbers (no effect on the linear probe's frozen backbone)")
    g.add_argument("--accum-steps", type=count(), default=1, metavar="N",
                   help="run the backbone over each batch in N chunks, the heads and the loss on the whole batch: "
                        "the whole batch's gradient (every negative kept, BN splits whole) with about 1/N of the "
                        "activation memory, at the cost of a second backbone forward; docs/RUNNING.md")
    g.add_argument("--clip-grad", type=positive(), default=None, metavar="NORM",
                   help="clip the gradients' global norm to NORM before each optimizer step (after unscaling under "
                        "fp16); the pre-clip norm is logged as grad_norm (default: no clipping)")
    g.add_argument("--skip-nonfinite", type=count(zero="stop at the first"), default=0, metavar="N",
                   help="skip up to N optimizer steps whose loss is not finite (checks every step: a host sync) "
                        "instead of stopping at the first")
    g.add_argument("--save-every", type=count(zero="checkpoint.pth only"), default=0,
                   help="also keep checkpoint-<epoch>.pth every N epochs (checkpoint.pth is updated every epoch)")
    g.add_argument("--dry-run", action="store_true",
                   help="check the flags, the data and the model's shapes (one forward pass), then stop")
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


def flag_name(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_ordered(args, *dests: str):
    """Every MIN MAX pair flag in order (one line naming the flag otherwise)."""
    for dest in dests:
        low, high = getattr(args, dest)
        if low > high:
            raise UserError(f"{flag_name(dest)} {low:g} {high:g}: MIN must not exceed MAX; swap them")


def check_per_process(batch: int, least: int, why: str):
    """The global batch splits evenly over the processes, with at least `least` images each (why: what needs
    them, e.g. batch norm)."""
    world = get_world_size()
    if batch % world:
        raise UserError(f"--batch-size {batch} is not divisible by the {world} processes; use a multiple of {world}")
    if batch // world < least:
        raise UserError(f"--batch-size {batch} leaves {batch // world} image(s) per process; {why} needs at least "
                        f"{least}: raise --batch-size")
