"""Every script's training step, as the script itself builds it, makes no host sync: its method, model and one
loaded batch are taken from the Trainer the script's main builds (tiny flags by rule, the embedded digits), moved
to the `meta` device and stepped under the DeviceGuard. Scripts are found by name, and nothing here names a method:
a new script is checked with no edit (tests/test_new_method.py uses the same two functions)."""
import pytest
import torch

from engine import Callback, installed
from test_flags import SCRIPTS, TINY
from test_gpu_paths import META, no_trouble, step_through
from utils.rng import BatchRandom
from utils.transfer import tree_to_device


class Captured(Exception):
    pass


class Capture(Callback):
    def fit_start(self, trainer):
        raise Captured(trainer)


def script_trainer(module, argv: list):
    """The Trainer that `module`'s main builds from argv, caught as training starts (nothing trained)."""
    args = module.get_args_parser().parse_args(argv)
    with installed(Capture()):
        try:
            module.main(args)
        except Captured as caught:
            trainer = caught.args[0]
            trainer.log.close()
            return trainer
    raise AssertionError(f"{module.__name__}.main returned without starting to train")


def assert_step_makes_no_host_sync(trainer, guard):
    """One loaded batch of the trainer's data through every optimizer step of its method, on `meta`."""
    method = trainer.method
    batch = tree_to_device(next(iter(trainer.loader)), META)
    method.module.to(META)                                # method.model is the module or a part of it (one process)
    params = [p for group in method.param_groups() for p in group["params"]]
    assert params and all(p.device == META for p in params)
    optimizer = torch.optim.SGD(params, lr=0.1)
    guard.reset()
    step_through(method, batch, BatchRandom(META, 0, 1).reseed(0, 0, 0, 2), optimizer)
    no_trouble(guard)
    return method


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_scripts_step_makes_no_host_sync(script, tmp_path, device_guard):
    import importlib
    module = importlib.import_module(script)
    trainer = script_trainer(module, ["--num-workers", "0", "--device", "cpu", "--epochs", "1", *TINY[script],
                                      "--output-dir", str(tmp_path)])
    assert trainer.global_step == 0 and not list(tmp_path.glob("checkpoint*.pth"))     # caught before training
    assert_step_makes_no_host_sync(trainer, device_guard)
