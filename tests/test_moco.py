"""MoCo core (docs/REFERENCE.md#moco-switches): loss, momentum update, queue, split BN, MultiCrop and MeanEnc
composition."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.moco import MoCo, moco_loss
from models.norm import SplitBatchNorm
from models.resnet import create_resnet, moco_projector
from utils.rng import BatchRandom


def reference_moco_loss(q, k, queue, T):
    q, k, queue = q.double().numpy(), k.double().numpy(), queue.double().numpy()
    total = 0.0
    for i in range(len(q)):
        logits = [float(q[i] @ k[i]) / T] + [float(q[i] @ queue[:, j]) / T for j in range(queue.shape[1])]
        m = max(logits)
        total += -(logits[0] - m - math.log(sum(math.exp(v - m) for v in logits)))
    return total / len(q)


def test_loss_against_hand_written_with_a_known_queue():
    torch.manual_seed(0)
    q, k = F.normalize(torch.randn(5, 8), dim=1), F.normalize(torch.randn(5, 8), dim=1)
    queue = F.normalize(torch.randn(8, 12), dim=0)
    assert moco_loss(q, k, queue, 0.2).item() == pytest.approx(reference_moco_loss(q, k, queue, 0.2), rel=1e-5)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 4))

    def forward(self, x):
        return self.body(x)


def test_momentum_update_formula_and_bn_buffers_untouched():
    torch.manual_seed(1)
    moco = MoCo(Tiny(), dim=4, queue_size=8, momentum=0.9)
    with torch.no_grad():
        for p in moco.encoder_q.parameters():
            p.add_(torch.randn_like(p))
    k_before = {n: p.clone() for n, p in moco.encoder_k.named_parameters()}
    q_now = dict(moco.encoder_q.named_parameters())
    moco.encoder_k.body[2].running_mean.fill_(3.0)
    moco.momentum_update()
    for n, p in moco.encoder_k.named_parameters():
        assert torch.allclose(p, 0.9 * k_before[n] + 0.1 * q_now[n]), n
    assert torch.all(moco.encoder_k.body[2].running_mean == 3.0)
    assert not any(p.requires_grad for p in moco.encoder_k.parameters())


def test_enqueue_wraps_around():
    moco = MoCo(Tiny(), dim=4, queue_size=8)
    batches = [torch.full((4, 4), float(i)) for i in (1, 2, 3)]
    for b in batches:
        moco.enqueue(b)
    assert int(moco.queue_ptr) == 4
    assert torch.all(moco.queue[:, :4] == 3.0) and torch.all(moco.queue[:, 4:] == 2.0)
    with pytest.raises(ValueError, match="multiple"):
        moco.enqueue(torch.zeros(3, 4))


def test_split_bn_equals_per_chunk_bn_by_hand():
    torch.manual_seed(2)
    bn = SplitBatchNorm(3, num_splits=2)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.0, -1.0, 1.0]))
    x = torch.randn(8, 3, 2, 2)
    y = bn(x)
    for j in range(2):
        chunk = x[4 * j:4 * j + 4]                                 # the chunks are consecutive rows
        mean = chunk.mean(dim=(0, 2, 3), keepdim=True)
        var = chunk.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        expected = (chunk - mean) / torch.sqrt(var + 1e-5) * bn.weight.view(1, 3, 1, 1) + bn.bias.view(1, 3, 1, 1)
        assert torch.allclose(y[4 * j:4 * j + 4], expected, atol=1e-5)
    chunk_means = torch.stack([x[4 * j:4 * j + 4].mean(dim=(0, 2, 3)) for j in range(2)]).mean(dim=0)
    assert torch.allclose(bn.running_mean, 0.1 * chunk_means, atol=1e-6)
    chunk_vars = torch.stack([x[4 * j:4 * j + 4].var(dim=(0, 2, 3)) for j in range(2)]).mean(dim=0)  # unbiased
    assert torch.allclose(bn.running_var, 0.9 + 0.1 * chunk_vars, atol=1e-6)
    bn.eval()
    assert torch.allclose(bn(x), F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias), atol=1e-6)


def test_split_bn_keeps_channels_last_and_its_gradients_match():
    torch.manual_seed(5)
    bn = SplitBatchNorm(4, num_splits=4)
    x = torch.randn(8, 4, 3, 5, requires_grad=True)
    x_cl = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    y, y_cl = bn(x), bn(x_cl)
    assert y_cl.is_contiguous(memory_format=torch.channels_last)      # no layout copies around the BN
    assert torch.allclose(y, y_cl, atol=1e-6)
    w = torch.randn_like(y)
    g, = torch.autograd.grad((y * w).sum(), x)
    ref = torch.cat([torch.autograd.grad((F.batch_norm(x[2 * k:2 * k + 2], None, None, bn.weight, bn.bias, True)
                                          * w[2 * k:2 * k + 2]).sum(), x)[0][2 * k:2 * k + 2] for k in range(4)])
    assert torch.allclose(g, ref, atol=1e-5)


def test_multicrop_and_mean_encoding_compose_as_specified():
    torch.manual_seed(3)
    moco = MoCo(Tiny(), dim=4, queue_size=8, momentum=1.0, temperature=0.2).eval()  # m = 1: fixed key encoder
    query = torch.randn(4, 3, 2, 2)
    keys = torch.randn(2, 4, 3, 2, 2)                              # two key views (MeanEnc)
    minis = torch.randn(3, 4, 3, 2, 2)                             # three mini queries (MultiCrop)
    queue = moco.queue.clone()
    loss, stats = moco(query, keys, minis)
    with torch.no_grad():
        k = F.normalize((moco.encoder_k(keys[0]) + moco.encoder_k(keys[1])) / 2, dim=1)
        q = F.normalize(moco.encoder_q(query), dim=1)
        large = reference_moco_loss(q, k, queue, 0.2)
        mini = np.mean([reference_moco_loss(F.normalize(moco.encoder_q(m), dim=1), k, queue, 0.2) for m in minis])
    assert loss.item() == pytest.approx(large + mini, rel=1e-5)
    assert stats["loss_large"].item() == pytest.approx(large, rel=1e-5)
    assert torch.allclose(moco.queue[:, :4], k.T, atol=1e-6)      # the mean key is what is enqueued
    assert int(moco.queue_ptr) == 4


def test_resnet_cifar_stem_and_projector_keys():
    model = create_resnet("resnet18", cifar_stem=True, bn_splits=2)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity) and isinstance(model.bn1, SplitBatchNorm)
    model.fc = moco_projector(model.feature_dim, 64, 16)
    keys = {k.split(".")[1] for k in model.state_dict() if k.startswith("fc.")}
    assert keys == {"0", "1", "3", "5"}
    assert model(torch.randn(4, 3, 32, 32)).shape == (4, 16)


def moco_run(argv):
    import main_moco
    return main_moco.main(main_moco.get_args_parser().parse_args(argv))


TINY_MOCO = ["-a", "resnet18", "--img-size", "16", "--batch-size", "8", "--moco-k", "16", "--moco-dim", "8",
             "--mlp-hidden-dim", "16", "--bn-splits", "2", "--epochs", "1", "--num-workers", "0", "--lr", "0.03"]


@pytest.mark.slow
def test_seed_command_shape_runs_on_a_folder(tmp_path, make_folder):
    make_folder(tmp_path / "data", per_class=12)
    out = tmp_path / "out"
    metrics = moco_run(TINY_MOCO + ["--dist-url", "tcp://localhost:10001", "--multiprocessing-distributed",
                                    "--world-size", "1", "--rank", "0", "--knn-every", "1",
                                    "--output-dir", str(out), str(tmp_path / "data")])
    assert 0 <= metrics["knn_top1"] <= 100
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["args"]["dataset"] == "imagefolder" and ckpt["args"]["cifar_stem"] is True
    assert int(ckpt["model"]["queue_ptr"]) == (3 * 8) % 16       # 24 images, batch 8: 3 enqueues
    assert {"encoder_q.fc.0.weight", "encoder_q.fc.1.running_mean", "encoder_k.fc.5.weight", "queue"} <= set(
        ckpt["model"])


@pytest.mark.slow
def test_all_implemented_switches_run_together(tmp_path, make_folder):
    make_folder(tmp_path / "data", per_class=4)
    out = tmp_path / "out"
    metrics = moco_run(TINY_MOCO + ["--enable-multicrop", "--num-mini-crops", "2", "--mini-crop-size", "8",
                                    "--enable-mean-encoding", "--num-key-views", "2", "--enable-asymm-aug", "--enable-scalemix",
                                    "--knn-every", "0",
                                    "--data-root", str(tmp_path / "data"), "--dataset", "imagefolder",
                                    "--output-dir", str(out)])
    assert metrics["train_loss"] > metrics["train_loss_large"] > 0  # minis add their mean loss
    assert "train_loss_mini" in metrics


def test_queue_must_be_a_multiple_of_the_batch(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        moco_run(TINY_MOCO + ["--moco-k", "20", "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "--moco-k 20 is not a multiple of the global batch 8" in err


def test_asym_aug_query_and_key_pipelines_differ_as_specified():
    import torchvision.transforms as T
    from PIL import Image
    from timm.data.auto_augment import RandAugment

    from augment.pil import pil_pipeline
    from augment.recipes import moco_views
    from data import get_preset
    preset = get_preset("imagefolder")
    views = pil_pipeline(moco_views(preset, 224, asym_aug=True))
    q, k = views.query, views.key
    calls = []                                                                  # the query's order, op by op
    q.colour = lambda img: calls.append("colour") or img
    q.flip = lambda img: calls.append("flip") or (img, False)
    ra = q.randaug
    q.randaug = lambda img: calls.append("randaugment") or img
    q(Image.new("RGB", (256, 240)))
    assert calls == ["colour", "flip", "randaugment"]                          # RandAugment right after the flip
    assert isinstance(ra, RandAugment) and ra.num_layers == 2 and all(op.magnitude == 10 for op in ra.ops)
    views = pil_pipeline(moco_views(preset, 224, asym_aug=True))
    q, k = views.query, views.key
    assert [type(t) for t in q.colour.transforms] == [T.RandomApply, T.RandomGrayscale, T.RandomApply]  # v2's
    assert q.view.blur_p == 0.5 and q.view.jitter_p == 0.8
    assert k.colour.transforms == [] and k.randaug is None and k.view.crop == "resized" and k.view.flip_p == 0.5
    assert [type(t) for t in k.finish.transforms] == [T.ToTensor, T.Normalize]  # crop + flip, then normalise only
    assert k.view.scale == (0.08, 1.0)
    # timm's RandAugment translates by a fraction of the side (TranslateXRel/YRel), never by translate_const
    assert {op.name for op in q.randaug.ops} >= {"TranslateXRel", "TranslateYRel"}
    assert not {op.name for op in q.randaug.ops} & {"TranslateX", "TranslateY"}
    assert all(op.hparams["translate_pct"] == 0.45 for op in q.randaug.ops)
    base = pil_pipeline(moco_views(preset, 224))
    assert base.query is base.key                                              # symmetric baseline
    out = views(Image.new("RGB", (256, 240), (120, 60, 30)))
    assert out["query"].shape == (3, 224, 224) and out["keys"].shape == (1, 3, 224, 224)


def test_scalemix_pastes_the_box_on_non_square_inputs():
    from augment.mix import scalemix
    g = BatchRandom("cpu").reseed(0)
    N, H, W = 64, 6, 10
    x1, x2 = torch.zeros(N, 3, H, W), torch.ones(N, 3, H, W)
    mixed, boxes, lam = scalemix(x1, x2, rng=g)
    for i in range(N):
        top, bottom, left, right = boxes[i].tolist()
        assert 0 <= top <= bottom <= H and 0 <= left <= right <= W
        expected = torch.zeros(H, W)
        expected[top:bottom, left:right] = 1.0                      # rows are H, columns are W (no swap)
        assert torch.equal(mixed[i, 0], expected) and torch.equal(mixed[i, 2], expected)


def test_scalemix_box_area_matches_lambda_on_average():
    from augment.mix import scalemix
    g = BatchRandom("cpu").reseed(1)
    N, H, W = 4000, 64, 96
    _, boxes, lam = scalemix(torch.zeros(N, 1, H, W), torch.ones(N, 1, H, W), rng=g)
    top, bottom, left, right = boxes.T.float()
    side = torch.sqrt(1 - lam)
    # boxes whose centre keeps them inside the image: area fraction = 1 - lambda up to pixel rounding
    inside = (bottom - top - side * H).abs().le(1.01) & (right - left - side * W).abs().le(1.01)
    frac = ((bottom - top) * (right - left) / (H * W))[inside]
    assert inside.float().mean() > 0.1
    assert frac.mean().item() == pytest.approx((1 - lam[inside]).mean().item(), abs=0.01)
    assert lam.mean().item() == pytest.approx(0.5, abs=0.03)


def test_load_backbone_reads_our_and_the_reference_moco_checkpoints(tmp_path):
    from models import load_backbone
    from models.resnet import ResNetTrunk
    from utils.errors import UserError
    torch.manual_seed(4)
    enc = create_resnet("resnet18", cifar_stem=True)
    enc.fc = moco_projector(enc.feature_dim, 32, 8)
    moco = MoCo(enc, dim=8, queue_size=16)
    x = torch.randn(2, 3, 16, 16)
    expected = ResNetTrunk(moco.encoder_q).eval()(x)
    ref = {"epoch": 100, "arch": "resnet18", "optimizer": {},
           "state_dict": {f"module.{k}": v for k, v in moco.state_dict().items()}}  # docs/REFERENCE.md#moco-checkpoint
    torch.save(ref, tmp_path / "ref.pth")
    torch.save({"model": moco.state_dict(), "args": {}, "epoch": 1, "optimizer": {}}, tmp_path / "ours.pth")
    for name in ("ref.pth", "ours.pth"):
        backbone = load_backbone(str(tmp_path / name)).eval()
        assert isinstance(backbone.fc, nn.Identity) and backbone.conv1.kernel_size == (3, 3)
        assert torch.allclose(backbone(x), expected, atol=1e-5), name
    with pytest.raises(UserError, match="pass -a resnet18"):
        load_backbone(str(tmp_path / "ref.pth"), arch="resnet50")
    broken = dict(ref, state_dict={k: v for k, v in ref["state_dict"].items() if "layer2.0.conv1" not in k})
    with pytest.raises(UserError, match="missing: layer2.0.conv1.weight"):
        load_backbone(broken)
