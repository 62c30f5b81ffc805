"""Batched mixing of views on the training device."""

import torch

from utils.rng import BatchRandom


def scalemix(x1: torch.Tensor, x2: torch.Tensor, rng: BatchRandom = None):
    """ScaleMix (Asym-Siam): paste a box of view 2 into view 1, per sample.

    lambda ~ U(0, 1); the box has sides sqrt(1 - lambda) * (H, W) and a uniform centre, clipped to the
    image, so before clipping it covers a fraction 1 - lambda. x1, x2: [N, C, H, W].
    rng: where lambda and the centre come from (default: the device's global generator).
    Returns (mixed [N, C, H, W], boxes [N, 4] = (top, bottom, left, right), lambda [N]).
    """
    N, _, H, W = x1.shape
    dev = x1.device
    rng = rng or BatchRandom.local(dev)
    lam = rng.rand(N)                                                           # [N]
    side = torch.sqrt(1.0 - lam)                                                # [N]
    cy = rng.rand(N) * H
    cx = rng.rand(N) * W
    top = (cy - side * H / 2).round().clamp(0, H).long()
    bottom = (cy + side * H / 2).round().clamp(0, H).long()
    left = (cx - side * W / 2).round().clamp(0, W).long()
    right = (cx + side * W / 2).round().clamp(0, W).long()
    rows = torch.arange(H, device=dev)[None, :, None]                           # [1, H, 1]
    cols = torch.arange(W, device=dev)[None, None, :]                           # [1, 1, W]
    inside = ((rows >= top[:, None, None]) & (rows < bottom[:, None, None])
              & (cols >= left[:, None, None]) & (cols < right[:, None, None]))  # [N, H, W]
    mixed = torch.where(inside[:, None], x2, x1)
    return mixed, torch.stack([top, bottom, left, right], dim=1), lam


