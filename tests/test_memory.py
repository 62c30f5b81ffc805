"""Memory savers that change no number: activation checkpointing (--grad-checkpointing) and exact accumulation
(--accum-steps: the backbone in chunks, the heads and the loss on the whole batch) give the same gradients,
batch-norm statistics and weights as without; and --clip-grad clips the global norm as the formula says."""
import copy
import json

import numpy as np
import pytest
import torch

import main_finetune
import main_moco
import main_pretrain
from models import APS, create_vit
from models.moco import build_moco, shuffle_permutation
from models.resnet import create_resnet
from utils.recompute import enable_grad_checkpointing, split_batch
from utils.rng import BatchRandom


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
MOCO = ["-a", "resnet18", "--img-size", "16", "--batch-size", "16", "--moco-k", "32", "--moco-dim", "8",
        "--mlp-hidden-dim", "16", "--epochs", "1", "--num-workers", "0", "--knn-every", "0", "--device", "cpu",
        "--bn-splits", "2"]                                   # on 48 images (3 steps): a ResNet step is the cost


@pytest.mark.slow
@pytest.mark.parametrize("script, flags", [(main_finetune, FT), (main_moco, MOCO)], ids=["finetune", "moco"])
def test_a_run_with_grad_checkpointing_ends_with_the_same_weights(tmp_path, script, flags, make_folder):
    from tools.same_runs import compare_checkpoint
    if script is main_moco:
        make_folder(tmp_path / "data", classes=2, per_class=24, size=(20, 20))
        flags = flags + ["--dataset", "imagefolder", "--data-root", str(tmp_path / "data")]
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


# ---------------------------------------------------------------- exact accumulation (--accum-steps)
def close(a: torch.Tensor, b: torch.Tensor, rel: float, scale: float = 0.0) -> bool:
    """|a - b| <= rel max(|a|, scale / 100) in norm. scale (the whole gradient's norm) sets a floor for tensors
    whose value is zero in theory: a bias whose shift the next normalisation removes gets a gradient of pure
    round-off."""
    return (a.double() - b.double()).norm().item() <= rel * max(a.double().norm().item(), scale / 100) + 1e-12


def test_split_batch_gives_the_whole_batchs_gradients_in_float64():
    torch.manual_seed(0)
    vit = create_vit("vit-tiny", img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2,
                     num_classes=5).double()
    chunked = split_batch(copy.deepcopy(vit), 3, ("forward", "forward_kept"))        # 8 images: 3 + 3 + 2
    x, idx = torch.randn(8, 3, 16, 16, dtype=torch.float64), torch.rand(8, 16).argsort(1)[:, :6]
    loss = lambda m: m(x).square().sum() + m.forward_kept(x, idx).square().sum()      # noqa: E731
    plain, split = grads_and_buffers(vit, loss)[0], grads_and_buffers(chunked, loss)[0]
    assert all(close(a, b, 1e-10) for a, b in zip(plain, split))
    assert chunked.state_dict().keys() == vit.state_dict().keys()


