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
    from utils.config import ArgumentParser
    parser = ArgumentParser()
    add_runtime_args(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--compile", "fast"])
    err = capsys.readouterr().err
    assert "--compile" in err and "max-autotune" in err and "Traceback" not in err


def test_fp16_clipping_logs_the_norm_of_the_steps_the_scaler_took(tmp_path):
    """Under fp16 the grad scaler skips a step whose gradients overflow; its (infinite) norm is left out of the
    logged grad_norm, which is the mean of the other steps' norms (by hand), not nan."""
    import json
    from torch.utils.data import DataLoader, TensorDataset
    from engine import Method, Trainer, TrainSettings
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    calls, norms = {"n": 0}, []

    def overflow(grad):
        calls["n"] += 1
        return grad * float("inf") if calls["n"] == 2 else grad      # the second step's gradients overflow
    model.weight.register_hook(overflow)

    class Steps(Method):
        def training_steps(self, batch, rng):
            yield self.model(batch[0]).float().pow(2).mean(), {}     # (an fp32 loss, as our methods' are)

        def lr_at(self, e):
            return 0.0                                            # nothing moves: each step's norm is known

    data = TensorDataset(torch.randn(8, 2), torch.zeros(8))
    settings = TrainSettings(output_dir=str(tmp_path), epochs=1, batch_size=2, print_freq=100, clip_grad=1e6)
    trainer = Trainer(Steps(model), torch.optim.SGD(model.parameters(), lr=0.0), DataLoader(data, batch_size=2),
                      settings, torch.device("cpu"), torch.float16)
    metrics = trainer.fit()
    for x in data.tensors[0].view(4, 2, 2):                          # the norms by hand, unscaled
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(x).float().pow(2).mean()
        w, b = torch.autograd.grad(loss, [model.weight, model.bias])
        norms.append(torch.cat([w.flatten(), b]).norm().item())
    expected = (norms[0] + norms[2] + norms[3]) / 3
    assert trainer.scaler.get_scale() < 65536.0                      # the scaler saw the overflow and backed off
    assert metrics["train_grad_norm"] == pytest.approx(expected, rel=1e-3)
    logged = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert logged["train_grad_norm"] == pytest.approx(expected, rel=1e-3)


def test_a_method_owns_its_parameter_groups_with_lr_scale_fixed_lr_and_weight_decay(tmp_path):
    """The Trainer builds the optimiser over the method's groups; each step a group's lr is its fixed_lr, or the
    schedule's lr times its lr_scale, and its own weight decay applies (plain SGD: w <- w - lr (g + wd w))."""
    from torch.utils.data import DataLoader, TensorDataset

    from engine import Method, Trainer, TrainSettings
    from utils.optim import OptimizerSpec

    class Groups(Method):
        def training_steps(self, batch, rng):
            x, _ = batch
            yield self.model(x).sum(), {}

        def lr_at(self, epoch):
            return 0.1 * (1 - epoch / 2)                        # 0.1 at the first step, 0.05 at the second

        def param_groups(self):
            return [{"params": [self.module.weight], "lr_scale": 2.0},
                    {"params": [self.module.bias], "fixed_lr": 0.5, "weight_decay": 0.0}]

    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    loader = DataLoader(TensorDataset(x, torch.zeros(2)), batch_size=2)
    settings = TrainSettings(output_dir=str(tmp_path), epochs=2, batch_size=2, print_freq=1)
    trainer = Trainer(Groups(model), OptimizerSpec("sgd", 0.1, weight_decay=0.1, momentum=0.0), loader, settings,
                      torch.device("cpu"), None)
    trainer.fit()
    g_w, g_b = x.sum(0, keepdim=True), torch.tensor([2.0])      # d(sum(x w + b)) / dw, / db
    w, b = w0, b0
    for lr in (0.1, 0.05):                                        # the schedule at epochs 0 and 1
        w = w - 2.0 * lr * (g_w + 0.1 * w)                       # lr_scale 2, the spec's weight decay
        b = b - 0.5 * g_b                                         # fixed lr, no decay
    assert torch.allclose(model.weight.detach(), w, atol=1e-6) and torch.allclose(model.bias.detach(), b, atol=1e-6)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [2.0 * 0.05, 0.5]


def test_callbacks_see_every_moment_in_order_and_an_installed_one_leaves_with_its_block(tmp_path, make_trainer):
    import contextlib
    import os

    from engine import Callback, installed
    events = []

    class Recorder(Callback):
        @contextlib.contextmanager
        def step_context(self):
            events.append("ctx")
            yield

        def fit_start(self, trainer):
            events.append(("start", trainer.global_step))

        def after_backward(self, trainer):           # the gradients are there, the optimiser has not stepped yet
            grads = [p.grad for p in trainer.method.module.parameters()]
            events.append(("backward", trainer.global_step, all(g is not None for g in grads)))

        def epoch_end(self, trainer, epoch):         # before the epoch's checkpoint
            ckpt = tmp_path / "checkpoint.pth"
            events.append(("epoch", epoch, load_file(str(ckpt))["epoch"] if os.path.exists(ckpt) else None))

    def steps(model, batch):
        for _ in range(2):
            yield model(batch[0]).pow(2).mean(), {}

    with installed(Recorder()):
        trainer, _ = make_trainer(tmp_path, steps, K=2, epochs=2, lr_log=[])
    trainer.fit()
    # by hand: 5 batches of 2 steps an epoch; each batch's load, each step's forward and its backward in the context;
    # one more load finds the end of the epoch
    expected = [("start", 0)]
    for epoch in range(2):
        for batch in range(5):
            expected.append("ctx")
            for t in range(2):
                expected += ["ctx", "ctx", ("backward", epoch * 10 + batch * 2 + t, True)]
        expected += ["ctx", ("epoch", epoch, None if epoch == 0 else 1)]
    assert events == expected
    events.clear()
    later, _ = make_trainer(tmp_path / "later", steps, K=2, epochs=1, lr_log=[])    # built outside the block
    later.fit()
    assert events == []
