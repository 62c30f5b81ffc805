"""Checkpoints that describe themselves (utils.checkpoint.backbone_record): a method's checkpoint says where its
backbone sits and what its heads are, and every reader takes it with no row in models.loading's table; our
checkpoints written before they carried the record still load, to the same backbone."""
import pytest
import torch

import main_lincls
from models.loading import load_backbone, open_checkpoint
from models.resnet import create_resnet
from models.vit import create_vit
from utils.checkpoint import RECORD, backbone_record
from utils.errors import UserError

VIT = dict(arch="vit-tiny", img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2)


def a_new_methods_checkpoint(path, family: str):
    """What a method nobody told models.loading about saves: its backbone under 'student.', a projector and a
    predictor beside it, its record. Returns the backbone it saved."""
    torch.manual_seed(5)
    if family == "resnet":
        backbone, config = create_resnet("resnet18", cifar_stem=True, num_classes=8), {"arch": "resnet18",
                                                                                    "cifar_stem": True}
        heads = ("student.fc.", "predictor.")                 # the projector sits at fc, as in MoCo
    else:
        backbone, config = create_vit(**VIT), dict(VIT)
        heads = ("projector.", "predictor.")
    model = {"student." + k: v for k, v in backbone.state_dict().items()}
    model.update({"projector.0.weight": torch.randn(8, 32), "predictor.0.weight": torch.randn(8, 8),
                  "predictor.0.bias": torch.randn(8)})
    record = backbone_record("SimSiam", family, "student.", heads, config)
    torch.save({"model": model, "optimizer": {}, "epoch": 3, "args": {}, RECORD: record}, path)
    return backbone


def test_a_new_methods_resnet_checkpoint_is_probed_by_main_lincls_with_no_table_edit(tmp_path, make_folder):
    path = tmp_path / "simsiam.pth"
    backbone = a_new_methods_checkpoint(path, "resnet")
    ck = open_checkpoint(str(path))
    assert (ck.format.name, ck.family, ck.format.ours) == ("ours-simsiam", "resnet", True)
    want = {k: v for k, v in backbone.state_dict().items() if not k.startswith("fc.")}
    assert ck.state.keys() == want.keys() and all(torch.equal(ck.state[k], want[k]) for k in want)
    assert ck.dropped == sorted(["student.fc.weight", "student.fc.bias", "predictor.0.weight", "predictor.0.bias"])
    out = tmp_path / "probe"
    make_folder(tmp_path / "data", classes=2, per_class=8, size=(20, 20))
    main_lincls.main(main_lincls.get_args_parser().parse_args([
        "--pretrained", str(path), "--dataset", "imagefolder", "--data-root", str(tmp_path / "data"), "--img-size",
        "16", "--batch-size", "8", "--epochs", "1", "--num-workers", "0", "--cache-features", "--output-dir",
        str(out)]))
    probed = torch.load(out / "checkpoint.pth", weights_only=True)
    assert probed["model_config"]["backbone"]["arch"] == "resnet18"
    assert all(torch.equal(probed["model"]["backbone." + k], v) for k, v in want.items())   # the file's, frozen

    loaded = torch.load(path, weights_only=True)
    del loaded[RECORD]                                     # the same file without its record: nobody knows it
    with pytest.raises(UserError, match="not a checkpoint format we know"):
        open_checkpoint(loaded)


def test_a_new_methods_vit_checkpoint_is_a_backbone_for_fine_tuning(tmp_path):
    path = tmp_path / "vit.pth"
    backbone = a_new_methods_checkpoint(path, "vit")
    model = load_backbone(str(path))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), backbone.state_dict().values()))
    assert model.state_dict().keys() == backbone.state_dict().keys()


def test_a_bad_record_is_one_line(tmp_path):
    path = tmp_path / "bad.pth"
    a_new_methods_checkpoint(path, "vit")
    loaded = torch.load(path, weights_only=True)
    loaded[RECORD]["family"] = "mlp"
    with pytest.raises(UserError, match=f"has a {RECORD} that is not one this code writes"):
        open_checkpoint(loaded)


def test_our_checkpoints_carry_their_record_and_read_as_before_without_it(tmp_path, tiny_flags, make_folder):
    """main_moco.py and main_pretrain.py checkpoints now describe themselves; the same file without the record
    (as every checkpoint written before) reads to the same backbone through the table's rows."""
    import main_moco
    import main_pretrain
    make_folder(tmp_path / "data", classes=2, per_class=8, size=(20, 20))
    runs = {"moco": (main_moco, ["-a", "resnet18", "--moco-k", "16", "--moco-dim", "8", "--mlp-hidden-dim", "16",
                                 "--bn-splits", "2"]),
            "aps": (main_pretrain, tiny_flags + ["--warmup-epochs", "0"])}
    for name, (script, flags) in runs.items():
        out = tmp_path / name
        script.main(script.get_args_parser().parse_args(flags + [
            "--img-size", "16", "--batch-size", "8", "--epochs", "1", "--num-workers", "0", "--knn-every", "0",
            "--dataset", "imagefolder", "--data-root", str(tmp_path / "data"), "--output-dir", str(out)]))
        loaded = torch.load(out / "checkpoint.pth", weights_only=True)
        assert loaded[RECORD]["format"] == f"ours-{name}"
        described = open_checkpoint(dict(loaded))
        old = dict(loaded)
        del old[RECORD]
        by_table = open_checkpoint(old)
        assert described.format.name == by_table.format.name and described.dropped == by_table.dropped
        assert described.state.keys() == by_table.state.keys()
        assert all(torch.equal(described.state[k], by_table.state[k]) for k in by_table.state)
        if name == "aps":
            assert described.saved == by_table.saved == loaded["model_config"]
        else:                                              # the table's MoCo row kept no config; the record does
            assert by_table.saved is None and described.saved == {"arch": "resnet18", "cifar_stem": True}
