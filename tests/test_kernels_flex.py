"""FlexAttention fed the same layout: its BlockMask must mean exactly the layout's token mask.

Eager Flex (materialised scores) is fast on CPU; compiled Flex goes through Inductor, whose
first compile takes seconds, so it runs on one small case.
"""

import os

import torch

if not torch.cuda.is_available():
    # must precede the first import of triton (Inductor may import it)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from attnlab.kernels import (  # noqa: E402
    BlockSparseLayout,
    KernelInputError,
    attends,
    flex_block_mask,
    flex_mask_mod,
    reference_attention,
)
from attnlab.kernels.flex import flex_block_sparse_attention  # noqa: E402
from attnlab.kernels.synthetic import all_blocks, random_blocks, vertical_slash_blocks  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# eager Flex warns that it materialises the scores: that is what these small tests want
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def mixed_index(n_q, n_k, block, causal):
    generator = torch.Generator().manual_seed(n_q + n_k)
    kept = torch.stack([
        all_blocks(n_q, n_k, block),
        all_blocks(n_q, n_k, block),
        random_blocks(n_q, n_k, block, 0.4, generator=generator),
        vertical_slash_blocks(n_q, n_k, block, columns=[0, 2], diagonals=[0, 1]),
    ])  # fmt: skip
    return BlockSparseLayout.from_block_masks(
        kept, None, block_size=block, n_q=n_q, n_k=n_k, causal=causal,
        sink=[0, 4, 0, 0], window=[0, 24, 0, 0],
    )  # fmt: skip


def inputs(n_q, n_k, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, n_q, 16, generator=generator)
    k = torch.randn(2, 2, n_k, 16, generator=generator)
    v = torch.randn(2, 2, n_k, 16, generator=generator)
    return (x.to(DEVICE, dtype) for x in (q, k, v))


def test_block_mask_carries_the_same_blocks():
    index = mixed_index(100, 100, 16, causal=True)
    block_mask = flex_block_mask(index)
    listed, full = index.block_mask(), index.full_block_mask()
    assert block_mask.BLOCK_SIZE == (16, 16) and block_mask.seq_lengths == (100, 100)
    assert torch.equal(block_mask.full_kv_num_blocks[0], full.sum(-1).int())
    assert torch.equal(block_mask.kv_num_blocks[0], (listed & ~full).sum(-1).int())
    # the dense mask Flex derives (mask_mod over every pair) is the index's token mask
    dense = block_mask.to_dense()  # block level
    assert torch.equal(dense[0].bool(), listed)


@pytest.mark.parametrize(("n_q", "n_k", "causal"), [(150, 150, True), (40, 100, False), (100, 40, True)])
def test_eager_flex_matches_reference(n_q, n_k, causal):
    index = mixed_index(n_q, n_k, 16, causal).to(DEVICE)
    q, k, v = inputs(n_q, n_k)
    out, lse = flex_block_sparse_attention(q, k, v, index, compiled=False)
    gold_out, gold_lse = reference_attention(q, k, v, index.token_mask())
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out.double(), gold_out, atol=2e-6, rtol=0)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(gold_lse))
    finite = torch.isfinite(gold_lse)
    torch.testing.assert_close(lse.double()[finite], gold_lse[finite], atol=1e-5, rtol=0)


