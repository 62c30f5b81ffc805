"""Top-k accuracy of a classifier over a (sharded) loader, summed over ranks."""
import torch
import torch.nn.functional as F

from utils.dist import is_dist
from utils.runtime import autocast
from utils.transfer import to_device


@torch.no_grad()
def evaluate_classifier(model, loader, device, amp=None) -> dict:
    """{'acc1', 'acc5', 'loss'} in % (loss: mean CE) over every rank's shard of `loader`. The counts stay on the
    device until the end (one host sync per pass, none per batch)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss sum, count
    for images, target in loader:
        images, target = to_device(images, device), to_device(target, device)
        with autocast(device, amp):
            logits = model(images)                                    # [B, C]
        logits = logits.float()
        k = min(5, logits.shape[1])
        hit = logits.topk(k, dim=1).indices == target[:, None]        # [B, k]
        totals[:3] += torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum(),
                                   F.cross_entropy(logits, target, reduction="sum")]).double()
        totals[3] += target.shape[0]                                  # a Python number: no host-to-device copy
    model.train(was_training)
    if is_dist():
        torch.distributed.all_reduce(totals)
    correct1, correct5, loss_sum, n = totals.tolist()
    n = max(n, 1)
    return {"acc1": 100 * correct1 / n, "acc5": 100 * correct5 / n, "loss": loss_sum / n}
