"""Projection and prediction heads."""
import torch.nn as nn


def mlp_bn_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear-BN-ReLU, Linear-BN-ReLU, Linear-BN(affine=False), all linears without bias (docs/REFERENCE.md#aps-model).

    Indices 0, 1, 3, 4, 6, 7 hold parameters, as in the reference's state dicts.
    """
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim, affine=False),
    )
