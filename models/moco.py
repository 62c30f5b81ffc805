"""MoCo v2 with a momentum key encoder and a queue of negatives (docs/REFERENCE.md#moco-baseline), one direction:
query = source, key = target. Views arrive by name (query, keys, mini_queries), never as slices.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from augment.mix import scalemix
from models.heads import momentum_copy, momentum_update
from models.norm import SplitBatchNorm, convert_sync_batchnorm
from models.resnet import create_resnet, moco_projector
from utils.dist import all_gather, broadcast, get_rank, get_world_size, rank_group
from utils.errors import UserError
from utils.runtime import no_autocast


def _fp32(z: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16/fp16 autocast outputs go up, float64 stays float64)."""
    return z.to(torch.promote_types(z.dtype, torch.float32))


def group_major(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[V, N, ...] -> [V * N, ...] with rows ordered (group, view, sample): group g holds samples
    [g N / groups, (g + 1) N / groups) of every view, i.e. what process g of `groups` would hold."""
    V, N = x.shape[:2]
    return x.reshape(V, groups, N // groups, *x.shape[2:]).transpose(0, 1).flatten(0, 2)


def view_major(z: torch.Tensor, views: int, groups: int) -> torch.Tensor:
    """The inverse of group_major for outputs: [V * N, d] -> [V, N, d]."""
    return z.view(groups, views, -1, z.shape[-1]).transpose(0, 1).flatten(1, 2)


def moco_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """CE([q.k, q.queue] / T, label 0). q, k: [N, d] L2-normalised; queue: [d, K] L2-normalised columns.

    In fp32 (at least) under any autocast: a bf16 q @ queue would round the negatives' logits while the
    positive's stay exact, and at T = 0.2 the rounding is a visible share of the logits' spread."""
    with no_autocast(q.device):
        q, k, queue = _fp32(q), _fp32(k), _fp32(queue)
        l_pos = (q * k).sum(dim=1, keepdim=True)                     # [N, 1]
        l_neg = q @ queue                                            # [N, K]
        logits = torch.cat([l_pos, l_neg], dim=1) / temperature      # [N, 1 + K]
        return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


class MoCo(nn.Module):
    """forward(query, keys, mini_queries=None) -> (loss, stats).

    encoder: a network whose output is the projection (the query encoder); the key encoder is its EMA.
    query: [N, 3, H, W]; keys: [V, N, 3, H, W] (V > 1: MeanEnc, the key is the normalised mean of the V
    projections); mini_queries: [M, N, 3, h, w] or None (MultiCrop: loss = large + mean over minis).
    perm: shuffle-BN's permutation of the global keys (`shuffle_permutation`, drawn before the forward so that
    a compiled forward holds no random draw; default: rank 0's global generator, broadcast).

    An encoder with split BN (S chunks) in one process computes what S processes compute with plain BN:
    chunk g sees the g-th contiguous part of the batch, as process g would (tests/test_moco_dist.py).
    """

    def __init__(self, encoder: nn.Module, dim: int = 128, queue_size: int = 65536, momentum: float = 0.999,
                 temperature: float = 0.2):
        super().__init__()
        self.encoder_q = encoder
        self.encoder_k = momentum_copy(encoder)
        self.momentum, self.temperature, self.queue_size = momentum, temperature, queue_size
        self.splits = max((m.num_splits for m in encoder.modules() if isinstance(m, SplitBatchNorm)), default=1)
        self.register_buffer("queue", F.normalize(torch.randn(dim, queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self):
        """k <- m k + (1 - m) q for every parameter (BN buffers are not averaged)."""
        momentum_update(self.encoder_k, self.encoder_q, self.momentum)

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
    def encode_keys(self, keys: torch.Tensor, perm: torch.Tensor = None) -> torch.Tensor:
        """keys: [V, N, ...] -> [N, d], normalised mean over the V views' projections (one BN batch: MeanEnc).

        Shuffle-BN: the keys of all ranks (and split-BN chunks) are encoded in a random order, so that no BN
        batch holds a query's own key: gather, permute (the same permutation everywhere), each rank encodes
        its part, gather back, unshuffle."""
        V = keys.shape[0]
        x = group_major(keys, self.splits)                           # [V * N, ...]
        per, rank = x.shape[0], get_rank()
        x_all = all_gather(x)                                        # [world * V * N, ...]
        total = x_all.shape[0]
        perm = perm if perm is not None else broadcast(torch.randperm(total, device=x.device))
        mine = perm[rank * per:(rank + 1) * per]
        z_all = all_gather(_fp32(self.encoder_k(x_all[mine])))
        z = torch.empty_like(z_all)
        z[perm] = z_all                                              # unshuffle
        z = view_major(z[rank * per:(rank + 1) * per], V, self.splits)  # [V, N, d]
        return F.normalize(z.mean(dim=0), dim=1)

    def forward(self, query, keys, mini_queries=None, perm=None, update_key_encoder=True):
        """update_key_encoder=False: the caller has made the momentum update already (MoCoPretraining does, outside
        the model: under torch.compile and DDP, an in-place update of the key encoder inside a forward that DDP's
        graph splitting cuts leaves the loss without a gradient). The update reads only the query encoder's
        weights, which the forward does not change, so before or during the forward is the same."""
        q = F.normalize(_fp32(self.encoder_q(query)), dim=1)                              # [N, d]
        with torch.no_grad():
            if update_key_encoder:
                self.momentum_update()
            k = self.encode_keys(keys, perm)                         # [N, d]
        queue = self.queue.clone().detach()
        loss = moco_loss(q, k, queue, self.temperature)
        stats = {"loss_large": loss.detach()}
        if mini_queries is not None and mini_queries.shape[0] > 0:
            M = mini_queries.shape[0]
            qm = self.encoder_q(group_major(mini_queries, self.splits))
            qm = F.normalize(_fp32(view_major(qm, M, self.splits)), dim=2)              # [M, N, d]
            mini = torch.stack([moco_loss(qm[i], k, queue, self.temperature) for i in range(M)]).mean()
            loss = loss + mini
            stats["loss_mini"] = mini.detach()
        stats["pos_cos"] = (q * k).sum(dim=1).mean().detach()
        self.enqueue(k)
        return loss, stats


def shuffle_permutation(keys: torch.Tensor, rng) -> torch.Tensor:
    """Shuffle-BN's permutation for keys [V, N, ...] of this rank: one of all ranks' V * N key images, from rng
    (a utils.rng.BatchRandom: drawn on the CPU, the same on every rank and device)."""
    return rng.randperm(get_world_size() * keys.shape[0] * keys.shape[1])


def synchronise_key_projector(module: MoCo, device: torch.device, group_size: int):
    """AsymBN: the target (key) projector's BN computes its statistics over groups of `group_size` ranks;
    the query side keeps per-rank BN."""
    module.encoder_k.fc = convert_sync_batchnorm(module.encoder_k.fc, device, rank_group(group_size))


def check_queue(queue_size: int, global_batch: int):
    if queue_size % global_batch:
        raise UserError(f"--moco-k {queue_size} is not a multiple of the global batch {global_batch} "
                        f"({get_world_size()} processes); choose a queue size that is")


def build_moco(arch: str = "resnet50", cifar_stem: bool = False, bn_splits: int = 1, hidden_dim: int = 2048,
               dim: int = 128, queue_size: int = 65536, momentum: float = 0.999, temperature: float = 0.2,
               device: torch.device = torch.device("cpu")) -> MoCo:
    """MoCo v2 on a torchvision ResNet (docs/REFERENCE.md#moco-baseline), on `device`: the projector in place of fc,
    split BN in the trunk and the projector when bn_splits > 1, channels_last on CUDA (NHWC convolutions; the inputs
    follow the weights' layout). What main_moco.py trains and the benchmark times."""
    encoder = create_resnet(arch, cifar_stem, bn_splits)
    encoder.fc = moco_projector(encoder.feature_dim, hidden_dim, dim, bn_splits)
    module = MoCo(encoder, dim, queue_size, momentum, temperature).to(device)
    if device.type == "cuda":
        module.to(memory_format=torch.channels_last)
    return module


def moco_inputs(views: dict, rng=None):
    """A batch's named views (augment.recipes.MoCoViews' groups) -> MoCo's (query [N, ...], keys [V, N, ...],
    mini queries [M, N, ...] or None). With ScaleMix, the query is query_mix's box pasted into query."""
    query = scalemix(views["query"], views["query_mix"], rng)[0] if "query_mix" in views else views["query"]
    minis = views["mini_queries"].transpose(0, 1) if "mini_queries" in views else None
    return query, views["keys"].transpose(0, 1), minis
