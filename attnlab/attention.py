"""Route a bridged model's attention through a function of ours, and always restore it.

The TransformerBridge replaces each Hugging Face attention module with an eager
re-implementation that materialises the full ``[heads, n, n]`` pattern (that is what makes
``hook_pattern`` possible). Work that must not pay for that — the q/k capture path at long
context, and the sparse executors — swaps each layer's bridge forward for the original Hugging
Face attention module and selects our function through transformers' attention-function
registry (``AttentionInterface``). The function receives exactly what ``hook_rot_q`` /
``hook_rot_k`` carry on the eager path: post-RoPE queries ``[batch, heads, n_q, head_dim]``
and keys/values ``[batch, kv_heads, n_k, head_dim]`` (before GQA repetition).

Use it as a context manager; the bridge and the config are restored on exit, also when the
forward raises::

    with route_attention(model, my_attention):
        model.bridge(input_ids)
"""

from __future__ import annotations

import threading
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from attnlab.errors import AttnlabError

#: The name under which attnlab registers its dispatcher with transformers.
IMPLEMENTATION = "attnlab"

#: ``fn(layer, query, key, value, *, scaling, attention_mask) -> output [batch, n_q, heads, head_dim]``.
AttentionFn = Callable[..., torch.Tensor]

_state = threading.local()
_registered = False

_ERR_NESTED = "route_attention is already active on this thread; nesting is not supported"
_ERR_BYPASS = (
    "{cls} (layer {layer}; layers {layers} use it) ran its attention {n} times through attnlab's "
    "attention function instead of once: it does not dispatch through transformers' attention "
    "registry, so attnlab cannot measure or change what it computes. Use the pattern path "
    "(--path pattern) for statistics; sparse executors cannot run on this model"
)
_ERR_NOT_REGISTRY = (
    "{cls} computes attention itself instead of through transformers' attention registry "
    "(layers {layers}): attnlab cannot route it. Use the pattern path (--path pattern) for "
    "statistics; sparse executors cannot run on this model"
)


class RoutingError(AttnlabError):
    """A model's attention did not (or cannot) run through attnlab's attention function."""


def _layer_span(layers: list[int]) -> str:
    if not layers:
        return "none"
    if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


def _uses_registry(module: Any) -> bool:
    """Whether the module's forward looks its attention function up in transformers' registry
    (the only way attnlab's function gets called). Read from the source; a module whose source
    cannot be read is given the benefit of the doubt and checked at run time."""
    import inspect

    try:
        src = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return True
    return "ALL_ATTENTION_FUNCTIONS" in src or "attention_interface" in src
_ERR_UNSUPPORTED = (
    "{what} is not supported by attnlab's attention routing ({detail}); use the pattern capture "
    "path (--path pattern) or the reference executor for this model"
)


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scaling: float) -> torch.Tensor:
    """Causal SDPA with GQA; ``[b, h, n_q, d]`` in, ``[b, n_q, h, d]`` out (HF's layout).

    When ``n_q < n_k`` the queries are the last ``n_q`` positions (prefill over a cache).
    """
    n_q, n_k = query.shape[-2], key.shape[-2]
    group = query.shape[1] // key.shape[1]
    if group > 1:
        key = key.repeat_interleave(group, dim=1)
        value = value.repeat_interleave(group, dim=1)
    if n_q == n_k:
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
    else:
        q_pos = torch.arange(n_k - n_q, n_k, device=query.device)
        mask = torch.arange(n_k, device=query.device)[None, :] <= q_pos[:, None]
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous()


