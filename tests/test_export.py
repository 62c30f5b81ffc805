"""tools.weights export: our checkpoints out to the other libraries, tested with the real libraries (timm,
torchvision, safetensors) and no network: ours -> export -> their model -> the same features; and the exported
folder back through our reader, main_finetune.py and torch.hub."""
import json

import pytest
import safetensors.torch
import timm
import torch
import torchvision

from models.loading import load_backbone
from models.moco import MoCo
from models.resnet import create_resnet, moco_projector
from tools import weights
from tools.export import set_norm_eps
from utils.checkpoint import RECORD, backbone_record

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def run(*argv):
    weights.main(weights.get_args_parser().parse_args(list(argv)))


@pytest.fixture
def aps_checkpoint(tmp_path, tiny_aps):
    """A main_pretrain.py-style checkpoint of the tiny APS model, with its record; and the encoder."""
    model = tiny_aps()
    cfg = dict(arch="vit-tiny", img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2)
    path = tmp_path / "aps.pth"
    torch.save({"model": model.state_dict(), "model_config": cfg, "args": {"dataset": "cifar10"}, "epoch": 1,
                "optimizer": {}, RECORD: backbone_record("APS", "vit", "encoder.", ("projector.", "predictor."), cfg)},
               path)
    (tmp_path / "report.md").write_text("# run\nknn_top1 61.2\n")
    return path, model.encoder.eval()


def ours(model, x=X):
    with torch.no_grad():
        return model.eval()(x)


def test_a_vit_exported_to_safetensors_is_timms_vit_with_our_features(tmp_path, aps_checkpoint, capsys):
    path, encoder = aps_checkpoint
    out = tmp_path / "vit.safetensors"
    run("export", str(path), str(out), "--format", "safetensors")
    assert "wrote" in capsys.readouterr().out
    with safetensors.safe_open(str(out), "pt") as f:
        meta = f.metadata()
    config = {**json.loads(meta["timm_config"]), "asym_ssl": json.loads(meta["asym_ssl"])}
    model = timm.create_model(config["architecture"], pretrained=True, pretrained_cfg_overlay=dict(file=str(out)),
                              **config["model_args"]).eval()
    assert config["model_args"]["qkv_bias"] is False and config["pretrained_cfg"]["mean"] == [0.4914, 0.4822, 0.4465]
    plain = ours(model)
    set_norm_eps(model, config)
    assert torch.allclose(ours(model), ours(encoder), atol=1e-5)
    assert not torch.allclose(plain, ours(encoder), atol=1e-5)          # timm's own epsilon (1e-6) is not ours
    assert torch.allclose(ours(load_backbone(str(out))), ours(encoder), atol=1e-6)   # and back through our reader


def test_a_hub_folder_loads_in_timm_our_reader_finetuning_and_torch_hub(tmp_path, aps_checkpoint):
    import hubconf
    import main_finetune
    path, encoder = aps_checkpoint
    folder = tmp_path / "hub"
    run("export", str(path), str(folder), "--format", "hf")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    card = (folder / "README.md").read_text()
    assert "local-dir:THIS_FOLDER" in card and "knn_top1 61.2" in card                # the run's report rides along
    config = json.loads((folder / "config.json").read_text())
    model = set_norm_eps(timm.create_model(f"local-dir:{folder}", pretrained=True), config)
    assert torch.allclose(ours(model), ours(encoder), atol=1e-5)
    assert torch.allclose(ours(load_backbone(str(folder))), ours(encoder), atol=1e-6)
    assert torch.allclose(ours(hubconf.aps_vit_tiny(weights=str(folder))), ours(encoder), atol=1e-6)
    args = main_finetune.get_args_parser().parse_args([
        "--pretrained-weights", str(folder), "--dataset", "digits", "--img-size", "16", "--patch-size", "4",
        "--batch-size", "8", "--epochs", "1", "--num-workers", "0", "--device", "cpu", "--dry-run",
        "--output-dir", str(tmp_path / "ft")])
    assert "dry_run_loss" in main_finetune.main(args)
    import main_lincls
    args = main_lincls.get_args_parser().parse_args([
        "--pretrained", str(folder), "--dataset", "digits", "--batch-size", "8", "--epochs", "1", "--num-workers",
        "0", "--device", "cpu", "--dry-run", "--output-dir", str(tmp_path / "probe")])
    assert "dry_run_loss" in main_lincls.main(args)
    with pytest.raises(SystemExit) as e:                                          # a second export: refused
        run("export", str(path), str(folder), "--format", "hf")
    assert e.value.code == 2


def test_a_resnet_exports_in_torchvisions_layout(tmp_path):
    torch.manual_seed(0)
    enc = create_resnet("resnet18", cifar_stem=False)
    enc.fc = moco_projector(enc.feature_dim, 32, 8)
    moco = MoCo(enc, dim=8, queue_size=16)
    torch.save({"model": moco.state_dict(), "args": {}, "epoch": 1, "optimizer": {}}, tmp_path / "moco.pth")
    run("export", str(tmp_path / "moco.pth"), str(tmp_path / "r18.safetensors"))
    tv = torchvision.models.resnet18()
    tv.fc = torch.nn.Identity()
    tv.load_state_dict(safetensors.torch.load_file(str(tmp_path / "r18.safetensors")))     # strict: every key
    trunk = load_backbone(str(tmp_path / "moco.pth"))
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(ours(tv, x), ours(trunk, x))


def test_bad_exports_are_one_line(tmp_path, capsys):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    for argv in (["export", str(tmp_path / "junk.safetensors"), str(tmp_path / "o.safetensors")],
                 ["export", str(tmp_path), str(tmp_path / "o.safetensors")]):       # a folder without config.json
        with pytest.raises(SystemExit) as e:
            run(*argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err


def test_onnx_exports_a_vit_and_a_resnet_with_a_dynamic_batch_equal_to_pytorch(tmp_path, aps_checkpoint,
                                                                                 moco_checkpoints, capsys):
    import onnxruntime
    path, encoder = aps_checkpoint
    moco = moco_checkpoints(tmp_path)                                              # a CIFAR-stem ResNet-18
    for src, out, x, model in ((path, "vit.onnx", torch.randn(5, 3, 16, 16), encoder),
                               (tmp_path / "ours.pth", "r18.onnx", torch.randn(4, 3, 32, 32), None)):
        run("export", str(src), str(tmp_path / out), "--format", "onnx")
        assert "checked with onnxruntime" in capsys.readouterr().out
        session = onnxruntime.InferenceSession(str(tmp_path / out), providers=["CPUExecutionProvider"])
        assert session.get_inputs()[0].shape[0] == "batch"
        got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        if model is None:
            model = create_resnet("resnet18", cifar_stem=True)
            model.load_state_dict({k[len("encoder_q."):]: v for k, v in moco.state_dict().items()
                                   if k.startswith("encoder_q.") and ".fc." not in k and not k.startswith("encoder_q.fc")})
        assert torch.allclose(got, ours(model, x), atol=1e-4)
