"""Hook-based capture: reduce each layer's attention to per-head statistics during the forward.

Two paths, one reduction (`attnlab.stats.HeadStatAccumulator`):

- **pattern** — a forward hook on ``blocks.{l}.attn.hook_pattern`` reduces the model's own
  softmaxed pattern ``[1, heads, n, n]`` in row chunks and returns it untouched. Exact by
  construction; the bridge's eager attention holds the ``n × n`` pattern of one layer at a time.
- **qk** — attention is routed (`attnlab.attention.route_attention`) to a function that gets
  the post-RoPE queries and keys (what ``hook_rot_q`` / ``hook_rot_k`` carry), recomputes the
  softmax one query chunk at a time (``heads × chunk × n``, GQA-aware) for the statistics, and
  computes the layer's output with SDPA. Nothing ``n × n`` is ever materialised, which is what
  makes 8k+ contexts fit.

With a device map (`attnlab.models.load_model`), each layer's statistics are reduced on the
device that layer runs on (`LoadedModel.layer_device`) and gathered on the CPU by `finalize`.

Both paths agree on every statistic (to 1e-4 on the embedded model, 1e-5 on every tiny
architecture of tests/test_architectures.py). Sliding windows, logit soft-capping and learned
sinks (`attnlab.attention.AttentionVariant`) are recomputed exactly as the model computes them;
on a window layer the statistics are over the keys the model can see (see `attnlab.stats`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from attnlab.attention import (
    PLAIN,
    AttentionVariant,
    attend,
    layer_variants,
    route_attention,
    scores_to_probs,
    sdpa,
)
from attnlab.errors import PromptError
from attnlab.models import LoadedModel
from attnlab.names import attn_hook
from attnlab.stats import HeadStatAccumulator, SampleStats, StatConfig

PATHS = ("pattern", "qk")

_ERR_TOO_LONG = (
    "prompt {name!r} has {n} tokens but {model} takes at most {n_ctx}: shorten it "
    "(e.g. --lengths up to {n_ctx}) or use a longer-context model"
)
_ERR_PATH = "capture path must be one of {paths}, got {path!r}"


@dataclass
class CaptureResult:
    """One sample's capture: per-layer `SampleStats` (``layers[l]``) and the sample length."""

    layers: list[SampleStats]
    n_tokens: int

    def values(self) -> torch.Tensor:
        """``[layers, heads, n_stats]``."""
        return torch.stack([s.values for s in self.layers])


def check_length(model: LoadedModel, n: int, name: str = "prompt") -> None:
    if n > model.n_ctx:
        raise PromptError(_ERR_TOO_LONG.format(name=name, n=n, model=model.name, n_ctx=model.n_ctx))
    if n < 1:
        raise PromptError(f"prompt {name!r} is empty after tokenisation: give it some text")


@torch.no_grad()
def capture(
    model: LoadedModel,
    input_ids: torch.Tensor,
    config: StatConfig | None = None,
    *,
    path: str = "pattern",
    name: str = "prompt",
) -> CaptureResult:
    """Run one forward over ``input_ids`` ``[1, n]`` and return its per-head statistics.

    Args:
        model: a `LoadedModel`.
        input_ids: ``[1, n]`` token ids (one sample; samples differ in length).
        config: which statistics; defaults to `StatConfig()`.
        path: ``"pattern"`` (exact, from ``hook_pattern``) or ``"qk"`` (from q and k, O(n) memory).
        name: the sample's name, for error messages.
    """
    config = config or StatConfig()
    if path not in PATHS:
        raise ValueError(_ERR_PATH.format(paths=PATHS, path=path))
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.shape[0] != 1:
        raise ValueError(f"capture takes one sample at a time, got a batch of {input_ids.shape[0]}")
    n = int(input_ids.shape[1])
    check_length(model, n, name)
    input_ids = input_ids.to(model.device)  # the input embedding's device
    variants = layer_variants(model)  # a config whose window fields disagree stops here
    # each layer reduces on the device it runs on (no n × n chunk crosses devices); `finalize`
    # gathers every layer's statistics on the CPU
    accs = [HeadStatAccumulator(model.n_heads, n, config, device=model.layer_device(layer), window=v.window)
            for layer, v in enumerate(variants)]
    if path == "pattern":
        _run_pattern_path(model, input_ids, accs, config)
    else:
        _run_qk_path(model, input_ids, accs, config)
    return CaptureResult(layers=[a.finalize() for a in accs], n_tokens=n)


def _run_pattern_path(model: LoadedModel, input_ids: torch.Tensor, accs: list[HeadStatAccumulator], config: StatConfig) -> None:
    def make_hook(layer: int) -> Callable:
        def hook(pattern: torch.Tensor, hook=None):
            p = pattern[0]
            for a, b in config.chunks(p.shape[-1]):
                accs[layer].update(p[:, a:b, :], a)
            return None

        return hook

    hooks = [(attn_hook(layer, "hook_pattern"), make_hook(layer)) for layer in range(model.n_layers)]
    # Statistics need every layer's attention, not the logits: stop before the unembedding.
    model.bridge.run_with_hooks(input_ids, fwd_hooks=hooks, stop_at_layer=model.n_layers)


def qk_probabilities(
    query: torch.Tensor, key: torch.Tensor, start: int, end: int, scaling: float, variant: AttentionVariant | None = None
) -> torch.Tensor:
    """Softmax rows ``start..end-1`` of causal attention, recomputed from q and k.

    Args:
        query: ``[heads, n, d]`` post-RoPE queries.
        key: ``[kv_heads, n, d]`` post-RoPE keys (GQA: query head h reads KV head h // group).
        variant: the layer's sliding window / soft-cap / learned sinks (default: none).
    Returns:
        ``[heads, end - start, n]`` float32 probabilities (0 on future keys and keys outside
        the window; with learned sinks each row sums to ``1 -`` the sink's mass).
    """
    h, n, _ = query.shape
    group = h // key.shape[0]
    q = query[:, start:end, :].to(torch.float32)
    k = key.to(torch.float32)
    q = q.reshape(key.shape[0], group * (end - start), -1)  # fold each GQA group into rows
    scores = torch.matmul(q, k.transpose(-1, -2)).view(h, end - start, n) * scaling
    return scores_to_probs(scores, torch.arange(start, end, device=query.device), variant or PLAIN)


def _run_qk_path(model: LoadedModel, input_ids: torch.Tensor, accs: list[HeadStatAccumulator], config: StatConfig) -> None:
    def attention(layer: int, query, key, value, *, scaling: float, attention_mask=None, variant: AttentionVariant = PLAIN) -> torch.Tensor:
        q, k = query[0], key[0]
        for a, b in config.chunks(q.shape[1]):
            accs[layer].update(qk_probabilities(q, k, a, b, scaling, variant), a)
        if variant.plain:
            return sdpa(query, key, value, scaling=scaling)
        return attend(query, key, value, scaling=scaling, variant=variant)

    with route_attention(model, attention):
        model.hf_model.base_model(input_ids, use_cache=False)  # no unembedding: logits are not needed