@pytest.mark.parametrize("chunks", [2, 4])
def test_split_batch_keeps_split_batch_norm_batches_and_statistics(chunks):
    torch.manual_seed(0)
    resnet = create_resnet("resnet18", cifar_stem=True, bn_splits=4).double()
    chunked = split_batch(copy.deepcopy(resnet), chunks)
    x = torch.randn(16, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (g1, b1), (g2, b2) = (grads_and_buffers(m, lambda m: m(x).square().sum()) for m in (resnet, chunked))
    assert all(close(a, b, 1e-10) for a, b in zip(g1, g2))
    assert all(close(a, b, 1e-10) for a, b in zip(b1, b2))       # one running-statistics update, as one batch
    assert all(m.num_splits == 4 for m in chunked.modules() if hasattr(m, "num_splits"))


def test_split_batch_refuses_chunks_that_cut_a_batch_norm_split():
    with pytest.raises(ValueError, match="whole batch-norm splits"):
        split_batch(create_resnet("resnet18", cifar_stem=True, bn_splits=4), 3)


def test_split_batch_replays_the_drop_path_masks_in_the_recomputation():
    torch.manual_seed(0)
    vit = create_vit("vit-tiny", img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2, drop_path_rate=0.5,
                     num_classes=5).double()
    chunked = split_batch(copy.deepcopy(vit), 2)
    x = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    # the reference: the two halves through plain autograd, one after the other (no recomputation)
    by_hand = grads_and_buffers(vit, lambda m: torch.cat([m(c) for c in x.chunk(2)]).square().sum())[0]
    split = grads_and_buffers(chunked, lambda m: m(x).square().sum())[0]
    assert all(close(a, b, 1e-10) for a, b in zip(by_hand, split))


def step_gradients(module, step):
    """The gradients of one step(module) -> loss, the module's buffers after it, and its parameters after one SGD
    update with them."""
    module.train()
    module.zero_grad(set_to_none=True)
    step(module).backward()
    grads = [p.grad.clone() for p in module.parameters() if p.grad is not None]
    buffers = [b.clone() for b in module.buffers()]
    torch.optim.SGD([p for p in module.parameters() if p.grad is not None], lr=0.5, momentum=0.9).step()
    return grads, buffers, [p.detach().clone() for p in module.parameters()]


def assert_same_step(make, step, chunk_counts, split):
    """For each chunk count, a fresh make() split by split(module, n) gives step()'s gradients and the weights after
    an SGD update within 1e-5 relative, and its buffers (BN statistics, MoCo's queue) within 1e-5 relative or 1e-6
    (fp32)."""
    plain_g, plain_b, plain_w = step_gradients(make(), step)
    scale = torch.stack([g.norm() for g in plain_g]).norm().item()
    wscale = torch.stack([w.norm() for w in plain_w]).norm().item()
    for n in chunk_counts:
        module = make()
        split(module, n)
        grads, buffers, weights = step_gradients(module, step)
        assert len(grads) == len(plain_g)
        assert all(close(a, b, 1e-5, scale) for a, b in zip(plain_g, grads)), n
        assert all(torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6) for a, b in zip(plain_b, buffers)), n
        assert all(close(a, b, 1e-5, wscale) for a, b in zip(plain_w, weights)), n  # and the updated weights


def test_an_aps_step_accumulated_equals_the_whole_batch():
    from methods.aps import APSPretraining

    def make():
        torch.manual_seed(0)
        return APS(create_vit("vit-tiny", img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2), 32, 16, 32)
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(16, 3, 16, 16, generator=g), torch.randn(16, 3, 16, 16, generator=g)
    i1, i2 = (torch.rand(16, 16, generator=g).argsort(1)[:, :8] for _ in range(2))
    split = lambda m, n: APSPretraining(m, m, 4, 0.5, 1, 1.0, 1e-3, 0, 1).split_backbone(n)  # noqa: E731
    assert_same_step(make, lambda m: m(x1, x2, i1, i2)[0], (2, 4), split)
    assert_same_step(make, lambda m: m(x1, x2, i1, i2)[0], (4,),               # with --grad-checkpointing too
                     lambda m, n: split(m, n) or enable_grad_checkpointing(m))


def test_a_moco_step_with_every_switch_accumulated_equals_the_whole_batch():
    from augment.mix import scalemix
    from methods.moco import MoCoPretraining

    def make():
        torch.manual_seed(0)
        return build_moco("resnet18", True, bn_splits=4, hidden_dim=32, dim=8, queue_size=64)
    g = torch.Generator().manual_seed(2)
    query, mix = torch.randn(16, 3, 16, 16, generator=g), torch.randn(16, 3, 16, 16, generator=g)
    keys, minis = torch.randn(2, 16, 3, 16, 16, generator=g), torch.randn(2, 16, 3, 8, 8, generator=g)

    def step(m):                                   # ScaleMix, MeanEnc (2 keys), MultiCrop (2 minis), shuffle-BN
        rng = BatchRandom(torch.device("cpu")).reseed(3, 0, 0)
        q = scalemix(query, mix, rng)[0]
        return m(q, keys, minis, perm=shuffle_permutation(keys, rng))[0]
    split = lambda m, n: MoCoPretraining(m, m, 0.1, 1).split_backbone(n)    # noqa: E731
    assert_same_step(make, step, (2, 4), split)
    assert_same_step(make, step, (2,), lambda m, n: split(m, n) or enable_grad_checkpointing(m))


def test_a_fine_tuning_step_with_mixup_and_cutmix_accumulated_equals_the_whole_batch():
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    from methods.classify import FineTuning

    def make():
        torch.manual_seed(0)
        # (drop path draws its masks block by block, so chunks draw others: tested for replay above)
        return create_vit("vit-tiny", img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2, num_classes=4)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1, num_classes=4)
    images, labels = torch.randn(16, 3, 16, 16), torch.arange(16) % 4

    def method(m):
        return FineTuning(m, m, SoftTargetCrossEntropy(), None, {}, torch.device("cpu"), None, mixup)

    def step(m):
        np.random.seed(4)                           # mixup/cutmix draw on the whole batch, before the chunks
        return next(method(m).training_steps((images.clone(), labels), None))[0]
    assert_same_step(make, step, (2, 4), lambda m, n: method(m).split_backbone(n))


