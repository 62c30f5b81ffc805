"""Per-process runtime choices: seeding, numeric precision (autocast + grad scaler), compilation, and moving
batches to the device."""
import contextlib
import os
import random

import numpy as np
import torch


AMP_CHOICES = ("auto", "bf16", "fp16", "off")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
# inductor generates kernels (the speed); aot_eager traces the graphs, forward and backward, and runs them with
# eager kernels: everything the compiler changes about the program, in seconds (what the CPU tests use)
COMPILE_BACKENDS = ("inductor", "aot_eager")


def add_compile_arg(parser, what: str):
    """--compile [MODE]: bare means torch.compile's default mode; absent means eager. --compile-backend."""
    parser.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES, metavar="MODE",
                        help=f"torch.compile {what} (first steps are slow); MODE one of {', '.join(COMPILE_MODES)} "
                             "(bare: default; max-autotune also tunes the matmuls and fuses their epilogues)")
    parser.add_argument("--compile-backend", default="inductor", choices=COMPILE_BACKENDS,
                        help="with --compile: inductor generates fused kernels (the speed); aot_eager traces the "
                             "same graphs and runs them with eager kernels (quick to compile: to check that a "
                             "configuration compiles, e.g. on a CPU); MODE applies to inductor only")


def compile_kwargs(mode, backend: str = "inductor") -> dict:
    """torch.compile's keyword arguments for --compile MODE --compile-backend BACKEND."""
    if backend != "inductor":
        return {"backend": backend}
    return {"mode": None if mode in (None, True, "default") else mode}


def compile_in_place(module: torch.nn.Module, mode, backend: str = "inductor"):
    """module.compile() with --compile's mode and backend (state-dict keys stay the same); mode None or False:
    nothing."""
    if mode:
        module.compile(**compile_kwargs(mode, backend))


def seed_everything(seed: int):
    """Seed python, numpy and torch (CPU and all GPUs)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


CUBLAS_DETERMINISTIC = ":4096:8"  # cuBLAS's workspace setting for reproducible results (CUDA 10.2 and later)


def configure_device(device: torch.device, deterministic: bool = False):
    """Per-process kernel choices for `device`. By default, on CUDA, cuDNN benchmark mode (the training inputs have
    fixed shapes, so the fastest convolution algorithms are timed once and reused): fast, but the algorithm, and
    so the last bits of a result, may differ from run to run. deterministic (--deterministic), what it says:
    benchmark mode off, cuDNN's deterministic algorithms, cuBLAS's fixed workspace, torch's deterministic algorithms
    in strict mode (an op with no deterministic implementation stops the run naming itself; docs/RUNNING.md lists
    those we know and what we do instead), and attention by SDPA's math kernels (the flash, memory-efficient and
    cuDNN kernels' backward passes accumulate in an order that varies). docs/RUNNING.md says what is then
    bit-exact."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)   # read when cuBLAS starts
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True)
        for kernel in DETERMINISM_OFF_SDPA:
            getattr(torch.backends.cuda, f"enable_{kernel}_sdp")(False)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


DETERMINISM_OFF_SDPA = ("flash", "mem_efficient", "cudnn")     # --deterministic: SDPA's math kernels only


def seed_worker(worker_id: int):
    """DataLoader worker_init_fn: torch seeds each worker; give numpy and python the same seed."""
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


def amp_dtype(amp: str, device: torch.device):
    """The autocast dtype for --amp (None = full fp32). 'auto' is bf16 on GPU, fp32 on CPU."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def fused(device: torch.device) -> dict:
    """Optimizer keyword arguments for the fused (single-kernel) AdamW/SGD on CUDA; nothing elsewhere."""
    return {"fused": True} if device.type == "cuda" else {}


def autocast(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def no_autocast(device: torch.device):
    """A block in full precision under any autocast (for losses and geometry); nothing to turn off on devices
    autocast does not know ('meta', where the tests run the step)."""
    kind = torch.device(device).type
    if kind == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=kind, enabled=False)


def make_grad_scaler(device: torch.device, dtype):
    """A GradScaler that is active only for fp16 (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)




def peak_memory_mib(device: torch.device) -> float:
    """The process's peak memory so far: allocated on a GPU, resident on the CPU (Linux: ru_maxrss in KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
