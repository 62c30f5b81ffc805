"""The frozen-feature linear segmentation probe as a Trainer method (main_segprobe.py, docs/SEGMENTATION.md):
cross-entropy with the ignore index over the upsampled logits, mIoU and pixel accuracy on the validation split,
single-scale or averaged over several scales."""
import torch
import torch.nn.functional as F

from engine import Method
from utils.miou import IGNORE, confusion, reduced_scores
from utils.runtime import autocast, no_autocast
from utils.transfer import to_device


@torch.no_grad()
def segment_eval(probe, loader, device, amp, num_classes: int, scales=(1.0,)) -> dict:
    """mIoU (%) and pixel accuracy (%) of `probe` over `loader` (every process's shard, summed); several scales:
    the softmax of the image resized by each, at the label's size, averaged. One host read per pass."""
    was = probe.training
    probe.eval()
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    for images, masks in loader:
        images, masks = to_device(images, device), to_device(masks, device)
        size = masks.shape[-2:]
        prob = 0
        for s in scales:
            x = images if s == 1.0 else F.interpolate(images, scale_factor=s, mode="bilinear", align_corners=False)
            with autocast(device, amp):
                logits = probe(x, size=size)
            prob = prob + logits.float().softmax(1)
        matrix += confusion(prob.argmax(1), masks, num_classes)
    probe.train(was)
    out = reduced_scores(matrix)
    return {"miou": out["miou"], "pixel_acc": out["pixel_acc"]}


class SegmentationProbing(Method):
    """module: the models.dense.SegProbe (what is saved); model: what trains (it, under DDP). schedule(epoch) ->
    lr; guard: a models.linear.BackboneGuard of the frozen features."""
    name = "the segmentation probe"

    def __init__(self, module, model, schedule, val_loader, device, amp, num_classes: int, guard, scales=(1.0,),
                 model_config: dict = None):
        super().__init__(module, model, model_config)
        self.schedule, self.val_loader, self.device, self.amp = schedule, val_loader, device, amp
        self.num_classes, self.guard, self.scales = num_classes, guard, tuple(scales)

    def param_groups(self) -> list:
        return [{"params": list(self.module.head.parameters())}]

    def training_steps(self, batch, rng):
        self.guard.snapshot()
        images, masks = batch
        logits = self.model(images)
        with no_autocast(logits.device):
            yield F.cross_entropy(logits.float(), masks, ignore_index=IGNORE), {}

    def lr_at(self, epoch: float) -> float:
        return self.schedule(epoch)

    def after_epoch(self, epoch: int):
        self.guard.check()

    def evaluate(self, epoch: int) -> dict:
        return segment_eval(self.module, self.val_loader, self.device, self.amp, self.num_classes, self.scales)

    def summary(self, metrics: dict, best=None, start: dict = None) -> str:
        if "miou" not in metrics:
            return ""
        scales = "" if self.scales == (1.0,) else f" (scales {', '.join(f'{s:g}' for s in self.scales)})"
        return f"final val mIoU {metrics['miou']:.2f}%, pixel accuracy {metrics['pixel_acc']:.2f}%{scales}"
