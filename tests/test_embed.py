"""tools.embed: every image's backbone features to a file, checked against the backbone run by hand on the
evaluation view of the same images; the same rows in the same order under 2 processes."""
import numpy as np
import pytest
import safetensors.torch
import torch

from augment.pil import pil_pipeline
from augment.recipes import eval_view
from data.datasets import build_dataset, get_preset
from models.loading import load_backbone
from tools import embed


@pytest.fixture
def vit_file(tmp_path, tiny_aps):
    model = tiny_aps()
    cfg = dict(arch="vit-tiny", img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2)
    torch.save({"model": model.state_dict(), "model_config": cfg, "args": {}, "epoch": 1, "optimizer": {}},
               tmp_path / "aps.pth")
    return tmp_path / "aps.pth"


def run(*argv):
    return embed.main(embed.get_args_parser().parse_args(list(argv)))


def test_features_labels_and_index_are_the_backbones_on_each_image_in_order(tmp_path, vit_file):
    features, labels, paths = run(str(vit_file), "--dataset", "digits", "--out", str(tmp_path / "d.npy"),
                                  "--num-workers", "0", "--batch-size", "64", "--device", "cpu", "--data-path", "cpu",
                                  "--output-dir", str(tmp_path / "o"))
    saved = np.load(tmp_path / "d.npy")
    test = build_dataset("digits", None, train=False, transform=pil_pipeline(eval_view(get_preset("digits"), 16)))
    assert saved.shape == (len(test), 32) and saved.dtype == np.float32
    assert np.array_equal(np.load(tmp_path / "d.labels.npy"), np.asarray(test.targets))
    assert (tmp_path / "d.index.txt").read_text().splitlines() == [str(i) for i in range(len(test))]
    model = load_backbone(str(vit_file)).eval()
    picks = [0, 1, 200, len(test) - 1]
    with torch.no_grad():
        by_hand = model(torch.stack([test[i][0] for i in picks]))
    assert np.allclose(saved[picks], by_hand.numpy(), atol=1e-5)
    device, _, _ = run(str(vit_file), "--dataset", "digits", "--out", str(tmp_path / "dev.npy"), "--device", "cpu",
                       "--batch-size", "64", "--output-dir", str(tmp_path / "o"))          # the device path (default)
    gap = (device - features).abs().max().item()
    assert gap < 0.05                # torchvision's antialiased uint8 resize is PIL's on the CPU (equal here), close on a GPU
    run(str(vit_file), "--dataset", "digits", "--split", "train", "--out", str(tmp_path / "t.safetensors"),
        "--num-workers", "0", "--device", "cpu", "--output-dir", str(tmp_path / "o"))
    st = safetensors.torch.load_file(str(tmp_path / "t.safetensors"))
    assert st["features"].shape == (1438, 32) and st["labels"].shape == (1438,)


@pytest.mark.slow
def test_two_processes_write_the_same_rows_in_the_same_order(tmp_path, vit_file, torchrun):
    one = tmp_path / "one.npy"
    run(str(vit_file), "--dataset", "digits", "--out", str(one), "--num-workers", "0", "--device", "cpu",
        "--batch-size", "50", "--output-dir", str(tmp_path / "o1"))
    out = torchrun(29631, "-m", "tools.embed", str(vit_file), "--dataset", "digits", "--out", str(tmp_path / "two.npy"),
                   "--num-workers", "0", "--device", "cpu", "--batch-size", "50", "--output-dir", str(tmp_path / "o2"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "2 process(es)" in out.stdout + out.stderr
    assert np.allclose(np.load(tmp_path / "two.npy"), np.load(one), atol=1e-6)
    assert (tmp_path / "two.index.txt").read_text() == (tmp_path / "one.index.txt").read_text()


def test_a_size_that_contradicts_the_file_is_one_line(tmp_path, vit_file, capsys):
    with pytest.raises(SystemExit) as e:
        run(str(vit_file), "--dataset", "digits", "--img-size", "32", "--out", str(tmp_path / "x.npy"),
            "--device", "cpu", "--output-dir", str(tmp_path / "o"))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == [f"error: {vit_file} was trained at --img-size 16, not 32; pass --img-size 16 "
                                         "or leave it out"]
    assert not (tmp_path / "x.npy").exists()
