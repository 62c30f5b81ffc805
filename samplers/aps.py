"""Asymmetric patch sampling (docs/REFERENCE.md#aps-sampling), batched on the training device.

View 1 keeps K disjoint random subsets of n cells (sparse sampling; K = steps_per_batch, the flag --nsampling:
each subset feeds one optimizer step). For each subset, view 2 keeps n
cells drawn without replacement with probability proportional to r^power, where r is the fraction
of the view-2 cell that the kept view-1 cells do not cover (selective sampling). All geometry is in
source-image pixels and honours horizontal flips. Covered area is separable, so for the whole batch

    covered = Oy^T @ S @ Ox        Oy: [B, G, G] row overlaps, S: [B, K, G, G] view-1 mask, Ox: column overlaps

and Gumbel top-k draws the samples without replacement. No per-sample Python loop anywhere.

`python -m tools.show_aps` draws a few pairs with the kept patches highlighted.
"""
import math

import torch
import torchvision.transforms as T

from augment.recipes import APS_VIEW
from utils.rng import BatchRandom
from utils.runtime import no_autocast

POSITIVE_EPS = 1e-5  # r below this counts as fully covered (float round-off of exact cover)


def kept_per_view(num_cells: int, ratio: float, steps_per_batch: int) -> int:
    """n = floor(L * ratio); checks 0 < ratio < 1, n >= 1 and K * n <= L."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"sampling ratio {ratio} must lie in (0, 1)")
    n = int(math.floor(num_cells * ratio + 1e-9))
    if n < 1:
        raise ValueError(f"sampling ratio {ratio} keeps no patch of {num_cells}; raise it to at least "
                         f"{1 / num_cells:.4g}")
    if steps_per_batch < 1 or steps_per_batch * n > num_cells:
        raise ValueError(f"nsampling {steps_per_batch} x {n} kept patches exceeds the {num_cells} patches; need "
                         f"nsampling * floor(L * ratio) <= L, e.g. nsampling <= {num_cells // n}")
    return n


def cell_spans(box: torch.Tensor, flip: torch.Tensor, grid: int, axis: int) -> torch.Tensor:
    """Source-pixel [start, end) of each row (axis 0) or column (axis 1) of a view's grid.

    box: [B, 4] (top, left, height, width); flip: [B] bool. Returns [B, G, 2]. A flipped view's column j
    covers what column G-1-j of the unflipped crop covers.
    """
    start, length = box[:, axis], box[:, axis + 2]                                     # [B], [B]
    steps = torch.arange(grid + 1, device=box.device, dtype=box.dtype) / grid          # [G+1]
    edges = start[:, None] + length[:, None] * steps                                   # [B, G+1]
    spans = torch.stack([edges[:, :-1], edges[:, 1:]], dim=-1)                         # [B, G, 2]
    if axis == 1:
        spans = torch.where(flip[:, None, None], spans.flip(1), spans)
    return spans


def overlap_1d(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Length of the intersection of every span of a with every span of b: [B, G, 2] x [B, G, 2] -> [B, G, G]."""
    lo = torch.maximum(a[:, :, None, 0], b[:, None, :, 0])
    hi = torch.minimum(a[:, :, None, 1], b[:, None, :, 1])
    return (hi - lo).clamp_min(0)


def uncovered_fraction(box1, flip1, box2, flip2, grid: int, mask1: torch.Tensor) -> torch.Tensor:
    """r[b, k, a, c]: fraction of view-2 cell (a, c) not covered by the view-1 cells selected in mask1[b, k].

    mask1: [B, K, G, G] (0/1, view 1's own frame). Returns [B, K, G, G] in view 2's own frame, in [0, 1].
    """
    box1, box2 = box1.float(), box2.float()
    oy = overlap_1d(cell_spans(box1, flip1, grid, 0), cell_spans(box2, flip2, grid, 0))  # [B, G1, G2] rows
    ox = overlap_1d(cell_spans(box1, flip1, grid, 1), cell_spans(box2, flip2, grid, 1))  # [B, G1, G2] cols
    covered = torch.einsum("bia,bkij,bjc->bkac", oy, mask1.float(), ox)                  # [B, K, G, G]
    inv_cell_area = (grid ** 2 / (box2[:, 2] * box2[:, 3]))[:, None, None, None]       # [B, 1, 1, 1]
    return covered.mul_(-inv_cell_area).add_(1.0).clamp_(0.0, 1.0)                     # 1 - covered / area


def gumbel(rng, n: int, *shape: int) -> torch.Tensor:
    """Standard Gumbel noise -log(-log(u)), u clamped to [1e-6, 1 - 1e-6]: values in [-2.63, 13.8]."""
    u = rng.rand(n, *shape).clamp_(1e-6, 1 - 1e-6)
    return u.log_().neg_().log_().neg_()


