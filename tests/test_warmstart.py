"""--init-weights: a fresh run (schedule, optimiser, epoch) whose backbone, and heads where a checkpoint of the same
method fits, start from another file; what was loaded is one line in the log and in report.md."""
import math

import pytest
import torch
import torchvision

import main_moco
import main_pretrain
from test_flags import TINY
from test_host_sync import script_trainer

BASE = ["--dataset", "digits", "--num-workers", "0", "--device", "cpu", "--epochs", "1"]


def test_aps_starts_from_its_own_checkpoint_whole_on_a_fresh_schedule(tmp_path):
    first = script_trainer(main_pretrain, BASE + TINY["main_pretrain"] + ["--output-dir", str(tmp_path / "a")])
    source = {k: v.clone() for k, v in first.method.module.state_dict().items()}
    with torch.no_grad():
        for v in source.values():
            v.add_(0.5) if v.is_floating_point() else None          # weights no fresh init would give
    torch.save({"model": source, "model_config": first.method.model_config, "args": {}, "epoch": 7,
                "optimizer": {}, "backbone_record": first.method.backbone_record()}, tmp_path / "src.pth")
    argv = BASE + TINY["main_pretrain"] + ["--init-weights", str(tmp_path / "src.pth")]
    trainer = script_trainer(main_pretrain, argv + ["--output-dir", str(tmp_path / "b")])
    state = trainer.method.module.state_dict()
    assert all(torch.equal(state[k], v) for k, v in source.items())             # backbone and heads
    assert trainer.global_step == 0 and trainer.start_epoch == 0 and not trainer.optimizer.state
    parser = main_pretrain.get_args_parser()
    metrics = main_pretrain.main(parser.parse_args(argv + ["--output-dir", str(tmp_path / "c")]))
    assert math.isfinite(metrics["train_loss"])                              # it trained from there
    report = (tmp_path / "c" / "report.md").read_text()
    src = tmp_path / "src.pth"
    assert f"--init-weights {src} (ours-aps): loaded {len(source)} of {len(source)} tensors of the model" in report
    ckpt = torch.load(tmp_path / "c" / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 1                                                   # epochs counted from 0, not 7


def test_moco_starts_from_torchvisions_resnet_and_its_key_encoder_follows(tmp_path, capsys):
    torch.manual_seed(5)
    tv = torchvision.models.resnet18()
    torch.save(tv.state_dict(), tmp_path / "r18.pth")
    argv = BASE + TINY["main_moco"] + ["--img-size", "72",                    # above 64 px: torchvision's stem
                                       "--init-weights", str(tmp_path / "r18.pth"), "--output-dir", str(tmp_path / "m")]
    trainer = script_trainer(main_moco, argv)
    module = trainer.method.module
    trunk = {k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    q, k = module.encoder_q.state_dict(), module.encoder_k.state_dict()
    assert all(torch.equal(q[name], v) for name, v in trunk.items())
    assert all(torch.equal(q[name], k[name]) for name in q)                      # the key encoder = the query one
    logged = " ".join(trainer.settings.notes)                               # logged as training starts, reported
    assert f"loaded {len(trunk)} of {len(q)} tensors of the backbone; left initialised: {len(q) - len(trunk)}" in logged
    assert "the file's heads left out: fc;" in logged and "not used" not in logged


@pytest.mark.parametrize("extra, message", [
    (["--resume", "RESUME"], "--resume and --init-weights together"),
    ([], "has no tensor that fits this model's backbone"),
])
def test_bad_warm_starts_are_one_line(tmp_path, capsys, tiny_aps, extra, message):
    torch.save(tiny_aps().encoder.state_dict(), tmp_path / "vit.pth")              # a ViT for a ResNet script
    extra = [str(tmp_path / "vit.pth") if a == "RESUME" else a for a in extra]
    args = main_moco.get_args_parser().parse_args(BASE + TINY["main_moco"] + [
        "--init-weights", str(tmp_path / "vit.pth"), "--output-dir", str(tmp_path / "o"), *extra])
    with pytest.raises(SystemExit) as e:
        main_moco.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0], err
