"""Dense features of a frozen backbone and the linear segmentation probe on them (main_segprobe.py).

ViT: the patch tokens of the last block after the final norm, as a [B, D, H/p, W/p] map (`layers` > 1: the last
`layers` blocks' tokens, each normed, concatenated: DINOv2's "+ms" probe); ResNet: the last stage, [B, 2048 (512),
H/32, W/32]. The probe is BatchNorm2d + a 1x1 convolution (a linear layer per position) over those features, its
logits upsampled bilinearly to the image size; the backbone stays frozen and in eval mode.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.loading import load_backbone, open_checkpoint
from models.resnet import RESNETS, create_resnet
from models.vit import create_vit
from utils.errors import UserError


class DenseFeatures(nn.Module):
    def __init__(self, backbone: nn.Module, family: str, layers: int = 1):
        super().__init__()
        if family == "resnet" and layers != 1:
            raise UserError(f"--layers {layers} is for ViTs (the last blocks' tokens); a ResNet gives its last stage: "
                            "pass --layers 1")
        self.backbone, self.family, self.layers = backbone, family, layers
        if family == "vit":
            self.channels = backbone.embed_dim * layers
            self.stride = backbone.patch_embed.patch_size[0]
        else:
            self.channels = backbone.feature_dim          # models.resnet.create_resnet's: 2048, or 512 (resnet18/34)
            self.stride = 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.family == "vit":
            return torch.cat(self.backbone.get_intermediate_layers(x, n=self.layers, reshape=True, norm=True), 1)
        b = self.backbone
        h = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        return b.layer4(b.layer3(b.layer2(b.layer1(h))))


class SegProbe(nn.Module):
    """forward(images) -> [B, K, H, W] logits: BN + 1x1 conv over the frozen features, upsampled to the image."""

    def __init__(self, features: DenseFeatures, num_classes: int):
        super().__init__()
        self.features = features
        for p in features.parameters():
            p.requires_grad_(False)
        conv = nn.Conv2d(features.channels, num_classes, 1)
        nn.init.normal_(conv.weight, std=0.01)
        nn.init.zeros_(conv.bias)
        self.head = nn.Sequential(nn.BatchNorm2d(features.channels), conv)

    def train(self, mode: bool = True):
        super().train(mode)
        self.features.eval()
        return self

    def forward(self, x: torch.Tensor, size=None) -> torch.Tensor:
        with torch.no_grad():
            f = self.features(x)
        logits = self.head(f)
        return F.interpolate(logits, size=size or x.shape[-2:], mode="bilinear", align_corners=False)


def dense_backbone(source, arch: str = None, patch_size: int = None, img_size: int = None,
                   random_init: bool = False) -> tuple:
    """(backbone, its config) from a checkpoint (any file the reader takes) or, source None, a random init of `arch`;
    random_init: the checkpoint's architecture with fresh weights (the baseline a probe is compared with).
    A ViT is built with timm's dynamic image size: its position embedding, kept at the pre-training grid, is
    interpolated to each input's grid, so the probe runs at any --img-size that is a multiple of the patch."""
    if source is None:
        if arch is None:
            raise UserError("a randomly initialised backbone needs -a/--arch")
        if arch in RESNETS:
            cfg = dict(family="resnet", arch=arch, cifar_stem=img_size <= 64)
            return create_resnet(arch, cfg["cifar_stem"]), cfg
        patch_size = patch_size or 8
        cfg = dict(family="vit", arch=arch, img_size=img_size, patch_size=patch_size)
        return create_vit(arch, img_size, patch_size, dynamic_img_size=True), cfg
    ck = open_checkpoint(source)
    if ck.family == "resnet":
        cfg = ck.resnet_config(arch)
        model = create_resnet(cfg["arch"], cfg["cifar_stem"]) if random_init else load_backbone(ck, arch)
        return model, dict(family="resnet", **cfg)
    cfg = {k: v for k, v in ck.vit_config(arch, patch_size).items() if k not in ("num_classes", "drop_path_rate")}
    model = create_vit(**cfg, dynamic_img_size=True) if random_init else load_backbone(ck, arch, patch_size,
                                                                                        dynamic_img_size=True)
    return model, dict(family="vit", **cfg)
