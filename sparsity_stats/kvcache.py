"""A KV cache that keeps a different number of tokens per KV head: a policy's decode phase.

`PolicyCache` is a transformers `Cache` (one `PolicyCacheLayer` per model layer) that stores
each KV head's keys and values separately, with the absolute position of every kept token. What
a head keeps is its `attnlab.sparsity_stats.policy.DecodeHead`:

- ``full``: every token (the cache equals Hugging Face's ``DynamicCache``);
- ``streaming``: the first ``sink`` and the last ``recent`` tokens; evicted at the end of prefill
  and at every decode step (after the new token is appended, before it attends);
- ``snapkv``: at the end of prefill, ``sink`` + the observation window (the last ``window``
  tokens) + the prompt tokens the window's queries attend to most (their attention summed over
  the window's queries and the group's query heads, max-pooled over key positions with kernel
  ``kernel``), ``budget`` in all; every generated token is kept after that.

The model sees keys after RoPE, so an evicted token leaves no hole in anyone's position:
`PolicyCache.get_seq_length` is the number of tokens *seen*, not kept, and new tokens get the
positions they would have had with a full cache.

The cache needs attnlab's attention function (a padded, per-head key set needs a validity mask
the model's own attention does not know): run the model inside
``route_attention(model, CachedAttention(cache))``, or use `generate` / `greedy_decode`, which do.
Batch 1 only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from attnlab.attention import route_attention, sdpa
from attnlab.errors import AttnlabError
from attnlab.models import LoadedModel

from .policy import DecodeHead, Policy

_ERR_BATCH = "the policy KV cache holds one sequence (batch 1): loop over samples"
_ERR_CONTEXT = "{what} needs {need} positions, beyond {model}'s context of {n_ctx}: shorten the prompt or generate fewer tokens"
_ERR_UNSUPPORTED = "the policy KV cache does not support {what}: use greedy or sampled generation"


class PolicyCacheLayer(CacheLayerMixin):
    """One layer's cache: a ``[1, H_kv, capacity, d]`` key and value buffer in which each KV head
    fills its own first ``lengths[h]`` slots, with the absolute position of every slot
    (``-1``: empty). A streaming head, once full, overwrites its oldest recent token in place
    (a ring after its sink), so a decode step copies one token per head, never the cache."""

    is_sliding = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, heads: list[DecodeHead]):
        super().__init__()
        self.heads = heads
        self.seen = 0
        self.compressed = False
        self.prompt_tokens = 0
        self.lengths: list[int] = [0] * len(heads)
        self._ring: list[int] = [0] * len(heads)
        self.slot_positions: torch.Tensor | None = None
        #: ``[H_kv, M]`` bool: which slots of the keys returned by the last `update` hold a token.
        self.valid: torch.Tensor | None = None
        #: ``[H_kv, M]`` long: the absolute position of each of those slots (-1 for padding).
        self.positions: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.shape[0] != 1:
            raise AttnlabError(_ERR_BATCH)
        if key_states.shape[1] != len(self.heads):
            raise AttnlabError(f"the policy's decode phase has {len(self.heads)} KV heads per layer, the model {key_states.shape[1]}: the policy is for another model")
        self.device, self.dtype = key_states.device, key_states.dtype
        self._allocate(0, key_states, value_states)
        self.is_initialized = True

    def _allocate(self, capacity: int, like_k: torch.Tensor | None = None, like_v: torch.Tensor | None = None) -> None:
        """(Re)allocate the buffers with ``capacity`` slots, keeping what the heads hold."""
        like_k = self.keys if like_k is None else like_k
        like_v = self.values if like_v is None else like_v
        b, h, d, dv = like_k.shape[0], len(self.heads), like_k.shape[-1], like_v.shape[-1]
        keys = like_k.new_zeros(b, h, capacity, d)
        values = like_v.new_zeros(b, h, capacity, dv)
        pos = torch.full((h, capacity), -1, dtype=torch.long, device=self.device)
        if self.slot_positions is not None:
            m = min(capacity, self.slot_positions.shape[-1])
            keys[:, :, :m] = self.keys[:, :, :m]
            values[:, :, :m] = self.values[:, :, :m]
            pos[:, :m] = self.slot_positions[:, :m]
        self.keys, self.values, self.slot_positions = keys, values, pos

    # -- the model's calls ---------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens (once prefill is over, a full streaming head overwrites its
        oldest recent token). Returns ``keys, values [1, H_kv, M, d]``: views of the buffers up
        to the longest head (see `valid` and `positions`)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != 1:
            raise AttnlabError(_ERR_BATCH)
        n = key_states.shape[-2]
        need = max(self.lengths) + n
        if need > self.keys.shape[-2]:
            self._allocate(max(need, self.keys.shape[-2] * 5 // 4 + 64))
        for h, head in enumerate(self.heads):
            if self.compressed and head.kind == "streaming":
                for i in range(n):
                    self._stream_one(h, head, key_states[:, h, i], value_states[:, h, i], self.seen + i)
                continue
            at = self.lengths[h]
            self.keys[:, h, at:at + n] = key_states[:, h]
            self.values[:, h, at:at + n] = value_states[:, h]
            self.slot_positions[h, at:at + n] = torch.arange(self.seen, self.seen + n, device=self.device)
            self.lengths[h] = at + n
        self.seen += n
        return self._view()

    def _stream_one(self, h: int, head: DecodeHead, k: torch.Tensor, v: torch.Tensor, pos: int) -> None:
        sink, recent = head.params["sink"], head.params["recent"]
        if self.lengths[h] < sink + recent:
            slot = self.lengths[h]
            self.lengths[h] += 1
            if self.lengths[h] == sink + recent:
                self._ring[h] = sink
        else:
            slot = self._ring[h]
            self._ring[h] = sink + (slot - sink + 1) % recent
        self.keys[:, h, slot] = k
        self.values[:, h, slot] = v
        self.slot_positions[h, slot] = pos

    def _view(self) -> tuple[torch.Tensor, torch.Tensor]:
        m = max(self.lengths)
        self.positions = self.slot_positions[:, :m]
        self.valid = None if all(n == m for n in self.lengths) else self.positions >= 0
        return self.keys[:, :, :m], self.values[:, :, :m]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        """Tokens seen (not kept): the position the next token takes."""
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise AttnlabError(_ERR_UNSUPPORTED.format(what="beam search"))

    def crop(self, tokens_to_remove: int) -> None:
        raise AttnlabError(_ERR_UNSUPPORTED.format(what="cropping (assisted generation)"))

    def reset(self) -> None:
        self.__init__(self.heads)

    # -- eviction ------------------------------------------------------------------------------
    def _keep(self, h: int, index: torch.Tensor) -> None:
        """Head ``h`` keeps the slots ``index`` (sorted), moved to its first slots."""
        k = index.numel()
        if k == self.lengths[h]:
            return
        self.keys[:, h, :k] = self.keys[:, h].index_select(-2, index)
        self.values[:, h, :k] = self.values[:, h].index_select(-2, index)
        self.slot_positions[h, :k] = self.slot_positions[h].index_select(0, index)
        self.slot_positions[h, k:] = -1
        self.lengths[h] = k

    def compress(self, scores: dict[int, torch.Tensor] | None = None) -> None:
        """The end of prefill: streaming heads keep sink + recent, snapkv heads their budget
        chosen from ``scores[h]`` (``[n]`` pooled attention of the observation window per key
        of head ``h``); full heads keep everything. The buffers shrink when every head did.
        Called once, by `CachedAttention`."""
        self.prompt_tokens = n = self.seen
        for h, head in enumerate(self.heads):
            if head.kind == "streaming":
                p = head.params
                keep = torch.arange(n, device=self.device)
                self._keep(h, keep[(keep < p["sink"]) | (keep >= n - p["recent"])])
                self._ring[h] = p["sink"]  # the oldest recent token is in the slot after the sink
            elif head.kind == "snapkv":
                self._keep(h, snapkv_keep(head, n, None if scores is None else scores.get(h), self.device))
        longest = max(self.lengths)
        if longest < self.keys.shape[-2] // 2:
            self._allocate(longest + 64)
        self._view()
        self.compressed = True

    # -- accounting ----------------------------------------------------------------------------
    def tokens_held(self) -> list[int]:
        return list(self.lengths)

    def token_bytes(self) -> int:
        """Bytes one token takes in one KV head (its key and its value)."""
        return self.keys.shape[-1] * self.keys.element_size() + self.values.shape[-1] * self.values.element_size()

    def bytes_held(self) -> int:
        return sum(self.lengths) * self.token_bytes() if self.is_initialized else 0

    def bytes_allocated(self) -> int:
        return (self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()) if self.is_initialized else 0


def snapkv_keep(head: DecodeHead, n: int, scores: torch.Tensor | None, device: Any = None) -> torch.Tensor:
    """Sorted indices a snapkv head keeps of an ``n``-token prompt: the first ``sink``, the last
    ``window``, and the top-scoring of the rest (``scores [n]``, already pooled) up to the budget."""
    p = head.params
    total = head.prompt_tokens_kept(n)
    sink, window = min(p["sink"], n), min(p["window"], n)
    fixed = torch.zeros(n, dtype=torch.bool, device=device)
    fixed[:sink] = True
    fixed[n - window:] = True
    free = total - int(fixed.sum())
    if free > 0:
        if scores is None:
            raise AttnlabError("a snapkv head needs the observation window's attention at the end of prefill: run the model through CachedAttention")
        s = scores.float().to(fixed.device).masked_fill(fixed, -math.inf)
        fixed[torch.topk(s, free).indices] = True
    return fixed.nonzero().flatten()


def window_scores(query: torch.Tensor, key: torch.Tensor, scaling: float, heads: list[DecodeHead]) -> dict[int, torch.Tensor]:
    """SnapKV's selection scores at the end of prefill, per snapkv KV head: softmax attention of
    the last ``window`` queries (causal) over every key, summed over those queries and the
    group's query heads, then max-pooled over key positions (kernel ``kernel``, stride 1)."""
    n_q, n = query.shape[-2], key.shape[-2]
    group = query.shape[1] // key.shape[1]
    out: dict[int, torch.Tensor] = {}
    for h, head in enumerate(heads):
        if head.kind != "snapkv":
            continue
        w = min(head.params["window"], n_q)
        q = query[0, h * group:(h + 1) * group, n_q - w:].float()  # [g, w, d]
        k = key[0, h].float()  # [n, d]
        logits = q @ k.T * scaling  # [g, w, n]
        q_pos = torch.arange(n - w, n, device=k.device)
        logits = logits.masked_fill(torch.arange(n, device=k.device)[None, :] > q_pos[:, None], -math.inf)
        attn = logits.softmax(-1).sum(dim=(0, 1))  # [n]
        ks = head.params["kernel"]
        if ks > 1:
            attn = torch.nn.functional.max_pool1d(attn[None, None], ks, stride=1, padding=ks // 2)[0, 0]
        out[h] = attn
    return out


class PolicyCache(Cache):
    """The KV cache of a policy's decode phase (see the module docstring).

    Args:
        policy: a `Policy` (its decode section; without one every head keeps everything).
        n_layers: the model's layer count (default: the policy's).
    """

    def __init__(self, policy: Policy, n_layers: int | None = None):
        n_layers = n_layers or policy.n_layers
        self.policy = policy
        super().__init__(layers=[PolicyCacheLayer([policy.decode_head(la, kv) for kv in range(policy.n_kv_heads)]) for la in range(n_layers)])

    @property
    def prompt_tokens(self) -> int:
        return self.layers[0].prompt_tokens

    def tokens_held(self) -> list[list[int]]:
        """``[layer][kv_head]`` tokens held now."""
        return [layer.tokens_held() for layer in self.layers]

    def positions(self, layer: int, kv_head: int) -> list[int]:
        """Absolute positions of the tokens KV head ``kv_head`` of ``layer`` holds, in order."""
        lc = self.layers[layer]
        return sorted(int(p) for p in lc.slot_positions[kv_head, :lc.lengths[kv_head]])

    def bytes_held(self) -> int:
        """Bytes of the keys and values of the tokens the cache holds (what a paged cache
        would store; `bytes_allocated` is this implementation's padded buffers)."""
        return sum(layer.bytes_held() for layer in self.layers)

    def bytes_allocated(self) -> int:
        """Bytes of this cache's buffers: per layer, its longest head's tokens times the KV
        heads, plus room to grow."""
        return sum(layer.bytes_allocated() for layer in self.layers)

    def dense_bytes(self) -> int:
        """Bytes a full cache would hold for the tokens seen so far."""
        layer = self.layers[0]
        if not layer.is_initialized:
            return 0
        return len(self.layers) * len(layer.heads) * layer.seen * layer.token_bytes()

    def predicted_bytes(self) -> int:
        """Bytes the policy predicts for this prompt length and the decode steps taken
        (`Policy.predicted_kv_tokens`)."""
        layer = self.layers[0]
        if not layer.is_initialized:
            return 0
        n = self.prompt_tokens or layer.seen
        return self.policy.predicted_kv_tokens(n, layer.seen - n) * layer.token_bytes()

    def kv_report(self) -> dict[str, Any]:
        """Bytes held, dense and predicted, and held/dense and held/predicted ratios."""
        held, dense, predicted = self.bytes_held(), self.dense_bytes(), self.predicted_bytes()
        return {"kv_bytes_held": held, "kv_bytes_dense": dense, "kv_bytes_predicted": predicted,
                "kv_bytes_allocated": self.bytes_allocated(),
                "kv_fraction": held / dense if dense else 1.0, "kv_vs_predicted": held / predicted if predicted else 1.0}


class CachedAttention:
    """The attention function (`attnlab.attention.route_attention`'s signature) that reads a
    `PolicyCache`: each query attends to the tokens its KV head holds. The first call of each
    layer is the prefill: it runs ``prefill`` (an attention function, e.g. a prefill policy's
    executor; default dense causal SDPA), then compresses that layer's cache."""

    def __init__(self, cache: PolicyCache, prefill: Callable[..., torch.Tensor] | None = None):
        self.cache = cache
        self.prefill = prefill

    def __call__(self, layer: int, query, key, value, *, scaling: float, attention_mask=None) -> torch.Tensor:
        lc: PolicyCacheLayer = self.cache.layers[layer]
        if not lc.compressed:
            if self.prefill is not None and query.shape[-2] == key.shape[-2]:
                out = self.prefill(layer, query, key, value, scaling=scaling, attention_mask=attention_mask)
            else:
                out = sdpa(query, key, value, scaling=scaling)
            snap = any(h.kind == "snapkv" for h in lc.heads)
            lc.compress(window_scores(query, key, scaling, lc.heads) if snap else None)
            return out
        if query.shape[-2] == 1:  # one query over what each KV head holds: no key copies
            return decode_attention(query, key, value, lc.valid, scaling)
        valid = lc.valid if lc.valid is not None else torch.ones_like(lc.positions, dtype=torch.bool)
        return masked_attention(query, key, value, valid, lc.positions, lc.seen, scaling)


def decode_attention(query, key, value, valid: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """One query per head over its KV head's keys (``valid [H_kv, M]``: the slots that hold a
    token; None: all), the group's query heads side by side so no key is copied for GQA.
    ``[b, H, 1, d]`` in, ``[b, 1, H, d]`` out."""
    b, h, _, d = query.shape
    hkv = key.shape[1]
    q = query.reshape(b, hkv, h // hkv, d)
    mask = None if valid is None else valid[None, :, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(b, 1, h, value.shape[-1])


def masked_attention(query, key, value, valid: torch.Tensor, positions: torch.Tensor, seen: int, scaling: float) -> torch.Tensor:
    """Queries at the last ``n_q`` of ``seen`` positions over padded per-head keys: a key counts
    where it is ``valid`` and not after the query. ``[b, H, n_q, d]`` in, ``[b, n_q, H, d]`` out."""
    n_q = query.shape[-2]
    group = query.shape[1] // key.shape[1]
    q_pos = torch.arange(seen - n_q, seen, device=query.device)
    mask = valid[:, None, :] & (positions[:, None, :] <= q_pos[None, :, None])  # [H_kv, n_q, M]
    mask = mask.repeat_interleave(group, dim=0)[None]
    k = key.repeat_interleave(group, dim=1) if group > 1 else key
    v = value.repeat_interleave(group, dim=1) if group > 1 else value
    return torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scaling).transpose(1, 2).contiguous()


# -- generation --------------------------------------------------------------------------------
def check_context(model: LoadedModel, n_prompt: int, new_tokens: int, what: str = "generation") -> None:
    """One `AttnlabError` line when ``n_prompt + new_tokens`` exceeds the model's context."""
    if n_prompt + new_tokens > model.n_ctx:
        raise AttnlabError(_ERR_CONTEXT.format(what=f"{what} of {new_tokens} tokens after a {n_prompt}-token prompt",
                                               need=n_prompt + new_tokens, model=model.name, n_ctx=model.n_ctx))


def make_cache(model: LoadedModel, policy: Policy | None) -> Cache:
    """A `PolicyCache` for ``policy`` (checked against ``model``), or a ``DynamicCache`` for None (dense)."""
    if policy is None:
        from transformers import DynamicCache

        return DynamicCache(config=model.hf_model.config)
    policy.check_model(model.identity())
    return PolicyCache(policy, model.n_layers)


@torch.no_grad()
def generate(model: LoadedModel, input_ids: torch.Tensor, policy: Policy | None, *, max_new_tokens: int = 32,
             prefill: Callable[..., torch.Tensor] | None = None, **kwargs: Any) -> tuple[torch.Tensor, Cache]:
    """``model.generate`` (greedy, or sampling with ``do_sample=True``) through the policy's
    decode cache (None: a dense ``DynamicCache``, same attention function). Returns the token ids
    ``[1, n + new]`` and the cache (for `PolicyCache.kv_report`)."""
    if input_ids.shape[0] != 1:
        raise AttnlabError(_ERR_BATCH)
    check_context(model, input_ids.shape[-1], max_new_tokens)
    cache = make_cache(model, policy)
    fn = CachedAttention(cache, prefill) if isinstance(cache, PolicyCache) else _dense_fn(prefill)
    with route_attention(model, fn):
        out = model.generate(input_ids, max_new_tokens=max_new_tokens, cache=cache, **kwargs)
    return out, cache


def _dense_fn(prefill):
    """The dense yardstick's attention: ``prefill`` (default causal SDPA) on the prompt, then the
    same decode kernel as `CachedAttention` over the whole cache (a fair time comparison)."""
    def fn(layer, query, key, value, *, scaling, attention_mask=None):
        if prefill is not None and query.shape[-2] == key.shape[-2]:
            return prefill(layer, query, key, value, scaling=scaling, attention_mask=attention_mask)
        if query.shape[-2] == 1:
            return decode_attention(query, key, value, None, scaling)
        return sdpa(query, key, value, scaling=scaling)

    return fn


@dataclass
class Decoded:
    """A greedy (or teacher-forced) decode: generated ``tokens``, the ``logits [steps, vocab]``
    that chose each of them (fp32, CPU), and the cache at the end."""

    tokens: list[int]
    logits: torch.Tensor
    cache: Cache


@torch.no_grad()
def greedy_decode(model: LoadedModel, input_ids: torch.Tensor, policy: Policy | None, n: int, *,
                  force: list[int] | None = None, prefill: Callable[..., torch.Tensor] | None = None,
                  stop: Callable[[list[int]], bool] | None = None) -> Decoded:
    """``n`` greedy steps through the policy's cache (None: dense ``DynamicCache``): step ``i``'s
    logits predict token ``i``. With ``force`` (token ids), those tokens are fed instead of the
    argmax (teacher forcing: the logits of two caches compared on the same continuation)."""
    if input_ids.shape[0] != 1:
        raise AttnlabError(_ERR_BATCH)
    check_context(model, input_ids.shape[-1], n)
    cache = make_cache(model, policy)
    fn = CachedAttention(cache, prefill) if isinstance(cache, PolicyCache) else _dense_fn(prefill)
    tokens: list[int] = []
    logits: list[torch.Tensor] = []
    with route_attention(model, fn):
        feed = input_ids.to(model.device)
        for i in range(n):
            out = model.hf_model(input_ids=feed, cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1].float()
            logits.append(out.cpu())
            token = int(force[i]) if force is not None and i < len(force) else int(out.argmax())
            tokens.append(token)
            if stop is not None and stop(tokens):
                break
            feed = torch.tensor([[token]], device=model.device)
    return Decoded(tokens, torch.stack(logits), cache)
