"""Head ablation: knock chosen attention heads out and see what the model loses.

A head's contribution to the residual stream is its attention output ``z`` (one ``head_dim``
vector per query position) projected by ``W_O``. Three standard ways to remove it
(`ABLATION_METHODS`):

- ``zero``: ``z = 0`` — the head writes nothing;
- ``mean``: ``z = mean_z`` — the head writes its average output over a reference set
  (`head_means`), which keeps the residual stream on-distribution;
- ``uniform``: the head attends uniformly to every visible key, so ``z_i`` is the mean of the
  values ``v_0..v_i`` — it still moves information, but no longer selects anything.

Two places to do it, because attnlab runs attention two ways:

- ``path="bridge"``: forward hooks on the TransformerBridge (``blocks.{l}.attn.hook_z`` for zero
  and mean, ``blocks.{l}.attn.hook_pattern`` for uniform), for plain ``model.bridge(...)``
  forwards and ``run_with_hooks``. They exist for Llama- and GPT-2-style bridges alike.
- ``path="routed"``: inside the attention function of `attnlab.attention.route_attention`
  (SDPA prefill, KV-cache decoding). Routing bypasses the bridge's attention forward, so
  ``hook_pattern`` never fires there, and ``hook_z`` fires only where the Hugging Face module's
  output projection is a bridge component (Llama yes, GPT-2 no) — hence the routed path applies
  the ablation to the attention function's output itself, which is ``z`` for every
  architecture. `HeadAblation.apply` does that; `ablated_attention` wraps any attention function.

Both paths give the same logits (the tests check it for each method on GQA and MHA models), and
the hooks are always removed when the ``with`` block ends, also when the forward raises::

    with ablate_heads(model, [(14, 3), (20, 7)], "zero") as handle:
        logits = model.bridge(ids)
    assert handle.calls > 0            # the ablation really ran
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from attnlab.attention import AttentionFn, attend, route_attention
from attnlab.names import attn_hook

from .base import ProbeError

ABLATION_METHODS = ("zero", "mean", "uniform")
ABLATION_PATHS = ("bridge", "routed")

_ERR_METHOD = "ablation method must be one of {methods}, got {method!r}"
_ERR_PATH = "ablation path must be one of {paths}, got {path!r}"
_ERR_HEAD = "cannot ablate head {head}: the model has layers 0..{max_layer} and query heads 0..{max_head}"
_ERR_NEEDS_MEANS = "mean ablation needs per-head means [layers, heads, head_dim]: compute them with head_means(model, prompts)"
_ERR_MEANS_SHAPE = "head means have shape {got}, expected [layers, heads, head_dim] = {expected}"
_ERR_NO_PROMPTS = "head_means needs at least one reference prompt"
_ERR_BATCH = "routed ablation handles one sample at a time (batch 1), got a batch of {batch}"


class AblationError(ProbeError):
    """An ablation was asked for heads, a method or means that do not fit the model."""


@dataclass
class HeadAblation:
    """Which heads to ablate and how. ``heads`` are ``(layer, query_head)`` pairs.

    ``means``: ``[layers, heads, head_dim]`` (required for ``method="mean"``).
    ``calls`` counts how many (layer, forward) applications happened, so callers can check the
    ablation actually ran in the path they use.
    """

    heads: tuple[tuple[int, int], ...]
    method: str = "zero"
    means: torch.Tensor | None = None
    calls: int = 0
    _by_layer: dict[int, list[int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.method not in ABLATION_METHODS:
            raise AblationError(_ERR_METHOD.format(methods=list(ABLATION_METHODS), method=self.method))
        if self.method == "mean" and self.means is None:
            raise AblationError(_ERR_NEEDS_MEANS)
        self.heads = tuple(sorted({(int(layer), int(h)) for layer, h in self.heads}))
        self._by_layer = {}
        for layer, h in self.heads:
            self._by_layer.setdefault(layer, []).append(h)

    @property
    def layers(self) -> list[int]:
        return sorted(self._by_layer)

    def heads_in(self, layer: int) -> list[int]:
        return self._by_layer.get(layer, [])

    def check(self, model) -> HeadAblation:
        """Raise an `AblationError` for heads or means that do not fit ``model``; return self."""
        for layer, h in self.heads:
            if not (0 <= layer < model.n_layers and 0 <= h < model.n_heads):
                raise AblationError(
                    _ERR_HEAD.format(head=(layer, h), max_layer=model.n_layers - 1, max_head=model.n_heads - 1)
                )
        if self.means is not None:
            expected = (model.n_layers, model.n_heads, model.head_dim)
            if tuple(self.means.shape) != expected:
                raise AblationError(_ERR_MEANS_SHAPE.format(got=tuple(self.means.shape), expected=expected))
        return self

    # -- the routed path -----------------------------------------------------------------
    def apply(self, layer: int, out: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Ablate this layer's heads in a routed attention output.

        Args:
            out: ``[1, n_q, heads, head_dim]`` attention output (HF layout, ``z``).
            value: ``[1, kv_heads, n_k, head_dim]`` values (cache included); the queries are
                the last ``n_q`` of the ``n_k`` positions.
        Returns:
            ``out`` with the chosen heads replaced (a new tensor; the input is not modified).
        """
        heads = self.heads_in(layer)
        if not heads:
            return out
        if out.shape[0] != 1:
            raise AblationError(_ERR_BATCH.format(batch=out.shape[0]))
        self.calls += 1
        out = out.clone()
        idx = torch.tensor(heads, device=out.device)
        if self.method == "zero":
            out[:, :, idx, :] = 0
        elif self.method == "mean":
            out[:, :, idx, :] = self.means[layer, idx].to(out.device, out.dtype)  # type: ignore[index]
        else:
            out[:, :, idx, :] = _uniform_output(value, out.shape[1], out.shape[2], heads).to(out.dtype)
        return out

    # -- the bridge path -----------------------------------------------------------------
    def z_hook(self, layer: int) -> Callable:
        """A ``hook_z`` hook (``[b, n, heads, head_dim]``) for zero and mean ablation."""
        idx = self.heads_in(layer)

        def hook(z: torch.Tensor, hook=None) -> torch.Tensor:
            self.calls += 1
            z = z.clone()
            if self.method == "zero":
                z[:, :, idx, :] = 0
            else:
                z[:, :, idx, :] = self.means[layer, idx].to(z.device, z.dtype)  # type: ignore[index]
            return z

        return hook

    def pattern_hook(self, layer: int) -> Callable:
        """A ``hook_pattern`` hook (``[b, heads, n_q, n_k]``) that makes attention uniform over
        the visible (causal) keys."""
        idx = self.heads_in(layer)

        def hook(pattern: torch.Tensor, hook=None) -> torch.Tensor:
            self.calls += 1
            n_q, n_k = pattern.shape[-2:]
            pos = torch.arange(n_k - n_q, n_k, device=pattern.device)[:, None]
            visible = (torch.arange(n_k, device=pattern.device)[None, :] <= pos).to(pattern.dtype)
            pattern = pattern.clone()
            pattern[:, idx] = visible / visible.sum(-1, keepdim=True)
            return pattern

        return hook


