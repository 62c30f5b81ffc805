"""Public backbones through the one reader: each layout is built here with the real library's module (timm's
VisionTransformer, torchvision's ResNet) and saved as its authors publish it (no downloads); read by
models.loading, it must give the library model's own features (or logits)."""
import pytest
import timm
import torch
import torchvision

from models.loading import describe_weights, load_backbone, load_fine_tuned, open_checkpoint
from utils.errors import UserError

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def timm_vit(**kw):
    torch.manual_seed(0)
    cfg = dict(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2, num_classes=0)   # 64 per head
    return timm.create_model("vit_small_patch16_224", pretrained=False, **{**cfg, **kw}).eval()


def features_equal(ours, theirs, x=X):
    with torch.no_grad():
        a, b = ours.eval()(x), theirs(x)
    assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_a_plain_timm_vit_reads_with_its_qkv_bias_class_position_and_epsilon(tmp_path):
    vit = timm_vit()
    torch.save(vit.state_dict(), tmp_path / "timm.pth")
    ours = load_backbone(str(tmp_path / "timm.pth"))
    assert ours.blocks[0].attn.qkv.bias is not None and ours.pos_embed.shape[1] == 1 + 16
    assert ours.norm.eps == ours.blocks[0].norm1.eps == 1e-6                  # timm's, not the APS reference's 1e-5
    features_equal(ours, vit)
    info = describe_weights(str(tmp_path / "timm.pth"))
    assert (info["format"], info["patch_size"], info["img_size"], info["depth"]) == ("timm-vit", 8, 32, 2)
    with pytest.raises(UserError, match="trained with --patch-size 8, not 4; pass --patch-size 8"):
        load_backbone(str(tmp_path / "timm.pth"), patch_size=4)


def test_maes_pretraining_and_fine_tuned_files(tmp_path):
    encoder = timm_vit()
    state = {**encoder.state_dict(), "mask_token": torch.zeros(1, 1, 128), "decoder_embed.weight": torch.zeros(32, 128),
             "decoder_blocks.0.norm1.weight": torch.ones(32), "decoder_pred.weight": torch.zeros(192, 32)}
    torch.save({"model": state, "optimizer": {}, "epoch": 799, "args": {}}, tmp_path / "mae.pth")   # as MAE saves
    ck = open_checkpoint(str(tmp_path / "mae.pth"))
    assert ck.format.name == "timm-vit-model" and "decoder_embed.weight" in ck.dropped and not ck.head
    features_equal(load_backbone(ck), encoder)
    tuned = timm_vit(global_pool="avg", num_classes=5)                       # MAE's fine-tuning: fc_norm, mean pool
    torch.save({"model": tuned.state_dict()}, tmp_path / "mae-ft.pth")
    model, cfg = load_fine_tuned(str(tmp_path / "mae-ft.pth"))
    assert cfg["global_pool"] == "avg" and cfg["num_classes"] == 5
    features_equal(model, tuned)


def test_moco_v3s_vit_small_has_twelve_heads_and_its_resnet_drops_the_projector(tmp_path):
    vit = timm_vit(embed_dim=384, num_heads=12, depth=1, patch_size=16)      # MoCo v3's vit_small: 12 heads of 32
    proj = {"head.0.weight": torch.zeros(16, 384), "head.1.weight": torch.ones(16)}
    sd = {f"module.{part}.{k}": v for part in ("base_encoder", "momentum_encoder")
          for k, v in {**vit.state_dict(), **proj}.items()}
    sd["module.predictor.0.weight"] = torch.zeros(4, 16)
    torch.save({"epoch": 300, "arch": "vit_small", "state_dict": sd, "optimizer": {}}, tmp_path / "mocov3.pth.tar")
    ours = load_backbone(str(tmp_path / "mocov3.pth.tar"))
    assert ours.blocks[0].attn.num_heads == 12
    features_equal(ours, vit)                                # with timm's 6 heads for width 384 this would differ
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18().eval()
    resnet.fc = torch.nn.Sequential(torch.nn.Linear(512, 16), torch.nn.BatchNorm1d(16))   # the projector
    sd = {f"module.base_encoder.{k}": v for k, v in resnet.state_dict().items()}
    torch.save({"state_dict": sd}, tmp_path / "mocov3-r.pth.tar")
    ck = open_checkpoint(str(tmp_path / "mocov3-r.pth.tar"))
    assert ck.format.name == "moco-v3-resnet" and "module.base_encoder.fc.0.weight" in ck.dropped
    resnet.fc = torch.nn.Identity()
    features_equal(load_backbone(ck), resnet)


def test_dinos_training_checkpoint_gives_the_teachers_backbone(tmp_path):
    teacher, student = timm_vit(), timm_vit()
    with torch.no_grad():
        student.cls_token.add_(1.0)                           # the student differs: the teacher must be what loads
    head = {"head.mlp.0.weight": torch.zeros(8, 128), "head.last_layer.weight_g": torch.ones(16, 1)}
    torch.save({"teacher": {**{f"backbone.{k}": v for k, v in teacher.state_dict().items()}, **head},
                "student": {f"module.backbone.{k}": v for k, v in student.state_dict().items()}, "epoch": 100},
               tmp_path / "dino.pth")
    ck = open_checkpoint(str(tmp_path / "dino.pth"))
    assert ck.format.name == "dino-vit" and "teacher.head.mlp.0.weight" in ck.dropped
    features_equal(load_backbone(ck), teacher)


def test_a_plain_torchvision_resnet_with_its_imagenet_head_left_out(tmp_path):
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18().eval()
    torch.save(resnet.state_dict(), tmp_path / "r18.pth")
    ck = open_checkpoint(str(tmp_path / "r18.pth"))
    assert ck.format.name == "torchvision-resnet" and ck.dropped == ["fc.bias", "fc.weight"]
    model = load_backbone(ck)
    assert model.config == {"arch": "resnet18", "cifar_stem": False}
    resnet.fc = torch.nn.Identity()
    features_equal(model, resnet, torch.randn(2, 3, 64, 64))
    with pytest.raises(UserError, match="holds a resnet18, not resnet50; pass -a resnet18"):
        load_backbone(ck, arch="resnet50")