def test_a_linear_probe_step_accumulated_equals_the_whole_batch():
    from methods.classify import LinearProbing
    from models.linear import BackboneGuard, LinearProbe

    def make():
        torch.manual_seed(0)
        backbone = create_resnet("resnet18", cifar_stem=True)
        return LinearProbe(backbone, torch.nn.Linear(512, 4), head_bn=True)
    images, labels = torch.randn(16, 3, 16, 16), torch.arange(16) % 4
    loss = torch.nn.CrossEntropyLoss()
    assert_same_step(make, lambda m: loss(m(images), labels), (2, 4), lambda m, n: LinearProbing(
        m, m, loss, None, {}, torch.device("cpu"), None, guard=BackboneGuard(m.backbone)).split_backbone(n))


PRE = ["--arch", "vit-tiny", "--depth", "2", "--embed-dim", "32", "--num-heads", "2", "--patch-size", "4",
       "--proj-hidden-dim", "32", "--proj-dim", "16", "--pred-hidden-dim", "32", "--dataset", "digits",
       "--warmup-epochs", "0", "--batch-size", "1024", "--nsampling", "2", "--nepoch", "2", "--num-workers", "0",
       "--knn-every", "0", "--device", "cpu"]


def weights_close(a: dict, b: dict, atol: float, skip=()):
    compared = [k for k, v in a.items() if v.is_floating_point() and not any(s in k for s in skip)]
    far = [k for k in compared if (a[k] - b[k]).abs().max().item() > atol]
    assert len(compared) > 4 and not far, far


@pytest.mark.slow
def test_accumulated_runs_end_as_the_whole_batch_run_and_resume_exactly(tmp_path):
    import shutil

    from tools.same_runs import differences

    def run(name, *extra):
        args = main_pretrain.get_args_parser().parse_args(PRE + list(extra) + ["--output-dir", str(tmp_path / name)])
        main_pretrain.main(args)
    load = lambda name, file="checkpoint.pth": torch.load(tmp_path / name / file, weights_only=True)  # noqa: E731
    run("whole", "--save-every", "1")
    run("accumulated", "--save-every", "1", "--accum-steps", "4")
    whole, accumulated = load("whole", "checkpoint-0001.pth"), load("accumulated", "checkpoint-0001.pth")
    assert accumulated["global_step"] == whole["global_step"] == 2                # 1 batch x 2 rounds
    # two AdamW steps: round-off only (the BN-removed bias and what tracks it, as in tests/test_distributed.py;
    # longer runs drift as far apart as two whole-batch runs on 1 and 2 threads do)
    weights_close(whole["model"], accumulated["model"], 1e-4, skip=("encoder.norm.bias", "projector.1.running_mean"))
    (tmp_path / "resumed").mkdir()
    shutil.copy(tmp_path / "accumulated" / "checkpoint-0001.pth", tmp_path / "resumed" / "checkpoint.pth")
    run("resumed", "--accum-steps", "4")
    resumed, straight = load("resumed"), load("accumulated")
    assert resumed["global_step"] == straight["global_step"] == 4
    assert differences(resumed["model"], straight["model"]) == []
    assert differences(resumed["optimizer"], straight["optimizer"]) == []


@pytest.mark.slow
def test_the_memory_table_runs_each_configuration_in_its_own_process_and_accumulation_saves(monkeypatch):
    from bench import memory as bench_memory
    monkeypatch.setattr(bench_memory, "STEPS", [("aps-vit-tiny", "vit-tiny", 16, 1024)])    # /8 on the CPU: 128
    monkeypatch.setattr(bench_memory, "SAVINGS", [("none", False, 1), ("accum-4", False, 4)])
    plain, accumulated = bench_memory.memory_table(torch.device("cpu"), "off", 8, 1)
    assert (plain["saving"], accumulated["saving"]) == ("none", "accum-4")
    assert plain["batch"] == accumulated["batch"] == 128 and plain["memory_ratio"] == 1.0
    assert accumulated["step_mib"] < 0.7 * plain["step_mib"], (plain, accumulated)   # activations / 4, + the rest
    assert accumulated["memory_ratio"] == pytest.approx(accumulated["step_mib"] / plain["step_mib"], abs=1e-3)
