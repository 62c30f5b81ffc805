"""Split batch norm: BN statistics per chunk of the batch, the single-process stand-in for MoCo's
shuffle-BN (as in the MoCo CIFAR demo). In eval mode it is a plain BN."""
import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm


class SplitBatchNorm(_BatchNorm):
    """BN over [N, C, ...] (a BatchNorm1d or 2d) whose statistics are per chunk: chunk k is every
    num_splits-th sample from k. The running statistics are the chunks' average."""

    def __init__(self, num_features, num_splits: int = 1, **kw):
        super().__init__(num_features, **kw)
        self.num_splits = num_splits

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"split BN expects [N, C, ...] input, got {x.dim()}D")

    def forward(self, x):
        if not self.training or self.num_splits <= 1:
            return super().forward(x)
        N, C = x.shape[:2]                                                # x: [N, C, ...]
        s = self.num_splits
        if N % s:
            raise ValueError(f"split BN: batch {N} is not divisible by --bn-splits {s}")
        mean = self.running_mean.repeat(s)
        var = self.running_var.repeat(s)
        y = F.batch_norm(x.reshape(N // s, C * s, *x.shape[2:]), mean, var, self.weight.repeat(s),
                         self.bias.repeat(s), True, self.momentum, self.eps)   # each chunk sees its own stats
        with torch.no_grad():
            self.running_mean.copy_(mean.view(s, C).mean(dim=0))
            self.running_var.copy_(var.view(s, C).mean(dim=0))
            self.num_batches_tracked.add_(1)
        return y.view(x.shape)
