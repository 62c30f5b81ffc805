"""MoCo v2 with a momentum key encoder and a queue of negatives (SPEC C1), one direction:
query = source, key = target. Views arrive by name (query, keys, mini_queries), never as slices.
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.dist import all_gather, broadcast, get_rank, get_world_size, rank_group
from utils.syncbn import convert_sync_batchnorm


def _fp32(z: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16/fp16 autocast outputs go up, float64 stays float64)."""
    return z.to(torch.promote_types(z.dtype, torch.float32))


def moco_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """CE([q.k, q.queue] / T, label 0). q, k: [N, d] L2-normalised; queue: [d, K] L2-normalised columns."""
    l_pos = (q * k).sum(dim=1, keepdim=True)                         # [N, 1]
    l_neg = q @ queue                                                # [N, K]
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature          # [N, 1 + K]
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


class MoCo(nn.Module):
    """forward(query, keys, mini_queries=None) -> (loss, stats).

    encoder: a network whose output is the projection (the query encoder); the key encoder is its EMA.
    query: [N, 3, H, W]; keys: [V, N, 3, H, W] (V > 1: MeanEnc, the key is the normalised mean of the V
    projections); mini_queries: [M, N, 3, h, w] or None (MultiCrop: loss = large + mean over minis).
    """

    def __init__(self, encoder: nn.Module, dim: int = 128, queue_size: int = 65536, momentum: float = 0.999,
                 temperature: float = 0.2):
        super().__init__()
        self.encoder_q = encoder
        self.encoder_k = copy.deepcopy(encoder)
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)
        self.momentum, self.temperature, self.queue_size = momentum, temperature, queue_size
        self.register_buffer("queue", F.normalize(torch.randn(dim, queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self):
        """k <- m k + (1 - m) q for every parameter (BN buffers are not averaged)."""
        for pq, pk in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            pk.mul_(self.momentum).add_(pq.detach(), alpha=1.0 - self.momentum)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor):
        """Write the keys of all ranks at the pointer (oldest first out), wrapping around."""
        keys = all_gather(keys)                                      # [N * world, d]
        n = keys.shape[0]
        if self.queue_size % n:
            raise ValueError(f"queue size {self.queue_size} is not a multiple of the global batch {n}")
        idx = (self.queue_ptr + torch.arange(n, device=keys.device)) % self.queue_size  # no host sync
        self.queue.index_copy_(1, idx, keys.T.to(self.queue.dtype))
        self.queue_ptr.add_(n).remainder_(self.queue_size)

    @torch.no_grad()
    def encode_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """keys: [V, N, ...] -> [N, d], normalised mean over the V views' projections."""
        V, N = keys.shape[:2]
        x = keys.flatten(0, 1)                                       # [V * N, ...], one batch (MeanEnc)
        z = self.shuffled_key_encoder(x)                             # [V * N, d]
        return F.normalize(z.view(V, N, -1).mean(dim=0), dim=1)

    @torch.no_grad()
    def shuffled_key_encoder(self, x: torch.Tensor) -> torch.Tensor:
        """Shuffle-BN: encode the keys in a random order so that no BN batch holds a query's own key.

        Many processes: shuffle across ranks (all-gather, one permutation from rank 0, each rank encodes
        its slice, gather back, unshuffle). One process: shuffle locally; split BN stands in for GPUs.
        """
        world = get_world_size()
        if world == 1:
            perm = torch.randperm(x.shape[0], device=x.device)
            return _fp32(self.encoder_k(x[perm]))[perm.argsort()]
        n = x.shape[0]
        x_all = all_gather(x)                                        # [n * world, ...]
        perm = broadcast(torch.randperm(x_all.shape[0], device=x.device))
        rank = get_rank()
        mine = perm[rank * n:(rank + 1) * n]
        z_all = all_gather(_fp32(self.encoder_k(x_all[mine])))      # [n * world, d], in shuffled order
        z = torch.empty_like(z_all)
        z[perm] = z_all                                              # unshuffle
        return z[rank * n:(rank + 1) * n]

    def forward(self, query, keys, mini_queries=None):
        q = F.normalize(_fp32(self.encoder_q(query)), dim=1)        # [N, d]
        with torch.no_grad():
            self.momentum_update()
            k = self.encode_keys(keys)                               # [N, d]
        queue = self.queue.clone().detach()
        loss = moco_loss(q, k, queue, self.temperature)
        stats = {"loss_large": loss.detach()}
        if mini_queries is not None and mini_queries.shape[0] > 0:
            M, N = mini_queries.shape[:2]
            qm = F.normalize(_fp32(self.encoder_q(mini_queries.flatten(0, 1))), dim=1).view(M, N, -1)
            mini = torch.stack([moco_loss(qm[i], k, queue, self.temperature) for i in range(M)]).mean()
            loss = loss + mini
            stats["loss_mini"] = mini.detach()
        stats["pos_cos"] = (q * k).sum(dim=1).mean().detach()
        self.enqueue(k)
        return loss, stats


def synchronise_key_projector(module: MoCo, device: torch.device, group_size: int):
    """AsymBN: the target (key) projector's BN computes its statistics over groups of `group_size` ranks;
    the query side keeps per-rank BN."""
    module.encoder_k.fc = convert_sync_batchnorm(module.encoder_k.fc, device, rank_group(group_size))


def check_queue(queue_size: int, global_batch: int):
    if queue_size % global_batch:
        from utils.errors import UserError
        raise UserError(f"--moco-k {queue_size} is not a multiple of the global batch {global_batch} "
                        f"({get_world_size()} processes); choose a queue size that is")
