"""Route a bridged model's attention through a function of ours, and always restore it.

The TransformerBridge replaces each Hugging Face attention module with an eager
re-implementation that materialises the full ``[heads, n, n]`` pattern (that is what makes
``hook_pattern`` possible). Work that must not pay for that — the q/k capture path at long
context, and the sparse executors — swaps each layer's bridge forward for the original Hugging
Face attention module and selects our function through transformers' attention-function
registry (``AttentionInterface``). The function receives exactly what ``hook_rot_q`` /
``hook_rot_k`` carry on the eager path: post-RoPE queries ``[batch, heads, n_q, head_dim]``
and keys/values ``[batch, kv_heads, n_k, head_dim]`` (before GQA repetition).

Attention variants pass through: each layer's sliding window, logit soft-cap and learned sinks
are read from the kwargs its Hugging Face module hands the attention function (``sliding_window``,
``softcap``, ``s_aux``; the scaling is always the module's own ``scaling``), checked against the
config read as transformers reads it (`config_windows`, `layer_variants`), and given to the
function as ``variant=`` (`AttentionVariant`). A function without a ``variant`` parameter is
refused on a model that needs one, and every layer must run the function exactly once per
forward (`RoutingError` otherwise): no path silently computes something the model does not.

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
from dataclasses import dataclass
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


_ERR_BIAS = (
    "{cls} adds {bias} to its attention scores{where}: attnlab's executors and q/k "
    "statistics compute softmax(q·k) without it, so they cannot run on this model. Use the pattern "
    "path (--path pattern) for statistics"
)


_ERR_VARIANT_DIFFERS = (
    "{cls} (layer {layer}) passes its attention function {got}, but its config describes {want}: "
    "attnlab will not guess which one the model computes; check the config's window fields"
)
_ERR_FN_PLAIN = (
    "{fn} computes plain causal attention, but layers {layer} use {what}: this path does not "
    "support that attention variant (it takes no `variant` parameter); use the pattern path "
    "(--path pattern) for statistics"
)
_ERR_CONFIG = "{cfg}: {what}; fix the config's attention fields (attnlab reads them as transformers does)"


class RoutingError(AttnlabError):
    """A model's attention did not (or cannot) run through attnlab's attention function."""


class ConfigError(RoutingError):
    """A config whose attention fields disagree, or describe attention attnlab does not model."""


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
def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scaling: float) -> torch.Tensor:
    """Causal SDPA with GQA; ``[b, h, n_q, d]`` in, ``[b, n_q, h, d]`` out (HF's layout).

    When ``n_q < n_k`` the queries are the last ``n_q`` positions (prefill over a cache).
    Plain attention only: `attend` is the model's own attention whatever its variant.
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


@dataclass(frozen=True, eq=False)
class AttentionVariant:
    """What one layer's attention computes beyond ``softmax(q·kᵀ·scaling + causal mask)``.

    Read from the kwargs the Hugging Face attention module passes to its attention function
    (checked against what the config says, `layer_variants`):

    - ``window``: sliding window, Hugging Face's convention (``sliding_window`` kwarg): query
      ``i`` sees key ``j`` iff ``i - j < window`` — the window counts the query itself; 0 = none.
    - ``softcap``: logit soft-capping ``s = c·tanh(s/c)`` on the scaled scores, before the mask
      (Gemma 2's ``attn_logit_softcapping``, the ``softcap`` kwarg); None = none.
    - ``sinks``: learned attention sinks (gpt-oss, the ``s_aux`` kwarg): float ``[heads]``, one
      logit per query head in the softmax denominator that takes mass but has no value. The
      probabilities over the real keys then sum to ``1 - sink mass``.
    """

    window: int = 0
    softcap: float | None = None
    sinks: torch.Tensor | None = None

    @property
    def plain(self) -> bool:
        return not self.window and self.softcap is None and self.sinks is None

    def describe(self) -> str:
        parts = []
        if self.window:
            parts.append(f"sliding window {self.window}")
        if self.softcap is not None:
            parts.append(f"logit soft-capping {self.softcap:g}")
        if self.sinks is not None:
            parts.append("learned attention sinks")
        return ", ".join(parts) or "plain causal attention"

    def same(self, other: AttentionVariant) -> bool:
        """Same window and soft-cap, and sinks present in both or neither."""
        return (self.window == other.window and self.softcap == other.softcap
                and (self.sinks is None) == (other.sinks is None))


PLAIN = AttentionVariant()


def key_mask(q_pos: torch.Tensor, n_k: int, window: int = 0) -> torch.Tensor:
    """Bool ``[len(q_pos), n_k]``: causal (and windowed) visibility, True = the query sees the key."""
    j = torch.arange(n_k, device=q_pos.device)[None, :]
    i = q_pos[:, None]
    keep = j <= i
    if window:
        keep &= (i - j) < window
    return keep


def scores_to_probs(scores: torch.Tensor, q_pos: torch.Tensor, variant: AttentionVariant) -> torch.Tensor:
    """``[heads, R, n_k]`` scaled scores of queries at ``q_pos`` (overwritten) → probabilities over the keys,
    as Hugging Face eager attention computes them: soft-cap, mask (causal + window), softmax
    with the learned sinks in the denominator (their mass is dropped, not given to any key)."""
    if variant.softcap is not None:
        scores = torch.tanh(scores / variant.softcap) * variant.softcap
    # in place: every caller passes scores it just computed (a copy of [heads, R, n_k] per
    # chunk made the q/k path ~20% slower on SmolLM2 at 2k)
    scores = scores.masked_fill_(~key_mask(q_pos, scores.shape[-1], variant.window), float("-inf"))
    if variant.sinks is None:
        return torch.softmax(scores, dim=-1)
    sink = variant.sinks.to(scores.device, scores.dtype).reshape(-1, 1, 1).expand(-1, scores.shape[1], 1)
    both = torch.cat([scores, sink], dim=-1)
    return torch.softmax(both - both.amax(-1, keepdim=True), dim=-1)[..., :-1]


def variant_attention(query, key, value, *, scaling: float, variant: AttentionVariant, chunk: int = 256) -> torch.Tensor:
    """Causal attention with a variant, one query chunk at a time (``heads × chunk × n_k`` scores
    at once); ``[b, h, n_q, d]`` in, ``[b, n_q, h, d]`` out like `sdpa`. Computed in fp32."""
    b, h, n_q, _ = query.shape
    n_k = key.shape[-2]
    group = h // key.shape[1]
    k = key.to(torch.float32).repeat_interleave(group, dim=1)
    v = value.to(torch.float32).repeat_interleave(group, dim=1)
    out = torch.empty(b, h, n_q, value.shape[-1], dtype=torch.float32, device=query.device)
    for a in range(0, n_q, chunk):
        e = min(n_q, a + chunk)
        q_pos = torch.arange(n_k - n_q + a, n_k - n_q + e, device=query.device)
        for i in range(b):
            s = torch.matmul(query[i, :, a:e].to(torch.float32), k[i].transpose(-1, -2)) * scaling
            out[i, :, a:e] = torch.matmul(scores_to_probs(s, q_pos, variant), v[i])
    return out.to(query.dtype).transpose(1, 2).contiguous()


def attend(query, key, value, *, scaling: float, variant: AttentionVariant | None = None) -> torch.Tensor:
    """The model's own attention for ``variant``: `sdpa` for plain layers, `variant_attention` else."""
    if variant is None or variant.plain:
        return sdpa(query, key, value, scaling=scaling)
    if variant.softcap is None and variant.sinks is None:
        return windowed_sdpa(query, key, value, scaling=scaling, window=variant.window)
    return variant_attention(query, key, value, scaling=scaling, variant=variant)


def windowed_sdpa(query, key, value, *, scaling: float, window: int, chunk: int = 512) -> torch.Tensor:
    """Causal SDPA with a sliding window, one query chunk at a time over only the keys the chunk
    can see (``chunk + window`` of them): memory ``O(chunk · (chunk + window))``, not
    ``O(n²)`` (a masked SDPA on a CPU materialises every score). ``[b, h, n_q, d]`` in,
    ``[b, n_q, h, d]`` out like `sdpa`."""
    n_q, n_k = query.shape[-2], key.shape[-2]
    group = query.shape[1] // key.shape[1]
    if group > 1:
        key = key.repeat_interleave(group, dim=1)
        value = value.repeat_interleave(group, dim=1)
    outs = []
    for a in range(0, n_q, chunk):
        e = min(n_q, a + chunk)
        q_pos = torch.arange(n_k - n_q + a, n_k - n_q + e, device=query.device)
        lo = max(0, int(q_pos[0]) - window + 1) if window else 0
        hi = int(q_pos[-1]) + 1
        mask = key_mask(q_pos, hi, window)[:, lo:]
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            query[:, :, a:e], key[:, :, lo:hi], value[:, :, lo:hi], attn_mask=mask, scale=scaling))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous()


