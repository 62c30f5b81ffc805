"""Memory savers that change no number: activation checkpointing (--grad-checkpointing) gives the same gradients,
batch-norm statistics and weights as without; and --clip-grad clips the global norm as the formula says."""
import copy
import json

import pytest
import torch

import main_finetune
import main_moco
from models import create_vit
from models.resnet import create_resnet
from utils.recompute import enable_grad_checkpointing


def grads_and_buffers(model, loss_fn):
    model.train()
    torch.manual_seed(5)                                     # the same drop-path draws for both models
    loss_fn(model).backward()
    return [p.grad.clone() for p in model.parameters()], [b.clone() for b in model.buffers()]


def test_checkpointed_vit_blocks_give_the_same_gradients_with_drop_path():
    torch.manual_seed(0)
    vit = create_vit("vit-tiny", img_size=16, patch_size=4, depth=3, embed_dim=32, num_heads=2, drop_path_rate=0.3,
                     num_classes=5)
    saved = copy.deepcopy(vit)
    assert enable_grad_checkpointing(saved) == 3
    x, idx = torch.randn(4, 3, 16, 16), torch.rand(4, 16).argsort(1)[:, :6]
    loss = lambda m: m(x).square().sum() + m.forward_kept(x, idx).square().sum()  # noqa: E731
    (plain, _), (ckpt, _) = grads_and_buffers(vit, loss), grads_and_buffers(saved, loss)
    assert all(torch.equal(a, b) for a, b in zip(plain, ckpt))
    assert vit.state_dict().keys() == saved.state_dict().keys()
    without_drop = copy.deepcopy(vit)
    for m in without_drop.modules():
        if hasattr(m, "drop_prob"):
            m.drop_prob = 0.0
    assert not all(torch.equal(a, b) for a, b in zip(plain, grads_and_buffers(without_drop, loss)[0]))


def test_checkpointed_resnet_stages_keep_gradients_and_batch_norm_statistics():
    torch.manual_seed(0)
    resnet = create_resnet("resnet18", cifar_stem=True)
    saved = copy.deepcopy(resnet)
    assert enable_grad_checkpointing(saved) == 4
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    (g1, b1), (g2, b2) = (grads_and_buffers(m, lambda m: m(x).square().sum()) for m in (resnet, saved))
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert all(torch.equal(a, b) for a, b in zip(b1, b2))        # statistics updated once, not twice


def test_a_copy_of_a_checkpointed_model_computes_with_its_own_weights():
    vit = create_vit("vit-tiny", img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2, num_classes=3)
    enable_grad_checkpointing(vit)
    ema = copy.deepcopy(vit)                                  # what ModelEmaV3 and MoCo's key encoder do
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.5)
    x = torch.randn(2, 3, 16, 16)
    assert not torch.equal(ema.eval()(x), vit.eval()(x))


FT = ["--arch", "vit-tiny", "--depth", "2", "--embed-dim", "32", "--num-heads", "2", "--patch-size", "4",
      "--batch-size", "128", "--epochs", "1", "--warmup-epochs", "1", "--num-workers", "0", "--device", "cpu",
      "--drop-path", "0.2"]                                  # drop path on: the recomputation draws the same masks
MOCO = ["-a", "resnet18", "--img-size", "16", "--batch-size", "32", "--moco-k", "64", "--moco-dim", "8",
        "--mlp-hidden-dim", "16", "--epochs", "1", "--num-workers", "0", "--knn-every", "0", "--device", "cpu",
        "--bn-splits", "2"]


@pytest.mark.slow
@pytest.mark.parametrize("script, flags", [(main_finetune, FT), (main_moco, MOCO)], ids=["finetune", "moco"])
def test_a_run_with_grad_checkpointing_ends_with_the_same_weights(tmp_path, script, flags):
    from tools.same_runs import compare_checkpoint
    run = lambda argv: script.main(script.get_args_parser().parse_args(argv))  # noqa: E731
    run(flags + ["--output-dir", str(tmp_path / "plain")])
    run(flags + ["--grad-checkpointing", "--output-dir", str(tmp_path / "ckpt")])
    assert compare_checkpoint(str(tmp_path / "plain" / "checkpoint.pth"), str(tmp_path / "ckpt" / "checkpoint.pth"),
                              ignore=("args", "metrics", "start_metrics")) == []


def test_clip_grad_clips_the_global_norm_and_logs_it(tmp_path, make_trainer):
    def steps(model, batch):
        x, _ = batch
        yield (model(x).sum() * 10.0), {}

    trainer, opt = make_trainer(tmp_path, steps, 1, 1, [], clip_grad=0.5)
    model = trainer.method.module
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    x = trainer.loader.dataset.tensors[0][:2]
    g_w, g_b = 10.0 * x.sum(0), torch.tensor([20.0])              # d(10 * sum(w.x + b))
    norm = torch.sqrt(g_w.square().sum() + g_b.square().sum())
    lr = opt.param_groups[0]["lr"]
    trainer.optimizer.zero_grad()
    loss, _ = next(steps(model, next(iter(trainer.loader))))
    loss.backward()
    logged = trainer.clip_gradients(0.5)
    assert logged.item() == pytest.approx(norm.item(), rel=1e-6)
    opt.step()
    scale = 0.5 / norm.item()
    assert torch.allclose(model.weight.detach(), w0 - lr * g_w * scale, atol=1e-6)
    assert torch.allclose(model.bias.detach(), b0 - lr * g_b * scale, atol=1e-6)


def test_a_clipped_run_logs_the_pre_clip_norm(tmp_path, make_trainer):
    def steps(model, batch):
        x, _ = batch
        yield model(x).sum() * 100.0, {}

    trainer, _ = make_trainer(tmp_path, steps, 1, 1, [], clip_grad=1.0)
    trainer.fit()
    record = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()][-1]
    assert record["train_grad_norm"] > 1.0                       # what it was before clipping