def _uniform_output(value: torch.Tensor, n_q: int, n_heads: int, heads: Sequence[int]) -> torch.Tensor:
    """Mean of the visible values for each query: ``[1, n_q, len(heads), head_dim]``."""
    n_k = value.shape[-2]
    group = n_heads // value.shape[1]
    kv = torch.tensor([h // group for h in heads], device=value.device)
    v = value[0, kv].to(torch.float32)  # [len(heads), n_k, d]
    start = n_k - n_q
    csum = v.cumsum(dim=1)[:, start:, :]  # [len(heads), n_q, d]
    count = torch.arange(start + 1, n_k + 1, device=value.device, dtype=torch.float32)[None, :, None]
    return (csum / count).transpose(0, 1)[None]


def as_ablation(heads: Iterable[tuple[int, int]] | HeadAblation, method: str = "zero", means: torch.Tensor | None = None) -> HeadAblation:
    """A `HeadAblation` from ``(layer, head)`` pairs (or the ablation itself, unchanged)."""
    if isinstance(heads, HeadAblation):
        return heads
    return HeadAblation(tuple(heads), method, means)


def ablated_attention(fn: AttentionFn | None, ablation: HeadAblation) -> AttentionFn:
    """Wrap a `route_attention` function so its output has ``ablation`` applied."""

    def attention(layer: int, query, key, value, *, scaling: float, attention_mask=None, variant=None) -> torch.Tensor:
        if fn is None:
            out = attend(query, key, value, scaling=scaling, variant=variant)
        elif variant is None or variant.plain:
            out = fn(layer, query, key, value, scaling=scaling, attention_mask=attention_mask)
        else:
            out = fn(layer, query, key, value, scaling=scaling, attention_mask=attention_mask, variant=variant)
        return ablation.apply(layer, out, value)

    return attention


@contextmanager
def ablate_heads(
    model,
    heads: Iterable[tuple[int, int]] | HeadAblation,
    method: str = "zero",
    *,
    means: torch.Tensor | None = None,
    path: str = "bridge",
    attention: AttentionFn | None = None,
) -> Iterator[HeadAblation]:
    """Ablate ``heads`` of ``model`` (a `LoadedModel`) inside the ``with`` block.

    Args:
        heads: ``(layer, query_head)`` pairs, or a ready `HeadAblation` (then ``method`` and
            ``means`` are ignored).
        method: ``zero``, ``mean`` (needs ``means`` from `head_means`) or ``uniform``.
        path: ``bridge`` — hooks on ``hook_z`` / ``hook_pattern`` for ``model.bridge(...)``
            forwards; ``routed`` — enters `route_attention` with an ablating SDPA function
            (or ``attention`` wrapped), for ``model.hf_model(...)`` forwards and KV-cache
            decoding.
    Yields:
        the `HeadAblation`; its ``calls`` counts the applications.

    Hooks (or the routing) are removed when the block ends, whether or not it raised.
    """
    if path not in ABLATION_PATHS:
        raise AblationError(_ERR_PATH.format(paths=list(ABLATION_PATHS), path=path))
    ablation = as_ablation(heads, method, means).check(model)
    if path == "routed":
        with route_attention(model, ablated_attention(attention, ablation)):
            yield ablation
        return
    handles = []
    try:
        for layer in ablation.layers:
            if ablation.method == "uniform":
                point, fn = attn_hook(layer, "hook_pattern"), ablation.pattern_hook(layer)
            else:
                point, fn = attn_hook(layer, "hook_z"), ablation.z_hook(layer)
            hook_point = model.bridge.hook_dict[point]
            handles.append((hook_point, hook_point.add_hook(fn, dir="fwd")))
        yield ablation
    finally:
        for hook_point, handle in handles:
            handle.hook.remove()
            if handle in hook_point.fwd_hooks:
                hook_point.fwd_hooks.remove(handle)


@torch.inference_mode()
def head_means(model, prompts: Sequence[torch.Tensor], *, path: str = "routed") -> torch.Tensor:
    """Per-head mean attention output ``z`` over every position of the reference prompts.

    Args:
        prompts: token ids, each ``[1, n]`` (or ``[n]``); anything with ``.input_ids`` works too.
        path: ``routed`` (SDPA, fast) or ``bridge`` (``hook_z`` on the eager bridge).
    Returns:
        ``[layers, heads, head_dim]`` float32, for ``HeadAblation(method="mean", means=...)``.
    """
    if path not in ABLATION_PATHS:
        raise AblationError(_ERR_PATH.format(paths=list(ABLATION_PATHS), path=path))
    ids_list = [getattr(p, "input_ids", p) for p in prompts]
    if not ids_list:
        raise AblationError(_ERR_NO_PROMPTS)
    total = torch.zeros(model.n_layers, model.n_heads, model.head_dim, dtype=torch.float64)
    count = 0

    def add(layer: int, z: torch.Tensor) -> None:  # z: [1, n, heads, d]
        total[layer] += z[0].to(torch.float64).sum(0).cpu()

    for ids in ids_list:
        ids = (ids if ids.dim() == 2 else ids[None]).to(model.device)
        count += int(ids.shape[1])
        if path == "routed":

            def attention(layer: int, query, key, value, *, scaling: float, attention_mask=None, variant=None) -> torch.Tensor:
                out = attend(query, key, value, scaling=scaling, variant=variant)
                add(layer, out)
                return out

            with route_attention(model, attention):
                model.hf_model.base_model(ids, use_cache=False)
        else:
            hooks = [
                (attn_hook(layer, "hook_z"), lambda z, hook, layer=layer: add(layer, z))
                for layer in range(model.n_layers)
            ]
            model.bridge.run_with_hooks(ids, fwd_hooks=hooks, stop_at_layer=model.n_layers)
    return (total / count).to(torch.float32)
