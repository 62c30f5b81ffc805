"""Split batch norm: BN statistics per chunk of the batch, the single-process stand-in for MoCo's
shuffle-BN (as in the MoCo CIFAR demo). In eval mode it is a plain BN."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class SplitBatchNorm(nn.BatchNorm2d):
    def __init__(self, num_features, num_splits: int = 1, **kw):
        super().__init__(num_features, **kw)
        self.num_splits = num_splits

    def forward(self, x):
        if not self.training or self.num_splits <= 1:
            return super().forward(x)
        N, C, H, W = x.shape                                              # x: [N, C, H, W]
        s = self.num_splits
        if N % s:
            raise ValueError(f"split BN: batch {N} is not divisible by --bn-splits {s}")
        mean = self.running_mean.repeat(s)
        var = self.running_var.repeat(s)
        y = F.batch_norm(x.reshape(N // s, C * s, H, W), mean, var, self.weight.repeat(s), self.bias.repeat(s),
                         True, self.momentum, self.eps)                   # each chunk sees its own stats
        with torch.no_grad():
            self.running_mean.copy_(mean.view(s, C).mean(dim=0))
            self.running_var.copy_(var.view(s, C).mean(dim=0))
            self.num_batches_tracked.add_(1)
        return y.view(N, C, H, W)
