"""The pattern vocabulary: every predicate and composition against brute-force token masks."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from attnlab.sparsity_stats.patterns import (
    and_masks,
    generate_blocks,
    generate_causal,
    generate_dense,
    generate_sink,
    generate_slash,
    generate_vertical,
    generate_window,
    named,
    on_blocks,
    or_masks,
    per_head,
    token_mask,
)


def brute(rule, n_q: int, n_k: int) -> torch.Tensor:
    """A token mask from a plain Python rule over absolute positions (query i sits at i + n_k - n_q)."""
    off = n_k - n_q
    return torch.tensor([[bool(rule(i + off, j)) for j in range(n_k)] for i in range(n_q)])


PRIMITIVES = [
    (generate_causal(), lambda q, k: k <= q),
    (generate_dense(), lambda q, k: True),
    (generate_sink(3), lambda q, k: k < 3),
    (generate_sink(0), lambda q, k: False),
    (generate_window(4), lambda q, k: q - k < 4),
    (generate_vertical([0, 5, 7, 5]), lambda q, k: k in (0, 5, 7)),
    (generate_vertical([]), lambda q, k: False),
    (generate_slash([0, 2, 5]), lambda q, k: q - k in (0, 2, 5)),
    (generate_blocks([(1, 0), (4, 2), (12, 12)]), lambda q, k: (q, k) in {(1, 0), (4, 2), (12, 12)}),
]


@pytest.mark.parametrize("pattern,rule", PRIMITIVES, ids=[p.name for p, _ in PRIMITIVES])
@pytest.mark.parametrize("n_q,n_k", [(13, 13), (5, 13)])
def test_primitive_token_mask_matches_brute_force(pattern, rule, n_q, n_k):
    assert torch.equal(token_mask(pattern, n_q, n_k)[0], brute(rule, n_q, n_k))


def test_compositions_match_set_logic():
    c, s, w = generate_causal(), generate_sink(2), generate_window(3)
    v, sl = generate_vertical([6]), generate_slash([5])
    streaming = and_masks(c, or_masks(s, w))
    assert torch.equal(token_mask(streaming, 11, 11)[0], brute(lambda q, k: k <= q and (k < 2 or q - k < 3), 11, 11))
    vs = and_masks(c, or_masks(v, sl))
    assert torch.equal(token_mask(vs, 11, 11)[0], brute(lambda q, k: k <= q and (k == 6 or q - k == 5), 11, 11))
    # operators and renaming keep the predicate
    assert torch.equal(token_mask(c & (s | w), 9, 9), token_mask(streaming, 9, 9))
    renamed = named(streaming, "streaming_sink2_window3")
    assert renamed.name == "streaming_sink2_window3"
    assert torch.equal(token_mask(renamed, 9, 9), token_mask(streaming, 9, 9))


def test_on_blocks_lifts_block_predicates():
    b = 4
    lifted = on_blocks(or_masks(generate_vertical([0]), generate_slash([0, 2])), b)
    rule = lambda q, k: k // b == 0 or (q // b - k // b) in (0, 2)  # noqa: E731
    assert torch.equal(token_mask(lifted, 19, 19)[0], brute(rule, 19, 19))
    a_shape = and_masks(generate_causal(), on_blocks(or_masks(generate_sink(1), generate_window(2)), b))
    rule = lambda q, k: k <= q and (k // b < 1 or q // b - k // b < 2)  # noqa: E731
    assert torch.equal(token_mask(a_shape, 19, 19)[0], brute(rule, 19, 19))


def test_blocks_from_a_bool_table():
    table = torch.zeros(3, 3, dtype=torch.bool)
    table[2, 0] = table[1, 1] = True
    p = generate_blocks(table)
    assert torch.equal(token_mask(p, 3, 3)[0], table)
    assert p.name == "blocks_2"


def test_per_head_dispatches_on_head():
    pats = [generate_sink(1), generate_window(1), and_masks(generate_causal(), generate_slash([1]))]
    mask = token_mask(per_head(pats), 7, 7, n_heads=3)
    for h, p in enumerate(pats):
        assert torch.equal(mask[h], token_mask(p, 7, 7)[0])


def _rect_truth(pattern, q_lo, q_hi, k_lo, k_hi):
    q = torch.arange(q_lo, q_hi + 1)[:, None]
    k = torch.arange(k_lo, k_hi + 1)[None, :]
    m = pattern(torch.tensor(0), q, k).expand(q.shape[0], k.shape[1])
    return bool(m.any()), bool(m.all())


def _random_rects(count: int, size: int, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(count):
        q_lo, k_lo = rng.randrange(size), rng.randrange(size)
        yield q_lo, q_lo + rng.randrange(6), k_lo, k_lo + rng.randrange(6)


@pytest.mark.parametrize("pattern,rule", PRIMITIVES, ids=[p.name for p, _ in PRIMITIVES])
def test_primitive_rectangles_are_exact(pattern, rule):
    for q_lo, q_hi, k_lo, k_hi in _random_rects(150, 16):
        got = pattern.rect(torch.tensor(0), torch.tensor(q_lo), torch.tensor(q_hi), torch.tensor(k_lo), torch.tensor(k_hi))
        assert (bool(got[0]), bool(got[1])) == _rect_truth(pattern, q_lo, q_hi, k_lo, k_hi), (q_lo, q_hi, k_lo, k_hi)


def test_lifted_rectangles_are_exact():
    lifted = on_blocks(or_masks(generate_vertical([1]), generate_slash([0, 3])), 4)
    for q_lo, q_hi, k_lo, k_hi in _random_rects(200, 40, seed=1):
        got = lifted.rect(torch.tensor(0), torch.tensor(q_lo), torch.tensor(q_hi), torch.tensor(k_lo), torch.tensor(k_hi))
        truth_any, truth_all = _rect_truth(lifted, q_lo, q_hi, k_lo, k_hi)
        assert bool(got[0]) == truth_any
        # `all` of an or_masks may miss a union that covers the rectangle, never claim one that does not
        assert not bool(got[1]) or truth_all


def test_composed_rectangles_are_sound():
    comps = [
        and_masks(generate_causal(), or_masks(generate_sink(3), generate_window(5))),
        and_masks(generate_vertical([2, 3]), generate_slash([1, 2, 3])),
        or_masks(generate_window(2), generate_blocks([(9, 1)])),
    ]
    for p in comps:
        for q_lo, q_hi, k_lo, k_hi in _random_rects(200, 14, seed=2):
            got_any, got_all = (bool(x) for x in p.rect(torch.tensor(0), torch.tensor(q_lo), torch.tensor(q_hi), torch.tensor(k_lo), torch.tensor(k_hi)))
            truth_any, truth_all = _rect_truth(p, q_lo, q_hi, k_lo, k_hi)
            assert got_any or not truth_any  # never drops a rectangle that has a passing pair
            assert truth_all or not got_all  # never calls a rectangle full that is not


def test_streaming_rectangles_exact_on_tiles():
    # the case the compiler relies on: causal & (sink | window) over block tiles
    p = and_masks(generate_causal(), or_masks(generate_sink(4), generate_window(10)))
    b = 4
    for qb, kb in itertools.product(range(8), range(8)):
        q_lo, q_hi, k_lo, k_hi = qb * b, qb * b + b - 1, kb * b, kb * b + b - 1
        got_any, _ = (bool(x) for x in p.rect(torch.tensor(0), torch.tensor(q_lo), torch.tensor(q_hi), torch.tensor(k_lo), torch.tensor(k_hi)))
        assert got_any == _rect_truth(p, q_lo, q_hi, k_lo, k_hi)[0]


def test_mask_mod_builds_a_flex_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    p = and_masks(generate_causal(), or_masks(generate_sink(4), generate_window(20)))
    bm = create_block_mask(p.mask_mod(), 1, 1, 64, 64, device="cpu", BLOCK_SIZE=16)
    dense = bm.to_dense()[0, 0].bool()
    truth = token_mask(p, 64, 64)[0].reshape(4, 16, 4, 16).any(3).any(1)
    assert torch.equal(dense, truth)


def test_draw_shows_the_mask():
    art = generate_window(2).draw(4).splitlines()
    assert art[0] == "window_2"
    assert art[1:] == ["████", "████", "·███", "··██"]  # q - k < 2 also admits every future key


@pytest.mark.parametrize("make", [lambda: generate_sink(-1), lambda: generate_window(-2), lambda: generate_vertical([-1]),
                                  lambda: generate_slash([3, -4]), lambda: generate_blocks([(0, -1)]), lambda: on_blocks(generate_dense(), 0)])
def test_negative_sizes_are_rejected(make):
    with pytest.raises(ValueError):
        make()
