"""The protocols researchers judge a model by: few labels (a class-balanced subset of its own seed), the kNN
baseline before training, pictures (attention, features, curves), a report per run, detectron2 export."""
import json
import os
import pickle
from collections import Counter

import pytest
import torch
from PIL import Image

import main_finetune
import main_lincls
import main_pretrain
from data import build_dataset
from data.subsets import class_balanced_subset
from models.resnet import create_resnet
from models.vit import cls_attention, create_vit
from tools import plot_runs, show_attention, show_features
from tools import weights as weights_tool
from utils.errors import UserError

FT = ["--dataset", "digits", "--arch", "vit-tiny", "--depth", "1", "--embed-dim", "32", "--num-heads", "2",
      "--patch-size", "8", "--batch-size", "16", "--epochs", "1", "--num-workers", "0", "--warmup-epochs", "0"]


def torchvision_name(key: str) -> str:
    """A detectron2 ResNet key back to torchvision's: the inverse of models.resnet.detectron2_name, written here as
    the independent reference the export is checked against."""
    parts = key.split(".")
    if parts[:2] == ["stem", "conv1"]:
        return ".".join((["bn1"] + parts[3:]) if parts[2:3] == ["norm"] else (["conv1"] + parts[2:]))
    if not (parts[0].startswith("res") and len(parts) >= 4):
        raise ValueError(f"{key} is not a detectron2 ResNet name")
    layer, block, rest = f"layer{int(parts[0][3:]) - 1}", parts[1], parts[2:]
    norm = len(rest) > 2 and rest[1] == "norm"
    if rest[0] == "shortcut":
        name = ["downsample", "1" if norm else "0"]
    elif rest[0].startswith("conv"):
        name = [f"bn{rest[0][4:]}" if norm else rest[0]]
    else:
        raise ValueError(f"{key} is not a detectron2 ResNet name")
    return ".".join([layer, block] + name + rest[2 if norm else 1:])


def from_detectron2(state: dict) -> dict:
    """The inverse of models.resnet.to_detectron2 (num_batches_tracked aside)."""
    return {torchvision_name(k): v for k, v in state.items()}

def run(script, argv):
    return script.main(script.get_args_parser().parse_args(argv))


def test_the_subset_is_class_balanced_and_its_own_seeds():
    targets = build_dataset("digits").targets
    per_class = Counter(targets)
    chosen = class_balanced_subset(targets, fraction=0.1, seed=0)
    assert Counter(targets[i] for i in chosen) == {c: max(1, round(0.1 * n)) for c, n in per_class.items()}
    five = class_balanced_subset(targets, per_class=5, seed=0)
    assert Counter(targets[i] for i in five) == {c: 5 for c in per_class}
    assert chosen == class_balanced_subset(targets, fraction=0.1, seed=0) != class_balanced_subset(targets, 0.1, seed=1)
    assert chosen == sorted(set(chosen))
    with pytest.raises(UserError, match="more than class"):
        class_balanced_subset(targets, per_class=10_000)


