"""No silent bypass: every routed forward runs attnlab's attention function exactly once per layer
call, or stops with an error naming the attention class and its layers."""

from __future__ import annotations

import pytest
import torch

from attnlab import attention
from attnlab.attention import RoutingError, route_attention, sdpa
from attnlab.models import tiny_hf_model, wrap_hf_model


@pytest.fixture(scope="module")
def tiny_own_attention():
    """A tiny Llama whose attention modules compute attention themselves (transformers' eager
    function called directly), never through transformers' attention registry."""
    from transformers.models.llama import modeling_llama as ml

    class OwnAttention(ml.LlamaAttention):
        def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
            shape = (*hidden_states.shape[:-1], -1, self.head_dim)
            q, k, v = (proj(hidden_states).view(shape).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
            q, k = ml.apply_rotary_pos_emb(q, k, *position_embeddings)
            out, weights = ml.eager_attention_forward(self, q, k, v, attention_mask, scaling=self.scaling)
            return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights

    hf, tok = tiny_hf_model("llama")
    for layer in hf.model.layers:
        layer.self_attn.__class__ = OwnAttention
    return wrap_hf_model(hf, tok, name="tiny-own-attention", source="config")


def _counting_fn(calls: list[int]):
    def fn(layer, q, k, v, *, scaling, attention_mask=None):
        calls.append(layer)
        return sdpa(q, k, v, scaling=scaling)

    return fn


def test_a_model_that_bypasses_the_registry_is_refused_up_front(tiny_own_attention):
    calls: list[int] = []
    with pytest.raises(RoutingError, match=r"OwnAttention computes attention itself .*\(layers 0,1\).*--path pattern"):
        with route_attention(tiny_own_attention, _counting_fn(calls)):
            pass
    assert calls == []


def test_a_bypass_at_run_time_stops_the_forward(tiny_own_attention, monkeypatch):
    """Even when the up-front check is fooled, the first layer that does not route stops the forward."""
    monkeypatch.setattr(attention, "_uses_registry", lambda module: True)
    calls: list[int] = []
    ids = torch.randint(100, 1000, (1, 12))
    with pytest.raises(RoutingError, match=r"OwnAttention \(layer 0; layers 0,1 use it\) ran its attention 0 times"):
        with route_attention(tiny_own_attention, _counting_fn(calls)):
            tiny_own_attention.bridge(ids)
    assert calls == []
    # the model is restored: a plain forward works and routing can start again
    tiny_own_attention.bridge(ids)
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


# --- attention variants: read from the config as transformers does, passed to every fn ---------
def _config(cls_name: str, **kw):
    """A config; ``layer_types`` is set after construction (transformers validates its own, a
    hand-edited config.json need not be what it would have built)."""
    import transformers

    layer_types = kw.pop("layer_types", None)
    cfg = getattr(transformers, cls_name)(num_hidden_layers=4, **kw)
    if layer_types is not None:
        cfg.layer_types = layer_types
    return cfg


@pytest.mark.parametrize(
    ("cls_name", "kw", "want"),
    [
        ("MistralConfig", {"sliding_window": 16}, [16, 16, 16, 16]),
        ("MistralConfig", {"sliding_window": None}, [0, 0, 0, 0]),
        ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 2}, [0, 0, 16, 16]),
        ("Qwen2Config", {"use_sliding_window": False, "sliding_window": 16}, [0, 0, 0, 0]),
        ("Gemma2Config", {"sliding_window": 16}, [16, 0, 16, 0]),
        ("Gemma3TextConfig", {"sliding_window": 16, "sliding_window_pattern": 2}, [16, 0, 16, 0]),
        ("GptOssConfig", {"sliding_window": 16}, [16, 0, 16, 0]),
        ("LlamaConfig", {}, [0, 0, 0, 0]),
    ],
)
def test_config_windows_are_read_as_transformers_reads_them(cls_name, kw, want):
    assert attention.config_windows(_config(cls_name, **kw), 4) == want