def sample_aps(box1, flip1, box2, flip2, grid: int, ratio: float, steps_per_batch: int, power: float,
               rng: BatchRandom = None):
    """Asymmetric patch sampling for a batch of view pairs.

    box1, box2: [B, 4] float (top, left, height, width) in source pixels; flip1, flip2: [B] bool.
    Returns idx1, idx2: [B, steps_per_batch, n] long, flat row-major cell indices in each view's own frame.
    rng (a utils.rng.BatchRandom on the boxes' device): where the random numbers come from; default the
    device's global generator.
    """
    B, L = box1.shape[0], grid * grid
    n = kept_per_view(L, ratio, steps_per_batch)
    device = box1.device
    rng = rng or BatchRandom.local(device)
    flip1, flip2 = flip1.to(device=device, dtype=torch.bool), flip2.to(device=device, dtype=torch.bool)

    # view 1: one permutation per pair, round t takes the t-th block of n cells
    perm = rng.rand(B, L).argsort(dim=1)                                                 # [B, L]
    idx1 = perm[:, :steps_per_batch * n].reshape(B, steps_per_batch, n)            # [B, K, n]
    mask1 = torch.zeros(B, steps_per_batch, L, device=device).scatter_(2, idx1, 1.0)     # [B, K, L]

    # view 2: r^power weights, Gumbel top-k = sampling without replacement (geometry in fp32, never autocast)
    with no_autocast(device):
        r = uncovered_fraction(box1, flip1, box2, flip2, grid, mask1.view(B, -1, grid, grid)).flatten(2)  # [B, K, L]
    # key = power * log(r) + Gumbel. Covered cells (r = 0) score below every uncovered one (power * log r >=
    # power * log eps, Gumbel in [-2.63, 13.8]) plus their own Gumbel noise, so they are drawn last and
    # uniformly among themselves: the fill for large ratios
    covered_score = -(12.0 * power + 20.0)
    key = torch.log(r.clamp_min(POSITIVE_EPS)).mul_(power)                              # [B, K, L]
    key = torch.where(r > POSITIVE_EPS, key, covered_score).add_(gumbel(rng, B, steps_per_batch, L))
    idx2 = key.topk(n, dim=2).indices                                                    # [B, K, n]
    return idx1, idx2


def covered_fraction_of(idx1, idx2, box1, flip1, box2, flip2, grid: int) -> torch.Tensor:
    """Mean covered fraction (1 - r) of each round's selected view-2 cells: [B, K]."""
    B, steps_per_batch, _ = idx1.shape
    mask1 = torch.zeros(B, steps_per_batch, grid * grid, device=idx1.device).scatter_(2, idx1, 1.0)
    r = uncovered_fraction(box1, flip1, box2, flip2, grid, mask1.view(B, steps_per_batch, grid, grid)).flatten(2)
    return 1.0 - r.gather(2, idx2).mean(dim=2)


def coverage_stats(box1, flip1, box2, flip2, grid, ratio, steps_per_batch, power) -> dict:
    """How much of view 2's kept area view 1 already saw: ours, the reference (flip ignored), uniform."""
    idx1, idx2 = sample_aps(box1, flip1, box2, flip2, grid, ratio, steps_per_batch, power)
    no_flip = torch.zeros_like(flip1, dtype=torch.bool)
    ref1, ref2 = sample_aps(box1, no_flip, box2, no_flip, grid, ratio, steps_per_batch, power)
    B, steps_per_batch, n = idx2.shape
    uni2 = torch.rand(B, steps_per_batch, grid * grid, device=box1.device).argsort(dim=2)[:, :, :n]
    cov = lambda i1, i2: covered_fraction_of(i1, i2, box1, flip1, box2, flip2, grid).mean().item()  # noqa: E731
    return {"aps": cov(idx1, idx2), "aps_flip_ignored": cov(ref1, ref2), "uniform": cov(idx1, uni2)}


def random_boxes(batch: int, src_size: int, scale=None):
    """Crop boxes and flips drawn like the training pipeline (RandomResizedCrop + flip p=0.5; scale: the APS
    view's, augment.recipes.APS_VIEW, unless given)."""
    img = torch.empty(3, src_size, src_size)
    scale = APS_VIEW.scale if scale is None else scale
    boxes = [torch.tensor(T.RandomResizedCrop.get_params(img, scale, APS_VIEW.ratio), dtype=torch.float32)
             for _ in range(2 * batch)]
    boxes = torch.stack(boxes).view(2, batch, 4)
    flips = torch.rand(2, batch) < 0.5
    return boxes[0], flips[0], boxes[1], flips[1]
