"""torch.hub entry points: backbones (features, no classifier) with the released or your own weights.

    torch.hub.load(REPO_DIR, "asym_siam_resnet50", source="local", variant="multicrop", pretrained=True)
    torch.hub.load(REPO_DIR, "aps_vit_small", source="local", weights="aps:pretrain/<file>")  # or a path
    torch.hub.load(REPO_DIR, "aps_vit_small", source="local", weights="aps:finetune/<file>", classifier=True)

Weights are fetched into the cache of `python -m tools.weights` and verified before loading.
"""
dependencies = ["torch", "torchvision", "timm"]

ASYM_SIAM_VARIANTS = ("baseline", "multicrop", "scalemix", "asymaug", "asymbn", "meanenc")


def asym_siam_resnet50(variant: str = "baseline", pretrained: bool = True, **kwargs):
    """ResNet-50 pretrained 100 epochs on ImageNet with MoCo v2 and one Asym-Siam asymmetry (variant: one of
    baseline, multicrop, scalemix, asymaug, asymbn, meanenc). Returns the trunk: forward gives the 2048-d
    pooled feature."""
    from models.loading import load_backbone
    from models.resnet import create_resnet
    from utils.errors import UserError
    if variant not in ASYM_SIAM_VARIANTS:
        raise UserError(f"unknown variant {variant!r}; choose one of {', '.join(ASYM_SIAM_VARIANTS)}")
    if not pretrained:
        return create_resnet("resnet50", **kwargs)
    return load_backbone(f"asym-siam/{variant}-r50-100ep", arch="resnet50")


def _aps_vit(arch: str, weights=None, img_size: int = 32, patch_size: int = 2, pretrained: bool = False,
             classifier: bool = False, **kwargs):
    from models.loading import load_backbone, load_fine_tuned
    from models.vit import create_vit
    from utils.errors import UserError
    if weights and classifier:
        return load_fine_tuned(weights, arch=arch)[0]
    if weights:
        return load_backbone(weights, arch=arch, **kwargs)
    if pretrained:
        raise UserError("name the APS file: weights='aps:pretrain/<file>' (see `python -m tools.weights list "
                        "--remote aps`) or weights=PATH of a downloaded file")
    return create_vit(arch, img_size, patch_size, **kwargs)


def aps_vit_tiny(weights=None, img_size: int = 32, patch_size: int = 2, pretrained: bool = False,
                 classifier: bool = False, **kwargs):
    """APS ViT-Tiny: forward gives the cls feature (classifier=True with a fine-tuned file: the logits). weights: a
    path, or aps:<folder>/<file> from the hub."""
    return _aps_vit("vit-tiny", weights, img_size, patch_size, pretrained, classifier, **kwargs)


def aps_vit_small(weights=None, img_size: int = 32, patch_size: int = 2, pretrained: bool = False,
                 classifier: bool = False, **kwargs):
    """APS ViT-Small: forward gives the cls feature (classifier=True with a fine-tuned file: the logits). weights: a
    path, or aps:<folder>/<file> from the hub."""
    return _aps_vit("vit-small", weights, img_size, patch_size, pretrained, classifier, **kwargs)


def aps_vit_base(weights=None, img_size: int = 32, patch_size: int = 2, pretrained: bool = False,
                 classifier: bool = False, **kwargs):
    """APS ViT-Base: forward gives the cls feature (classifier=True with a fine-tuned file: the logits). weights: a
    path, or aps:<folder>/<file> from the hub."""
    return _aps_vit("vit-base", weights, img_size, patch_size, pretrained, classifier, **kwargs)
