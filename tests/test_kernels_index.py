"""The layout contract and the dense reference, without the kernel (pure PyTorch, fast).

The token semantics of `BlockSparseLayout` are checked against a literal, loop-free
transcription of the definition, over random layouts, lengths, causal flags and
sink/window values; the reference against PyTorch's SDPA.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

from attnlab.kernels import BlockSparseLayout, KernelInputError, reference_attention
from attnlab.kernels.synthetic import causal_blocks, topk_blocks, vertical_slash_blocks


def definition_mask(kept, *, block_size, n_q, n_k, causal, sink, window):
    """The module docstring's semantics, literally: listed block AND bounds AND causal AND
    streaming, for every (head, i, j)."""
    i = torch.arange(n_q).reshape(1, -1, 1)
    j = torch.arange(n_k).reshape(1, 1, -1)
    qa = i + n_k - n_q
    listed = kept[:, i[0, :, 0] // block_size][:, :, j[0, 0] // block_size]
    sink = torch.as_tensor(sink).reshape(-1, 1, 1)
    window = torch.as_tensor(window).reshape(-1, 1, 1)
    ok = listed & (j < n_k) & ((window == 0) | (j < sink) | (qa - j < window))
    if causal:
        ok = ok & (j <= qa)
    return ok


CONFIGS = list(
    itertools.product(
        [16, 32],  # block size
        [(37, 37), (64, 64), (20, 90), (90, 20), (1, 50)],  # (n_q, n_k)
        [True, False],  # causal
        [(0, 0), (5, 12), (0, 17), (16, 16), (3, 40)],  # (sink, window)
    )
)


@pytest.mark.parametrize(("block", "lengths", "causal", "streaming"), CONFIGS)
def test_token_mask_and_full_blocks_follow_the_definition(block, lengths, causal, streaming):
    n_q, n_k = lengths
    sink, window = streaming
    generator = torch.Generator().manual_seed(block + n_q + n_k + sink + window)
    q_blocks, k_blocks = -(-n_q // block), -(-n_k // block)
    kept = torch.rand(3, q_blocks, k_blocks, generator=generator) < 0.7
    kept[2] = True
    params = dict(block_size=block, n_q=n_q, n_k=n_k, causal=causal)
    sinks, windows = [sink, 0, sink], [window, 0, window]
    index = BlockSparseLayout.from_block_masks(kept, None, **params, sink=sinks, window=windows)
    assert isinstance(index, BlockSparseLayout)
    index.validate()

    expected = definition_mask(kept, **params, sink=sinks, window=windows)
    assert torch.equal(index.token_mask(), expected)

    # every listed block holds an attended pair; every full block is attended throughout
    # and in bounds; no truly full kept block was left partial
    listed, full = index.block_mask(), index.full_block_mask()
    padded = torch.zeros(3, q_blocks * block, k_blocks * block, dtype=torch.bool)
    padded[:, :n_q, :n_k] = expected
    tiles = padded.reshape(3, q_blocks, block, k_blocks, block)
    any_pair = tiles.any(dim=(2, 4))
    every_pair = tiles.all(dim=(2, 4))
    assert torch.equal(listed, kept & any_pair)
    assert torch.equal(full, kept & every_pair)


def test_full_claims_are_demoted_not_trusted():
    n, block = 64, 16
    kept = torch.ones(1, 4, 4, dtype=torch.bool)
    index = BlockSparseLayout.from_block_masks(kept, kept, block_size=block, n_q=n, n_k=n, causal=True)
    listed, full = index.block_mask(), index.full_block_mask()
    assert torch.equal(full[0], torch.ones(4, 4, dtype=torch.bool).tril(-1))  # diagonal demoted
    assert torch.equal(listed[0], torch.ones(4, 4, dtype=torch.bool).tril())  # above dropped
    # with full=all-False, everything kept stays partial
    index = BlockSparseLayout.from_block_masks(kept, kept & False, block_size=block, n_q=n, n_k=n, causal=True)
    assert index.full_kv_index.numel() == 0 and index.kv_index.numel() == 10


def test_compressed_layout_is_csr_over_head_and_query_block():
    kept = torch.tensor([[[1, 0, 1], [0, 1, 1]], [[0, 0, 0], [1, 1, 0]]], dtype=torch.bool)
    index = BlockSparseLayout.from_block_masks(kept, None, block_size=16, n_q=32, n_k=48, causal=False)
    assert index.kv_count.dtype == torch.int32 and index.kv_count.shape == (2, 2)
    assert index.full_kv_count.tolist() == [[2, 2], [0, 2]]
    assert index.full_kv_offset.tolist() == [[0, 2], [4, 4]]
    assert index.full_kv_index.tolist() == [0, 2, 1, 2, 0, 1]
    assert index.kv_index.numel() == 0
    assert index.sink.tolist() == [0, 0] and index.window.tolist() == [0, 0]
    assert index.n_q_blocks == 2 and index.n_k_blocks == 3


def test_token_mask_refuses_huge_lengths():
    kept = torch.ones(1, 1, 1, dtype=torch.bool)
    index = BlockSparseLayout.from_block_masks(kept, None, block_size=128, n_q=128, n_k=128, causal=True)
    import dataclasses

    big = dataclasses.replace(index, n_q=1 << 15, n_k=1 << 15)
    with pytest.raises(KernelInputError, match="small test lengths"):
        big.token_mask()


def test_synthetic_layouts():
    causal = causal_blocks(40, 100, 16)
    assert causal.shape == (3, 7)
    # query block 0 holds absolute positions 60..75: key blocks 0..4
    assert causal[0].tolist() == [True] * 5 + [False] * 2
    vs = vertical_slash_blocks(64, 64, 16, columns=[0], diagonals=[0, 2])
    assert vs.tolist() == [
        [True, False, False, False],
        [True, True, False, False],
        [True, False, True, False],
        [True, True, False, True],
    ]
    allowed = torch.ones(4, 4, dtype=torch.bool).tril()
    scores = torch.arange(16.0).reshape(4, 4)
    top = topk_blocks(scores, allowed, 0.5)
    assert top.sum(-1).tolist() == [1, 1, 2, 2] and not (top & ~allowed).any()


def test_reference_matches_sdpa_with_gqa():
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 37, 16, generator=generator)
    k = torch.randn(2, 2, 37, 16, generator=generator)
    v = torch.randn(2, 2, 37, 16, generator=generator)
    causal = torch.ones(37, 37, dtype=torch.bool).tril()
    out, lse = reference_attention(q, k, v, causal)
    sdpa = F.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), is_causal=True, enable_gqa=True
    )
    assert out.dtype == torch.float64 and lse.shape == (2, 6, 37)
    torch.testing.assert_close(out, sdpa)
    scores = (q.double() @ k.double().repeat_interleave(3, 1).transpose(-1, -2)) / 4.0
    torch.testing.assert_close(lse, torch.logsumexp(scores.masked_fill(~causal, -torch.inf), -1))


def test_reference_empty_rows_are_zero_not_nan():
    q = torch.randn(1, 2, 5, 8)
    k = v = torch.randn(1, 1, 7, 8)
    mask = torch.ones(2, 5, 7, dtype=torch.bool)
    mask[1, 3] = False
    for dtype in (torch.float64, torch.float32, torch.float16):
        out, lse = reference_attention(q, k, v, mask, dtype=dtype)
        assert not out.isnan().any() and not lse.isnan().any()
        assert (out[0, 1, 3] == 0).all() and torch.isneginf(lse[0, 1, 3])
        assert torch.isfinite(lse[0, 0]).all()
    with pytest.raises(KernelInputError, match="broadcastable"):
        reference_attention(q, k, v, mask.float())


def test_kernels_is_a_leaf_package():
    """kernels/ imports nothing from the packages above it, not even inside functions: policies
    (sparsity_stats), probes, circuits, the app and the CLI façade. The attnlab core is below."""
    import ast
    from pathlib import Path

    import attnlab.kernels

    above = tuple(f"attnlab.{name}" for name in ("sparsity_stats", "probes", "circuits", "app", "cli"))
    package = Path(attnlab.kernels.__file__).parent
    files = sorted(package.glob("*.py"))
    assert files
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: stays inside the package only at level 1
                    assert node.level == 1, f"{path.name}: relative import above kernels"
                    continue
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name != "attnlab", f"{path.name} imports the attnlab façade: import the module itself"
                assert not any(name == up or name.startswith(up + ".") for up in above), (
                    f"{path.name} imports {name}: kernels/ must stay a leaf"
                )
