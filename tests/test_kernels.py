"""The block-sparse Triton kernel against the fp64 dense reference.

Convention (FlashAttention's tests): the kernel's max error against the fp64 reference may be
at most 2x that of the same-dtype PyTorch reference, plus a tiny absolute floor where both
are at rounding level; any NaN fails. Without CUDA the kernel runs under the Triton
interpreter (switched on below, before triton is imported), so shapes stay small; with CUDA
the same tests run natively (device "cuda", marked ``gpu``).
"""

import os

import torch

if not torch.cuda.is_available():
    # must precede the first import of triton / attnlab.kernels.block_sparse
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses  # noqa: E402
import re  # noqa: E402
import string  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from attnlab.kernels import (  # noqa: E402
    BlockSparseLayout,
    KernelInputError,
    block_sparse_attention,
    reference_attention,
)
from attnlab.kernels import block_sparse as bs  # noqa: E402
from attnlab.kernels import layout as ix  # noqa: E402
from attnlab.kernels.synthetic import (  # noqa: E402
    all_blocks,
    no_blocks,
    random_blocks,
    vertical_slash_blocks,
)

CUDA = torch.cuda.is_available()
DEVICES = (
    [pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")]
    if CUDA
    else [pytest.param("cpu", id="cpu-interpreter")]
)
# bf16 only where it runs natively: the interpreter multiplies its bit patterns.
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
] + ([pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.gpu)] if CUDA else [])
FP = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
# Where the kernel and the same-dtype reference both sit at rounding level (fp32: ~1e-7),
# "2x" is noise; this floor keeps the test about bugs, not about ulps.
ABS_FLOOR = {torch.float32: 2e-6, torch.float16: 1e-5, torch.bfloat16: 1e-4}
LSE_FLOOR = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def qkv(batch, q_heads, kv_heads, n_q, n_k, head_dim, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def draw(heads, n):
        return torch.randn(batch, heads, n, head_dim, generator=generator).to(device, dtype)

    return draw(q_heads, n_q), draw(kv_heads, n_k), draw(kv_heads, n_k)


def assert_matches_reference(q, k, v, index, out, lse, *, scale=None, softcap=None, sinks=None):
    """The FlashAttention acceptance rule, for the output and the log-sum-exp."""
    mask = index.token_mask().to(q.device)
    variants = dict(scale=scale, softcap=softcap, sinks=sinks)
    gold_out, gold_lse = reference_attention(q, k, v, mask, dtype=torch.float64, **variants)
    same_out, same_lse = reference_attention(q, k, v, mask, dtype=q.dtype, **variants)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    assert not torch.isnan(out).any(), "NaN in the kernel output"
    assert not torch.isnan(lse).any(), "NaN in the kernel log-sum-exp"
    assert not torch.isposinf(lse).any()

    err = (out.double() - gold_out).abs().max().item()
    same_err = (same_out.double() - gold_out).abs().max().item()
    bound = 2 * same_err + ABS_FLOOR[q.dtype]
    assert err <= bound, f"out error {err:.3g} > 2 x same-dtype error {same_err:.3g} + floor"

    empty = torch.isneginf(gold_lse)
    assert torch.equal(torch.isneginf(lse), empty), "lse -inf rows differ from the reference"
    assert (out[empty] == 0).all(), "rows with no attended key must be exactly 0"
    if (~empty).any():
        lse_err = (lse.double() - gold_lse)[~empty].abs().max().item()
        same_lse_err = (same_lse.double() - gold_lse)[~empty].abs().max().item()
        assert lse_err <= 2 * same_lse_err + LSE_FLOOR[q.dtype], f"lse error {lse_err:.3g}"


def stack_heads(*layouts):
    return torch.stack(list(layouts))


# --- correctness ------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 63, 65, 113])
def test_all_dense_causal_matches_sdpa(device, dtype, n):
    block = 32
    q, k, v = qkv(1, 2, 2, n, n, 32, dtype, device, seed=n)
    kept = all_blocks(n, n, block).expand(2, -1, -1)
    index = BlockSparseLayout.from_block_masks(kept, None, block_size=block, n_q=n, n_k=n, causal=True)
    out, lse = block_sparse_attention(q, k, v, index)
    assert_matches_reference(q, k, v, index, out, lse)

    # and the index's token mask really is causal attention: compare with PyTorch's SDPA
    sdpa = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    same = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    err = (out.double() - sdpa).abs().max().item()
    assert err <= 2 * (same.double() - sdpa).abs().max().item() + ABS_FLOOR[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FP)
def test_length_1023_sparse_causal(device, dtype):
    n, block = 1023, 64
    q, k, v = qkv(1, 1, 1, n, n, 16, dtype, device, seed=7)
    kept = random_blocks(n, n, block, 0.5, generator=torch.Generator().manual_seed(1))
    kept |= torch.eye(*kept.shape, dtype=torch.bool)  # keep the diagonal: no empty rows
    index = BlockSparseLayout.from_block_masks(kept[None], None, block_size=block, n_q=n, n_k=n, causal=True)
    out, lse = block_sparse_attention(q, k, v, index)
    assert_matches_reference(q, k, v, index, out, lse)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block", [16, 32, 64, 128])
def test_every_block_size(device, block):
    n = 130  # ragged for every block size
    q, k, v = qkv(1, 2, 1, n, n, 16, torch.float32, device, seed=block)
    generator = torch.Generator().manual_seed(block)
    kept = stack_heads(
        random_blocks(n, n, block, 0.6, generator=generator), all_blocks(n, n, block)
    )
    index = BlockSparseLayout.from_block_masks(kept, None, block_size=block, n_q=n, n_k=n, causal=False)
    out, lse = block_sparse_attention(q, k, v, index)
    assert_matches_reference(q, k, v, index, out, lse)


def heterogeneous_index(n_q, n_k, block, *, causal=True, seed=0):
    """Four head types in one index: dense, streaming, random block-sparse, vertical-slash."""
    generator = torch.Generator().manual_seed(seed)
    kept = stack_heads(
        all_blocks(n_q, n_k, block),  # dense
        all_blocks(n_q, n_k, block),  # streaming: the sink/window predicate prunes it
        random_blocks(n_q, n_k, block, 0.4, generator=generator),
        vertical_slash_blocks(n_q, n_k, block, columns=[0, 2], diagonals=[0, 1]),
    )
    return BlockSparseLayout.from_block_masks(
        kept, None, block_size=block, n_q=n_q, n_k=n_k, causal=causal,
        sink=[0, 4, 0, 0], window=[0, 24, 0, 0],
    )  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_heterogeneous_heads_in_one_launch(device, dtype):
    n, block = 150, 16
    index = heterogeneous_index(n, n, block)
    # every kind is really there: streaming has partial blocks off the diagonal, the random
    # head lists fewer blocks than the dense one
    per_head = index.kept_blocks()
    assert per_head[2] < per_head[0] and per_head[1] < per_head[0]
    q, k, v = qkv(2, 4, 2, n, n, 32, dtype, device, seed=3)
    out, lse = block_sparse_attention(q, k, v, index)
    assert_matches_reference(q, k, v, index, out, lse)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("q_heads", "kv_heads"), [(2, 2), (3, 1), (6, 2), (4, 1)])
