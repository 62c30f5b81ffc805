"""The parts a self-supervised method is built from, shared by every method: MLP heads (projectors,
predictors) and momentum encoders (a frozen copy that follows its online twin by an exponential moving average)."""
import copy
from typing import Callable, Optional

import torch
import torch.nn as nn


def mlp(dims: list, bias: bool = True, norm: Optional[Callable[[int], nn.Module]] = None, norm_after=None,
        out_norm: Optional[nn.Module] = None) -> nn.Sequential:
    """Linear layers dims[0] -> dims[1] -> ... -> dims[-1], a ReLU after each hidden one; `norm(width)` (e.g.
    nn.BatchNorm1d) between a hidden linear and its ReLU for the hidden layers in `norm_after` (indices from 0;
    default all of them); `out_norm` after the last linear. The modules sit in that order, so state-dict keys are
    their positions (what the reference files use)."""
    layers, hidden = [], range(len(dims) - 2)
    norm_after = set(hidden if norm_after is None else norm_after)
    for i in hidden:
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=bias))
        if norm is not None and i in norm_after:
            layers.append(norm(dims[i + 1]))
        layers.append(nn.ReLU(inplace=True))
    layers.append(nn.Linear(dims[-2], dims[-1], bias=bias))
    if out_norm is not None:
        layers.append(out_norm)
    return nn.Sequential(*layers)


def mlp_bn_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear-BN-ReLU, Linear-BN-ReLU, Linear-BN(affine=False), all linears without bias (docs/REFERENCE.md#aps-model).

    Indices 0, 1, 3, 4, 6, 7 hold parameters, as in the reference's state dicts.
    """
    return mlp([in_dim, hidden_dim, hidden_dim, out_dim], bias=False, norm=nn.BatchNorm1d,
               out_norm=nn.BatchNorm1d(out_dim, affine=False))


def momentum_copy(online: nn.Module) -> nn.Module:
    """A frozen copy of `online` to follow it by momentum_update (MoCo's key encoder, BYOL's target)."""
    target = copy.deepcopy(online)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def momentum_update(target: nn.Module, online: nn.Module, momentum: float):
    """target <- m target + (1 - m) online for every parameter (buffers such as BN statistics are not averaged),
    in two multi-tensor kernels."""
    params = list(target.parameters())
    torch._foreach_mul_(params, momentum)
    torch._foreach_add_(params, [p.detach() for p in online.parameters()], alpha=1.0 - momentum)
