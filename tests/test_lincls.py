"""Linear probe (docs/REFERENCE.md#linear-probe): LARS against a hand-computed update, loading, frozen backbone,
accuracy, --evaluate."""
import math

import pytest
import torch
import torch.nn as nn

from models.linear import BackboneGuard, LinearProbe, backbone_and_fc
from utils.errors import UserError
from utils.lars import LARS


def norm(v):
    return math.sqrt(sum(x * x for x in v))


def test_lars_step_equals_the_hand_computed_one():
    lr, mom, wd, c, eps = 0.5, 0.9, 0.1, 0.02, 1e-8
    w0, b0 = [[3.0, -4.0], [0.0, 12.0]], [1.0, -2.0]
    W = nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    b = nn.Parameter(torch.tensor(b0, dtype=torch.float64))
    opt = LARS([W, b], lr=lr, momentum=mom, weight_decay=wd, trust_coefficient=c, eps=eps)
    grads = [([[1.0, 2.0], [2.0, -4.0]], [0.5, 0.5]), ([[0.0, 1.0], [-1.0, 0.0]], [1.0, -1.0])]

    w, bb = [x for row in w0 for x in row], list(b0)             # by hand, flat, plain floats
    buf_w, buf_b = [0.0] * 4, [0.0] * 2
    for gw, gb in grads:
        W.grad = torch.tensor(gw, dtype=torch.float64)
        b.grad = torch.tensor(gb, dtype=torch.float64)
        opt.step()
        g = [x for row in gw for x in row]
        ratio = c * norm(w) / (norm(g) + wd * norm(w) + eps)     # the matrix: trust ratio
        d = [ratio * (gi + wd * wi) for gi, wi in zip(g, w)]
        buf_w = [mom * m + di for m, di in zip(buf_w, d)]
        w = [wi - lr * m for wi, m in zip(w, buf_w)]
        d = [gi + wd * bi for gi, bi in zip(gb, bb)]              # the bias (ndim 1): no adaptation
        buf_b = [mom * m + di for m, di in zip(buf_b, d)]
        bb = [bi - lr * m for bi, m in zip(bb, buf_b)]
    assert W.detach().flatten().tolist() == pytest.approx(w, rel=1e-12, abs=1e-12)
    assert b.detach().tolist() == pytest.approx(bb, rel=1e-12, abs=1e-12)


def test_lars_leaves_a_zero_matrix_step_unscaled():
    W = nn.Parameter(torch.zeros(2, 2))
    opt = LARS([W], lr=1.0, momentum=0.0, trust_coefficient=0.001)
    W.grad = torch.ones(2, 2)
    opt.step()
    assert torch.equal(W.detach(), -torch.ones(2, 2))  # |w| = 0: plain SGD, not a zero step


def test_reference_checkpoint_loads_with_exactly_fc_missing(tmp_path, moco_checkpoints):
    moco = moco_checkpoints(tmp_path)
    ref = torch.load(tmp_path / "ref.pth", weights_only=True)
    backbone, fc, cfg = backbone_and_fc(ref, num_classes=10)
    assert cfg == dict(family="resnet", arch="resnet18", cifar_stem=True)
    trunk = {k[len("encoder_q."):]: v for k, v in moco.state_dict().items()
             if k.startswith("encoder_q.") and not k.startswith("encoder_q.fc.")}
    assert set(backbone.state_dict()) == set(trunk)               # every trunk tensor, nothing else
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, trunk[k]), k
    assert isinstance(fc, nn.Linear) and fc.weight.shape == (10, 512)
    broken = dict(ref, state_dict={k: v for k, v in ref["state_dict"].items() if "layer3.1.bn2.weight" not in k})
    with pytest.raises(UserError, match=r"missing: layer3.1.bn2.weight\)"):  # fc keys are not reported
        backbone_and_fc(broken, num_classes=10)
    with pytest.raises(UserError, match="pass -a resnet18"):
        backbone_and_fc(ref, num_classes=10, arch="resnet50")
    with pytest.raises(UserError, match="holds a ResNet"):
        backbone_and_fc(ref, num_classes=10, arch="vit-tiny")


def test_probe_head_init_frozen_backbone_and_eval_mode_bn():
    backbone = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))
    probe = LinearProbe(backbone, nn.Linear(6, 3), chunk_size=2)
    probe.train()
    assert not backbone.training and probe.head.training
    assert not any(p.requires_grad for p in backbone.parameters())
    torch.manual_seed(0)
    big = LinearProbe(nn.Identity(), nn.Linear(2000, 100))
    assert big.head.weight.std().item() == pytest.approx(0.01, rel=0.02) and not big.head.bias.any()
    x = torch.randn(5, 4)
    before = backbone[1].running_mean.clone()
    probe(x).sum().backward()
    assert torch.equal(backbone[1].running_mean, before)            # BN used its running statistics
    assert torch.allclose(probe(x), probe.head(backbone.eval()(x)))  # chunks of 2, 2, 1 = one pass
    with_bn = LinearProbe(nn.Identity(), nn.Linear(6, 3), head_bn=True)
    assert isinstance(with_bn.head[0], nn.BatchNorm1d) and not with_bn.head[0].affine