def test_gqa_groups(device, q_heads, kv_heads):
    n, block = 70, 32
    generator = torch.Generator().manual_seed(q_heads)
    kept = torch.stack([random_blocks(n, n, block, 0.7, generator=generator) for _ in range(q_heads)])
    index = BlockSparseLayout.from_block_masks(kept, None, block_size=block, n_q=n, n_k=n, causal=True)
    q, k, v = qkv(1, q_heads, kv_heads, n, n, 16, torch.float32, device, seed=q_heads)
    out, lse = block_sparse_attention(q, k, v, index)
    assert_matches_reference(q, k, v, index, out, lse)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FP)
@pytest.mark.parametrize(
    ("n_q", "n_k", "causal"),
    [(40, 100, True), (40, 100, False), (1, 77, True), (100, 40, True)],
)
def test_queries_over_a_cache(device, dtype, n_q, n_k, causal):
    """Nq != Nk: query i sits at absolute position i + Nk - Nq."""
    block = 16
    index = heterogeneous_index(n_q, n_k, block, causal=causal, seed=n_q)
    q, k, v = qkv(1, 4, 4, n_q, n_k, 16, dtype, device, seed=n_k)
    out, lse = block_sparse_attention(q, k, v, index)
    assert_matches_reference(q, k, v, index, out, lse)
    if n_q > n_k and causal:
        # the first n_q - n_k queries precede every key: empty rows inside partial blocks
        assert torch.isneginf(lse[:, :, : n_q - n_k]).all()
        assert (out[:, :, : n_q - n_k] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FP)
