"""main_pretrain.py end to end on the embedded dataset: outputs, exact resume, one-line errors."""
import gzip
import hashlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import main_pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--dataset", "digits", "--batch-size", "128", "--num-workers", "0", "--warmup-epochs", "1",
        "--print-freq", "5"]


def run(argv):
    return main_pretrain.main(main_pretrain.get_args_parser().parse_args(argv))


@pytest.mark.slow
def test_short_run_writes_logs_checkpoint_and_knn(tmp_path, tiny_flags, capsys):
    out = tmp_path / "run"
    metrics = run(tiny_flags + FAST + ["--nepoch", "2", "--knn-every", "1", "--output-dir", str(out)])
    assert metrics["knn_top1"] > 20.0  # 10 classes: chance is 10 % (a wrong label order would give ~10)
    printed = capsys.readouterr().out
    assert "final kNN top-1" in printed and "eta" in printed

    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert {"model", "optimizer", "scaler", "epoch", "args", "global_step"} <= set(ckpt)
    assert ckpt["epoch"] == 2 and ckpt["global_step"] == 2 * 4 * (1438 // 128)
    assert ckpt["args"]["nsampling"] == 4 and ckpt["args"]["arch"] == "vit-tiny"

    lines = [json.loads(s) for s in (out / "log.jsonl").read_text().splitlines()]
    assert [entry["epoch"] for entry in lines] == [0, 1, 2]                  # epoch 0: the kNN before training
    assert set(lines[0]) == {"epoch", "step", "knn_top1", "knn_top5"}
    assert all("knn_top1" in entry and "train_loss" in entry and "train_pos_cos" in entry for entry in lines[1:])
    assert (out / "curves.png").stat().st_size > 0 and "| knn_top1 |" in (out / "report.md").read_text()
    events = [f for f in os.listdir(out / "tensorboard") if f.startswith("events.out.tfevents")]
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/pos_cos", "train/img_per_s", "eval/knn_top1"} <= tags

    from models import load_backbone
    backbone = load_backbone(str(out / "checkpoint.pth"), arch="vit-tiny", patch_size=4)
    assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, 32)


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def bad_inputs(tmp_path):
    """(flags, text the one-line error must contain) for inputs a user can get wrong."""
    (tmp_path / "empty").mkdir(exist_ok=True)
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "corrupt.pth").write_bytes(b"PK\x03\x04 not really a zip")
    torch.save({"base_encoder.cls_token": torch.zeros(1, 1, 192)}, tmp_path / "weights.pth")
    fm = tmp_path / "fmnist"
    fm.mkdir(exist_ok=True)
    with gzip.open(fm / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x03" + (2).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\x00" * 100)
    with gzip.open(fm / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01" + (2).to_bytes(4, "big") + b"\x01\x02")
    return [
        (["--dataset", "cifar100", "--data-root", str(tmp_path / "nowhere")], "cifar100 not found"),
        (["--dataset", "cifar10", "--data-root", str(tmp_path / "empty")], "--download"),
        (["--dataset", "mnist", "--data-root", str(tmp_path / "empty")], "train-images-idx3-ubyte"),
        (["--dataset", "fashion-mnist", "--data-root", str(fm)], "truncated or corrupt"),
        (["--dataset", "imagefolder", "--data-root", str(tmp_path / "empty")], "train/<class>"),
        (["--sampling-ratio", "1.5"], "(0, 1)"),
        (["--sampling-ratio", "0.3"], "nsampling"),
        (["--nsampling", "9"], "nsampling"),
        (["--img-size", "30"], "not a multiple of --patch-size"),
        (["--batch-size", "4096"], "larger than the training set"),
        (["--batch-size", "0"], "must be positive"),
        (["--output-dir", str(tmp_path / "a_file")], "not writable"),
        (["--resume", str(tmp_path / "corrupt.pth")], "unreadable"),
        (["--resume", str(tmp_path / "weights.pth")], "not a training checkpoint"),
        (["--resume", str(tmp_path / "missing.pth")], "does not exist"),
        (["--arch", "vit-huge"], "invalid choice"),
        (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
        (["--amp", "fp8"], "invalid choice"),
    ]


def test_bad_inputs_give_one_line_errors(tmp_path, tiny_flags, capsys):
    cases = bad_inputs(tmp_path)
    for flags, expected in cases:
        out_dir = str(tmp_path / "out")
        argv = tiny_flags + FAST + ["--nepoch", "1", "--knn-every", "0", "--output-dir", out_dir] + flags
        with pytest.raises(SystemExit) as e:
            run(argv)
        err = capsys.readouterr().err
        lines = [s for s in err.splitlines() if s.strip()]
        assert e.value.code == 2, (flags, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), (flags, err)
        assert expected in lines[0], (flags, lines[0])
        assert "Traceback" not in err


@pytest.mark.slow
def test_checkpoint_of_another_model_is_refused_and_left_untouched(tmp_path, tiny_flags, capsys):
    out = tmp_path / "run"
    run(tiny_flags + FAST + ["--nepoch", "1", "--knn-every", "0", "--output-dir", str(out)])
    before = digest(out / "checkpoint.pth")
    wider = [f if f != "32" else "48" for f in tiny_flags]  # --embed-dim 48
    with pytest.raises(SystemExit) as e:
        run(wider + FAST + ["--nepoch", "2", "--knn-every", "0", "--output-dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "does not fit the model" in err and len(err.splitlines()) == 1
    assert digest(out / "checkpoint.pth") == before
    # auto-resume refuses a checkpoint of another run in the same folder (here: another patch size)
    other = [f if f != "4" else "8" for f in tiny_flags]  # --patch-size 8
    with pytest.raises(SystemExit):
        run(other + FAST + ["--nepoch", "2", "--knn-every", "0", "--output-dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert "belongs to a different run (--patch-size 4 vs 8)" in err and len(err.splitlines()) == 1
    assert digest(out / "checkpoint.pth") == before


def test_cli_error_has_no_traceback(tmp_path):
    res = subprocess.run([sys.executable, "main_pretrain.py", "--dataset", "cifar100", "--data-root",
                          str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "out")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert res.stderr.strip().startswith("error: cifar100 not found") and len(res.stderr.strip().splitlines()) == 1
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_paths_run_on_cpu(tmp_path, tiny_flags, amp):
    """The autocast + grad-scaler code that GPUs use, exercised on the CPU."""
    metrics = run(tiny_flags + FAST + ["--nepoch", "1", "--knn-every", "1", "--amp", amp,
                                       "--output-dir", str(tmp_path / amp)])
    assert math.isfinite(metrics["train_loss"]) and metrics["knn_top1"] > 0
    ckpt = torch.load(tmp_path / amp / "checkpoint.pth", weights_only=True)
    assert ("scale" in ckpt["scaler"]) == (amp == "fp16")  # a grad scaler only for fp16
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values() if v.is_floating_point())


def test_download_failure_is_one_line(tmp_path, monkeypatch, capsys):
    import urllib.error

    import torchvision.datasets.utils as tvu

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tvu, "download_url", offline)
    monkeypatch.setattr(tvu, "download_and_extract_archive", offline)
    import torchvision.datasets.cifar as tvc
    import torchvision.datasets.mnist as tvm
    monkeypatch.setattr(tvc, "download_and_extract_archive", offline)
    monkeypatch.setattr(tvm, "download_and_extract_archive", offline)
    for dataset in ("cifar10", "fashion-mnist"):
        with pytest.raises(SystemExit) as e:
            run(["--dataset", dataset, "--data-root", str(tmp_path / dataset), "--download", "--nepoch", "1",
                 "--output-dir", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1, err
        assert err.startswith(f"error: could not download {dataset}") and "elsewhere" in err


def test_same_seed_same_run(tmp_path, tiny_flags):
    flags = tiny_flags + FAST + ["--nepoch", "1", "--knn-every", "0"]
    run(flags + ["--output-dir", str(tmp_path / "a")])
    run(flags + ["--output-dir", str(tmp_path / "b")])
    run(flags + ["--output-dir", str(tmp_path / "c"), "--seed", "1"])
    a, b, c = (torch.load(tmp_path / d / "checkpoint.pth", weights_only=True)["model"] for d in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
