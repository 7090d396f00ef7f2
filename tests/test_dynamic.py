"""XAttention's antidiagonal scores and FlexPrefill's Jensen–Shannon choice on hand-made q/k
where the right answer is known, and against their definitions written as plain loops."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.sparsity_stats.dynamic import (
    antidiagonal_block_scores,
    fewest_reaching,
    flexprefill_query_aware,
    js_distance,
)


def loop_antidiagonal(q, k, block, stride):
    """The definition, one tile at a time (single head, n a multiple of the block size)."""
    n, d = q.shape
    tiles = n // stride
    logits = torch.full((tiles, tiles), -float("inf"))
    for i in range(tiles):
        for j in range(i + 1):
            logits[i, j] = sum(
                float(q[i * stride + stride - 1 - t] @ k[j * stride + t]) for t in range(stride)
            ) / (stride * math.sqrt(d))
    att = torch.softmax(logits, -1)
    per = block // stride
    nb = n // block
    out = torch.zeros(nb, nb)
    for qb in range(nb):
        for kb in range(nb):
            out[qb, kb] = att[qb * per:(qb + 1) * per, kb * per:(kb + 1) * per].sum()
    return out / out.sum(-1, keepdim=True)


@pytest.mark.parametrize("stride", [1, 2, 4])
def test_antidiagonal_scores_follow_the_definition(stride):
    g = torch.Generator().manual_seed(stride)
    q, k = torch.randn(2, 32, 8, generator=g), torch.randn(1, 32, 8, generator=g)
    got = antidiagonal_block_scores(q, k, 8, stride=stride)
    assert got.shape == (2, 4, 4)
    for h in range(2):
        torch.testing.assert_close(got[h], loop_antidiagonal(q[h], k[0], 8, stride), atol=1e-5, rtol=1e-4)
    assert torch.allclose(got.sum(-1), torch.ones(2, 4))
    assert (got.triu(1) == 0).all(), "no mass on future blocks"


def test_antidiagonal_scores_find_the_block_every_query_attends():
    n, d, block = 64, 16, 16
    q = torch.zeros(1, n, d)
    q[..., 0] = 4.0  # every query points along axis 0
    k = torch.zeros(1, n, d)
    k[0, 16:32, 0] = 4.0  # only key block 1 points there too
    scores = antidiagonal_block_scores(q, k, block, stride=4)
    assert scores[0, 1:, 1].min() > 0.9, "rows that can see block 1 put their mass on it"
    assert scores[0, 0, 0] == pytest.approx(1.0)


def test_ragged_lengths_and_bad_strides():
    q, k = torch.randn(1, 50, 8), torch.randn(1, 50, 8)
    scores = antidiagonal_block_scores(q, k, 16, stride=8)
    assert scores.shape == (1, 4, 4) and torch.isfinite(scores).all()
    assert torch.allclose(scores.sum(-1), torch.ones(1, 4))
    with pytest.raises(ValueError, match="divide the block size"):
        antidiagonal_block_scores(q, k, 16, stride=32)
    with pytest.raises(ValueError, match="stride must be one of"):
        antidiagonal_block_scores(q, k, 18, stride=3)


def test_js_distance_by_hand():
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    assert js_distance(p, p).item() == pytest.approx(0.0, abs=1e-6)
    disjoint = torch.tensor([[0.0, 0.0, 0.5, 0.5]])
    assert js_distance(p, disjoint).item() == pytest.approx(math.sqrt(math.log(2)), rel=1e-5)
    assert js_distance(p * 7, p).item() == pytest.approx(0.0, abs=1e-6), "unnormalised inputs are normalised"


def test_flexprefill_chooses_query_aware_only_when_the_estimate_agrees():
    blocks = torch.softmax(torch.randn(2, 4, 4), -1).tril()
    blocks = blocks / blocks.sum(-1, keepdim=True)
    vertical = torch.stack([blocks[0, -1] * 64, torch.tensor([0.0, 0.0, 0.0, 1.0])])
    choice = flexprefill_query_aware(vertical, blocks, delta=0.1)
    assert choice[0] and (not choice[1] or js_distance(vertical[1:], blocks[1:, -1]).item() < 0.1)


def test_fewest_reaching_by_hand():
    mass = torch.tensor([[0.05, 0.5, 0.3, 0.15]])
    assert fewest_reaching(mass, 0.8).tolist() == [[True, True, True, False]], "first forced, then 0.5, 0.3"
    assert fewest_reaching(mass, 0.8, force_first=False).tolist() == [[False, True, True, False]]
    assert fewest_reaching(mass, 1.0).all()
    assert fewest_reaching(torch.zeros(1, 3), 0.9).tolist() == [[True, False, False]]