def test_density_zero_and_one_heads(device, dtype):
    n, block = 90, 32
    kept = stack_heads(no_blocks(n, n, block), all_blocks(n, n, block))
    index = BlockSparseLayout.from_block_masks(kept, None, block_size=block, n_q=n, n_k=n, causal=False)
    assert index.kept_blocks().tolist() == [0, 9]
    q, k, v = qkv(1, 2, 1, n, n, 16, dtype, device)
    out, lse = block_sparse_attention(q, k, v, index)
    assert (out[:, 0] == 0).all() and torch.isneginf(lse[:, 0]).all()
    assert torch.isfinite(lse[:, 1]).all()
    assert_matches_reference(q, k, v, index, out, lse)


@pytest.mark.parametrize("device", DEVICES)
def test_query_block_with_no_kept_block(device):
    n, block = 96, 32
    kept = all_blocks(n, n, block).clone()
    kept[1] = False  # query block 1 keeps nothing
    index = BlockSparseLayout.from_block_masks(kept[None], None, block_size=block, n_q=n, n_k=n, causal=True)
    q, k, v = qkv(1, 1, 1, n, n, 16, torch.float32, device)
    out, lse = block_sparse_attention(q, k, v, index)
    assert (out[:, :, 32:64] == 0).all() and torch.isneginf(lse[:, :, 32:64]).all()
    assert torch.isfinite(lse[:, :, :32]).all() and torch.isfinite(lse[:, :, 64:]).all()
    assert_matches_reference(q, k, v, index, out, lse)


@pytest.mark.parametrize("device", DEVICES)
def test_non_causal_streaming_and_custom_scale(device):
    n, block = 81, 16
    kept = stack_heads(all_blocks(n, n, block), vertical_slash_blocks(n, n, block, columns=[4], diagonals=[0]))
    index = BlockSparseLayout.from_block_masks(
        kept, None, block_size=block, n_q=n, n_k=n, causal=False, sink=[3, 0], window=[10, 0]
    )
    q, k, v = qkv(1, 2, 2, n, n, 24, torch.float32, device)  # head_dim 24: padded to 32
    out, lse = block_sparse_attention(q, k, v, index, scale=0.3)
    assert_matches_reference(q, k, v, index, out, lse, scale=0.3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(12))
