"""The APS sampler against a brute-force, per-cell rectangle-intersection reference."""
import math

import pytest
import torch

from samplers.aps import coverage_stats, kept_per_view, random_boxes, sample_aps, uncovered_fraction
from utils.rng import BatchRandom


def cell_rect(box, flip, grid, a, c):
    """Source-pixel rectangle (y0, y1, x0, x1) of cell (row a, col c) of a view, by hand."""
    top, left, h, w = [float(v) for v in box]
    col = grid - 1 - c if flip else c  # a flipped view's column c shows unflipped column G-1-c
    return (top + a * h / grid, top + (a + 1) * h / grid, left + col * w / grid, left + (col + 1) * w / grid)


def brute_force_r(box1, flip1, box2, flip2, grid, selected1):
    """r for every view-2 cell: 1 - sum of intersection areas with the selected view-1 cells / cell area."""
    sel = [(int(i) // grid, int(i) % grid) for i in selected1]
    r = torch.zeros(grid * grid, dtype=torch.float64)
    for a in range(grid):
        for c in range(grid):
            y0, y1, x0, x1 = cell_rect(box2, flip2, grid, a, c)
            covered = 0.0
            for (i, j) in sel:
                v0, v1, u0, u1 = cell_rect(box1, flip1, grid, i, j)
                covered += max(0.0, min(y1, v1) - max(y0, v0)) * max(0.0, min(x1, u1) - max(x0, u0))
            r[a * grid + c] = max(0.0, 1.0 - covered / ((y1 - y0) * (x1 - x0)))
    return r


def mask_of(idx, grid):
    B, K, _ = idx.shape
    return torch.zeros(B, K, grid * grid).scatter_(2, idx, 1.0).view(B, K, grid, grid)


CASES = {
    # name: (box1, flip1, box2, flip2)
    "partial overlap": ([3.0, 5.0, 20.0, 17.0], False, [10.0, 0.0, 22.0, 25.0], False),
    "view2 flipped": ([3.0, 5.0, 20.0, 17.0], False, [10.0, 0.0, 22.0, 25.0], True),
    "both flipped": ([0.0, 7.5, 24.5, 19.0], True, [4.0, 2.0, 28.0, 30.0], True),
    "same box, one flipped": ([2.0, 3.0, 20.0, 20.0], False, [2.0, 3.0, 20.0, 20.0], True),
    "disjoint": ([0.0, 0.0, 10.0, 10.0], False, [15.0, 15.0, 12.0, 12.0], True),
    "view2 inside view1": ([0.0, 0.0, 32.0, 32.0], True, [8.0, 6.0, 9.0, 13.0], False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_uncovered_fraction_matches_brute_force(case):
    b1, f1, b2, f2 = CASES[case]
    grid, n = 8, 20
    torch.manual_seed(0)
    sel = torch.stack([torch.randperm(grid * grid)[:n] for _ in range(3)])[None]  # [1, 3, n]
    r = uncovered_fraction(torch.tensor([b1]), torch.tensor([f1]), torch.tensor([b2]), torch.tensor([f2]),
                           grid, mask_of(sel, grid))
    for k in range(3):
        ref = brute_force_r(b1, f1, b2, f2, grid, sel[0, k])
        assert torch.allclose(r[0, k].flatten().double(), ref, atol=1e-5), case


def test_batched_sampler_uses_the_right_geometry_per_sample():
    torch.manual_seed(1)
    grid = 16
    box1, flip1, box2, flip2 = random_boxes(6, 32)
    idx1, idx2 = sample_aps(box1, flip1, box2, flip2, grid, 0.25, 4, 3.0)
    r = uncovered_fraction(box1, flip1, box2, flip2, grid, mask_of(idx1, grid))
    for b in range(6):
        for k in (0, 3):
            ref = brute_force_r(box1[b], bool(flip1[b]), box2[b], bool(flip2[b]), grid, idx1[b, k])
            assert torch.allclose(r[b, k].flatten().double(), ref, atol=1e-5)


def test_flip_changes_the_geometry():
    """Mirror-image crops: with the flip handled, view-2 column c lines up with view-1 column G-1-c."""
    grid = 4
    box = torch.tensor([[0.0, 0.0, 32.0, 32.0]])
    sel = torch.tensor([[[0, 4, 8, 12]]])  # view-1 column 0 (its left edge = source right edge, flipped)
    r = uncovered_fraction(box, torch.tensor([True]), box, torch.tensor([False]), grid, mask_of(sel, grid))
    r = r[0, 0]
    assert torch.all(r[:, 3] == 0) and torch.all(r[:, :3] == 1)


def test_output_shapes_and_view1_subsets_are_disjoint():
    torch.manual_seed(2)
    grid, K = 16, 4
    box1, flip1, box2, flip2 = random_boxes(32, 32)
    idx1, idx2 = sample_aps(box1, flip1, box2, flip2, grid, 0.25, K, 3.0)
    n = 64
    assert idx1.shape == idx2.shape == (32, K, n) and idx1.dtype == idx2.dtype == torch.long
    for b in range(32):
        # K * ratio = 1: the rounds partition the grid
        assert sorted(idx1[b].flatten().tolist()) == list(range(grid * grid))
        for k in range(K):
            assert len(set(idx2[b, k].tolist())) == n
    assert idx2.min() >= 0 and idx2.max() < grid * grid


def test_view2_never_takes_a_covered_cell_while_uncovered_ones_remain():
    torch.manual_seed(3)
    grid = 16
    box1, flip1, box2, flip2 = random_boxes(64, 32)
    idx1, idx2 = sample_aps(box1, flip1, box2, flip2, grid, 0.25, 4, 3.0)
    r = uncovered_fraction(box1, flip1, box2, flip2, grid, mask_of(idx1, grid)).flatten(2)
    picked = r.gather(2, idx2)
    n_pos = (r > 1e-5).sum(dim=2)                              # [B, K]
    enough = n_pos >= idx2.shape[2]
    assert torch.all(picked[enough] > 1e-5)


def test_large_power_picks_the_least_covered_cells():
    torch.manual_seed(4)
    grid = 8
    box1, flip1, box2, flip2 = random_boxes(16, 32)
    idx1, idx2 = sample_aps(box1, flip1, box2, flip2, grid, 0.25, 2, 1e4)
    r = uncovered_fraction(box1, flip1, box2, flip2, grid, mask_of(idx1, grid)).flatten(2)
    picked = r.gather(2, idx2)                                  # [B, K, n]
    unpicked = r.scatter(2, idx2, -1.0)
    assert torch.all(picked.min(dim=2).values >= unpicked.max(dim=2).values - 1e-4)


def test_first_draw_probability_is_proportional_to_r_to_the_power():
    """Gumbel top-k: the first view-2 cell is cell g with probability r_g^power / sum_h r_h^power."""
    torch.manual_seed(5)
    grid, power, B = 2, 2.0, 40000
    box1 = torch.tensor([[0.0, 0.0, 20.0, 24.0]]).expand(B, 4)
    box2 = torch.tensor([[6.0, 8.0, 26.0, 24.0]]).expand(B, 4)
    flip1 = torch.zeros(B, dtype=torch.bool)
    flip2 = torch.ones(B, dtype=torch.bool)
    idx1, idx2 = sample_aps(box1, flip1, box2, flip2, grid, 0.25, 1, power)
    r = uncovered_fraction(box1, flip1, box2, flip2, grid, mask_of(idx1, grid)).flatten(2)[:, 0]  # [B, 4]
    p = r ** power / (r ** power).sum(dim=1, keepdim=True)
    expected = p.mean(dim=0)
    observed = torch.nn.functional.one_hot(idx2[:, 0, 0], 4).float().mean(dim=0)
    assert torch.allclose(observed, expected, atol=0.01), (observed, expected)


@pytest.mark.parametrize("ratio", [1 / 256, 0.1, 0.3, 0.5, 0.6, 0.75, 0.9, 0.99])
def test_any_ratio_in_the_open_interval_works(ratio):
    torch.manual_seed(6)
    grid = 16
    n = math.floor(grid * grid * ratio + 1e-9)
    box1, flip1, box2, flip2 = random_boxes(8, 32)
    idx1, idx2 = sample_aps(box1, flip1, box2, flip2, grid, ratio, 1, 3.0)
    assert idx2.shape == (8, 1, n)
    for b in range(8):
        assert len(set(idx2[b, 0].tolist())) == n  # filled from covered cells without repeats


def test_ratio_0_9_fills_with_covered_cells_after_all_uncovered():
    torch.manual_seed(7)
    grid = 16
    box = torch.tensor([[0.0, 0.0, 32.0, 32.0]])
    f = torch.tensor([False])
    idx1, idx2 = sample_aps(box, f, box, f, grid, 0.9, 1, 3.0)  # same crop: exactly the unselected cells are free
    free = set(range(256)) - set(idx1[0, 0].tolist())
    assert free <= set(idx2[0, 0].tolist())


def test_bad_ratio_or_rounds_raise():
    with pytest.raises(ValueError, match="ratio"):
        kept_per_view(256, 0.0, 1)
    with pytest.raises(ValueError, match="ratio"):
        kept_per_view(256, 1.0, 1)
    with pytest.raises(ValueError, match="nsampling"):
        kept_per_view(256, 0.3, 4)
    assert kept_per_view(196, 0.25, 4) == 49


def test_coverage_statistics_match_spec():
    """Mean covered fraction of kept view-2 cells: about 0.04 with the flip fix vs about 0.17 uniform."""
    torch.manual_seed(8)
    stats = coverage_stats(*random_boxes(2048, 32), 16, 0.25, 4, 3.0)
    assert stats["aps"] < 0.06
    assert stats["uniform"] > 0.14
    assert stats["aps"] < stats["aps_flip_ignored"] < stats["uniform"]


def test_generator_makes_it_reproducible():
    boxes = random_boxes(4, 32)
    out = [sample_aps(*boxes, 16, 0.25, 4, 3.0, rng=BatchRandom("cpu").reseed(9)) for _ in range(2)]
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
