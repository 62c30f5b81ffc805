"""LARS: SGD with momentum whose step for each weight matrix is rescaled by a layer-wise trust ratio.

The linear-probe variant of docs/REFERENCE.md#linear-probe (the LARC form, without clipping). For a parameter w with
gradient g, weight decay wd, trust coefficient c and lr:

    if w.ndim > 1 and |w| > 0 and |g| > 0:   d = c |w| / (|g| + wd |w| + eps) * (g + wd w)
    else:                                   d = g + wd w          (biases, norms: no adaptation)
    buf = momentum * buf + d ;  w -= lr * buf
"""
import torch
from torch.optim import Optimizer


class LARS(Optimizer):
    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 1e-8):
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay),
                            ("trust_coefficient", trust_coefficient), ("eps", eps)):
            if value < 0:
                raise ValueError(f"LARS: {name} must be >= 0, got {value}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, c, eps = group["weight_decay"], group["trust_coefficient"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                d = g.add(p, alpha=wd) if wd else g.clone()
                if p.ndim > 1:
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    ratio = c * w_norm / (g_norm + wd * w_norm + eps)
                    # no host sync: a zero weight or gradient norm leaves the step unscaled
                    d.mul_(torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio)))
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(d)
                p.add_(buf, alpha=-group["lr"])
        return loss
