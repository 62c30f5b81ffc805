"""Segmentation metrics from a confusion matrix kept on the device: mean IoU and pixel accuracy, as mmsegmentation
and the frozen-feature probes of DINOv2 report them.

A pixel whose label is the ignore index counts nowhere. IoU of class c = TP / (TP + FP + FN); a class that is
neither in the labels nor in the predictions of the split (union 0) has no IoU and is left out of the mean (the
"nanmean" convention), so a split without some class is not penalised for it. Pixel accuracy = correct / labelled
pixels.
"""
import torch

from utils.dist import all_reduce_sum

IGNORE = 255


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore: int = IGNORE) -> torch.Tensor:
    """[K, K] counts (row: the label, column: the prediction) of the pixels whose label is not `ignore`; pred and
    target are integer tensors of the same shape (no host sync)."""
    cells = num_classes ** 2
    idx = torch.where(target != ignore, target.long() * num_classes + pred.long(), cells).flatten()
    counts = torch.zeros(cells + 1, dtype=torch.long, device=target.device)      # the last cell: ignored pixels
    # a fixed-size accumulation (bincount sizes its output from the data: a host sync per batch on a GPU)
    counts.index_put_((idx,), torch.ones_like(idx), accumulate=True)
    return counts[:cells].view(num_classes, num_classes)


def scores(matrix: torch.Tensor) -> dict:
    """mIoU (%), pixel accuracy (%) and per-class IoU (%, NaN where the class has no union) of a confusion matrix;
    one host read."""
    m = matrix.double()
    tp = m.diag()
    union = m.sum(0) + m.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    miou = iou.nanmean().nan_to_num(0.0)                    # no class with a union at all: 0
    acc = tp.sum() / m.sum().clamp(min=1)
    values = torch.cat([miou[None], acc[None], iou]).mul(100).tolist()
    return {"miou": values[0], "pixel_acc": values[1], "iou": values[2:]}


def reduced_scores(matrix: torch.Tensor) -> dict:
    """scores() of the matrix summed over every process."""
    return scores(all_reduce_sum(matrix))