def test_compiled_flex_matches_reference():
    """Inductor compiles the Flex template for this index (a few seconds on CPU)."""
    n_q, n_k = 100, 100
    index = mixed_index(n_q, n_k, 16, causal=True).to(DEVICE)
    q, k, v = inputs(n_q, n_k)
    out, lse = flex_block_sparse_attention(q, k, v, index, compiled=True)
    gold_out, gold_lse = reference_attention(q, k, v, index.token_mask())
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), gold_out, atol=2e-6, rtol=0)
    if lse is not None:  # CPU Inductor cannot return it
        finite = torch.isfinite(gold_lse)
        torch.testing.assert_close(lse.double()[finite], gold_lse[finite], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_compiled_flex_keeps_compiling_past_dynamos_default_limit():
    """An eval over prompts of a dozen lengths compiles Flex once per length: past torch._dynamo's
    default of 8 it must not fall back to Flex's eager path (36-78x slower per call at 2k tokens on
    the CPU). With the fallback made an error, the ninth and tenth lengths still run compiled and
    exact, and the user's own limit is back afterwards."""
    import torch._dynamo

    with torch._dynamo.config.patch(recompile_limit=8, fail_on_recompile_limit_hit=True):
        for n in range(33, 43):
            index = mixed_index(n, n, 16, causal=True).to(DEVICE)
            q, k, v = inputs(n, n)
            out, _ = flex_block_sparse_attention(q, k, v, index, compiled=True)
            gold_out, _ = reference_attention(q, k, v, index.token_mask())
            torch.testing.assert_close(out.double(), gold_out, atol=2e-6, rtol=0)
        assert torch._dynamo.config.recompile_limit == 8


@pytest.mark.parametrize(("n_q", "n_k", "causal"), [(100, 100, True), (40, 100, False), (100, 40, True)])
def test_one_predicate_for_the_mask_flex_and_the_reference(n_q, n_k, causal):
    """The layout's token mask is block membership AND `attends`; Flex's mask_mod evaluates the
    same pairs, and the reference given the layout attends exactly those."""
    index = mixed_index(n_q, n_k, 16, causal)
    token_mask = index.token_mask()
    h, i, j = (torch.arange(x) for x in (index.n_heads, n_q, n_k))
    listed = index.block_mask()[h[:, None, None], (i // 16)[None, :, None], (j // 16)[None, None, :]]
    predicate = attends(
        (i + n_k - n_q)[None, :, None], j[None, None, :], n_k=n_k, causal=causal,
        sink=index.sink.long()[:, None, None], window=index.window.long()[:, None, None],
    )  # fmt: skip
    assert torch.equal(token_mask, listed & predicate)
    mask_mod = flex_mask_mod(index)
    flex_pairs = mask_mod(0, h[:, None, None], i[None, :, None], j[None, None, :])
    assert torch.equal(flex_pairs, token_mask)
    # the dense mask Flex derives from its BlockMask (mask_mod over the listed blocks)
    from torch.nn.attention.flex_attention import create_mask

    assert torch.equal(create_mask(mask_mod, 1, index.n_heads, n_q, n_k, device="cpu")[0], token_mask)
    # the reference given the layout attends exactly listed & attends: its log-sum-exp is that
    # of the scores over those pairs (GQA: query head h reads KV head h // 2)
    q, k, v = (x.double() for x in inputs(n_q, n_k))
    _, lse = reference_attention(q, k, v, index.to(DEVICE))
    scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) / 4.0
    expected = torch.logsumexp(scores.masked_fill(~(listed & predicate).to(DEVICE), -torch.inf), -1)
    torch.testing.assert_close(lse, expected)


# --- score variants: soft-capping, learned sinks, the model's own window ----------------------
def variant_index(n_q, n_k, causal, model_window):
    generator = torch.Generator().manual_seed(7)
    kept = torch.stack([
        all_blocks(n_q, n_k, 16),
        all_blocks(n_q, n_k, 16),
        random_blocks(n_q, n_k, 16, 0.5, generator=generator),
        vertical_slash_blocks(n_q, n_k, 16, columns=[0], diagonals=[1]),
    ])  # fmt: skip
    return BlockSparseLayout.from_block_masks(
        kept, None, block_size=16, n_q=n_q, n_k=n_k, causal=causal,
        sink=[0, 3, 0, 0], window=[0, 12, 0, 0], model_window=model_window,
    )  # fmt: skip


VARIANT_CASES = [
    pytest.param(100, 100, True, dict(softcap=2.0), 0, id="softcap"),
    pytest.param(100, 100, True, dict(sinks=True), 0, id="sinks"),
    pytest.param(100, 100, True, {}, 21, id="model_window"),
    pytest.param(100, 100, True, dict(softcap=3.0, sinks=True), 9, id="all"),
    pytest.param(40, 100, False, dict(softcap=3.0, sinks=True), 9, id="all-cache-noncausal"),
]


@pytest.mark.parametrize(("n_q", "n_k", "causal", "options", "model_window"), VARIANT_CASES)
def test_eager_flex_variants_match_reference(n_q, n_k, causal, options, model_window):
    index = variant_index(n_q, n_k, causal, model_window).to(DEVICE)
    q, k, v = inputs(n_q, n_k)
    q = q * 2  # scores of a few units: soft-capping at 2-3 really bites
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], device=DEVICE) if options.get("sinks") else None
    variants = dict(softcap=options.get("softcap"), sinks=sinks)
    out, lse = flex_block_sparse_attention(q, k, v, index, compiled=False, **variants)
    gold_out, gold_lse = reference_attention(q, k, v, index.token_mask(), **variants)
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out.double(), gold_out, atol=2e-6, rtol=0)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(gold_lse))  # real keys only, sink or not
    finite = torch.isfinite(gold_lse)
    torch.testing.assert_close(lse.double()[finite], gold_lse[finite], atol=1e-5, rtol=0)
    if model_window == 9:  # rows the window and the blocks leave empty: out 0
        assert (~finite).any() and (out[~finite] == 0).all()


def test_compiled_flex_variants_match_reference():
    """Compiled Flex: softcap through Inductor's score_mod; sinks (on the CPU: eager, which has the lse)."""
    n = 64
    index = variant_index(n, n, True, 21).to(DEVICE)
    q, k, v = inputs(n, n)
    q = q * 2
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], device=DEVICE)
    for variants in (dict(softcap=2.0), dict(softcap=2.0, sinks=sinks)):
        out, lse = flex_block_sparse_attention(q, k, v, index, compiled=True, **variants)
        gold_out, gold_lse = reference_attention(q, k, v, index.token_mask(), **variants)
        assert not out.isnan().any()
        torch.testing.assert_close(out.double(), gold_out, atol=2e-6, rtol=0)
        if lse is not None:
            finite = torch.isfinite(gold_lse)
            torch.testing.assert_close(lse.double()[finite], gold_lse[finite], atol=1e-5, rtol=0)
        elif variants.get("sinks") is not None:
            raise AssertionError("with sinks Flex must return the log-sum-exp it rescaled by")


def test_flex_mask_mod_carries_the_model_window():
    index = variant_index(60, 60, True, 9)
    token_mask = index.token_mask()
    h, i, j = (torch.arange(x) for x in (4, 60, 60))
    assert torch.equal(flex_mask_mod(index)(0, h[:, None, None], i[None, :, None], j[None, None, :]), token_mask)
    assert not (token_mask & ((i[:, None] - j[None, :]) >= 9)).any()
    from torch.nn.attention.flex_attention import create_mask

    assert torch.equal(create_mask(flex_mask_mod(index), 1, 4, 60, 60, device="cpu")[0], token_mask)


def test_flex_refuses_bad_variants():
    index = variant_index(32, 32, True, 0)
    q, k, v = inputs(32, 32)
    for bad in (dict(softcap=0.0), dict(softcap=float("nan")), dict(sinks=torch.zeros(2)),
                dict(sinks=torch.tensor([0.0, 0.0, float("inf"), 0.0]))):  # fmt: skip
        with pytest.raises(KernelInputError, match="softcap must be|sinks must be"):
            flex_block_sparse_attention(q, k, v, index, compiled=False, **bad)