def _accepts_variant(fn: Callable) -> bool:
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "variant" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _dispatch(module: Any, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    fn = getattr(_state, "fn", None)
    if fn is None:  # routing ended but a module still points here: behave like SDPA
        fn = _default_fn
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        layer = _state.layer_of.get(id(module), -1) if hasattr(_state, "layer_of") else -1
    layer = int(layer)
    counts = getattr(_state, "counts", None)
    if counts is not None:
        counts[layer] = counts.get(layer, 0) + 1
    if mask_bias(attention_mask):  # a bias the config did not announce: never computed without it
        raise RoutingError(_ERR_BIAS.format(
            cls=type(module).__name__, bias="a bias",
            where=f" through its attention mask (layer {layer}: values other than 0 and the masking value, "
                  "as ALiBi's position bias gives)"))
    softcap = kwargs.get("softcap")
    sinks = kwargs.get("s_aux")
    variant = AttentionVariant(
        window=int(kwargs.get("sliding_window") or 0),
        softcap=float(softcap) if softcap is not None else None,
        sinks=sinks.detach() if sinks is not None else None,
    )
    expected = getattr(_state, "variants", None)
    if expected is not None and 0 <= layer < len(expected) and not variant.same(expected[layer]):
        raise RoutingError(_ERR_VARIANT_DIFFERS.format(
            cls=type(module).__name__, layer=layer, got=variant.describe(), want=expected[layer].describe()))
    if variant.plain:
        out = fn(layer, query, key, value, scaling=float(scaling), attention_mask=attention_mask)
    elif _accepts_variant(fn):
        out = fn(layer, query, key, value, scaling=float(scaling), attention_mask=attention_mask, variant=variant)
    else:
        raise RoutingError(_ERR_FN_PLAIN.format(fn=getattr(fn, "__qualname__", fn), layer=layer, what=variant.describe()))
    return out, None


def _default_fn(layer: int, query, key, value, *, scaling: float, attention_mask=None, variant=None) -> torch.Tensor:
    return attend(query, key, value, scaling=scaling, variant=variant)


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


_LAYER_TYPES = ("full_attention", "sliding_attention")


def config_windows(cfg: Any, n_layers: int) -> list[int]:
    """Each layer's sliding window (0 = none), read from a Hugging Face config as transformers
    does: ``layer_types`` (``"sliding_attention"`` layers get ``sliding_window``) when present
    (Qwen2/Qwen3 derive it from ``use_sliding_window`` and ``max_window_layers``; Gemma 2/3 and
    gpt-oss from their alternating pattern), else ``sliding_window`` on every layer (Mistral,
    Phi-3) unless ``use_sliding_window`` is false. `ConfigError` when the fields disagree or
    describe attention attnlab does not model (chunked, bidirectional)."""
    name = type(cfg).__name__
    if getattr(cfg, "use_bidirectional_attention", None):
        raise ConfigError(_ERR_CONFIG.format(cfg=name, what="use_bidirectional_attention=True (attention is not causal)"))
    window = getattr(cfg, "sliding_window", None)
    use = getattr(cfg, "use_sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 0):
        raise ConfigError(_ERR_CONFIG.format(cfg=name, what=f"sliding_window={window!r} is not a window size"))
    if types is None:
        return [int(window or 0) if use is not False else 0] * n_layers
    types = list(types)
    if len(types) != n_layers:
        raise ConfigError(_ERR_CONFIG.format(cfg=name, what=f"layer_types has {len(types)} entries for {n_layers} layers"))
    other = sorted(set(types) - set(_LAYER_TYPES))
    if other:
        raise ConfigError(_ERR_CONFIG.format(cfg=name, what=f"layer_types holds {', '.join(other)} (attnlab models {', '.join(_LAYER_TYPES)})"))
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if sliding and not window:
        raise ConfigError(_ERR_CONFIG.format(cfg=name, what=f"layer_types marks layers {_layer_span(sliding)} sliding but sliding_window={window!r}"))
    if sliding and use is False:
        raise ConfigError(_ERR_CONFIG.format(cfg=name, what=f"layer_types marks layers {_layer_span(sliding)} sliding but use_sliding_window=False"))
    max_window = getattr(cfg, "max_window_layers", None)
    if use and window and max_window is not None:
        want = [i for i in range(n_layers) if i >= max_window]
        if want != sliding:
            raise ConfigError(_ERR_CONFIG.format(
                cfg=name, what=f"max_window_layers={max_window} makes layers {_layer_span(want)} sliding but layer_types says {_layer_span(sliding)}"))
    return [int(window) if t == "sliding_attention" else 0 for t in types]


def _forward_source(module: Any) -> str:
    import inspect

    try:
        return inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return ""


def layer_variants(model: Any) -> list[AttentionVariant]:
    """Each layer's `AttentionVariant` as the config and the attention modules declare it: the
    windows of `config_windows`, the soft-cap a module passes (``softcap=``, from
    ``attn_logit_softcapping``), the sinks it passes (``s_aux=``). Every routed forward checks
    the module's actual kwargs against this and stops on a difference."""
    cached = model.extra.get("attention_variants") if hasattr(model, "extra") else None
    if cached is not None:
        return cached
    cfg = model.hf_model.config
    modules = [getattr(attn, "original_component", None) for attn in _attention_modules(model)]
    windows = config_windows(cfg, len(modules))
    out = []
    for layer, hf in enumerate(modules):
        src = _forward_source(hf)
        softcap = getattr(hf, "attn_logit_softcapping", getattr(cfg, "attn_logit_softcapping", None))
        sinks = getattr(hf, "sinks", None)
        out.append(AttentionVariant(
            window=windows[layer],
            softcap=float(softcap) if softcap is not None and "softcap=" in src else None,
            sinks=sinks.detach() if sinks is not None and "s_aux" in src else None,
        ))
    if hasattr(model, "extra"):
        model.extra["attention_variants"] = out
    return out


def attention_fields(variants: list[AttentionVariant]) -> dict[str, Any]:
    """The ``attention`` entry of a model's identity (`attnlab.identity.ModelIdentity`): ``{}``
    for plain attention, else ``layer_windows`` (one int per layer, 0 = none) when a layer has a
    window, ``softcap`` when a layer soft-caps, ``learned_sinks: true`` when a layer has sinks."""
    out: dict[str, Any] = {}
    if any(v.window for v in variants):
        out["layer_windows"] = [int(v.window) for v in variants]
    caps = {v.softcap for v in variants if v.softcap is not None}
    if caps:
        out["softcap"] = max(caps)
    if any(v.sinks is not None for v in variants):
        out["learned_sinks"] = True
    return out


def layer_windows_of(identity: Any, n_layers: int) -> list[int]:
    """Each layer's own sliding window (0 = none) from a model identity or its dict (the
    ``attention.layer_windows`` entry, `attention_fields`); all 0 for files without it."""
    attention = (identity.get("attention") if hasattr(identity, "get") else None) or {}
    windows = attention.get("layer_windows") if hasattr(attention, "get") else None
    if not windows or len(windows) != n_layers:
        return [0] * n_layers
    return [int(w) for w in windows]


def uses_alibi(cfg: Any) -> bool:
    """Whether a Hugging Face config asks for ALiBi position biases (Falcon's ``alibi``, MPT's
    ``attn_config.alibi``, BLOOM always): transformers adds them to the attention mask."""
    attn_config = getattr(cfg, "attn_config", None)
    return bool(getattr(cfg, "alibi", False) or getattr(attn_config, "alibi", False)
                or getattr(cfg, "model_type", None) == "bloom")


def mask_bias(attention_mask: Any) -> bool:
    """Whether an additive attention mask carries a bias: a value that is neither 0 (attend) nor
    a masking value (-inf or the dtype's most negative numbers). Boolean masks never do."""
    if not isinstance(attention_mask, torch.Tensor) or not attention_mask.is_floating_point():
        return False
    masked = attention_mask <= torch.finfo(attention_mask.dtype).min / 2
    return bool(((attention_mask != 0) & ~masked).any())


def check_routable(model: Any, fn: AttentionFn | None = None) -> list[AttentionVariant]:
    """Refuse, before any forward, a model whose attention attnlab cannot route, and a ``fn``
    that does not take the ``variant`` its layers need; returns `layer_variants`."""
    modules = [getattr(attn, "original_component", None) for attn in _attention_modules(model)]
    for i, hf in enumerate(modules):
        if hf is None:
            raise RoutingError(_ERR_NOT_REGISTRY.format(cls=type(_attention_modules(model)[i]).__name__, layers=i))
    for hf in modules:
        if not _uses_registry(hf):
            same = [i for i, m in enumerate(modules) if type(m) is type(hf)]
            raise RoutingError(_ERR_NOT_REGISTRY.format(cls=type(hf).__name__, layers=_layer_span(same)))
    if uses_alibi(model.hf_model.config):
        raise RoutingError(_ERR_BIAS.format(cls=type(modules[0]).__name__, bias="a position bias (ALiBi)",
                                            where=" (its config asks for ALiBi)"))
    variants = layer_variants(model)
    if fn is not None and not _accepts_variant(fn):
        special = [i for i, v in enumerate(variants) if not v.plain]
        if special:
            raise RoutingError(_ERR_FN_PLAIN.format(
                fn=getattr(fn, "__qualname__", fn), layer=_layer_span(special), what=variants[special[0]].describe()))
    return variants


@contextmanager
def route_attention(model: Any, fn: AttentionFn | None = None) -> Iterator[None]:
    """Run every attention layer of ``model`` (a `LoadedModel`) through ``fn`` in this block.

    ``fn(layer, query, key, value, *, scaling, attention_mask)`` gets post-RoPE
    ``query [b, heads, n_q, d]``, ``key``/``value [b, kv_heads, n_k, d]`` and returns the
    attention output ``[b, n_q, heads, d]``. ``None`` means the model's own attention
    (`attend`). On layers with a sliding window, soft-capping or learned sinks ``fn`` also gets
    ``variant=`` (an `AttentionVariant`); a ``fn`` without a ``variant`` parameter is refused
    on such a model, so no path silently computes plain attention where the model does not.
    """
    if getattr(_state, "fn", None) is not None:
        raise AttnlabError(_ERR_NESTED)
    variants = check_routable(model, fn)
    _ensure_registered()
    cfg = model.hf_model.config
    modules = _attention_modules(model)
    old_impl = cfg._attn_implementation
    swapped: list[Any] = []
    _state.fn = fn or _default_fn
    _state.layer_of = {}
    _state.counts = {}
    _state.variants = variants
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
        _state.variants = None
