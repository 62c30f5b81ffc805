"""A catalogue of bad inputs across the four scripts and the weights tool: each exits with status 2 and one
line naming the problem and the fix (no traceback), and leaves what is already in the output folder alone."""
import hashlib
import io
import os

import pytest
import torch

import main_finetune
import main_lincls
import main_moco
import main_pretrain
from bench import speed as bench
from tools import weights

TINY = ["--arch", "vit-tiny", "--depth", "2", "--embed-dim", "32", "--num-heads", "2", "--patch-size", "4"]
PRE = TINY + ["--proj-hidden-dim", "32", "--proj-dim", "16", "--pred-hidden-dim", "32", "--nepoch", "1",
              "--batch-size", "64", "--num-workers", "0", "--knn-every", "0"]
FT = TINY + ["--epochs", "1", "--batch-size", "64", "--num-workers", "0"]
MOCO = ["-a", "resnet18", "--img-size", "16", "--batch-size", "8", "--moco-k", "16", "--moco-dim", "8",
        "--mlp-hidden-dim", "16", "--epochs", "1", "--num-workers", "0", "--knn-every", "0", "--bn-splits", "2"]
LIN = ["-a", "resnet18", "--img-size", "16", "--batch-size", "64", "--epochs", "1", "--num-workers", "0"]


