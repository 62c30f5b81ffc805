"""Linear probe (docs/REFERENCE.md#linear-probe): a frozen backbone, always in eval mode, and a trainable linear head.

The backbone comes from any checkpoint `models.load_backbone` reads (MoCo ResNets: the pooled feature;
APS ViTs: the cls feature), or is randomly initialised (the chance-level baseline).
"""
import torch
import torch.nn as nn

from models.loading import load_classifier, open_checkpoint, resnet_from
from models.resnet import RESNETS, create_resnet
from models.vit import ARCHS, create_vit
from utils.errors import UserError

PROBE_ARCHS = RESNETS + tuple(ARCHS)


class LinearProbe(nn.Module):
    """forward(images) = head(backbone(images)); the backbone gets no gradient and stays in eval mode (its BN
    uses running statistics), whatever train() is called with. chunk_size > 0 runs the backbone on chunks of
    the batch (less memory, same result: nothing in it depends on the batch)."""

    def __init__(self, backbone: nn.Module, fc: nn.Linear, head_bn: bool = False, chunk_size: int = 0):
        super().__init__()
        self.backbone = backbone
        for p in backbone.parameters():
            p.requires_grad_(False)
        nn.init.normal_(fc.weight, std=0.01)
        nn.init.zeros_(fc.bias)
        # MAE's probe: an affine-free BN on the features before the linear layer
        self.head = nn.Sequential(nn.BatchNorm1d(fc.in_features, affine=False, eps=1e-6), fc) if head_bn else fc
        self.chunk_size = chunk_size

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()
        return self

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        chunks = x.split(self.chunk_size) if self.chunk_size else (x,)
        return torch.cat([self.backbone(c) for c in chunks])              # [N, D]

    def forward(self, x):
        return self.head(self.features(x))


def _split_head(model: nn.Module, attr: str):
    fc = getattr(model, attr)
    setattr(model, attr, nn.Identity())
    return model, fc


def backbone_and_fc(source, num_classes: int, arch: str = None, patch_size: int = None, img_size: int = None):
    """(backbone with an Identity head, new nn.Linear, config for build_backbone) from a checkpoint (a path, a loaded
    dict or a models.loading.Checkpoint), or None (random initialisation, which needs arch, patch_size and
    img_size)."""
    if source is None:
        if arch is None:
            raise UserError("a randomly initialised backbone needs -a/--arch")
        if arch in RESNETS:
            cfg = dict(family="resnet", arch=arch, cifar_stem=img_size <= 64)
        else:
            cfg = dict(family="vit", arch=arch, img_size=img_size, patch_size=patch_size)
        model = build_backbone(cfg, num_classes)
        return (*_split_head(model, "fc" if cfg["family"] == "resnet" else "head"), cfg)
    ck = open_checkpoint(source)
    if ck.family == "resnet":
        if arch is not None and arch not in RESNETS:
            raise UserError(f"{ck.name} holds a ResNet; pass -a resnet18/34/50/101/152 (or leave -a out)")
        model = resnet_from(ck, arch, num_classes=num_classes)         # missing exactly fc.weight, fc.bias
        return (*_split_head(model, "fc"), dict(family="resnet", **model.config))
    if arch is not None and arch not in ARCHS:
        raise UserError(f"{ck.name} holds a ViT; pass -a {'/'.join(ARCHS)} (or leave -a out)")
    model, cfg = load_classifier(ck, num_classes, arch, patch_size, img_size)  # missing exactly head.*
    cfg = {k: v for k, v in cfg.items() if k not in ("num_classes", "drop_path_rate")}
    return (*_split_head(model, "head"), dict(family="vit", **cfg))


def backbone_img_size(source):
    """The image size a ViT checkpoint (path, dict or models.loading.Checkpoint) was trained at (its position
    embedding fixes it); None for a ResNet or no checkpoint."""
    if source is None:
        return None
    ck = open_checkpoint(source)
    return ck.vit_config()["img_size"] if ck.family == "vit" else None


def build_backbone(cfg: dict, num_classes: int = 0) -> nn.Module:
    """An uninitialised backbone from a config of backbone_and_fc (to load a saved probe into)."""
    cfg = dict(cfg)
    family = cfg.pop("family")
    if family == "resnet":
        return create_resnet(cfg["arch"], cfg["cifar_stem"], num_classes=num_classes)
    return create_vit(**cfg, num_classes=num_classes)


def build_probe(config: dict) -> LinearProbe:
    """An empty probe shaped by the `model_config` main_lincls.py saves (for --evaluate and resume)."""
    backbone, fc = _split_head(build_backbone(config["backbone"], config["num_classes"]),
                               "fc" if config["backbone"]["family"] == "resnet" else "head")
    return LinearProbe(backbone, fc, config["head_bn"])


class BackboneGuard:
    """Remembers the backbone's tensors (weights and BN statistics) and checks that training left them alone."""

    def __init__(self, backbone: nn.Module):
        self.backbone, self.saved, self.checked = backbone, None, False

    def snapshot(self):
        """Remember the tensors now (once: later calls do nothing)."""
        if self.saved is None and not self.checked:
            self.saved = {k: v.detach().clone() for k, v in self.backbone.state_dict().items()}

    def check(self):
        """Raise if a tensor differs from the snapshot (once: later calls do nothing)."""
        if self.saved is None:
            return
        changed = [k for k, v in self.backbone.state_dict().items() if not torch.equal(v, self.saved[k])]
        if changed:
            raise RuntimeError(f"linear probe: backbone tensors changed during training ({', '.join(changed[:4])}"
                               f"{' ...' if len(changed) > 4 else ''}); the backbone must stay frozen")
        self.saved, self.checked = None, True                               # checked once, memory freed
