"""APS: one ViT encoder, a projector and a predictor, trained with a symmetric contrastive loss
(docs/REFERENCE.md#aps-model)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.heads import mlp_bn_head
from samplers.aps import sample_aps
from utils.dist import all_gather, get_rank
from utils.runtime import no_autocast


def contrastive_loss(p: torch.Tensor, z: torch.Tensor, temperature: float):
    """ctr(p, z) = CE(normalize(p) . normalize(sg(z))^T / T, arange(N) + rank * N), z gathered over ranks.

    Returns (loss, mean cosine between each prediction and its own target).
    """
    dtype = torch.promote_types(p.dtype, torch.float32)          # fp32 at least (also under autocast)
    with no_autocast(p.device):
        p = F.normalize(p.to(dtype), dim=1)                      # [N, d]
        z = F.normalize(z.detach().to(dtype), dim=1)             # [N, d]
        z_all = all_gather(z)                                    # [N * world, d]
        logits = p @ z_all.T / temperature                       # [N, N * world]
        labels = torch.arange(p.shape[0], device=p.device) + get_rank() * p.shape[0]
        return F.cross_entropy(logits, labels), (p * z).sum(dim=1).mean()


class APS(nn.Module):
    """forward(x1, x2, idx1, idx2) -> (loss, stats) for one sampling round.

    x1, x2: [B, 3, H, W] the two views; idx1, idx2: [B, n] kept cells of each. The encoder runs once over
    both views (it has no batch statistics, so this equals two calls, with half the kernel launches); the
    heads see each view in its own call, so their BN statistics are per view.
    """

    def __init__(self, encoder: nn.Module, proj_hidden_dim=512, proj_dim=128, pred_hidden_dim=512,
                 temperature=0.1):
        super().__init__()
        self.encoder = encoder
        self.projector = mlp_bn_head(encoder.embed_dim, proj_hidden_dim, proj_dim)
        self.predictor = mlp_bn_head(proj_dim, pred_hidden_dim, proj_dim)
        self.temperature = temperature

    def heads(self, h):
        z = self.projector(h)                                    # [B, proj_dim]
        return z, self.predictor(z)

    def forward(self, x1, x2, idx1, idx2):
        B = x1.shape[0]
        h = self.encoder.forward_kept(torch.cat([x1, x2]), torch.cat([idx1, idx2]))  # [2B, D], one pass
        z1, p1 = self.heads(h[:B])
        z2, p2 = self.heads(h[B:])
        loss12, cos12 = contrastive_loss(p1, z2, self.temperature)
        loss21, cos21 = contrastive_loss(p2, z1, self.temperature)
        return loss12 + loss21, {"pos_cos": (cos12 + cos21) / 2}


def aps_training_steps(model, batch: dict, grid: int, ratio: float, steps_per_batch: int, power: float, rng=None):
    """One loaded batch of view pairs -> `steps_per_batch` optimizer steps, one per sampling round
    (docs/REFERENCE.md#aps-optimisation).

    batch: view1/view2 [B, 3, H, W], box1/box2 [B, 4], flip1/flip2 [B], on the training device.
    Yields (loss, stats) for round t; the caller steps the optimizer before asking for round t + 1.
    rng: the sampler's random numbers (a utils.rng.BatchRandom; default the device's global generator).
    """
    idx1, idx2 = sample_aps(batch["box1"], batch["flip1"], batch["box2"], batch["flip2"], grid, ratio,
                            steps_per_batch, power, rng)                            # [B, K, n] each
    for t in range(steps_per_batch):
        yield model(batch["view1"], batch["view2"], idx1[:, t], idx2[:, t])