def _dispatch(module: Any, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    fn = getattr(_state, "fn", None)
    if fn is None:  # routing ended but a module still points here: behave like SDPA
        fn = _default_fn
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        layer = _state.layer_of.get(id(module), -1) if hasattr(_state, "layer_of") else -1
    counts = getattr(_state, "counts", None)
    if counts is not None:
        counts[int(layer)] = counts.get(int(layer), 0) + 1
    out = fn(int(layer), query, key, value, scaling=float(scaling), attention_mask=attention_mask)
    return out, None


def _default_fn(layer: int, query, key, value, *, scaling: float, attention_mask=None) -> torch.Tensor:
    return sdpa(query, key, value, scaling=scaling)


def _ensure_registered() -> None:
    global _registered
    if _registered:
        return
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, _dispatch)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    _registered = True


def _attention_modules(model: Any) -> list[Any]:
    return [block.attn for block in model.bridge.blocks]


def check_routable(model: Any) -> None:
    """Refuse models whose attention is more than softmax(q·kᵀ·scale + causal mask)."""
    cfg = model.hf_model.config
    if getattr(cfg, "attn_logit_softcapping", None):
        raise AttnlabError(_ERR_UNSUPPORTED.format(what="logit soft-capping", detail=model.name))
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        layer_types = getattr(cfg, "layer_types", None) or []
        if not layer_types or any(t != "full_attention" for t in layer_types):
            raise AttnlabError(_ERR_UNSUPPORTED.format(what="sliding-window attention", detail=model.name))
    modules = [getattr(attn, "original_component", None) for attn in _attention_modules(model)]
    for hf in modules:
        if hf is None or getattr(hf, "sinks", None) is not None:
            raise AttnlabError(_ERR_UNSUPPORTED.format(what="this attention module", detail=type(hf).__name__))
    for hf in modules:
        if not _uses_registry(hf):
            same = [i for i, m in enumerate(modules) if type(m) is type(hf)]
            raise RoutingError(_ERR_NOT_REGISTRY.format(cls=type(hf).__name__, layers=_layer_span(same)))


@contextmanager
def route_attention(model: Any, fn: AttentionFn | None = None) -> Iterator[None]:
    """Run every attention layer of ``model`` (a `LoadedModel`) through ``fn`` in this block.

    ``fn(layer, query, key, value, *, scaling, attention_mask)`` gets post-RoPE
    ``query [b, heads, n_q, d]``, ``key``/``value [b, kv_heads, n_k, d]`` and returns the
    attention output ``[b, n_q, heads, d]``. ``None`` means plain causal SDPA.
    """
    if getattr(_state, "fn", None) is not None:
        raise AttnlabError(_ERR_NESTED)
    check_routable(model)
    _ensure_registered()
    cfg = model.hf_model.config
    modules = _attention_modules(model)
    old_impl = cfg._attn_implementation
    swapped: list[Any] = []
    _state.fn = fn or _default_fn
    _state.layer_of = {}
    _state.counts = {}
    classes = [type(attn.original_component) for attn in modules]
    try:
        for layer, attn in enumerate(modules):
            hf = attn.original_component
            _state.layer_of[id(hf)] = layer

            def forward(self, *args, _hf=hf, _layer=layer, **kwargs):
                # every call of a layer's attention must reach attnlab's function exactly once,
                # or the numbers measured or produced would silently be the model's own
                before = _state.counts.get(_layer, 0)
                out = _hf(*args, **kwargs)
                ran = _state.counts.get(_layer, 0) - before
                if ran != 1:
                    same = [i for i, c in enumerate(classes) if c is type(_hf)]
                    raise RoutingError(_ERR_BYPASS.format(cls=type(_hf).__name__, layer=_layer, layers=_layer_span(same), n=ran))
                return out

            # The bridge forwards attribute writes to the wrapped module, so bypass it.
            object.__setattr__(attn, "forward", types.MethodType(forward, attn))
            swapped.append(attn)
        cfg._attn_implementation = IMPLEMENTATION
        yield
    finally:
        cfg._attn_implementation = old_impl
        for attn in swapped:
            attn.__dict__.pop("forward", None)
        _state.fn = None
        _state.layer_of = {}
        _state.counts = None
