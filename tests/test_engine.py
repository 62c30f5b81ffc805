"""The shared training loop: per-step lr at fractional epochs, K steps per batch, non-finite stop."""
import argparse

import pytest
import torch

from engine import NonFiniteLoss
from utils.checkpoint import load_file


def test_k_steps_per_batch_and_lr_at_fractional_epochs(tmp_path, make_trainer):

    def steps(model, batch):
        for _ in range(2):
            yield model(batch[0]).pow(2).mean(), {}

    lr_log = []
    trainer, opt = make_trainer(tmp_path, steps, K=2, epochs=2, lr_log=lr_log)
    trainer.fit()
    # 5 batches x 2 steps per epoch: e = epoch + (it * K + t) / (n_iter * K)
    assert lr_log == pytest.approx([e + i / 10 for e in range(2) for i in range(10)])
    assert trainer.global_step == 20
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * (1 - 1.9 / 2))
    assert load_file(str(tmp_path / "checkpoint.pth"))["global_step"] == 20


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path, make_trainer):
    counter = {"step": 0}

    def steps(model, batch):
        loss = model(batch[0]).pow(2).mean()
        counter["step"] += 1
        yield (loss * float("nan") if counter["step"] == 8 else loss), {}

    trainer, _ = make_trainer(tmp_path, steps, K=1, epochs=3, lr_log=[])
    with pytest.raises(NonFiniteLoss, match=r"non-finite at step 7 \(epoch 2\).*last good checkpoint"):
        trainer.fit()
    ckpt = load_file(str(tmp_path / "checkpoint.pth"))
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 5
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


@pytest.mark.parametrize("flags, mode", [([], None), (["--compile"], None),
                                         (["--compile", "max-autotune"], "max-autotune"),
                                         (["--compile", "reduce-overhead"], "reduce-overhead")])
def test_compile_flag_reaches_torch_compile_with_its_mode(tmp_path, monkeypatch, flags, mode,
                                                         make_trainer):
    from utils.run import add_runtime_args
    parser = argparse.ArgumentParser()
    add_runtime_args(parser)
    args = parser.parse_args(flags)
    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: calls.append((type(self), kw)))
    make_trainer(tmp_path, lambda model, batch: iter(()), K=1, epochs=1, lr_log=[], compile=args.compile)
    assert calls == ([(torch.nn.Linear, {"mode": mode})] if flags else [])


def test_compile_flag_rejects_an_unknown_mode(capsys):
    from utils.run import add_runtime_args
    from utils.errors import ArgumentParser
    parser = ArgumentParser()
    add_runtime_args(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--compile", "fast"])
    err = capsys.readouterr().err
    assert "--compile" in err and "max-autotune" in err and "Traceback" not in err
