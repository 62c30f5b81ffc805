"""The papers' rows as recipes (configs/) and tools.reproduce: every recipe parses with its script and says what
the seeds' commands and the reference's defaults say; a chain runs end to end at smoke scale and resumes at the
stage where it stopped."""
import importlib
import os
import shutil

import pytest
import yaml

from tools import reproduce

# written from the seeds' READMEs (their tables and commands) and docs/REFERENCE.md, not from configs/
PAPER = {**{f"aps-{ds}-{arch}-{ep}ep": v for (ds, ep), vals in {
    ("cifar10", 1600): (97.2, 98.1, 98.2), ("cifar10", 3200): (97.5, 98.2, 98.3),
    ("cifar100", 1600): (83.4, 84.9, 85.9), ("cifar100", 3200): (83.4, 85.3, 86.0)}.items()
    for arch, v in zip(("vit-tiny", "vit-small", "vit-base"), vals)},
    "aps-imagenet-vit-small-300ep": 82.1, "aps-imagenet-vit-base-300ep": 84.2,
    "asym-siam-baseline": 65.8, "asym-siam-multicrop": 69.9, "asym-siam-scalemix": 67.6,
    "asym-siam-asymaug": 67.2, "asym-siam-asymbn": 66.3, "asym-siam-meanenc": 67.7}
PRETRAIN_LR = {"vit-tiny": 1e-3, "vit-small": 5e-4, "vit-base": 5e-4}
FINETUNE_LR = {"vit-tiny": 2e-3, "vit-small": 1e-3, "vit-base": 5e-4}
SWITCHES = {"baseline": None, "multicrop": "enable_multicrop", "scalemix": "enable_scalemix",
            "asymaug": "enable_asymm_aug", "asymbn": "enable_asym_bn", "meanenc": "enable_mean_encoding"}
APS_PRETRAIN = dict(batch_size=512, weight_decay=0.05, warmup_epochs=20, temperature=0.1, sampling_ratio=0.25,
                    nsampling=4, power=3.0)
APS_FINETUNE = dict(epochs=100, batch_size=128, warmup_epochs=5, min_lr=1e-5, warmup_lr=1e-6, drop_path=0.1,
                    aa="rand-m9-mstd0.5-inc1", reprob=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1, weight_decay=0.05)
MOCO = dict(arch="resnet50", lr=0.03, batch_size=256, epochs=100, moco_k=65536, moco_m=0.999, moco_t=0.2,
            momentum=0.9, weight_decay=1e-4)
LINCLS = dict(arch="resnet50", lars=True, epochs=90, batch_size=4096, lr=0.1, weight_decay=0.0, momentum=0.9)


def parsed(stage: dict):
    script = importlib.import_module(stage["script"][:-3])
    return script.get_args_parser().parse_args(["--config", stage["config"]])


def test_every_row_is_a_recipe_its_scripts_parse_with_the_papers_flags(monkeypatch):
    monkeypatch.chdir(reproduce.ROOT)
    assert set(reproduce.rows()) == set(PAPER)
    for name in reproduce.rows():
        row = reproduce.load_row(name)
        assert row["paper"]["value"] == PAPER[name] and "README" in row["paper"]["source"], name
        first, second = (parsed(s) for s in row["stages"])
        if name.startswith("aps-"):
            ds, arch, epochs = name.split("-")[1], "-".join(name.split("-")[2:4]), int(name.split("-")[-1][:-2])
            dataset = "imagefolder" if ds == "imagenet" else ds
            patch = 16 if ds == "imagenet" else 2
            assert (first.dataset, first.arch, first.epochs, first.patch_size) == (dataset, arch, epochs, patch), name
            assert (second.dataset, second.arch, second.patch_size) == (dataset, arch, patch), name
            assert first.base_lr == PRETRAIN_LR[arch] and second.base_lr == FINETUNE_LR[arch], name
            expected_pre = APS_PRETRAIN if ds != "imagenet" else {"batch_size": 512, "weight_decay": 0.05}
            assert {k: getattr(first, k) for k in expected_pre} == expected_pre, name
            expected_ft = APS_FINETUNE if ds != "imagenet" else {"epochs": 100, "batch_size": 128, "drop_path": 0.1}
            assert {k: getattr(second, k) for k in expected_ft} == expected_ft, name
            assert row["stages"][1]["weights"] == "--pretrained-weights"
        else:
            variant = name.split("-")[-1]
            assert {k: getattr(first, k) for k in MOCO} == MOCO, name
            on = {v for v in SWITCHES.values() if v and getattr(first, v)}
            assert on == ({SWITCHES[variant]} if SWITCHES[variant] else set()), name
            assert {k: getattr(second, k) for k in LINCLS} == LINCLS, name
            assert row["stages"][1]["weights"] == "--pretrained"


def test_list_and_dry_run(capsys):
    lines = reproduce.main(reproduce.get_args_parser().parse_args(["--list"]))
    assert len(lines) == 1 + len(PAPER) and any(line.startswith("asym-siam-multicrop") for line in lines)
    cmds = reproduce.main(reproduce.get_args_parser().parse_args(["aps-cifar100-vit-base-3200ep", "--dry-run",
                                                                  "--output-dir", "out"]))
    assert cmds == ["main_pretrain.py --config configs/aps/pretrain-cifar100-vit-base-3200ep.yaml --output-dir "
                    "out/pretrain",
                    "main_finetune.py --config configs/aps/finetune-cifar100-vit-base.yaml --pretrained-weights "
                    "out/pretrain/checkpoint.pth --output-dir out/finetune"]
    with pytest.raises(SystemExit) as e:
        reproduce.main(reproduce.get_args_parser().parse_args(["aps-cifar10-vit-huge-1600ep"]))
    assert e.value.code == 2 and "unknown row" in capsys.readouterr().err


@pytest.mark.slow
def test_a_smoke_chain_runs_end_to_end_and_resumes_at_the_stage_where_it_stopped(tmp_path):
    out = str(tmp_path / "chain")
    said = []
    row = reproduce.load_row("aps-cifar10-vit-tiny-1600ep")
    first = reproduce.run_chain(row, out, smoke=True, extra=(), log=said.append)
    assert first["ours"] is not None and first["paper"] == 97.2 and set(first["seconds"]) == {"pretrain", "finetune"}
    report = open(os.path.join(out, "reproduce.md")).read()
    assert "- paper: 97.2" in report and "not comparable" in report and "main_finetune.py" in report
    shutil.rmtree(os.path.join(out, "finetune"))                      # stopped between the stages
    said.clear()
    again = reproduce.run_chain(row, out, smoke=True, extra=(), log=said.append)
    assert said[0].startswith("stage pretrain: done earlier") and said[1].startswith("stage finetune: ")
    assert again["seconds"]["pretrain"] is None and again["ours"] == pytest.approx(first["ours"])
    with open(os.path.join(out, "pretrain", "config.yaml")) as f:
        assert yaml.safe_load(f)["epochs"] == 2                        # the smoke flags won over the recipe's 1600


def test_the_quick_start_is_a_recipe_the_readme_runs(monkeypatch):
    monkeypatch.chdir(reproduce.ROOT)
    import main_pretrain
    args = main_pretrain.get_args_parser().parse_args(["--config", "configs/quickstart.yaml"])
    assert (args.dataset, args.img_size, args.patch_size, args.epochs) == ("digits", 16, 4, 120)
    readme = open("README.md", encoding="utf-8").read()
    first = next(line for line in readme.splitlines() if line.startswith("python3 -m venv"))
    assert first.endswith("python main_pretrain.py --config configs/quickstart.yaml --output-dir output/quickstart")
