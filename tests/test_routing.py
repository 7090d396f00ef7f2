"""No silent bypass: every routed forward runs attnlab's attention function exactly once per layer
call, or stops with an error naming the attention class and its layers."""

from __future__ import annotations

import pytest
import torch

from attnlab import attention
from attnlab.attention import RoutingError, route_attention, sdpa
from attnlab.models import EMBEDDED_MODELS, EMBEDDED_NAME, _embedded_cache, wrap_hf_model


@pytest.fixture(scope="module")
def tiny_falcon():
    """Falcon's attention computes itself, never through transformers' attention registry."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, FalconConfig

    tok = AutoTokenizer.from_pretrained(_embedded_cache(EMBEDDED_MODELS[EMBEDDED_NAME], verbose=False))
    cfg = FalconConfig(architectures=["FalconForCausalLM"], vocab_size=len(tok), hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, new_decoder_architecture=False, multi_query=True)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return wrap_hf_model(hf, tok, name="tiny-falcon", source="config")


def _counting_fn(calls: list[int]):
    def fn(layer, q, k, v, *, scaling, attention_mask=None):
        calls.append(layer)
        return sdpa(q, k, v, scaling=scaling)

    return fn


def test_a_model_that_bypasses_the_registry_is_refused_up_front(tiny_falcon):
    calls: list[int] = []
    with pytest.raises(RoutingError, match=r"FalconAttention computes attention itself .*\(layers 0,1\).*--path pattern"):
        with route_attention(tiny_falcon, _counting_fn(calls)):
            pass
    assert calls == []


def test_a_bypass_at_run_time_stops_the_forward(tiny_falcon, monkeypatch):
    """Even when the up-front check is fooled, the first layer that does not route stops the forward."""
    monkeypatch.setattr(attention, "_uses_registry", lambda module: True)
    calls: list[int] = []
    ids = torch.randint(100, 1000, (1, 12))
    with pytest.raises(RoutingError, match=r"FalconAttention \(layer 0; layers 0,1 use it\) ran its attention 0 times"):
        with route_attention(tiny_falcon, _counting_fn(calls)):
            tiny_falcon.bridge(ids)
    assert calls == []
    # the model is restored: a plain forward works and routing can start again
    tiny_falcon.bridge(ids)
    assert getattr(attention._state, "fn", None) is None


def test_routed_layers_run_exactly_once_each(tiny_llama):
    calls: list[int] = []
    ids = torch.randint(100, 1000, (1, 16))
    with torch.no_grad():
        plain = tiny_llama.bridge(ids)
        with route_attention(tiny_llama, _counting_fn(calls)):
            routed = tiny_llama.bridge(ids)
    assert calls == list(range(tiny_llama.n_layers))
    torch.testing.assert_close(routed, plain, atol=1e-4, rtol=1e-4)
