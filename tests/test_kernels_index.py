"""The layout contract and the dense reference, without the kernel (pure PyTorch, fast).

The token semantics of `BlockSparseLayout` are checked against a literal, loop-free
transcription of the definition, over random layouts, lengths, causal flags and
sink/window values; the reference against PyTorch's SDPA.
"""

import dataclasses
import inspect
import itertools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from attnlab.kernels import BlockSparseLayout, KernelInputError, reference_attention
from attnlab.kernels.layout import (
    MODEL_WINDOW_SEMANTICS,
    OPTIONAL_ARRAY_FIELDS,
    TENSOR_FIELDS,
    TOKEN_SEMANTICS,
    token_semantics,
)
from attnlab.kernels.synthetic import causal_blocks, topk_blocks, vertical_slash_blocks


def definition_mask(kept, *, block_size, n_q, n_k, causal, sink, window, model_window=0):
    """The module docstring's semantics, literally: listed block AND bounds AND causal AND
    streaming AND the model's window, for every (head, i, j)."""
    i = torch.arange(n_q).reshape(1, -1, 1)
    j = torch.arange(n_k).reshape(1, 1, -1)
    qa = i + n_k - n_q
    listed = kept[:, i[0, :, 0] // block_size][:, :, j[0, 0] // block_size]
    sink = torch.as_tensor(sink).reshape(-1, 1, 1)
    window = torch.as_tensor(window).reshape(-1, 1, 1)
    ok = listed & (j < n_k) & ((window == 0) | (j < sink) | (qa - j < window))
    if causal:
        ok = ok & (j <= qa)
    if model_window:
        ok = ok & (qa - j < model_window)
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


# --- the model's own sliding window (model_window) ------------------------------------------
MODEL_WINDOW_CONFIGS = list(
    itertools.product(
        [(37, 37), (20, 90), (90, 20), (1, 50)],  # (n_q, n_k)
        [True, False],  # causal
        [(0, 0), (5, 12), (3, 40)],  # (sink, window) of heads 0 and 2
        [1, 9, 16, 33],  # model_window
    )
)


@pytest.mark.parametrize(("lengths", "causal", "streaming", "model_window"), MODEL_WINDOW_CONFIGS)
def test_model_window_follows_the_definition(lengths, causal, streaming, model_window):
    """model_window is an AND on every head: token mask, pruned blocks and full blocks follow the
    literal definition; dense cost and token density count what the model's window lets through."""
    n_q, n_k = lengths
    block = 16
    sink, window = streaming
    generator = torch.Generator().manual_seed(n_q + n_k + sink + window + model_window)
    q_blocks, k_blocks = -(-n_q // block), -(-n_k // block)
    kept = torch.rand(3, q_blocks, k_blocks, generator=generator) < 0.7
    kept[2] = True
    params = dict(block_size=block, n_q=n_q, n_k=n_k, causal=causal)
    sinks, windows = [sink, 0, sink], [window, 0, window]
    index = BlockSparseLayout.from_block_masks(
        kept, None, **params, sink=sinks, window=windows, model_window=model_window
    )
    assert index.model_window == model_window
    index.validate()
    expected = definition_mask(kept, **params, sink=sinks, window=windows, model_window=model_window)
    assert torch.equal(index.token_mask(), expected)

    padded = torch.zeros(3, q_blocks * block, k_blocks * block, dtype=torch.bool)
    padded[:, :n_q, :n_k] = expected
    tiles = padded.reshape(3, q_blocks, block, k_blocks, block)
    assert torch.equal(index.block_mask(), kept & tiles.any(dim=(2, 4)))  # tiles outside: dropped
    assert torch.equal(index.full_block_mask(), kept & tiles.all(dim=(2, 4)))

    # the dense cost is the windowed one: tiles and pairs the model itself computes
    dense = definition_mask(torch.ones_like(kept[:1]), **params, sink=[0], window=[0], model_window=model_window)
    dense_padded = torch.zeros(1, q_blocks * block, k_blocks * block, dtype=torch.bool)
    dense_padded[:, :n_q, :n_k] = dense
    dense_tiles = dense_padded.reshape(1, q_blocks, block, k_blocks, block).any(dim=(2, 4))
    assert index.causal_blocks() == int(dense_tiles.sum())
    expected_density = expected.sum((-1, -2)).double() / max(1, int(dense.sum()))
    torch.testing.assert_close(index.token_density(), expected_density)


def test_model_window_zero_is_todays_layout():
    """model_window=0 (the default) builds the very layout it always did."""
    kept = torch.rand(2, 5, 5, generator=torch.Generator().manual_seed(3)) < 0.8
    params = dict(block_size=16, n_q=70, n_k=70, causal=True, sink=[0, 4], window=[0, 20])
    old = BlockSparseLayout.from_block_masks(kept, None, **params)
    new = BlockSparseLayout.from_block_masks(kept, None, **params, model_window=0)
    assert old.model_window == 0 and new.equals(old)
    assert set(old.to_arrays()) == set(TENSOR_FIELDS)  # exports carry exactly the arrays they did
    assert "model_window" not in repr(old)
    assert old.causal_blocks() == 15  # 5 query blocks, lower triangle


def test_model_window_survives_conversions():
    kept = torch.ones(2, 4, 4, dtype=torch.bool)
    params = dict(block_size=16, n_q=64, n_k=64, causal=True)
    index = BlockSparseLayout.from_block_masks(kept, None, **params, model_window=20, sink=[0, 2], window=[0, 8])
    plain = BlockSparseLayout.from_block_masks(kept, None, **params, sink=[0, 2], window=[0, 8])
    assert not index.equals(plain)
    assert index.to("cpu").model_window == 20 and index.validate().model_window == 20
    assert "model_window=20" in repr(index)
    arrays = index.to_arrays()
    assert int(arrays["model_window"]) == 20 and set(arrays) == {*TENSOR_FIELDS, *OPTIONAL_ARRAY_FIELDS}
    again = BlockSparseLayout.from_arrays(arrays, **params)
    assert again.model_window == 20 and again.equals(index)
    assert torch.equal(again.token_mask(), index.token_mask())
    # files written before model_window existed load with none
    old_arrays = {name: arrays[name] for name in TENSOR_FIELDS}
    assert BlockSparseLayout.from_arrays(plain.to_arrays(), **params).model_window == 0
    # an explicit keyword overrides the arrays
    assert BlockSparseLayout.from_arrays(old_arrays, **params, model_window=20).equals(index)
    # any object with the attributes keeps it (coerce)
    duck = SimpleNamespace(**{f.name: getattr(index, f.name) for f in dataclasses.fields(index)})
    assert BlockSparseLayout.coerce(duck).model_window == 20
    assert token_semantics(True).endswith(MODEL_WINDOW_SEMANTICS) and token_semantics() == TOKEN_SEMANTICS


@pytest.mark.parametrize("bad", [-1, 2.5, True, "8", None])
def test_bad_model_window_is_refused(bad):
    kept = torch.ones(1, 2, 2, dtype=torch.bool)
    with pytest.raises(KernelInputError, match="model_window must be an int >= 0"):
        BlockSparseLayout.from_block_masks(kept, None, block_size=16, n_q=32, n_k=32, model_window=bad)
    index = BlockSparseLayout.from_block_masks(kept, None, block_size=16, n_q=32, n_k=32)
    with pytest.raises(KernelInputError, match="model_window must be an int >= 0"):
        dataclasses.replace(index, model_window=bad).validate()
    arrays = {**index.to_arrays(), "model_window": torch.tensor([4, 5])}
    with pytest.raises(KernelInputError, match="model_window must be an int >= 0"):
        BlockSparseLayout.from_arrays(arrays, block_size=16, n_q=32, n_k=32)


def _hf_mask(config_class, n, window, **extra):
    """The eager (additive float) mask transformers builds for a sliding-window layer, as bool."""
    from transformers.masking_utils import create_sliding_window_causal_mask

    config = config_class(sliding_window=window, hidden_size=16, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=8, **extra)  # fmt: skip
    config._attn_implementation = "eager"
    # transformers renamed the argument past_key_values -> cache (5.17 on the GPU machine has
    # the old name; 5.24 here the new one)
    params = inspect.signature(create_sliding_window_causal_mask).parameters
    no_cache = {"cache": None} if "cache" in params else {"past_key_values": None}
    mask = create_sliding_window_causal_mask(
        config=config, inputs_embeds=torch.zeros(1, n, 16), attention_mask=None,
        position_ids=torch.arange(n)[None], **no_cache,
    )  # fmt: skip
    return mask[0, 0] == 0


@pytest.mark.parametrize("window", [1, 5, 16, 23])
def test_model_window_is_the_hugging_face_sliding_window(window):
    """Hugging Face's convention: with window W a query sees itself and W - 1 keys before it.
    The eager masks transformers builds for Mistral and Gemma 2 layers equal the layout's."""
    from transformers import Gemma2Config, MistralConfig
    from transformers.masking_utils import sliding_window_causal_mask_function

    n, block = 40, 16
    kept = torch.ones(1, 3, 3, dtype=torch.bool)
    index = BlockSparseLayout.from_block_masks(kept, None, block_size=block, n_q=n, n_k=n, model_window=window)
    assert torch.equal(index.token_mask()[0], _hf_mask(MistralConfig, n, window))
    assert torch.equal(index.token_mask()[0], _hf_mask(Gemma2Config, n, window, layer_types=["sliding_attention"],
                                                       num_hidden_layers=1))  # fmt: skip
    # over a cache: queries are the last n_q of n_k tokens; HF's mask function takes absolute positions
    n_q, n_k = 9, 40
    index = BlockSparseLayout.from_block_masks(
        torch.ones(1, 1, 3, dtype=torch.bool), None, block_size=block, n_q=n_q, n_k=n_k, model_window=window
    )  # fmt: skip
    hf = sliding_window_causal_mask_function(window)
    q_abs = torch.arange(n_k - n_q, n_k)[:, None]
    keys = torch.arange(n_k)[None, :]
    assert torch.equal(index.token_mask()[0], hf(0, 0, q_abs, keys))


# --- the reference's score variants against transformers' own eager functions ---------------
def _additive(mask, dtype):
    return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)


def test_reference_softcap_is_gemma2_eager():
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 30, 16, generator=generator, dtype=torch.float64) * 3
    k = torch.randn(2, 2, 30, 16, generator=generator, dtype=torch.float64) * 3
    v = torch.randn(2, 2, 30, 16, generator=generator, dtype=torch.float64)
    mask = torch.ones(30, 30, dtype=torch.bool).tril() & (torch.arange(30)[:, None] - torch.arange(30) < 7)
    module = SimpleNamespace(num_key_value_groups=2, training=False, head_dim=16)
    expected, _ = eager_attention_forward(module, q, k, v, _additive(mask, torch.float64), scaling=0.2, softcap=2.5)
    out, lse = reference_attention(q, k, v, mask, scale=0.2, softcap=2.5)
    # Gemma 2's eager softmax runs in fp32 whatever the input dtype: fp32 rounding
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=1e-6, rtol=0)
    capped = 2.5 * torch.tanh(q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.2 / 2.5)
    torch.testing.assert_close(lse, torch.logsumexp(capped.masked_fill(~mask, -torch.inf), -1))
    # soft-capping really changes the answer at these score sizes
    assert (reference_attention(q, k, v, mask, scale=0.2)[0] - out).abs().max() > 1e-2


