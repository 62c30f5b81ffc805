"""Batch-norm layers beyond torch's: split BN and synchronised BN.

- `SplitBatchNorm`: BN statistics per chunk of the batch, the single-process stand-in for MoCo's shuffle-BN (as
  in the MoCo CIFAR demo). In eval mode it is a plain BN.
- `DistBatchNorm` / `convert_sync_batchnorm`: BN over the batches of a group of ranks, on every device (gloo on
  the CPU, NCCL on GPUs). We use it in place of torch's nn.SyncBatchNorm everywhere: that one runs only on GPUs,
  and every call drops the empty ranks' statistics by boolean-mask indexing, a host sync in each BN of every step
  (the APS heads: 12 a step). This one adds the ranks' sums with all-reduces instead (a rank with no sample adds
  zeros), so the step stays free of host syncs, with the same forward, backward and running statistics: those of
  a plain BN over the ranks' batches put together (tests/test_distributed.py, in float64).
"""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm


class SplitBatchNorm(_BatchNorm):
    """BN over [N, C, ...] (a BatchNorm1d or 2d) whose statistics are per chunk of consecutive samples: chunk k
    is rows [k m, (k + 1) m), m = N / num_splits, what process k of num_splits would hold. Each chunk is a
    slice normalised by the native BN kernel, so a channels_last input stays channels_last (no layout copies
    around every BN). The running statistics are the chunks' average."""

    def __init__(self, num_features, num_splits: int = 1, **kw):
        super().__init__(num_features, **kw)
        self.num_splits = num_splits

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"split BN expects [N, C, ...] input, got {x.dim()}D")

    def forward(self, x):
        if not self.training or self.num_splits <= 1:
            return super().forward(x)
        N, s = x.shape[0], self.num_splits                                # x: [N, C, ...]
        if N % s:
            raise ValueError(f"split BN: batch {N} is not divisible by --bn-splits {s}")
        mean = self.running_mean.repeat(s, 1)                             # [s, C]: each chunk's running stats
        var = self.running_var.repeat(s, 1)
        y = torch.cat([F.batch_norm(part, mean[k], var[k], self.weight, self.bias, True, self.momentum, self.eps)
                       for k, part in enumerate(x.chunk(s))])
        with torch.no_grad():
            self.running_mean.copy_(mean.mean(dim=0))
            self.running_var.copy_(var.mean(dim=0))
            self.num_batches_tracked.add_(1)
        return y


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks of a group; the gradient of a sum is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class DistBatchNorm(_BatchNorm):
    """BatchNorm over the union of the batches of all ranks in `process_group` (autograd-aware)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        c = x.shape[1]
        group = self.process_group or dist.group.WORLD
        dims = [0] + list(range(2, x.dim()))
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 at least, fp64 stays fp64
        count = torch.full((1,), x.numel() / c, device=x.device, dtype=xf.dtype)
        # two passes (mean, then squared deviations) for the numerics of a plain BN
        stats = _AllReduceSum.apply(torch.cat([xf.sum(dims), count]), group)          # [C + 1]
        n = stats[-1]
        mean = stats[:c] / n
        shape = [1, c] + [1] * (x.dim() - 2)
        centred = xf - mean.view(shape)
        var = _AllReduceSum.apply((centred * centred).sum(dims), group) / n           # [C] biased
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                unbiased = var * n / (n - 1).clamp_min(1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device, process_group=None) -> nn.Module:
    """Replace every BatchNorm in `module` by a synchronised one (DistBatchNorm, on any device; the same
    parameters and buffers, so the same state-dict keys)."""
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, DistBatchNorm):
        like = next(iter(module.parameters()), None)
        like = like if like is not None else module.running_mean
        out = DistBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group, device=like.device, dtype=like.dtype)
        if module.affine:  # the same Parameter objects (and so requires_grad), as torch's converter does
            out.weight, out.bias = module.weight, module.bias
        if module.track_running_stats:
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, device, process_group))
    return out