@pytest.mark.parametrize(
    ("cls_name", "kw", "message"),
    [
        ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 2,
                         "layer_types": ["sliding_attention"] * 4}, r"max_window_layers=2 makes layers 2,3 sliding but layer_types says 0-3"),
        ("Gemma2Config", {"sliding_window": None}, r"layer_types marks layers 0,2 sliding but sliding_window=None"),
        ("Gemma2Config", {"sliding_window": 16, "layer_types": ["full_attention"] * 3}, r"layer_types has 3 entries for 4 layers"),
        ("Gemma3TextConfig", {"sliding_window": 16, "use_bidirectional_attention": True}, r"attention is not causal"),
        ("Gemma2Config", {"sliding_window": 16, "layer_types": ["chunked_attention"] * 4}, r"layer_types holds chunked_attention"),
    ],
)
def test_config_fields_that_disagree_give_one_clear_line(cls_name, kw, message):
    with pytest.raises(attention.ConfigError, match=message) as err:
        attention.config_windows(_config(cls_name, **kw), 4)
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def tiny_gemma2():
    from attnlab.models import tiny_model

    return tiny_model("gemma2")


def test_variant_layers_pass_their_window_softcap_and_scaling_to_the_function(tiny_gemma2):
    seen = {}

    def fn(layer, q, k, v, *, scaling, attention_mask=None, variant=attention.PLAIN):
        seen[layer] = (scaling, variant.window, variant.softcap, variant.sinks)
        return attention.attend(q, k, v, scaling=scaling, variant=variant)

    ids = torch.randint(100, 1000, (1, 20))
    with torch.no_grad(), route_attention(tiny_gemma2, fn):
        tiny_gemma2.hf_model(ids)
    assert seen == {0: (24 ** -0.5, 8, 2.0, None), 1: (24 ** -0.5, 0, 2.0, None)}  # query_pre_attn_scalar=24


def test_a_function_without_variant_is_refused_on_a_variant_model(tiny_gemma2):
    calls: list[int] = []
    with pytest.raises(RoutingError, match=r"computes plain causal attention, but layers 0,1 use sliding window 8, logit soft-capping 2"):
        with route_attention(tiny_gemma2, _counting_fn(calls)):
            pass
    assert calls == []


def test_a_module_that_passes_another_window_than_its_config_stops_the_forward(tiny_gemma2, monkeypatch):
    monkeypatch.setitem(tiny_gemma2.extra, "attention_variants",
                        [attention.AttentionVariant(window=4, softcap=2.0), attention.AttentionVariant(softcap=2.0)])
    with pytest.raises(RoutingError, match=r"\(layer 0\) passes its attention function sliding window 8, logit soft-capping 2, "
                                           r"but its config describes sliding window 4"):
        with torch.no_grad(), route_attention(tiny_gemma2):
            tiny_gemma2.hf_model(torch.randint(100, 1000, (1, 12)))


def test_variant_attention_equals_hf_eager_with_window_softcap_and_sinks():
    """`attend` is the model's own attention: checked against transformers' eager functions."""
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma2_eager
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward as oss_eager

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 21, 16, generator=g) for h in (4, 2, 2))
    sinks = torch.randn(4, generator=g)
    n = 21
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    mask = torch.where((j <= i) & (i - j < 5), 0.0, float("-inf"))[None, None]
    module = types_namespace(num_key_value_groups=2, training=False, sinks=sinks)
    want_g, _ = gemma2_eager(module, q, k, v, mask, scaling=0.3, softcap=1.5)
    got_g = attention.attend(q, k, v, scaling=0.3, variant=attention.AttentionVariant(window=5, softcap=1.5))
    torch.testing.assert_close(got_g, want_g, atol=1e-6, rtol=1e-5)
    want_o, _ = oss_eager(module, q, k, v, mask, scaling=0.3)
    got_o = attention.attend(q, k, v, scaling=0.3, variant=attention.AttentionVariant(window=5, sinks=sinks))
    torch.testing.assert_close(got_o, want_o, atol=1e-6, rtol=1e-5)
    got_w = attention.attend(q, k, v, scaling=0.3, variant=attention.AttentionVariant(window=5))
    want_w, _ = gemma2_eager(module, q, k, v, mask, scaling=0.3)
    torch.testing.assert_close(got_w, want_w, atol=1e-6, rtol=1e-5)


def types_namespace(**kw):
    import types

    return types.SimpleNamespace(**kw)
