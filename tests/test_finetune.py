"""main_finetune.py: loading with a new head, drop path, EMA, param groups and lr, accuracy, --eval."""
import json

import pytest
import torch
from timm.layers import DropPath

import main_finetune
from models import create_vit
from models.vit import param_groups
from models.loading import load_classifier
from utils.errors import UserError
from utils.optim import set_lr
from utils.schedule import warmup_cosine

FAST = ["--dataset", "digits", "--arch", "vit-tiny", "--depth", "2", "--embed-dim", "64", "--num-heads", "2",
        "--patch-size", "8", "--batch-size", "64", "--num-workers", "0", "--print-freq", "100"]
PLAIN = ["--mixup", "0", "--cutmix", "0", "--aa", "none", "--reprob", "0", "--drop-path", "0"]


def run(argv):
    return main_finetune.main(main_finetune.get_args_parser().parse_args(argv))


def test_reference_file_loads_with_a_new_head(tmp_path, caplog, tiny_aps, reference_state):
    model = tiny_aps()
    path = tmp_path / "ref.pth"
    torch.save(reference_state(model), path)
    clf, cfg = load_classifier(str(path), 7, num_heads=2, drop_path_rate=0.1)
    assert cfg["num_classes"] == 7 and clf.head.out_features == 7
    x = torch.randn(2, 3, 16, 16)
    clf.eval()
    model.encoder.eval()
    with torch.no_grad():
        assert torch.allclose(clf.forward_head(clf.forward_features(x), pre_logits=True), model.encoder(x),
                              atol=1e-6)
    with pytest.raises(UserError, match="pass --patch-size 4"):
        load_classifier(str(path), 7, patch_size=2, num_heads=2)
    evil = tmp_path / "finetuned_module.pth"
    torch.save(create_vit("vit-tiny", 16, 4, depth=1, num_classes=3), evil)  # the reference's fine-tune files
    with pytest.raises(UserError, match="refuse"):
        load_classifier(str(evil), 3)


def test_drop_path_is_active_in_train_mode_only():
    torch.manual_seed(0)
    model = create_vit("vit-tiny", 16, 4, depth=2, embed_dim=32, num_heads=2, num_classes=3, drop_path_rate=0.5)
    assert isinstance(model.blocks[1].drop_path1, DropPath)
    x = torch.randn(4, 3, 16, 16)
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    assert torch.allclose(model(x), model(x))


def test_param_groups_weight_decay_and_layer_decay_follow_the_schedule():
    model = create_vit("vit-tiny", 16, 4, depth=2, embed_dim=32, num_heads=2, num_classes=3)
    groups = param_groups(model, 0.05, layer_decay=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(groups, lr=1.0)
    expected_scale = {"cls_token": 0.125, "pos_embed": 0.125, "patch_embed.proj.weight": 0.125,
                      "blocks.0.attn.qkv.weight": 0.25, "blocks.1.mlp.fc1.bias": 0.5, "head.weight": 1.0,
                      "norm.weight": 0.5}  # timm's group_matcher puts the final norm with the last block
    no_decay = {"cls_token", "pos_embed", "blocks.1.mlp.fc1.bias", "norm.weight", "patch_embed.proj.bias"}
    for e in (0.0, 2.5, 5.0, 30.0, 100.0):
        lr = warmup_cosine(e, 5, 100, 1e-3, 1e-5, 1e-6)
        set_lr(opt, lr)
        for g in opt.param_groups:
            for p in g["params"]:
                n = names[id(p)]
                if n in expected_scale:
                    assert g["lr"] == pytest.approx(lr * expected_scale[n]), (n, e)
                if n in no_decay:
                    assert g["weight_decay"] == 0.0, n
                if n in ("head.weight", "blocks.0.attn.qkv.weight"):
                    assert g["weight_decay"] == 0.05, n
    assert warmup_cosine(0.0, 5, 100, 1e-3, 1e-5, 1e-6) == pytest.approx(1e-6)
    assert warmup_cosine(100.0, 5, 100, 1e-3, 1e-5, 1e-6) == pytest.approx(1e-5)


@pytest.mark.slow
def test_short_run_beats_chance_and_eval_reproduces_it(tmp_path, capsys):
    out = str(tmp_path / "ft")
    metrics = run(FAST + PLAIN + ["--epochs", "8", "--warmup-epochs", "1", "--base-lr", "1.6e-2",
                                  "--output-dir", out])
    assert metrics["test_acc1"] > 20.0  # 10 classes
    again = run(FAST + ["--eval", "--output-dir", out])
    assert again["test_acc1"] == pytest.approx(metrics["test_acc1"])
    assert "test top-1" in capsys.readouterr().out


@pytest.mark.slow
def test_ema_is_what_gets_evaluated(tmp_path):
    out = tmp_path / "ema"
    metrics = run(FAST + PLAIN + ["--epochs", "1", "--warmup-epochs", "0", "--base-lr", "8e-3", "--model-ema",
                                  "--model-ema-decay", "0.9", "--val-split", "0.1", "--output-dir", str(out)])
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    ema = {k[len("module."):]: v for k, v in ckpt["extra"]["ema"].items()}
    assert set(ema) == set(ckpt["model"])
    assert any(not torch.equal(ema[k], ckpt["model"][k]) for k in ema)
    # the logged accuracy is the EMA's: --eval (which loads the EMA weights) reproduces it
    again = run(FAST + ["--eval", "--output-dir", str(out)])
    assert again["test_acc1"] == pytest.approx(metrics["test_acc1"])
    live = create_vit(**ckpt["model_config"])
    live.load_state_dict(ckpt["model"])
    from augment.pil import pil_pipeline
    from augment.recipes import eval_view
    from data import build_dataset, build_eval_loader, get_preset
    preset = get_preset("digits")
    eval_tf = pil_pipeline(eval_view(preset, 32, *preset.finetune_stats))
    loader = build_eval_loader(build_dataset("digits", train=False, transform=eval_tf), 128, 0, torch.device("cpu"))
    from utils.accuracy import evaluate_classifier
    live_loss = evaluate_classifier(live, loader, torch.device("cpu"))["loss"]
    assert live_loss != pytest.approx(metrics["test_loss"], abs=1e-6)
    assert (out / "checkpoint-best.pth").exists()
    line = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert "val_acc1" in line and "test_acc1" in line


def test_bad_finetune_inputs(tmp_path, capsys):
    cases = [
        (["--pretrained-weights", str(tmp_path / "missing.pth")], "does not exist"),
        (["--batch-size", "63"], "even batch"),
        (["--val-split", "1.5"], "(0, 1)"),
        (["--eval", "--output-dir", str(tmp_path / "empty")], "--eval needs a fine-tuned checkpoint"),
    ]
    for flags, expected in cases:
        with pytest.raises(SystemExit) as e:
            run(FAST + ["--epochs", "1", "--output-dir", str(tmp_path / "out")] + flags)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and expected in err, (flags, err)
