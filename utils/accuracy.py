"""Top-k accuracy of a classifier over a (sharded) loader, summed over ranks."""
import torch
import torch.nn.functional as F

from utils.dist import is_dist
from utils.runtime import autocast


@torch.no_grad()
def evaluate_classifier(model, loader, device, amp=None) -> dict:
    """{'acc1', 'acc5', 'loss'} in % (loss: mean CE) over every rank's shard of `loader`."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss sum, count
    for images, target in loader:
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images)                                    # [B, C]
        logits = logits.float()
        k = min(5, logits.shape[1])
        hit = logits.topk(k, dim=1).indices == target[:, None]        # [B, k]
        totals += torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum(),
                               F.cross_entropy(logits, target, reduction="sum"),
                               torch.tensor(target.shape[0], device=device)]).double()
    model.train(was_training)
    if is_dist():
        torch.distributed.all_reduce(totals)
    n = max(totals[3].item(), 1)
    return {"acc1": 100 * totals[0].item() / n, "acc5": 100 * totals[1].item() / n, "loss": totals[2].item() / n}