def test_reference_sinks_are_gpt_oss_eager_and_lse_excludes_the_sink():
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    generator = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 25, 8, generator=generator, dtype=torch.float64)
    k = torch.randn(1, 2, 25, 8, generator=generator, dtype=torch.float64)
    v = torch.randn(1, 2, 25, 8, generator=generator, dtype=torch.float64)
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    mask = torch.ones(4, 25, 25, dtype=torch.bool).tril()
    mask[2, 10] = False  # a row with no key: the sink takes all the mass
    module = SimpleNamespace(num_key_value_groups=2, training=False, sinks=sinks)
    expected, _ = eager_attention_forward(module, q, k, v, _additive(mask[None], torch.float64), scaling=0.3)
    out, lse = reference_attention(q, k, v, mask, scale=0.3, sinks=sinks)
    torch.testing.assert_close(out, expected.transpose(1, 2))
    assert not out.isnan().any() and (out[0, 2, 10] == 0).all() and torch.isneginf(lse[0, 2, 10])
    # lse is that of the real keys: the same as without sinks, and the sink's share follows
    plain_out, plain_lse = reference_attention(q, k, v, mask, scale=0.3)
    torch.testing.assert_close(lse, plain_lse)
    share = torch.sigmoid(lse - sinks.reshape(1, -1, 1))
    torch.testing.assert_close(out, plain_out * share[..., None])
    # fp32 (the executors' dtype) agrees too
    out32, _ = reference_attention(q, k, v, mask, scale=0.3, sinks=sinks.float(), dtype=torch.float32)
    torch.testing.assert_close(out32.double(), out, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("softcap", "sinks"),
    [(0.0, None), (-1.0, None), (float("inf"), None), (float("nan"), None), (True, None), ("3", None),
     (None, torch.zeros(3)), (None, torch.zeros(4, dtype=torch.int64)), (None, torch.tensor([0.0, 1.0, float("nan"), 0.0])),
     (None, [0.0] * 4)],
)  # fmt: skip
def test_reference_refuses_bad_softcap_and_sinks(softcap, sinks):
    q = torch.randn(1, 4, 5, 8)
    k = v = torch.randn(1, 2, 5, 8)
    with pytest.raises(KernelInputError, match="softcap must be|sinks must be"):
        reference_attention(q, k, v, None, softcap=softcap, sinks=sinks)


