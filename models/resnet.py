"""torchvision ResNets for MoCo: optional CIFAR stem, the MoCo v2 projector in place of fc
(docs/REFERENCE.md#moco-baseline)."""
from functools import partial

import torch
import torch.nn as nn
import torchvision.models as tvm

from models.heads import mlp
from models.norm import SplitBatchNorm
from utils.errors import UserError

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def add_resnet_args(parser, arch: str = "resnet50"):
    """The ResNet model flags of the MoCo-family scripts (an argument group, for the script's own model flags):
    -a/--arch and --cifar-stem, whose default resolve_cifar_stem applies."""
    g = parser.add_argument_group("model")
    g.add_argument("-a", "--arch", default=arch, choices=RESNETS, help="torchvision ResNet")
    g.add_argument("--cifar-stem", default=None, action="store_true",
                   help="3x3 stride-1 first conv, no max-pool (default: on for 32 px datasets)")
    return g


def resolve_cifar_stem(args) -> bool:
    """--cifar-stem, or its default: on for images of 64 px or less (CIFAR, digits, STL at 64), off above; set on
    args, so that the run's config.yaml says which."""
    args.cifar_stem = args.img_size <= 64 if args.cifar_stem is None else args.cifar_stem
    return args.cifar_stem


def moco_projector(in_dim: int, hidden_dim: int = 2048, out_dim: int = 128, bn_splits: int = 1) -> nn.Sequential:
    """Linear-BN-ReLU-Linear-ReLU-Linear (BN after the first layer only); keys fc.0, fc.1, fc.3, fc.5.
    bn_splits > 1: split BN, as in the trunk."""
    norm = partial(SplitBatchNorm, num_splits=bn_splits) if bn_splits > 1 else nn.BatchNorm1d
    return mlp([in_dim, hidden_dim, hidden_dim, out_dim], norm=norm, norm_after={0})


class GlobalAvgPool(nn.AdaptiveAvgPool2d):
    """torchvision's pooling to 1x1, except under --deterministic on CUDA: adaptive average pooling has no
    deterministic backward there (strict mode would stop at it), and a mean over the spatial dims is the same
    number with a deterministic backward (an expand). Elsewhere the same kernel as before, so the same bits."""

    def __init__(self):
        super().__init__(1)

    def forward(self, x):
        if x.is_cuda and torch.are_deterministic_algorithms_enabled():
            return x.mean(dim=(2, 3), keepdim=True)
        return super().forward(x)


def create_resnet(arch: str = "resnet50", cifar_stem: bool = False, bn_splits: int = 1, num_classes: int = 0):
    """A torchvision ResNet; fc is Identity (features) unless num_classes > 0. `bn_splits` > 1 uses split BN."""
    if arch not in RESNETS:
        raise UserError(f"unknown --arch {arch!r}; choose one of {', '.join(RESNETS)}")
    norm = partial(SplitBatchNorm, num_splits=bn_splits) if bn_splits > 1 else nn.BatchNorm2d
    model = getattr(tvm, arch)(weights=None, norm_layer=norm)
    if cifar_stem:  # 32 px images: 3x3 stride-1 first conv, no max-pool
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    model.avgpool = GlobalAvgPool()
    model.feature_dim = model.fc.in_features
    model.fc = nn.Linear(model.feature_dim, num_classes) if num_classes else nn.Identity()
    return model


class ResNetTrunk(nn.Module):
    """The pooled features of a ResNet whose fc holds something else (the MoCo projector). Shares weights."""

    def __init__(self, resnet: nn.Module):
        super().__init__()
        self.resnet = resnet

    def forward(self, x):
        r = self.resnet
        x = r.maxpool(r.relu(r.bn1(r.conv1(x))))
        x = r.layer4(r.layer3(r.layer2(r.layer1(x))))
        return r.avgpool(x).flatten(1)


def detectron2_name(key: str) -> str:
    """A torchvision ResNet key -> detectron2's name for it (conv1 -> stem.conv1, bn1 -> stem.conv1.norm,
    layer<i>.<b>.conv<k> -> res<i+1>.<b>.conv<k>, its bn<k> -> .norm, downsample.0/1 -> shortcut / shortcut.norm)."""
    parts = key.split(".")
    if parts[0] in ("conv1", "bn1"):
        return ".".join(["stem.conv1"] + (["norm"] if parts[0] == "bn1" else []) + parts[1:])
    stage, block, layer, rest = f"res{int(parts[0][len('layer'):]) + 1}", parts[1], parts[2], parts[3:]
    if layer == "downsample":
        layer, rest = ("shortcut", rest[1:]) if rest[0] == "0" else ("shortcut.norm", rest[1:])
    elif layer.startswith("bn"):
        layer = f"conv{layer[2:]}.norm"
    return ".".join([stage, block, layer] + rest)


def to_detectron2(state: dict) -> dict:
    """A torchvision ResNet trunk's state dict (no fc) -> detectron2's ResNet names; BN as FrozenBN statistics
    (weight, bias, running_mean, running_var; num_batches_tracked dropped). Pure function."""
    if any(k.startswith("fc.") for k in state):
        raise ValueError("pass the trunk, without fc")
    return {detectron2_name(k): v for k, v in state.items() if not k.endswith("num_batches_tracked")}