@pytest.mark.parametrize("path", ["cpu", "device"])
def test_fine_tuning_on_ten_percent_trains_on_those_images_only(tmp_path, monkeypatch, path):
    from data import datasets
    from data.device_loaders import DeviceLoader
    seen = []
    original = datasets.ArrayDataset.__getitem__
    monkeypatch.setattr(datasets.ArrayDataset, "__getitem__", lambda self, i: seen.append(i) or original(self, i))
    images, real_init = [], DeviceLoader.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        images.append(self.images.shape[0])                        # what the device holds
    monkeypatch.setattr(DeviceLoader, "__init__", init)
    out = tmp_path / path
    run(main_finetune, FT + ["--label-fraction", "0.1", "--data-path", path, "--output-dir", str(out)])
    subset = [int(line) for line in (out / "subset.txt").read_text().split()]
    assert len(subset) == sum(max(1, round(0.1 * n)) for n in Counter(build_dataset("digits").targets).values())
    saved = torch.load(out / "checkpoint.pth", weights_only=True)["extra"]["subset"]["indices"].tolist()
    assert saved == subset
    if path == "cpu":
        train_seen = seen[:len(subset) // 16 * 16]                    # the epoch's batches (the test set follows)
        assert set(train_seen) <= set(subset) and len(train_seen) == len(set(train_seen)) == len(subset) // 16 * 16
    else:
        assert images == [len(subset)]                                # the device holds the subset's images only
    again = tmp_path / f"{path}-file"                                 # --subset-file reuses the list exactly
    run(main_finetune, FT + ["--subset-file", str(out / "subset.txt"), "--data-path", path, "--output-dir",
                             str(again)])
    assert (again / "subset.txt").read_text() == (out / "subset.txt").read_text()


def test_a_linear_probe_and_the_knn_bank_take_the_same_flags(tmp_path):
    probe = tmp_path / "probe"
    run(main_lincls, ["-a", "resnet18", "--img-size", "16", "--batch-size", "32", "--epochs", "1", "--num-workers",
                      "0", "--labels-per-class", "4", "--output-dir", str(probe)])
    assert len((probe / "subset.txt").read_text().split()) == 40
    pre = tmp_path / "pre"
    metrics = run(main_pretrain, ["--arch", "vit-tiny", "--depth", "1", "--embed-dim", "32", "--num-heads", "2",
                                  "--patch-size", "8", "--batch-size", "128", "--nepoch", "1", "--warmup-epochs", "1",
                                  "--num-workers", "0", "--knn-every", "1", "--labels-per-class", "3",
                                  "--output-dir", str(pre)])
    assert len((pre / "subset.txt").read_text().split()) == 30 and 0 <= metrics["knn_top1"] <= 100
    records = [json.loads(line) for line in (pre / "log.jsonl").read_text().splitlines()]
    assert records[0]["epoch"] == 0 and "knn_top1" in records[0] and "train_loss" not in records[0]
    assert records[1]["epoch"] == 1 and "knn_top1" in records[1]
    text = (pre / "log.txt").read_text()
    assert f"kNN top-1 at start {records[0]['knn_top1']:.2f} %, at the end {metrics['knn_top1']:.2f} %" in text
    report = (pre / "report.md").read_text()
    assert "labels_per_class=3" in report and "| knn_top1 |" in report and "[curves.png](curves.png)" in report
    assert "commit" in report and "peak memory" in report
    assert Image.open(pre / "curves.png").size[0] > 300


@pytest.mark.parametrize("argv, message", [
    (["--label-fraction", "1.5"], "--label-fraction 1.5 must lie in (0, 1]"),
    (["--label-fraction", "0"], "must lie in (0, 1]"),
    (["--labels-per-class", "1000"], "more than class"),
    (["--label-fraction", "0.1", "--labels-per-class", "3"], "pass one of"),
])
def test_bad_subsets_exit_2_with_one_line(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        run(main_finetune, FT + argv + ["--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0], err


def test_bad_subset_files_and_another_subset_on_resume(tmp_path, capsys):
    for name, text, message in (("unknown.txt", "3\n99999\n", "an unknown index (line 2: 99999"),
                                ("words.txt", "3\nseven\n", "'seven' is not an index"),
                                ("twice.txt", "3\n3\n", "repeats index 3 (line 2)")):
        (tmp_path / name).write_text(text)
        with pytest.raises(SystemExit):
            run(main_finetune, FT + ["--subset-file", str(tmp_path / name), "--output-dir", str(tmp_path / "o")])
        assert message in capsys.readouterr().err
    out = tmp_path / "resumed"
    run(main_finetune, FT + ["--labels-per-class", "3", "--output-dir", str(out)])
    with pytest.raises(SystemExit):
        run(main_finetune, FT + ["--epochs", "2", "--labels-per-class", "4", "--output-dir", str(out)])
    assert "trained on another subset" in capsys.readouterr().err


def test_the_attention_map_finds_the_patch_the_cls_token_attends_to():
    """A 2-block ViT built by hand: block 0 adds nothing, the tokens are their positional embeddings, and the
    last block's query/key weights make the cls query match the key of patch 6 only."""
    D, target = 8, 6
    vit = create_vit("vit-tiny", 16, 4, depth=2, embed_dim=D, num_heads=1).eval()
    with torch.no_grad():
        for p in vit.parameters():
            p.zero_()
        for norm in (vit.blocks[0].norm1, vit.blocks[0].norm2, vit.blocks[1].norm1, vit.blocks[1].norm2, vit.norm):
            norm.weight.fill_(1.0)
        one_hot = torch.eye(D) * 4.0
        vit.cls_token[0, 0] = one_hot[2]                                   # cls: direction 2
        vit.pos_embed[0, :] = one_hot[1]                                   # every patch: direction 1 ...
        vit.pos_embed[0, target] = one_hot[0]                              # ... but the target: direction 0
        swap = torch.eye(D)[[2, 1, 0] + list(range(3, D))]                 # keys: directions 0 and 2 swapped
        vit.blocks[1].attn.qkv.weight[:D] = 10.0 * torch.eye(D)            # queries
        vit.blocks[1].attn.qkv.weight[D:2 * D] = swap
    maps = cls_attention(vit, torch.randn(2, 3, 16, 16))                  # [2, 1, 4, 4]
    assert maps.shape == (2, 1, 4, 4)
    flat = maps.flatten(1)
    assert (flat.argmax(1) == target).all() and (flat[:, target] > 0.95).all()


def test_the_pictures_are_drawn(tmp_path, reference_classifier, capsys):
    vit = tmp_path / "vit.pth"
    reference_classifier(vit, img_size=32, patch=8, classes=10)
    run(show_attention, [str(vit), "--num-images", "3", "--out", str(tmp_path / "att.png")])
    width, height = Image.open(tmp_path / "att.png").size
    assert width > 4 * 150 and height > 3 * 150                          # image, mean, 2 heads; 3 rows
    top1 = run(show_features, [str(vit), "--max-points", "120", "--out", str(tmp_path / "feat.png")])
    assert 0 <= top1 <= 100 and Image.open(tmp_path / "feat.png").size == (640, 560)
    for d, loss in (("a", 2.0), ("b", 1.5)):
        (tmp_path / d).mkdir()
        (tmp_path / d / "log.jsonl").write_text("".join(json.dumps({"epoch": e, "train_loss": loss / e,
                                                                    "knn_top1": 10.0 * e}) + "\n" for e in (1, 2, 3)))
    run(plot_runs, [str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "runs.png")])
    assert Image.open(tmp_path / "runs.png").size == (840, 320)            # two panels, one row
    resnet = tmp_path / "r18.pth"
    trunk = create_resnet("resnet18").state_dict()                       # a main_moco.py checkpoint's layout
    torch.save({"model": {**{"encoder_q." + k: v for k, v in trunk.items()},
                          **{"encoder_k." + k: v for k, v in trunk.items()}, "queue": torch.zeros(8, 4)},
                "epoch": 1, "args": {}, "optimizer": {}}, resnet)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run(show_attention, [str(resnet), "--out", str(tmp_path / "no.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "holds a ResNet" in err[0] and not (tmp_path / "no.png").exists()


def detectron2_r50_shapes() -> dict:
    """detectron2's ResNet-50 backbone names and shapes, written out from its architecture (stem, then stages
    res2..res5 of 3, 4, 6, 3 bottleneck blocks; the first block of each stage has a projection shortcut)."""
    shapes = {"stem.conv1.weight": (64, 3, 7, 7)}
    stats = ("weight", "bias", "running_mean", "running_var")
    norm = lambda name, c: {f"{name}.norm.{p}": (c,) for p in stats}  # noqa: E731
    shapes.update(norm("stem.conv1", 64))
    cin = 64
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=2):
        cout = 4 * width
        for b in range(blocks):
            base = f"res{stage}.{b}"
            for conv, shape in (("conv1", (width, cin, 1, 1)), ("conv2", (width, width, 3, 3)),
                                ("conv3", (cout, width, 1, 1))):
                shapes[f"{base}.{conv}.weight"] = shape
                shapes.update(norm(f"{base}.{conv}", shape[0]))
            if b == 0:
                shapes[f"{base}.shortcut.weight"] = (cout, cin, 1, 1)
                shapes.update(norm(f"{base}.shortcut", cout))
            cin = cout
    return shapes


class NumpyOnly(pickle.Unpickler):
    """Reads back our own export: numpy arrays and plain containers, nothing else."""

    def find_class(self, module, name):
        if module.startswith("numpy") and name in ("_reconstruct", "ndarray", "dtype", "scalar"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed")


def test_detectron2_export_has_its_names_and_shapes_and_converts_back(tmp_path, moco_checkpoints, capsys):
    torch.manual_seed(0)
    resnet = create_resnet("resnet50")
    with torch.no_grad():
        for m in resnet.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
    ckpt = {"epoch": 100, "arch": "resnet50", "state_dict": {f"module.encoder_q.{k}": v
                                                             for k, v in resnet.state_dict().items()}}
    torch.save(ckpt, tmp_path / "asym.pth")                               # a released Asym-Siam file's layout
    out = tmp_path / "r50.pkl"
    run(weights_tool, ["convert", "--to", "detectron2", str(tmp_path / "asym.pth"), str(out)])
    with open(out, "rb") as f:
        exported = NumpyOnly(f).load()
    model = exported["model"]
    assert exported["matching_heuristics"] is True
    assert {k: tuple(v.shape) for k, v in model.items()} == detectron2_r50_shapes()
    back = from_detectron2({k: torch.from_numpy(v) for k, v in model.items()})
    for k, v in resnet.state_dict().items():
        if not k.endswith("num_batches_tracked") and not k.startswith("fc."):
            assert torch.equal(back[k], v), k
    moco_checkpoints(tmp_path)                                            # a ResNet-18 with the CIFAR stem
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run(weights_tool, ["convert", "--to", "detectron2", str(tmp_path / "ours.pth"), str(tmp_path / "no.pkl")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "takes a ResNet-50" in err[0] and not os.path.exists(
        tmp_path / "no.pkl")