def test_positional_construction_is_unchanged():
    """model_window is the dataclass's last field: layouts built positionally (as the policy
    compiler does) keep their head names and layer, and have no model window."""
    index = BlockSparseLayout.from_block_masks(torch.ones(2, 2, 2, dtype=torch.bool), None, block_size=16, n_q=32, n_k=32)
    positional = BlockSparseLayout(
        16, 32, 32, 2, True, *(getattr(index, name) for name in TENSOR_FIELDS), ("L0.H0", "L0.H1"), 3
    )  # fmt: skip
    assert positional.head_names == ("L0.H0", "L0.H1") and positional.layer == 3
    assert positional.model_window == 0 and positional.validate().equals(index)


def test_full_blocks_outside_the_model_window_are_refused():
    """The kernel skips masking in full blocks: a layout whose full blocks the model's window
    cuts (a window added after packing) is refused, not run wrong."""
    index = BlockSparseLayout.from_block_masks(torch.ones(1, 4, 4, dtype=torch.bool), None, block_size=16, n_q=64, n_k=64)
    assert index.full_kv_index.numel() > 0
    with pytest.raises(KernelInputError, match="model-window predicate"):
        dataclasses.replace(index, model_window=9).validate()
    # the same blocks packed with the window are fine: the cut ones are partial or dropped
    BlockSparseLayout.from_block_masks(
        torch.ones(1, 4, 4, dtype=torch.bool), None, block_size=16, n_q=64, n_k=64, model_window=9
    ).validate()
