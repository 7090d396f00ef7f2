"""The two capture paths agree, hooks never leak, and attention routing always restores."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids

from attnlab.attention import route_attention
from attnlab.capture import capture, qk_probabilities
from attnlab.errors import AttnlabError, PromptError
from attnlab.stats import StatConfig


def _all(result):
    return (
        result.values(),
        torch.stack([s.block_sum for s in result.layers]),
        torch.stack([s.block_max for s in result.layers]),
    )


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("last_queries", [None, 40])
def test_paths_agree_on_tiny_models(request, model_name, last_queries):
    model = request.getfixturevalue(model_name)
    cfg = StatConfig(block_size=16, query_chunk=32, windows=(4, 16, 64), budgets=(4, 16), last_queries=last_queries)
    ids = random_ids(150)
    a = capture(model, ids, cfg, path="pattern")
    b = capture(model, ids, cfg, path="qk")
    for x, y in zip(_all(a), _all(b), strict=True):
        assert x.shape == y.shape
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
    assert a.values().shape == (model.n_layers, model.n_heads, len(cfg.names))


@pytest.mark.slow
def test_paths_agree_on_embedded_model(embedded):
    cfg = StatConfig()
    ids = embedded.encode("The quick brown fox jumps over the lazy dog. " * 40)[:, :400]
    a = capture(embedded, ids, cfg, path="pattern")
    b = capture(embedded, ids, cfg, path="qk")
    for x, y in zip(_all(a), _all(b), strict=True):
        assert (x - y).abs().max().item() <= 1e-4
    values = a.values()
    # the embedded model is known to sink heavily on token 0 in about half its heads
    sink = values[..., cfg.names.index("sink_mass_1")]
    assert 0.3 < (sink > 0.3).float().mean().item() < 0.8


def test_qk_probabilities_match_softmax_with_gqa():
    torch.manual_seed(0)
    q = torch.randn(6, 20, 8)
    k = torch.randn(2, 20, 8)
    probs = qk_probabilities(q, k, 5, 17, 0.3)
    kk = k.repeat_interleave(3, dim=0)
    scores = (q @ kk.transpose(-1, -2)) * 0.3
    scores = scores.masked_fill(torch.ones(20, 20, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(probs, scores.softmax(-1)[:, 5:17])


def test_capture_leaves_forward_untouched_and_removes_hooks(tiny_llama):
    ids = random_ids(64, seed=1)
    before = tiny_llama.bridge(ids).detach()
    capture(tiny_llama, ids, StatConfig(block_size=16, query_chunk=32), path="pattern")
    capture(tiny_llama, ids, StatConfig(block_size=16, query_chunk=32), path="qk")
    after = tiny_llama.bridge(ids).detach()
    assert torch.equal(before, after)
    for hp in tiny_llama.bridge.hook_dict.values():
        assert not hp._forward_hooks, "a capture hook was left behind"


def test_hooks_removed_when_reduction_raises(tiny_llama, monkeypatch):
    from attnlab import stats

    def boom(self, probs, start):
        raise RuntimeError("reduction failed")

    monkeypatch.setattr(stats.HeadStatAccumulator, "update", boom)
    with pytest.raises(RuntimeError, match="reduction failed"):
        capture(tiny_llama, random_ids(32), StatConfig(block_size=16), path="pattern")
    with pytest.raises(RuntimeError, match="reduction failed"):
        capture(tiny_llama, random_ids(32), StatConfig(block_size=16), path="qk")
    for hp in tiny_llama.bridge.hook_dict.values():
        assert not hp._forward_hooks
    assert tiny_llama.hf_model.config._attn_implementation == "eager"
    assert all("forward" not in blk.attn.__dict__ for blk in tiny_llama.bridge.blocks)


def test_route_attention_restores_after_error(tiny_gpt2):
    ids = random_ids(48, seed=2)
    before = tiny_gpt2.bridge(ids).detach()
    calls = []

    def failing(layer, q, k, v, *, scaling, attention_mask=None):
        calls.append(layer)
        raise ValueError("executor failed")

    with pytest.raises(ValueError, match="executor failed"):
        with route_attention(tiny_gpt2, failing):
            tiny_gpt2.hf_model(ids)
    assert calls == [0]
    assert torch.equal(before, tiny_gpt2.bridge(ids).detach())


def test_routed_sdpa_matches_eager(tiny_llama):
    ids = random_ids(70, seed=3)
    eager = tiny_llama.hf_model(ids).logits
    layers = []

    def spy(layer, q, k, v, *, scaling, attention_mask=None):
        layers.append(layer)
        assert q.shape[1] == tiny_llama.n_heads and k.shape[1] == tiny_llama.n_kv_heads
        from attnlab.attention import sdpa

        return sdpa(q, k, v, scaling=scaling)

    with route_attention(tiny_llama, spy):
        routed = tiny_llama.hf_model(ids).logits
    assert layers == list(range(tiny_llama.n_layers))
    torch.testing.assert_close(routed, eager, atol=1e-5, rtol=1e-5)


def test_nested_routing_refused(tiny_llama):
    with route_attention(tiny_llama):
        with pytest.raises(AttnlabError, match="already active"):
            with route_attention(tiny_llama):
                pass


def test_prompt_longer_than_context_is_refused(tiny_llama):
    with pytest.raises(PromptError, match="at most 512"):
        capture(tiny_llama, random_ids(600), StatConfig(), path="pattern")


def test_unknown_path_is_refused(tiny_llama):
    with pytest.raises(ValueError, match="pattern"):
        capture(tiny_llama, random_ids(8), path="flash")


@pytest.mark.parametrize("which", ["window+softcap", "window+sinks", "sinks"])
def test_qk_probabilities_with_a_variant_are_hf_eager_attention_weights(which):
    """Row chunks recomputed from q and k equal the probabilities transformers' eager attention
    computes (Gemma 2's soft-capping, gpt-oss's learned sinks), window included."""
    import types

    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma2_eager
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward as oss_eager

    from attnlab.attention import AttentionVariant

    g = torch.Generator().manual_seed(1)
    n, window = 29, 0 if which == "sinks" else 7
    q, k, v = torch.randn(1, 4, n, 16, generator=g), torch.randn(1, 2, n, 16, generator=g), torch.randn(1, 2, n, 16, generator=g)
    sinks = torch.randn(4, generator=g)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    seen = (j <= i) & ((i - j < window) if window else True)
    mask = torch.where(seen, 0.0, float("-inf"))[None, None]
    module = types.SimpleNamespace(num_key_value_groups=2, training=False, sinks=sinks)
    if which == "window+softcap":
        _, want = gemma2_eager(module, q, k, v, mask, scaling=0.4, softcap=1.5)
        variant = AttentionVariant(window=window, softcap=1.5)
    else:
        _, want = oss_eager(module, q, k, v, mask, scaling=0.4)
        variant = AttentionVariant(window=window, sinks=sinks)
    got = torch.cat([qk_probabilities(q[0], k[0], a, b, 0.4, variant) for a, b in ((0, 10), (10, n))], dim=1)
    torch.testing.assert_close(got, want[0], atol=1e-6, rtol=1e-5)
    if which != "window+softcap":
        assert float(got.sum(-1).max()) < 1, "a learned sink keeps some mass from every row"