def test_guard_names_a_changed_backbone_tensor():
    backbone = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    guard = BackboneGuard(backbone)
    guard.snapshot()
    backbone.train()(torch.randn(4, 3))                             # BN statistics move
    with pytest.raises(RuntimeError, match="1.running_mean"):
        guard.check()


def lincls_run(argv):
    import main_lincls
    return main_lincls.main(main_lincls.get_args_parser().parse_args(argv))


BASE = ["--dataset", "digits", "--img-size", "16", "--num-workers", "0", "--batch-size", "128"]


@pytest.mark.slow
def test_probe_beats_chance_keeps_the_backbone_and_evaluate_matches(tmp_path, moco_checkpoints):
    moco_checkpoints(tmp_path)
    out = tmp_path / "out"
    metrics = lincls_run(BASE + ["--epochs", "2", "--eval-every", "2", "--lr", "1", "--head-bn", "--data-path", "cpu",
                                 "--pretrained", str(tmp_path / "ref.pth"), "--output-dir", str(out),
                                 "--dist-url", "tcp://localhost:10001", "--multiprocessing-distributed"])
    assert metrics["test_acc1"] > 30, metrics                       # 10 classes: chance is 10 %
    saved = torch.load(out / "checkpoint.pth", weights_only=True)
    ref = torch.load(tmp_path / "ref.pth", weights_only=True)["state_dict"]
    for k, v in saved["model"].items():                             # the backbone is the file's, bit for bit
        if k.startswith("backbone."):
            assert torch.equal(v, ref["module.encoder_q." + k[len("backbone."):]]), k
    assert set(k for k in saved["model"] if not k.startswith("backbone.")) == {
        "head.0.running_mean", "head.0.running_var", "head.0.num_batches_tracked", "head.1.weight", "head.1.bias"}
    again = lincls_run(["--evaluate", "--output-dir", str(out), "--dataset", "digits", "--num-workers", "0"])
    assert again["test_acc1"] == pytest.approx(metrics["test_acc1"], abs=1e-9)
    assert again["test_acc5"] == pytest.approx(metrics["test_acc5"], abs=1e-9)


@pytest.mark.slow
def test_vit_probe_from_an_aps_checkpoint_with_cached_features_and_head_bn(tmp_path):
    from models import APS, create_vit
    torch.manual_seed(0)
    aps = APS(create_vit("vit-tiny", img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2), 24, 8, 20)
    torch.save({"model": aps.state_dict(), "epoch": 1, "args": {}}, tmp_path / "aps.pth")
    out = tmp_path / "out"
    metrics = lincls_run(BASE + ["--epochs", "20", "--eval-every", "20", "--lars", "--lr", "20", "--cache-features",
                                 "--head-bn", "--pretrained", str(tmp_path / "aps.pth"),  # 16 px: the file's size
                                 "--output-dir", str(out)])
    assert metrics["test_acc1"] > 20, metrics
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["model_config"]["backbone"]["family"] == "vit" and "head.0.running_mean" in ckpt["model"]
    again = lincls_run(["--evaluate", "--output-dir", str(out), "--dataset", "digits", "--num-workers", "0"])
    assert 0 <= again["test_acc1"] <= 100


@pytest.mark.parametrize("argv, message", [
    (["-a", "resnet18", "--evaluate"], "--evaluate needs a trained classifier"),
    (["--pretrained", "PATH/does-not-exist.pth"], "does-not-exist.pth"),
    (["--chunk-size", "-1"], "--chunk-size -1 must be >= 0"),
])
def test_bad_input_gives_one_line(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        lincls_run(BASE + ["--epochs", "1", "--output-dir", str(tmp_path / "out")] + argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and message in err and "\n" not in err, err


def test_a_wrong_arch_for_the_checkpoint_is_named(tmp_path, capsys, moco_checkpoints):
    moco_checkpoints(tmp_path)
    with pytest.raises(SystemExit):
        lincls_run(BASE + ["-a", "vit-small", "--pretrained", str(tmp_path / "ours.pth"), "--output-dir",
                           str(tmp_path / "out")])
    assert "holds a ResNet; pass -a resnet18/34/50/101/152" in capsys.readouterr().err
