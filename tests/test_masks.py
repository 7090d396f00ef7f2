"""The mask compiler: layouts against token-level masks, CSR invariants, FlexAttention, speed."""

from __future__ import annotations

import time
import warnings

import pytest
import torch

from attnlab.kernels import BlockSparseLayout, KernelInputError
from attnlab.sparsity_stats import (
    Elastic,
    HeadPolicy,
    MaskError,
    Policy,
    compile_layer,
    compile_policy,
    estimate_block_scores,
    get_kind,
    head_patterns,
    prior_block_scores,
    token_mask,
)
from attnlab.sparsity_stats.errors import ExtrapolationWarning
from attnlab.sparsity_stats.kinds import BlockScores

ALL_KINDS = [
    ("dense", {}),
    ("streaming", {"sink": 4, "window": 11}),
    ("streaming", {"sink": 0, "window": {"alpha": 3, "beta": 0.1}}),
    ("a_shape", {"sink": 8, "window": 20}),
    ("vertical_slash", {"vertical": 16, "slash": 20}),
    ("block_topk", {"topk": 24}),
    ("block_topk", {"gamma": 0.7}),
]


def make_policy(entries, n_layers: int = 1, block_size: int = 8, n_kv_heads: int | None = None, n_ctx: int = 40000,
                profiled=(100,)) -> Policy:
    n_heads = len(entries)
    kv = n_kv_heads or n_heads
    model = {"name": "toy", "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": kv, "n_ctx": n_ctx}
    heads = []
    for lay in range(n_layers):
        for h, (kind, params) in enumerate(entries):
            heads.append(HeadPolicy(lay, h, h // (n_heads // kv), kind, get_kind(kind).validate(params, "test"), 0.9, 0.5))
    return Policy(model, block_size, heads, profiled_lengths=list(profiled))


def expected_token_mask(kind: str, params: dict, n: int, b: int) -> torch.Tensor:
    """Brute-force token masks from each kind's definition (prior scores for dynamic kinds)."""
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    causal = j <= i
    p = get_kind(kind).validate(params, "test")
    if kind == "dense":
        return causal
    if kind == "streaming":
        s, w = p["sink"].resolve(n), p["window"].resolve(n)
        return causal & ((j < s) | (i - j < w))
    if kind == "a_shape":
        sb, wb = -(-p["sink"].resolve(n) // b), -(-p["window"].resolve(n) // b)
        return causal & ((j // b < sb) | (i // b - j // b < wb))
    if kind == "vertical_slash":  # prior: the first columns and the nearest diagonals
        nv, ns = -(-p["vertical"].resolve(n) // b), -(-p["slash"].resolve(n) // b)
        return causal & ((j // b < nv) | (i // b - j // b < ns))
    raise AssertionError(kind)


@pytest.mark.parametrize("n,b", [(37, 8), (100, 16), (130, 8), (64, 16)])
def test_compiled_layout_equals_token_masks_for_every_kind(n, b):
    policy = make_policy(ALL_KINDS, block_size=b)
    lay = compile_layer(policy, 0, n).validate()
    tm = lay.token_mask()
    pats = head_patterns(policy, 0, n)
    for h, (kind, params) in enumerate(ALL_KINDS):
        assert torch.equal(tm[h], token_mask(pats[h], n, n)[0]), (kind, params)
        if kind != "block_topk":
            assert torch.equal(tm[h], expected_token_mask(kind, params, n, b)), (kind, params)
    # block_topk: diagonal and first block always kept, at most max(k, 2) blocks per row
    bm = lay.block_mask()
    nb = -(-n // b)
    for h in (5, 6):
        assert bm[h].diagonal().all() and bm[h][:, 0].all()
        assert not torch.triu(bm[h], 1).any()
    k = -(-24 // b)
    assert (bm[5].sum(-1) <= torch.clamp(torch.arange(1, nb + 1), max=max(2, k))).all()


def test_full_and_partial_blocks_follow_the_contract():
    n, b = 100, 16
    lay = compile_layer(make_policy(ALL_KINDS, block_size=b), 0, n)
    tm = lay.token_mask()
    full, part = lay.full_block_mask(), lay.partial_block_mask()
    nb = lay.n_q_blocks
    for h in range(lay.n_heads):
        for qb in range(nb):
            for kb in range(nb):
                tile = tm[h, qb * b : (qb + 1) * b, kb * b : (kb + 1) * b]
                in_bounds = (qb + 1) * b <= n and (kb + 1) * b <= n
                if full[h, qb, kb]:
                    assert in_bounds and tile.all()
                elif part[h, qb, kb]:
                    assert tile.any()  # no empty tile is listed
                    assert not (in_bounds and tile.all())  # a fully attending in-bounds tile is listed as full
                else:
                    assert not tile.any()


def test_csr_arrays_have_the_kernel_contract():
    lay = compile_layer(make_policy(ALL_KINDS, block_size=8), 0, 77)
    h, qb = lay.n_heads, lay.n_q_blocks
    for name in ("full_kv_count", "full_kv_offset", "kv_count", "kv_offset"):
        t = getattr(lay, name)
        assert t.dtype == torch.int32 and tuple(t.shape) == (h, qb)
    for name in ("full_kv_index", "kv_index", "sink", "window"):
        assert getattr(lay, name).dtype == torch.int32
    assert lay.sink.tolist() == [0, 4, 0, 0, 0, 0, 0]
    assert lay.window.tolist() == [0, 11, 3 + 8, 0, 0, 0, 0]  # 3 + 0.1 * 77 -> 11
    # row (h, qb) lists its blocks at [offset, offset + count), ascending
    bm = lay.block_mask()
    for hh in range(h):
        for r in range(qb):
            o, c = int(lay.kv_offset[hh, r]), int(lay.kv_count[hh, r])
            fo, fc = int(lay.full_kv_offset[hh, r]), int(lay.full_kv_count[hh, r])
            row = sorted(lay.kv_index[o : o + c].tolist() + lay.full_kv_index[fo : fo + fc].tolist())
            assert row == torch.nonzero(bm[hh, r]).flatten().tolist()
    broken = compile_layer(make_policy(ALL_KINDS, block_size=8), 0, 77)
    broken.kv_index = broken.kv_index.flip(0)
    with pytest.raises(KernelInputError, match="not strictly ascending"):
        broken.validate()


def test_density_counts_kept_causal_blocks():
    n, b = 100, 16
    lay = compile_layer(make_policy(ALL_KINDS, block_size=b), 0, n)
    nb = -(-n // b)
    causal_blocks = nb * (nb + 1) // 2
    assert lay.causal_blocks() == causal_blocks
    assert torch.allclose(lay.density, lay.block_mask().sum((-1, -2)).double() / causal_blocks)
    assert lay.density[0] == 1.0
    causal_pairs = n * (n + 1) / 2
    assert torch.allclose(lay.token_density(), lay.token_mask().sum((-1, -2)).double() / causal_pairs)


def test_from_block_mask_round_trips_and_handles_decode_queries():
    lay = compile_layer(make_policy(ALL_KINDS, block_size=8), 0, 61)
    again = BlockSparseLayout.from_block_masks(lay.block_mask(), block_size=8, n_q=61, n_k=61, sink=lay.sink, window=lay.window)
    assert again.equals(lay)
    # the last 16 queries of a 48-token sequence (n_q < n_k): absolute query i + 32
    bm = torch.zeros(1, 2, 6, dtype=torch.bool)
    bm[0, :, 0] = True
    bm[0, 1, 5] = True
    dec = BlockSparseLayout.from_block_masks(bm, block_size=8, n_q=16, n_k=48).validate()
    i = torch.arange(16)[:, None] + 32
    j = torch.arange(48)[None, :]
    listed = bm[0][torch.arange(16)[:, None] // 8, j // 8]
    assert torch.equal(dec.token_mask()[0], listed & (j <= i))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_block_mask_matches_layout_and_dense_reference():
    from torch.nn.attention.flex_attention import flex_attention

    n, b = 80, 16
    lay = compile_layer(make_policy(ALL_KINDS, block_size=b), 0, n)
    bm = lay.to_flex_block_mask()
    assert torch.equal(bm.to_dense()[0].bool(), lay.block_mask())
    assert torch.equal(bm.full_kv_num_blocks[0], lay.full_kv_count)
    torch.manual_seed(0)
    h = lay.n_heads
    q, k, v = (torch.randn(1, h, n, 16) for _ in range(3))
    out = flex_attention(q, k, v, block_mask=bm)
    scores = (q @ k.transpose(-1, -2)) / 4.0
    ref = torch.softmax(scores.masked_fill(~lay.token_mask()[None], -float("inf")), -1) @ v
    assert torch.allclose(out, ref, atol=1e-5)


def test_dynamic_heads_follow_estimated_scores():
    n, b, d = 96, 16, 8
    torch.manual_seed(1)
    policy = make_policy([("vertical_slash", {"vertical": 32, "slash": 16}), ("block_topk", {"topk": 32}), ("dense", {})], block_size=b)
    q = torch.randn(3, n, d)
    k = torch.randn(3, n, d)
    k[:, 37] = q.mean(1) * 40  # a key every query attends: its column (block 2) should be chosen
    scores = estimate_block_scores(q, k, b, last_q=16)
    assert int(scores.vertical[0, 1:].argmax()) + 1 == 37 // b
    lay = compile_layer(policy, 0, n, scores=scores).validate()
    pats = head_patterns(policy, 0, n, scores=scores)
    for h in range(3):
        assert torch.equal(lay.token_mask()[h], token_mask(pats[h], n, n)[0])
    bm = lay.block_mask()
    assert bm[0][2:, 37 // b].all()  # chosen column kept in every later row
    assert bm[0][:, 0].all() and bm[0].diagonal().all()
    assert (bm[1].sum(-1) <= 2).all() and bm[1].diagonal().all()
    # GQA: 3 query heads over 1 KV head
    s2 = estimate_block_scores(q, k[:1], b)
    assert s2.vertical.shape == (3, 6) and s2.blocks.shape == (3, 6, 6)
    with pytest.raises(MaskError, match="scores for layer 0"):
        compile_layer(policy, 0, n + 16, scores=scores)


def test_prior_scores_make_dynamic_heads_local():
    s = prior_block_scores(64, 8, n_heads=2)
    assert isinstance(s, BlockScores) and s.blocks.shape == (2, 8, 8)
    assert torch.allclose(s.blocks[0].sum(-1), torch.ones(8))


@pytest.mark.parametrize("bad", [48, 0, -16, 3])
def test_block_size_must_be_a_power_of_two(bad):
    with pytest.raises(MaskError, match="power of two"):
        compile_layer(make_policy(ALL_KINDS), 0, 64, block_size=bad)


def test_sequence_length_is_checked():
    pol = make_policy(ALL_KINDS, n_ctx=256)
    with pytest.raises(MaskError, match="beyond the model's context of 256"):
        compile_policy(pol, 512)
    with pytest.raises(MaskError, match="positive"):
        compile_policy(pol, 0)
    with pytest.raises(MaskError, match="layer 3 is out of range"):
        compile_layer(pol, 3, 64)


def test_far_lengths_warn_about_extrapolation():
    pol = make_policy(ALL_KINDS, profiled=(100,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compile_policy(pol, 180)  # within 2x: quiet
    with pytest.warns(ExtrapolationWarning, match="far outside the profiled lengths"):
        compile_policy(pol, 1000)


def test_elastic_sizes_scale_with_length():
    e = Elastic(64, 0.125)
    assert e.resolve(1024) == 192 and e.resolve(8192) == 1088
    assert e.resolve(32) == 32  # capped at the sequence
    assert e.blocks(1000, 64) == -(-189 // 64)
    lay_short = compile_layer(make_policy([("streaming", {"sink": 4, "window": {"alpha": 0, "beta": 0.25}})]), 0, 64)
    lay_long = compile_layer(make_policy([("streaming", {"sink": 4, "window": {"alpha": 0, "beta": 0.25}})]), 0, 256)
    assert lay_short.window.tolist() == [16] and lay_long.window.tolist() == [64]


def test_compile_32k_all_heads_fast_with_kept_block_memory():
    """30 layers x 9 heads at 32k tokens, block 64: the issue's target is under 2 s; the bound
    here leaves room for a loaded CI machine. Index memory must be O(kept blocks)."""
    entries = [("dense", {}), ("streaming", {"sink": 4, "window": 1024}), ("a_shape", {"sink": 64, "window": 2048}),
               ("vertical_slash", {"vertical": 1024, "slash": 2048}), ("block_topk", {"topk": 4096}),
               ("streaming", {"sink": 64, "window": 256}), ("a_shape", {"sink": 64, "window": 512}),
               ("vertical_slash", {"vertical": 256, "slash": 512}), ("block_topk", {"gamma": 0.9})]
    pol = make_policy(entries, n_layers=30, block_size=64, n_kv_heads=3, profiled=(32768,))
    t0 = time.perf_counter()
    layouts = compile_policy(pol, 32768)
    elapsed = time.perf_counter() - t0
    assert len(layouts) == 30
    assert elapsed < 8.0, f"compile took {elapsed:.2f} s"
    qb = 512
    for lay in layouts[:2]:
        kept = int(lay.kept_blocks().sum())
        assert lay.nbytes == 4 * (kept + 4 * lay.n_heads * qb + 2 * lay.n_heads)
    sparse = sum(int(lay.kept_blocks()[1:].sum()) for lay in layouts)
    assert sparse < 0.2 * 8 * 30 * qb * (qb + 1) // 2  # the sparse heads keep a small share


def test_compile_for_input_uses_the_layer_rule():
    from attnlab.sparsity_stats import compile_for_input, estimate_layer_scores

    n, b = 64, 16
    pol = make_policy([("vertical_slash", {"vertical": 32, "slash": 16, "estimate": {"rule": "last_q", "last_q": 8}}),
                       ("streaming", {"sink": 4, "window": 8})], block_size=b)
    torch.manual_seed(3)
    q, k = torch.randn(2, n, 8), torch.randn(1, n, 8)
    s = estimate_layer_scores(pol, 0, q, k)
    assert torch.allclose(s.vertical, estimate_block_scores(q, k, b, last_q=8).vertical)
    lay = compile_for_input(pol, 0, q, k)
    assert lay.equals(compile_layer(pol, 0, n, scores=s))
