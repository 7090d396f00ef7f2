"""Head ablation: both paths (bridge hooks, routed attention) ablate, agree, and always clean up."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids
from transformers import DynamicCache

from attnlab.attention import route_attention
from attnlab.models import forward_with_cache
from attnlab.probes.ablation import (
    ABLATION_METHODS,
    AblationError,
    HeadAblation,
    ablate_heads,
    ablated_attention,
    head_means,
)

HEADS = [(0, 1), (1, 2), (1, 3)]


@pytest.fixture(params=["tiny_llama", "tiny_gpt2"])
def tiny(request):
    return request.getfixturevalue(request.param)


def _hook_count(model) -> int:
    return sum(len(hp.fwd_hooks) + len(hp._forward_hooks) for hp in model.bridge.hook_dict.values())


@pytest.mark.parametrize("method", ABLATION_METHODS)
def test_bridge_and_routed_paths_agree_and_change_the_output(tiny, method):
    ids = random_ids(24, seed=1)
    means = head_means(tiny, [random_ids(32, seed=2)])
    with torch.no_grad():
        dense = tiny.bridge(ids)
        with ablate_heads(tiny, HEADS, method, means=means) as bridge_ab:
            bridged = tiny.bridge(ids)
        with ablate_heads(tiny, HEADS, method, means=means, path="routed") as routed_ab:
            routed = tiny.hf_model(ids).logits
    assert bridge_ab.calls == 2 and routed_ab.calls == 2  # layers 0 and 1, one forward each
    assert (bridged - dense).abs().max() > 1e-3
    torch.testing.assert_close(routed, bridged, atol=1e-5, rtol=1e-4)


def test_hooks_are_removed_after_the_block_and_when_the_forward_raises(tiny):
    before = _hook_count(tiny)
    with torch.no_grad():
        for method in ("zero", "uniform"):
            with ablate_heads(tiny, HEADS, method):
                assert _hook_count(tiny) > before
                tiny.bridge(random_ids(8))
            assert _hook_count(tiny) == before
            with pytest.raises(IndexError):
                with ablate_heads(tiny, HEADS, method):
                    tiny.bridge(torch.tensor([[10**7]]))  # beyond the vocabulary: the forward raises
            assert _hook_count(tiny) == before
        # the routed path restores the attention implementation and the bridge forwards
        implementation = tiny.hf_model.config._attn_implementation
        with pytest.raises(IndexError):
            with ablate_heads(tiny, HEADS, "zero", path="routed"):
                tiny.hf_model(torch.tensor([[10**7]]))
        assert tiny.hf_model.config._attn_implementation == implementation
        assert all("forward" not in block.attn.__dict__ for block in tiny.bridge.blocks)
        dense_again = tiny.bridge(random_ids(8))
        plain = tiny.bridge(random_ids(8))
    torch.testing.assert_close(dense_again, plain)


@pytest.mark.parametrize("method", ABLATION_METHODS)
def test_routed_ablation_acts_in_kv_cache_decoding(tiny, method):
    """A decode step (1 query over cached keys) sees the same ablation as a full forward."""
    ids = random_ids(20, seed=3)
    means = head_means(tiny, [random_ids(32, seed=2)])
    ablation = HeadAblation(tuple(HEADS), method, means).check(tiny)
    with torch.no_grad():
        with route_attention(tiny, ablated_attention(None, ablation)):
            cache = DynamicCache(config=tiny.hf_model.config)
            forward_with_cache(tiny.hf_model, ids[:, :-1], cache)
            step = forward_with_cache(tiny.hf_model, ids[:, -1:], cache).logits[0, -1]
            full = tiny.hf_model(ids).logits[0, -1]
        with route_attention(tiny):
            cache = DynamicCache(config=tiny.hf_model.config)
            forward_with_cache(tiny.hf_model, ids[:, :-1], cache)
            dense_step = forward_with_cache(tiny.hf_model, ids[:, -1:], cache).logits[0, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-4)
    assert (step - dense_step).abs().max() > 1e-4


def test_head_means_agree_between_paths(tiny):
    prompts = [random_ids(16, seed=4), random_ids(24, seed=5)[0]]  # [1, n] and [n] both accepted
    routed = head_means(tiny, prompts, path="routed")
    bridged = head_means(tiny, prompts, path="bridge")
    assert routed.shape == (tiny.n_layers, tiny.n_heads, tiny.head_dim)
    torch.testing.assert_close(routed, bridged, atol=1e-5, rtol=1e-4)
    assert routed.abs().max() > 0


def test_mean_ablation_writes_the_means(tiny_llama):
    """The ablated head's z is exactly its mean vector at every position."""
    means = torch.randn(tiny_llama.n_layers, tiny_llama.n_heads, tiny_llama.head_dim)
    ablation = HeadAblation(((1, 2),), "mean", means)
    out = torch.randn(1, 5, tiny_llama.n_heads, tiny_llama.head_dim)
    value = torch.randn(1, tiny_llama.n_kv_heads, 5, tiny_llama.head_dim)
    got = ablation.apply(1, out, value)
    torch.testing.assert_close(got[0, :, 2], means[1, 2].expand(5, -1))
    torch.testing.assert_close(got[0, :, [0, 1, 3]], out[0, :, [0, 1, 3]])
    assert ablation.apply(0, out, value) is out  # no heads in layer 0: untouched


def test_uniform_ablation_averages_the_visible_values(tiny_llama):
    """With a cache (3 queries over 7 keys) query i sees keys 0..4+i; GQA picks the KV head."""
    ablation = HeadAblation(((0, 3),), "uniform")
    value = torch.randn(1, tiny_llama.n_kv_heads, 7, tiny_llama.head_dim)
    out = ablation.apply(0, torch.zeros(1, 3, tiny_llama.n_heads, tiny_llama.head_dim), value)
    kv = tiny_llama.kv_head(3)
    for i in range(3):
        torch.testing.assert_close(out[0, i, 3], value[0, kv, : 5 + i].mean(0))


def test_ablation_errors_say_what_to_fix(tiny_llama):
    with pytest.raises(AblationError, match="method must be one of"):
        HeadAblation(((0, 0),), "shuffle")
    with pytest.raises(AblationError, match="head_means"):
        HeadAblation(((0, 0),), "mean")
    with pytest.raises(AblationError, match=r"layers 0\.\.1 and query heads 0\.\.3"):
        with ablate_heads(tiny_llama, [(5, 0)]):
            pass
    with pytest.raises(AblationError, match="expected"):
        HeadAblation(((0, 0),), "mean", torch.zeros(2, 2, 2)).check(tiny_llama)
    with pytest.raises(AblationError, match="path must be one of"):
        with ablate_heads(tiny_llama, [(0, 0)], path="eager"):
            pass
    assert _hook_count(tiny_llama) == 0