def test_random_configurations(device, seed):
    """Random lengths, block size, causality, GQA, density and sink/window per head."""
    g = torch.Generator().manual_seed(1000 + seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    block = pick([16, 32, 64])
    n_q, n_k = (int(x) for x in torch.randint(1, 200, (2,), generator=g))
    kv_heads, group = pick([1, 2]), pick([1, 2, 3])
    heads = kv_heads * group
    causal = bool(torch.rand(1, generator=g) < 0.7)
    kept = torch.stack(
        [random_blocks(n_q, n_k, block, float(torch.rand(1, generator=g)), generator=g)
         for _ in range(heads)]
    )  # fmt: skip
    window = [pick([0, 0, 7, 40]) for _ in range(heads)]
    sink = [pick([0, 3, 20]) for _ in range(heads)]
    index = BlockSparseLayout.from_block_masks(
        kept, None, block_size=block, n_q=n_q, n_k=n_k, causal=causal, sink=sink, window=window
    )
    dtype = pick([torch.float32, torch.float16])
    q, k, v = qkv(pick([1, 2]), heads, kv_heads, n_q, n_k, pick([16, 32]), dtype, device, seed)
    out, lse = block_sparse_attention(q, k, v, index)
    assert_matches_reference(q, k, v, index, out, lse)


@pytest.mark.parametrize("device", DEVICES)
def test_any_object_with_the_index_attributes_works(device):
    """The policy engineer's objects need only the attributes (int64 tensors are fine)."""
    n, block = 50, 16
    index = heterogeneous_index(n, n, block)
    duck = SimpleNamespace(
        **{field.name: getattr(index, field.name) for field in dataclasses.fields(index)}
    )
    for name in ix.TENSOR_FIELDS:
        setattr(duck, name, getattr(duck, name).to(torch.int64))
    q, k, v = qkv(1, 4, 1, n, n, 16, torch.float32, device)
    expected = block_sparse_attention(q, k, v, index)
    got = block_sparse_attention(q, k, v, duck)
    unchecked = block_sparse_attention(q, k, v, index, validate=False)
    for a, b, c in zip(expected, got, unchecked, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


# --- every bad input is refused before the launch ----------------------------------------
def fragment(template: str) -> str:
    """The longest literal piece of a message template, as a regex."""
    pieces = [literal for literal, *_ in string.Formatter().parse(template)]
    return re.escape(max(pieces, key=len))


# Where launch-free checks run: on a CUDA machine the kernel is compiled for the GPU and CPU
# tensors are refused first (NEEDS_DEVICE_OR_INTERPRETER), hiding the error under test.
CHECK_DEVICE = "cuda" if CUDA else "cpu"


def small_case(device=CHECK_DEVICE):
    n, block = 40, 16
    index = heterogeneous_index(n, n, block)
    q, k, v = qkv(1, 4, 2, n, n, 16, torch.float32, device)
    return q, k, v, index


def replace_tensor(index, **changes):
    return dataclasses.replace(index, **changes)


def _unsorted(index):
    row = int(torch.nonzero(index.kv_count.reshape(-1) >= 2)[0])
    start = int(index.kv_offset.reshape(-1)[row])
    kv_index = index.kv_index.clone()
    kv_index[start], kv_index[start + 1] = kv_index[start + 1].clone(), kv_index[start].clone()
    return replace_tensor(index, kv_index=kv_index)


def _duplicate(index):
    row = int(torch.nonzero(index.kv_count.reshape(-1) >= 2)[0])
    start = int(index.kv_offset.reshape(-1)[row])
    kv_index = index.kv_index.clone()
    kv_index[start + 1] = kv_index[start]
    return replace_tensor(index, kv_index=kv_index)


def _overlap(index):
    # list head 0's first full block of some row also as partial in that row
    row = int(torch.nonzero(index.full_kv_count.reshape(-1) >= 1)[0])
    block = index.full_kv_index[index.full_kv_offset.reshape(-1)[row]]
    count = index.kv_count.clone().reshape(-1)
    offset = index.kv_offset.clone().reshape(-1)
    kv_index = torch.cat([index.kv_index, block.reshape(1)])
    count[row], offset[row] = 1, kv_index.numel() - 1
    return replace_tensor(
        index, kv_index=kv_index, kv_count=count.reshape(index.kv_count.shape),
        kv_offset=offset.reshape(index.kv_offset.shape),
    )  # fmt: skip


def _diagonal_claimed_full(index):
    # head 0 (dense causal), query block 1: its diagonal block 1 is partial; claim it full
    kept = torch.zeros(4, 3, 3, dtype=torch.bool)
    kept[0, 1, 1] = True
    claimed = BlockSparseLayout.from_block_masks(kept, None, block_size=16, n_q=40, n_k=40, causal=True)
    return replace_tensor(
        claimed, full_kv_count=claimed.kv_count, full_kv_offset=claimed.kv_offset,
        full_kv_index=claimed.kv_index, kv_count=torch.zeros_like(claimed.kv_count),
        kv_index=claimed.kv_index[:0],
    )  # fmt: skip


def _block_out_of_range(index):
    kv_index = index.kv_index.clone()
    kv_index[-1] = 3  # n_k = 40, block 16: key blocks 0..2
    return replace_tensor(index, kv_index=kv_index)


def _count_past_end(index):
    count = index.kv_count.clone()
    count[-1, -1] += 5
    return replace_tensor(index, kv_count=count)


BAD_INDEX = {
    "block size 8": (lambda i: replace_tensor(i, block_size=8), ix.BLOCK_SIZE_UNSUPPORTED),
    "key block out of range": (_block_out_of_range, ix.INDEX_BLOCK_OUT_OF_RANGE),
    "unsorted row": (_unsorted, ix.INDEX_UNSORTED),
    "duplicate in row": (_duplicate, ix.INDEX_UNSORTED),
    "full and partial overlap": (_overlap, ix.INDEX_FULL_PARTIAL_OVERLAP),
    "partial block claimed full": (_diagonal_claimed_full, ix.INDEX_FULL_NOT_FULL),
    "count past the index array": (_count_past_end, ix.INDEX_CSR_OUT_OF_RANGE),
    "negative count": (
        lambda i: replace_tensor(i, kv_count=i.kv_count - 10), ix.INDEX_NEGATIVE,
    ),
    "count shape (block count) wrong": (
        lambda i: replace_tensor(i, kv_count=i.kv_count[:, :2]), ix.INDEX_TENSOR_SHAPE,
    ),
    "sink shape wrong": (lambda i: replace_tensor(i, sink=i.sink[:2]), ix.INDEX_TENSOR_SHAPE),
    "float index tensor": (
        lambda i: replace_tensor(i, kv_index=i.kv_index.float()), ix.INDEX_TENSOR_DTYPE,
    ),
    "not an index": (lambda i: {"block_size": 16}, ix.NOT_AN_INDEX),
    "index for fewer heads": (lambda i: replace_tensor(i, n_heads=2), bs.INDEX_HEADS),
    "sequence longer than the index": (
        lambda i: heterogeneous_index(32, 32, 16), bs.SEQUENCE_LONGER,
    ),
    "sequence shorter than the index": (
        lambda i: heterogeneous_index(48, 48, 16), bs.SEQUENCE_SHORTER,
    ),
    "negative model_window": (lambda i: replace_tensor(i, model_window=-1), ix.MODEL_WINDOW_BAD),
    "float model_window": (lambda i: replace_tensor(i, model_window=8.0), ix.MODEL_WINDOW_BAD),
}  # fmt: skip


def _transposed(q, k, v):
    return q.transpose(2, 3).contiguous().transpose(2, 3), k, v


BAD_TENSORS = {
    "q not contiguous": (_transposed, bs.NOT_CONTIGUOUS),
    "q float64": (lambda q, k, v: (q.double(), k.double(), v.double()), bs.DTYPE_UNSUPPORTED),
    "q int": (lambda q, k, v: (q.int(), k.int(), v.int()), bs.DTYPE_UNSUPPORTED),
    "k fp16, q fp32": (lambda q, k, v: (q, k.half(), v.half()), bs.DTYPE_MISMATCH),
    "head_dim mismatch": (
        lambda q, k, v: (q[..., :8].contiguous(), k, v), bs.HEAD_DIM_MISMATCH,
    ),
    "kv heads do not divide q heads": (
        lambda q, k, v: (q, k[:, :1].expand(-1, 3, -1, -1).contiguous(),
                         v[:, :1].expand(-1, 3, -1, -1).contiguous()),
        bs.GQA_HEADS,
    ),
    "k and v shapes differ": (lambda q, k, v: (q, k, v[:, :, :20].contiguous()), bs.KV_SHAPE_MISMATCH),
    "3-D q": (lambda q, k, v: (q[0], k, v), bs.INPUT_RANK),
    "batch mismatch": (lambda q, k, v: (q, torch.cat([k, k]), torch.cat([v, v])), bs.BATCH_MISMATCH),
    "head_dim 512": (
        lambda q, k, v: tuple(torch.zeros(*x.shape[:3], 512) for x in (q, k, v)),
        bs.HEAD_DIM_UNSUPPORTED,
    ),
}  # fmt: skip


@pytest.fixture
def no_launch(monkeypatch):
    """Fail the test if the kernel is launched: errors must come before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("the kernel was launched despite invalid input")

    monkeypatch.setattr(bs, "_launch", refuse)


@pytest.mark.parametrize("case", list(BAD_INDEX))
def test_bad_index_is_refused_before_launch(case, no_launch):
    q, k, v, index = small_case()
    make_bad, message = BAD_INDEX[case]
    with pytest.raises(KernelInputError, match=fragment(message)):
        block_sparse_attention(q, k, v, make_bad(index))


@pytest.mark.parametrize("case", list(BAD_TENSORS))
def test_bad_tensors_are_refused_before_launch(case, no_launch):
    q, k, v, index = small_case()
    make_bad, message = BAD_TENSORS[case]
    with pytest.raises(KernelInputError, match=fragment(message)):
        block_sparse_attention(*make_bad(q, k, v), index)


def test_bad_scale_is_refused(no_launch):
    q, k, v, index = small_case()
    with pytest.raises(KernelInputError, match=fragment(bs.SCALE_BAD)):
        block_sparse_attention(q, k, v, index, scale=float("nan"))


@pytest.mark.skipif(CUDA, reason="the interpreter is off when CUDA is present")
def test_bf16_is_refused_under_the_interpreter(no_launch):
    q, k, v, index = small_case()
    with pytest.raises(KernelInputError, match=fragment(bs.BF16_UNDER_INTERPRETER)):
        block_sparse_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), index)


def test_index_builder_refuses_bad_masks(no_launch):
    kept = torch.ones(2, 3, 3, dtype=torch.bool)
    # a layout takes any block size; the kernel refuses those it is not compiled for
    block_8 = BlockSparseLayout.from_block_masks(kept, None, block_size=8, n_q=24, n_k=24, causal=True)
    q = torch.zeros(1, 2, 24, 16, device=CHECK_DEVICE)
    with pytest.raises(KernelInputError, match=fragment(ix.BLOCK_SIZE_UNSUPPORTED)):
        block_sparse_attention(q, q, q, block_8)
    with pytest.raises(KernelInputError, match=fragment(ix.INDEX_SCALAR_BAD)):
        BlockSparseLayout.from_block_masks(kept, None, block_size=0, n_q=24, n_k=24, causal=True)
    with pytest.raises(KernelInputError, match=fragment(ix.BLOCK_MASK_SHAPE)):
        BlockSparseLayout.from_block_masks(kept, None, block_size=16, n_q=100, n_k=40, causal=True)
    full = kept.clone()
    with pytest.raises(KernelInputError, match=fragment(ix.BLOCK_MASK_FULL_NOT_KEPT)):
        BlockSparseLayout.from_block_masks(kept & False, full, block_size=16, n_q=40, n_k=40, causal=True)
    with pytest.raises(KernelInputError, match=fragment(ix.PER_HEAD_VALUE_BAD)):
        BlockSparseLayout.from_block_masks(kept, None, block_size=16, n_q=40, n_k=40, causal=True, window=[1, 2, 3])
    assert isinstance(heterogeneous_index(40, 40, 16), BlockSparseLayout)


# --- score variants: soft-capping, learned sinks, the model's own window ----------------------
VARIANTS = {
    "softcap": dict(softcap=2.0),
    "sinks": dict(sinks=True),
    "model_window": dict(model_window=21),
    "all": dict(softcap=3.0, sinks=True, model_window=9),
}


def variant_case(variant, dtype, device, *, n_q=70, n_k=70, causal=True, seed=0):
    """A mixed layout (dense, streaming, random, vertical-slash heads) with one variant on."""
    options = VARIANTS[variant]
    generator = torch.Generator().manual_seed(seed)
    block = 16
    kept = stack_heads(
        all_blocks(n_q, n_k, block),
        all_blocks(n_q, n_k, block),
        random_blocks(n_q, n_k, block, 0.5, generator=generator),
        vertical_slash_blocks(n_q, n_k, block, columns=[0], diagonals=[1]),
    )  # fmt: skip
    index = BlockSparseLayout.from_block_masks(
        kept, None, block_size=block, n_q=n_q, n_k=n_k, causal=causal,
        sink=[0, 3, 0, 0], window=[0, 12, 0, 0], model_window=options.get("model_window", 0),
    )  # fmt: skip
    q, k, v = qkv(1, 4, 2, n_q, n_k, 16, dtype, device, seed=seed)
    q = q * 2  # scores of a few units: soft-capping at 2-3 really bites
    sinks = torch.randn(4, generator=generator).to(device, dtype) if options.get("sinks") else None
    return q, k, v, index, dict(softcap=options.get("softcap"), sinks=sinks)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_score_variants_match_reference(device, dtype, variant):
    q, k, v, index, options = variant_case(variant, dtype, device)
    out, lse = block_sparse_attention(q, k, v, index, **options)
    assert_matches_reference(q, k, v, index, out, lse, **options)
    if variant == "all":
        # the model's window (9) and the vertical-slash head's blocks leave rows with no key:
        # out 0 (the sink has no value), lse -inf, no NaN
        empty = torch.isneginf(lse)
        assert empty.any() and (out[empty] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("n_q", "n_k", "causal"), [(30, 90, True), (90, 30, True), (40, 70, False)])
def test_score_variants_over_a_cache(device, n_q, n_k, causal):
    """Nq != Nk with every variant at once: the model's window counts from absolute positions."""
    q, k, v, index, options = variant_case("all", torch.float32, device, n_q=n_q, n_k=n_k, causal=causal, seed=n_q)
    out, lse = block_sparse_attention(q, k, v, index, **options)
    assert_matches_reference(q, k, v, index, out, lse, **options)


@pytest.mark.parametrize("device", DEVICES)
def test_default_variants_are_the_plain_kernel(device):
    """softcap=None, sinks=None, model_window=0 is today's kernel, to the bit."""
    q, k, v, index = small_case(device)
    plain = block_sparse_attention(q, k, v, index)
    explicit = block_sparse_attention(q, k, v, dataclasses.replace(index, model_window=0), softcap=None, sinks=None)
    for a, b in zip(plain, explicit, strict=True):
        assert torch.equal(a, b)


BAD_VARIANTS = {
    "softcap 0": dict(softcap=0.0),
    "softcap negative": dict(softcap=-2.0),
    "softcap nan": dict(softcap=float("nan")),
    "softcap inf": dict(softcap=float("inf")),
    "softcap bool": dict(softcap=True),
    "sinks per KV head": dict(sinks=torch.zeros(2)),
    "sinks int": dict(sinks=torch.zeros(4, dtype=torch.int32)),
    "sinks nan": dict(sinks=torch.tensor([0.0, float("nan"), 0.0, 0.0])),
    "sinks a list": dict(sinks=[0.0] * 4),
}


@pytest.mark.parametrize("case", list(BAD_VARIANTS))
def test_bad_variants_are_refused_before_launch(case, no_launch):
    q, k, v, index = small_case()
    with pytest.raises(KernelInputError, match=f"{fragment(ix.SOFTCAP_BAD)}|{fragment(ix.SINKS_BAD)}"):
        block_sparse_attention(q, k, v, index, **BAD_VARIANTS[case])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(4))
def test_random_variant_configurations(device, seed):
    """Random lengths, block size, causality, GQA, sink/window, model window, softcap, sinks."""
    g = torch.Generator().manual_seed(2000 + seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    block = pick([16, 32, 64])
    n_q, n_k = (int(x) for x in torch.randint(1, 160, (2,), generator=g))
    kv_heads, group = pick([1, 2]), pick([1, 2, 3])
    heads = kv_heads * group
    causal = bool(torch.rand(1, generator=g) < 0.7)
    kept = torch.stack(
        [random_blocks(n_q, n_k, block, float(torch.rand(1, generator=g)), generator=g)
         for _ in range(heads)]
    )  # fmt: skip
    index = BlockSparseLayout.from_block_masks(
        kept, None, block_size=block, n_q=n_q, n_k=n_k, causal=causal,
        sink=[pick([0, 3, 20]) for _ in range(heads)], window=[pick([0, 7, 40]) for _ in range(heads)],
        model_window=pick([1, 7, 40, 100]),
    )  # fmt: skip
    dtype = pick([torch.float32, torch.float16])
    q, k, v = qkv(pick([1, 2]), heads, kv_heads, n_q, n_k, 16, dtype, device, seed)
    options = dict(
        softcap=pick([None, 1.0, 5.0]),
        sinks=pick([None, (torch.randn(heads, generator=g) * 2).to(device, dtype)]),
    )  # fmt: skip
    out, lse = block_sparse_attention(q, k, v, index, **options)
    assert_matches_reference(q, k, v, index, out, lse, **options)
