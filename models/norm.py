"""Split batch norm: BN statistics per chunk of the batch, the single-process stand-in for MoCo's
shuffle-BN (as in the MoCo CIFAR demo). In eval mode it is a plain BN."""
import torch
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