class Payload:
    def __reduce__(self):
        return (os.system, ("touch payload-ran",))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad files and folders, built once."""
    from PIL import Image

    from models import APS, create_vit
    d = tmp_path_factory.mktemp("bad")
    torch.manual_seed(0)
    aps = APS(create_vit("vit-tiny", img_size=32, patch_size=4, depth=2, embed_dim=32, num_heads=2), 32, 16, 32)
    torch.save({"model": aps.state_dict(), "epoch": 1, "args": {}, "optimizer": {}}, d / "aps_p4.pth")
    data = (d / "aps_p4.pth").read_bytes()
    (d / "truncated.pth").write_bytes(data[: len(data) // 3])
    (d / "notes.pth").write_text("these are not weights\n")
    buf = io.BytesIO()
    torch.save({"model": Payload()}, buf)
    (d / "payload.pth").write_bytes(buf.getvalue())
    (d / "empty" / "train").mkdir(parents=True)
    (d / "empty" / "val").mkdir()
    (d / "flat" / "train").mkdir(parents=True)                 # images directly in train/: no class folders
    Image.new("RGB", (40, 40)).save(d / "flat" / "train" / "a.jpg")
    for split in ("train", "val"):
        for c in ("a", "b"):
            folder = d / "broken" / split / c
            folder.mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (40, 40), (i * 40, 0, 0)).save(folder / f"{i}.jpg")
    (d / "broken" / "train" / "a" / "0.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (d / "a_file").write_text("x")
    (d / "no_images").mkdir()
    (d / "no_images" / "notes.txt").write_text("not an image")
    lists = d / "lists"
    lists.mkdir()
    (lists / "missing.txt").write_text("../broken/train/b/1.jpg\n../broken/train/b/nope.jpg\n")
    (lists / "half.txt").write_text("../broken/train/b/1.jpg 0\n../broken/train/b/2.jpg\n")
    (lists / "labelled").mkdir()
    (lists / "labelled" / "train.txt").write_text("../../broken/train/b/1.jpg 0\n../../broken/train/b/2.jpg 1\n")
    (lists / "labelled" / "val.txt").write_text("../../broken/val/b/1.jpg 0\n../../broken/val/b/2.jpg 7\n")
    (lists / "unlabelled.txt").write_text("../broken/train/b/1.jpg\n../broken/train/b/2.jpg\n")
    return d


def scripted(module):
    return lambda argv: module.main(module.get_args_parser().parse_args(argv))


def disk_full(monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", no_space)


# (id, script, argv (F: the files folder), expected text in the one line, setup)
CASES = [
    ("missing-dataset-dir", main_pretrain, PRE + ["--dataset", "imagefolder", "--data-root", "F/nowhere"],
     "is not a folder"),
    ("empty-dataset-dir", main_pretrain, PRE + ["--dataset", "imagefolder", "--data-root", "F/empty"],
     "holds no images"),
    ("wrong-layout", main_pretrain, PRE + ["--dataset", "imagefolder", "--data-root", "F/flat"], "class sub-folders"),
    ("unreadable-image", main_pretrain, PRE + ["--dataset", "imagefolder", "--data-root", "F/broken", "--img-size",
                                               "32", "--batch-size", "8", "--data-path", "cpu"],
     "cannot read image"),
    ("unreadable-image-in-a-worker", main_pretrain, PRE + ["--dataset", "imagefolder", "--data-root", "F/broken",
                                                           "--img-size", "32", "--batch-size", "8",
                                                           "--num-workers", "1"], "cannot read image"),
    ("batch-larger-than-data", main_pretrain, PRE + ["--batch-size", "5000"], "larger than the training set"),
    ("ratio-out-of-range", main_pretrain, PRE + ["--sampling-ratio", "1.5"], "--sampling-ratio"),
    ("rounds-do-not-fit", main_pretrain, PRE + ["--sampling-ratio", "0.5", "--nsampling", "4"], "--nsampling"),
    ("unknown-arch", main_pretrain, PRE + ["--arch", "vit-huge"], "invalid choice: 'vit-huge'"),
    ("size-not-multiple-of-patch", main_pretrain, PRE + ["--img-size", "30"], "not a multiple of --patch-size 4"),
    ("resume-wrong-patch-size", main_pretrain, PRE + ["--patch-size", "8", "--resume", "F/aps_p4.pth"],
     "does not fit the model"),
    ("resume-truncated", main_pretrain, PRE + ["--resume", "F/truncated.pth"], "truncated"),
    ("resume-not-a-checkpoint", main_pretrain, PRE + ["--resume", "F/notes.pth"], "notes.pth"),
    ("resume-pickle-payload", main_pretrain, PRE + ["--resume", "F/payload.pth"], "pickled Python objects"),
    ("output-dir-not-writable", main_pretrain, PRE + ["--output-dir", "F/a_file/out"], "is not writable"),
    ("disk-full-during-save", main_pretrain, PRE, "could not write checkpoint"),
    ("finetune-wrong-width", main_finetune, FT + ["--pretrained-weights", "F/aps_p4.pth", "--embed-dim", "64"],
     "holds a ViT with --embed-dim 32, not 64; pass --embed-dim 32"),
    ("finetune-missing-weights", main_finetune, FT + ["--pretrained-weights", "F/none.pth"], "does not exist"),
    ("finetune-odd-batch-with-mixup", main_finetune, FT + ["--batch-size", "7"], "even batch"),
    ("finetune-eval-without-checkpoint", main_finetune, FT + ["--eval"], "--eval needs a fine-tuned checkpoint"),
    ("finetune-val-split-out-of-range", main_finetune, FT + ["--val-split", "1.5"], "must lie in (0, 1)"),
    ("finetune-device-path-on-a-folder", main_finetune, FT + ["--dataset", "imagefolder", "--data-root", "F/broken",
                                                             "--img-size", "32", "--data-path", "device"],
     "--data-path device cannot make this recipe's views"),
    ("finetune-bad-randaugment-policy", main_finetune, FT + ["--aa", "rand-x9"], "--aa rand-x9: cannot read 'x9'"),
    ("moco-queue-not-multiple-of-batch", main_moco, MOCO + ["--moco-k", "20"], "is not a multiple of the global"),
    ("moco-data-dir-disagrees", main_moco, MOCO + ["--data-root", "F/empty", "F/flat"], "disagree"),
    ("moco-bn-splits", main_moco, MOCO + ["--bn-splits", "3"], "--bn-splits 3"),
    ("moco-device-path-unreadable-image", main_moco, MOCO + ["--data-path", "device", "--batch-size", "8",
                                                             "--moco-k", "16", "F/broken"], "cannot read image"),
    ("accum-steps-zero", main_pretrain, PRE + ["--accum-steps", "0"], "--accum-steps"),
    ("accum-steps-above-the-batch", main_finetune, FT + ["--accum-steps", "65"], "more than the 64 images"),
    ("accum-steps-not-dividing-bn-splits", main_moco, MOCO + ["--accum-steps", "4"],
     "--accum-steps 4 does not divide --bn-splits 2"),
    ("clip-grad-negative", main_lincls, LIN + ["--clip-grad", "-1"], "--clip-grad"),
    ("lincls-resnet-arch-for-a-vit", main_lincls, LIN + ["--pretrained", "F/aps_p4.pth"], "holds a ViT"),
    ("own-folder-without-images", main_pretrain, PRE + ["--dataset", "folder", "--data-root", "F/no_images"],
     "no images under"),
    ("own-folder-not-a-folder", main_moco, MOCO + ["--dataset", "folder", "--data-root", "F/a_file"],
     "is not a folder"),
    ("filelist-names-a-missing-file", main_pretrain, PRE + ["--dataset", "filelist", "--data-root",
                                                           "F/lists/missing.txt"], "line 2 names"),
    ("filelist-half-labelled", main_pretrain, PRE + ["--dataset", "filelist", "--data-root", "F/lists/half.txt"],
     "line 2 has no label"),
    ("filelist-val-label-not-in-train", main_finetune, FT + ["--dataset", "filelist", "--data-root", "F/lists/labelled",
                                                            "--img-size", "32"], "has label '7'"),
    ("unlabelled-set-for-a-classifier", main_finetune, FT + ["--dataset", "folder", "--data-root", "F/broken",
                                                             "--img-size", "32", "--batch-size", "8"], "has no labels"),
    ("knn-data-without-labels", main_pretrain, PRE + ["--dataset", "folder", "--data-root", "F/broken", "--img-size",
                                                      "32", "--knn-every", "1", "--knn-data", "folder:F/broken",
                                                      "--batch-size", "8"],
     "the kNN monitor needs labels"),
    ("knn-data-unknown-dataset", main_moco, MOCO + ["--dataset", "folder", "--data-root", "F/broken", "--knn-every",
                                                    "1", "--knn-data", "imagenet:F/broken"], "names no dataset we know"),
    ("lincls-pickle-payload", main_lincls, LIN + ["--pretrained", "F/payload.pth"], "pickled Python objects"),
    ("lincls-evaluate-a-non-probe", main_lincls, LIN + ["--evaluate", "--resume", "F/aps_p4.pth"],
     "not a main_lincls.py checkpoint"),
    ("bench-unknown-pipeline-arch", bench, ["--device", "cpu", "--pipeline-archs", "vit-small,vit-huge"],
     "unknown arch 'vit-huge' in --pipeline-archs"),
    ("weights-unknown-name", weights, ["download", "asym-siam/nope-r50"], "unknown weights"),
    ("weights-aps-without-a-file", weights, ["download", "aps:"], "names no file"),
    ("weights-convert-a-text-file", weights, ["convert", "F/notes.pth", "F/out.pth"], "notes.pth"),
]


@pytest.mark.parametrize("name, module, argv, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_keeps_outputs(name, module, argv, expected, files, tmp_path,
                                                           monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier run's notes")
    (out / "checkpoint-0001.pth").write_bytes(b"an earlier run's checkpoint")
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()}
    argv = [a.replace("F/", f"{files}/") for a in argv]
    if module not in (weights, bench) and "--output-dir" not in argv:
        argv += ["--output-dir", str(out)]
    if name == "disk-full-during-save":
        disk_full(monkeypatch)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        scripted(module)(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2, err
    assert err and err[-1].startswith("error: ") and expected in err[-1], err
    assert not any("Traceback" in line for line in err), err
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir() if p.name in before}
    assert after == before                                      # nothing already there was changed
    assert not (out / "checkpoint.pth").exists()
    assert not (tmp_path / "payload-ran").exists()
