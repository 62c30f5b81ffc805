"""Resume equals the uninterrupted run, for every script: a run 'crashes' after epoch 1 (a fresh output folder
holding only that epoch's checkpoint, which it auto-resumes from) and ends with exactly the weights, optimizer
position and extra state of the run that never stopped."""
import json
import shutil

import pytest
import torch

import main_finetune
import main_lincls
import main_moco
import main_pretrain

TINY_MOCO = ["-a", "resnet18", "--img-size", "16", "--batch-size", "8", "--moco-k", "16", "--moco-dim", "8",
             "--mlp-hidden-dim", "16", "--bn-splits", "2", "--epochs", "1", "--num-workers", "0", "--lr", "0.03"]


def pretrain_flags(tmp_path, tiny_flags, make_folder):
    return tiny_flags + ["--dataset", "digits", "--batch-size", "128", "--num-workers", "0", "--warmup-epochs", "1",
                         "--print-freq", "5", "--nepoch", "3", "--knn-every", "0"]


def finetune_flags(tmp_path, tiny_flags, make_folder):
    return ["--dataset", "digits", "--arch", "vit-tiny", "--depth", "2", "--embed-dim", "64", "--num-heads", "2",
            "--patch-size", "8", "--num-workers", "0", "--print-freq", "100", "--epochs", "2", "--warmup-epochs", "1",
            "--model-ema", "--model-ema-decay", "0.9", "--batch-size", "128"]


def moco_flags(tmp_path, tiny_flags, make_folder):
    make_folder(tmp_path / "data", per_class=12)
    return TINY_MOCO + ["--epochs", "2", "--knn-every", "0", "--moco-k", "32", "--enable-scalemix",
                        str(tmp_path / "data")]


def lincls_flags(tmp_path, tiny_flags, make_folder):
    return ["-a", "resnet18", "--img-size", "16", "--batch-size", "256", "--epochs", "2", "--num-workers", "0",
            "--lars", "--head-bn", "--eval-every", "2"]


def pretrain_checks(full, resumed, out):
    assert resumed["epoch"] == 3
    assert resumed["optimizer"]["state"][0]["step"] == full["optimizer"]["state"][0]["step"]
    lines = (out / "log.jsonl").read_text().splitlines()
    assert [json.loads(s)["epoch"] for s in lines] == [2, 3]


def finetune_checks(full, resumed, out):
    for k, v in full["extra"]["ema"].items():
        assert torch.equal(v, resumed["extra"]["ema"][k]), k


def moco_checks(full, resumed, out):
    assert int(full["model"]["queue_ptr"]) == (2 * 3 * 8) % 32


def lincls_checks(full, resumed, out):
    momentum = lambda c: c["optimizer"]["state"][0]["momentum_buffer"]  # noqa: E731
    assert torch.equal(momentum(full), momentum(resumed))


CASES = {"pretrain": (main_pretrain, pretrain_flags, pretrain_checks),
         "finetune": (main_finetune, finetune_flags, finetune_checks),
         "moco": (main_moco, moco_flags, moco_checks),
         "lincls": (main_lincls, lincls_flags, lincls_checks)}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_resume_after_epoch_1_equals_the_uninterrupted_run(name, tmp_path, tiny_flags, make_folder):
    script, make_flags, checks = CASES[name]
    flags = make_flags(tmp_path, tiny_flags, make_folder)
    run = lambda argv: script.main(script.get_args_parser().parse_args(argv))  # noqa: E731
    run(flags + ["--output-dir", str(tmp_path / "full"), "--save-every", "1"])
    (tmp_path / "resumed").mkdir()
    shutil.copy(tmp_path / "full" / "checkpoint-0001.pth", tmp_path / "resumed" / "checkpoint.pth")
    run(flags + ["--output-dir", str(tmp_path / "resumed")])
    full = torch.load(tmp_path / "full" / "checkpoint.pth", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "checkpoint.pth", weights_only=True)
    assert resumed["global_step"] == full["global_step"] and resumed["epoch"] == full["epoch"]
    assert full["global_step"] > 0
    for k, v in full["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    checks(full, resumed, tmp_path / "resumed")
