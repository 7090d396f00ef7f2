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

With ``compensation`` (streaming and snapkv heads; RazorAttention), every token the head drops
is folded into one extra entry, the running mean of the dropped keys and of the dropped values,
and that entry's attention logit gets ``+ log n_dropped`` so it weighs as the ``n_dropped``
tokens it stands for (RazorAttention's compensation token). It is held in the cache and counted
in its bytes.

**Chunked prefill** (``prefill_chunk=N`` in `generate` / `greedy_decode`): the prompt is fed N
tokens at a time (cut from its end: the last chunk is whole, the first takes the remainder).
After each chunk, streaming heads keep sink + recent (their dropped tokens go
into the compensation entry when they have one): the next chunk's queries attend to that plus
their own chunk, as DuoAttention's chunked prefill does for its streaming heads, so the cache
never holds more than the policy's size plus one chunk there. Full and snapkv heads keep every
prompt token until the last chunk; snapkv heads then choose from the attention of the last
chunk's queries (the last ``min(window, N)`` of them): with chunks at least as long as the
window the selection is SnapKV's. A prefill policy's executor (``prefill=``) runs on the
first chunk; later chunks attend densely to what each head holds.

The model sees keys after RoPE, so an evicted token leaves no hole in anyone's position:
`PolicyCache.get_seq_length` is the number of tokens *seen*, not kept, and new tokens get the
positions they would have had with a full cache.

The cache needs attnlab's attention function (a padded, per-head key set needs a validity mask
the model's own attention does not know): run the model inside
``route_attention(model, CachedAttention(cache))``, or use `generate` / `greedy_decode`, which do.

A cache holds one sequence; `generate` also takes a left-padded batch (``input_ids [B, n]`` and
its ``attention_mask``): `PolicyCache(..., pads=...)` then holds one cache per row
(`BatchedPolicyCacheLayer`), each fed only that row's tokens, so every row keeps, evicts, counts
and attends exactly as it would alone (`CachedAttention` attends row by row). `greedy_decode`,
a prefill executor and chunked prefill stay batch 1.
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
from attnlab.models import LoadedModel, forward_with_cache

from .policy import DecodeHead, Policy

_ERR_BATCH = "the policy KV cache holds one sequence (batch 1): loop over samples"
#: `PolicyCacheLayer.slot_positions` of a slot that holds nothing.
EMPTY = -1
#: `PolicyCacheLayer.slot_positions` of the slot holding a head's compensation entry.
COMPENSATION = -2
_ERR_CONTEXT = "{what} needs {need} positions, beyond {model}'s context of {n_ctx}: shorten the prompt or generate fewer tokens"
_ERR_UNSUPPORTED = "the policy KV cache does not support {what}: use greedy or sampled generation"


class _SeenLayer(CacheLayerMixin):
    """What both cache layers answer the same way: positions come from the tokens seen (not
    kept), no maximum length, and no beam search or cropping."""

    is_sliding = False
    is_croppable = False
    supports_early_init = False
    seen: int

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


class PolicyCacheLayer(_SeenLayer):
    """One layer's cache: a ``[1, H_kv, capacity, d]`` key and value buffer in which each KV head
    fills its own first ``lengths[h]`` slots, with the absolute position of every slot
    (`EMPTY`; `COMPENSATION` for the compensation entry, at ``comp_slot[h]``). A streaming
    head, once full, overwrites its oldest recent token in place (a ring after its sink, the
    compensation entry after the ring), so a decode step copies one token per head, never the
    cache."""

    def __init__(self, heads: list[DecodeHead]):
        super().__init__()
        self.heads = heads
        self.seen = 0
        self.compressed = False
        self.prompt_tokens = 0
        self.lengths: list[int] = [0] * len(heads)
        self._ring: list[int] = [0] * len(heads)
        #: Per head, the slot of its compensation entry (-1: none yet) and how many tokens it stands for.
        self.comp_slot: list[int] = [-1] * len(heads)
        self.comp_count: list[int] = [0] * len(heads)
        self._comp_sums: tuple[torch.Tensor, torch.Tensor] | None = None
        self.peak_allocated = 0
        self.slot_positions: torch.Tensor | None = None
        #: ``[H_kv, M]`` bool: which slots of the keys returned by the last `update` hold a token.
        self.valid: torch.Tensor | None = None
        #: ``[H_kv, M]`` long: the absolute position of each of those slots (`EMPTY`, `COMPENSATION`).
        self.positions: torch.Tensor | None = None
        #: ``[H_kv, M]`` additive attention bias when a head holds a compensation entry
        #: (``log n_dropped`` there, ``-inf`` on empty slots, else 0); None otherwise.
        self.bias: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.shape[0] != 1:
            raise AttnlabError(_ERR_BATCH)
        if key_states.shape[1] != len(self.heads):
            raise AttnlabError(f"the policy's decode phase has {len(self.heads)} KV heads per layer, the model {key_states.shape[1]}: the policy is for another model")
        self.device, self.dtype = key_states.device, key_states.dtype
        if any(head.compensation for head in self.heads):
            h = len(self.heads)
            self._comp_sums = (torch.zeros(h, key_states.shape[-1], dtype=torch.float32, device=self.device),
                               torch.zeros(h, value_states.shape[-1], dtype=torch.float32, device=self.device))
        self._allocate(0, key_states, value_states)
        self.is_initialized = True

    def _allocate(self, capacity: int, like_k: torch.Tensor | None = None, like_v: torch.Tensor | None = None) -> None:
        """(Re)allocate the buffers with ``capacity`` slots, keeping what the heads hold."""
        like_k = self.keys if like_k is None else like_k
        like_v = self.values if like_v is None else like_v
        b, h, d, dv = like_k.shape[0], len(self.heads), like_k.shape[-1], like_v.shape[-1]
        keys = like_k.new_zeros(b, h, capacity, d)
        values = like_v.new_zeros(b, h, capacity, dv)
        pos = torch.full((h, capacity), EMPTY, dtype=torch.long, device=self.device)
        if self.slot_positions is not None:
            m = min(capacity, self.slot_positions.shape[-1])
            keys[:, :, :m] = self.keys[:, :, :m]
            values[:, :, :m] = self.values[:, :, :m]
            pos[:, :m] = self.slot_positions[:, :m]
        self.keys, self.values, self.slot_positions = keys, values, pos
        self.peak_allocated = max(self.peak_allocated, self.bytes_allocated())

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
        if need > self.keys.shape[-2]:  # a prompt (chunk) takes what it needs, decode steps grow by a quarter
            self._allocate(need if n > 1 else max(need, self.keys.shape[-2] * 5 // 4 + 64))
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
            if head.compensation:  # the oldest recent token leaves: into the compensation entry
                self._absorb(h, self.keys[0, h, slot:slot + 1], self.values[0, h, slot:slot + 1])
        self.keys[:, h, slot] = k
        self.values[:, h, slot] = v
        self.slot_positions[h, slot] = pos

    def _absorb(self, h: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Fold dropped tokens (``keys [m, d]``, ``values [m, dv]``) into head ``h``'s compensation
        entry (created after the head's last slot if it has none): the running mean, summed in fp32."""
        if keys.shape[0] == 0:
            return
        ksum, vsum = self._comp_sums
        ksum[h] += keys.float().sum(0)
        vsum[h] += values.float().sum(0)
        self.comp_count[h] += keys.shape[0]
        if self.comp_slot[h] < 0:
            self.comp_slot[h] = self.lengths[h]
            self.lengths[h] += 1
        self._write_compensation(h, self.comp_slot[h])

    def _write_compensation(self, h: int, slot: int) -> None:
        ksum, vsum = self._comp_sums
        self.keys[0, h, slot] = (ksum[h] / self.comp_count[h]).to(self.keys.dtype)
        self.values[0, h, slot] = (vsum[h] / self.comp_count[h]).to(self.values.dtype)
        self.slot_positions[h, slot] = COMPENSATION

    def _view(self) -> tuple[torch.Tensor, torch.Tensor]:
        m = max(self.lengths)
        self.positions = self.slot_positions[:, :m]
        self.valid = None if all(n == m for n in self.lengths) else self.positions != EMPTY
        self.bias = None
        if any(s >= 0 for s in self.comp_slot):
            bias = torch.zeros(self.positions.shape, dtype=self.keys.dtype, device=self.device)
            if self.valid is not None:
                bias.masked_fill_(~self.valid, -math.inf)
            for h, s in enumerate(self.comp_slot):
                if s >= 0:
                    bias[h, s] = math.log(self.comp_count[h])
            self.bias = bias
        return self.keys[:, :, :m], self.values[:, :, :m]

    def reset(self) -> None:
        self.__init__(self.heads)

    # -- eviction ------------------------------------------------------------------------------
    def _keep(self, h: int, index: torch.Tensor) -> None:
        """Head ``h`` keeps its token slots ``index`` (sorted), moved to its first slots; with
        compensation, its other token slots are folded into its compensation entry, which then
        follows the kept tokens."""
        head, n_slots = self.heads[h], self.lengths[h]
        k = index.numel()
        if k == n_slots - (self.comp_slot[h] >= 0):
            return  # nothing dropped
        if head.compensation:
            drop = self.slot_positions[h, :n_slots] >= 0
            drop[index] = False
            dropped = drop.nonzero().flatten()
            self._absorb_slots(h, dropped)
        self.keys[:, h, :k] = self.keys[:, h].index_select(-2, index)
        self.values[:, h, :k] = self.values[:, h].index_select(-2, index)
        self.slot_positions[h, :k] = self.slot_positions[h].index_select(0, index)
        self.slot_positions[h, k:] = EMPTY
        self.lengths[h] = k
        self.comp_slot[h] = -1
        if head.compensation:
            self.comp_slot[h] = k
            self.lengths[h] = k + 1
            self._write_compensation(h, k)

    def _absorb_slots(self, h: int, slots: torch.Tensor) -> None:
        ksum, vsum = self._comp_sums
        ksum[h] += self.keys[0, h].index_select(0, slots).float().sum(0)
        vsum[h] += self.values[0, h].index_select(0, slots).float().sum(0)
        self.comp_count[h] += slots.numel()

    def compress(self, scores: dict[int, torch.Tensor] | None = None, final: bool = True) -> None:
        """The end of prefill (``final``): streaming heads keep sink + recent, snapkv heads their
        budget chosen from ``scores[h]`` (``[n]`` pooled attention of the observation window per
        key of head ``h``); full heads keep everything; the buffers shrink when every head did.
        Between the chunks of a chunked prefill (not ``final``) only streaming heads drop
        tokens. Called by `CachedAttention`."""
        n = self.seen
        for h, head in enumerate(self.heads):
            if head.kind == "streaming":
                p = head.params
                pos = self.slot_positions[h, :self.lengths[h]]
                keep = (pos >= 0) & ((pos < p["sink"]) | (pos >= n - p["recent"]))
                self._keep(h, keep.nonzero().flatten())
                self._ring[h] = p["sink"]  # the oldest recent token is in the slot after the sink
            elif head.kind == "snapkv" and final:
                self._keep(h, snapkv_keep(head, n, None if scores is None else scores.get(h), self.device))
        if final:
            self.prompt_tokens = n
            longest = max(self.lengths)
            if longest < self.keys.shape[-2] // 2:
                self._allocate(longest + 64)
            self.compressed = True
        self._view()

    # -- accounting ----------------------------------------------------------------------------
    def tokens_held(self) -> list[int]:
        return list(self.lengths)

    def token_bytes(self) -> int:
        """Bytes one token takes in one KV head (its key and its value)."""
        return self.keys.shape[-1] * self.keys.element_size() + self.values.shape[-1] * self.values.element_size()

    def bytes_held(self) -> int:
        return sum(self.lengths) * self.token_bytes() if self.is_initialized else 0

    def bytes_allocated(self) -> int:
        if self.slot_positions is None:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()


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


class BatchedPolicyCacheLayer(_SeenLayer):
    """One layer's cache for a batch of sequences: one `PolicyCacheLayer` per sequence, each fed
    only its own tokens (a row's left padding, ``pads[b]`` tokens, never enters its cache), so
    every row keeps, evicts and counts exactly what it would alone. `CachedAttention` attends
    row by row over each row's cache (the keys `update` returns are not read)."""

    def __init__(self, heads: list[DecodeHead], pads: list[int]):
        super().__init__()
        self.heads = heads
        self.pads = list(pads)
        self.rows = [PolicyCacheLayer(heads) for _ in self.pads]
        self.seen = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.shape[0] != len(self.rows):
            raise AttnlabError(f"the policy KV cache was made for a batch of {len(self.rows)}, the model ran {key_states.shape[0]}")
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def pad_queries(self, b: int, n: int) -> int:
        """How many of the last call's ``n`` tokens are row ``b``'s left padding."""
        return min(n, max(0, self.pads[b] - (self.seen - n)))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        self.seen += n
        for b, row in enumerate(self.rows):
            skip = self.pad_queries(b, n)
            if skip < n:
                row.update(key_states[b:b + 1, :, skip:], value_states[b:b + 1, :, skip:])
        return key_states, value_states

    @property
    def compressed(self) -> bool:
        return all(row.compressed for row in self.rows)

    def reset(self) -> None:
        self.__init__(self.heads, self.pads)


class PolicyCache(Cache):
    """The KV cache of a policy's decode phase (see the module docstring).

    Args:
        policy: a `Policy` (its decode section; without one every head keeps everything).
        n_layers: the model's layer count (default: the policy's).
        pads: for a batch of more than one sequence, each row's left padding in tokens (one
            `PolicyCacheLayer` per row and layer, see `BatchedPolicyCacheLayer`); None: batch 1.
    """

    def __init__(self, policy: Policy, n_layers: int | None = None, pads: list[int] | None = None):
        n_layers = n_layers or policy.n_layers
        self.policy = policy
        #: False while the chunks before a chunked prefill's last are fed (`CachedAttention`
        #: then compresses only streaming heads, and keeps the prefill going).
        self.prefill_final = True
        self.batch = 1 if pads is None else len(pads)

        def layer(la: int) -> CacheLayerMixin:
            heads = [policy.decode_head(la, kv) for kv in range(policy.n_kv_heads)]
            return PolicyCacheLayer(heads) if pads is None else BatchedPolicyCacheLayer(heads, pads)

        super().__init__(layers=[layer(la) for la in range(n_layers)])

    def _rows(self, layer: int) -> list[PolicyCacheLayer]:
        lc = self.layers[layer]
        return lc.rows if isinstance(lc, BatchedPolicyCacheLayer) else [lc]

    def _row(self, layer: int, row: int) -> PolicyCacheLayer:
        rows = self._rows(layer)
        if not 0 <= row < len(rows):
            raise AttnlabError(f"row {row} is outside the cache's batch of {len(rows)}")
        return rows[row]

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens of the first row (its own, without padding)."""
        return self._rows(0)[0].prompt_tokens

    def tokens_held(self, row: int = 0) -> list[list[int]]:
        """``[layer][kv_head]`` tokens (entries) row ``row`` holds now."""
        return [self._row(la, row).tokens_held() for la in range(len(self.layers))]

    def positions(self, layer: int, kv_head: int, row: int = 0) -> list[int]:
        """Positions (in the row's own sequence, without its padding) of the tokens KV head
        ``kv_head`` of ``layer`` holds, in order."""
        lc = self._row(layer, row)
        return sorted(int(p) for p in lc.slot_positions[kv_head, :lc.lengths[kv_head]] if p >= 0)

    def compensation(self, layer: int, kv_head: int, row: int = 0) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """KV head ``kv_head`` of ``layer``'s compensation entry: its key ``[d]``, value
        ``[d]`` and the number of dropped tokens it stands for; None when it has none."""
        lc = self._row(layer, row)
        s = lc.comp_slot[kv_head]
        if s < 0:
            return None
        return lc.keys[0, kv_head, s], lc.values[0, kv_head, s], lc.comp_count[kv_head]

    def _all_rows(self) -> list[PolicyCacheLayer]:
        return [row for la in range(len(self.layers)) for row in self._rows(la)]

    def bytes_held(self) -> int:
        """Bytes of the keys and values of the tokens the cache holds (what a paged cache
        would store; `bytes_allocated` is this implementation's padded buffers)."""
        return sum(row.bytes_held() for row in self._all_rows())

    def bytes_allocated(self) -> int:
        """Bytes of this cache's buffers: per layer (and row), its longest head's tokens times
        the KV heads, plus room to grow."""
        return sum(row.bytes_allocated() for row in self._all_rows())

    def peak_bytes_allocated(self) -> int:
        """The most bytes this cache's buffers took at any time (every layer at its peak)."""
        return sum(row.peak_allocated for row in self._all_rows())

    def dense_bytes(self) -> int:
        """Bytes a full cache would hold for the tokens seen so far (padding not counted)."""
        return sum(len(self.layers) * len(row.heads) * row.seen * row.token_bytes()
                   for row in self._rows(0) if row.is_initialized)

    def predicted_bytes(self) -> int:
        """Bytes the policy predicts for these prompt lengths and the decode steps taken
        (`Policy.predicted_kv_tokens`, summed over rows)."""
        total = 0
        for row in self._rows(0):
            if row.is_initialized:
                n = row.prompt_tokens or row.seen
                total += self.policy.predicted_kv_tokens(n, row.seen - n) * row.token_bytes()
        return total

    def kv_report(self) -> dict[str, Any]:
        """Bytes held, dense and predicted, allocated now and at the peak, and held/dense and
        held/predicted ratios."""
        held, dense, predicted = self.bytes_held(), self.dense_bytes(), self.predicted_bytes()
        return {"kv_bytes_held": held, "kv_bytes_dense": dense, "kv_bytes_predicted": predicted,
                "kv_bytes_allocated": self.bytes_allocated(), "kv_bytes_peak": self.peak_bytes_allocated(),
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
        lc = self.cache.layers[layer]
        if isinstance(lc, BatchedPolicyCacheLayer):  # row by row, each over its own cache, padding queries out
            n_q = query.shape[-2]
            outs = []
            for b, row in enumerate(lc.rows):
                skip = lc.pad_queries(b, n_q)
                out = query.new_zeros(1, n_q, query.shape[1], value.shape[-1])
                if skip < n_q:
                    k, v = row.keys[:, :, :max(row.lengths)], row.values[:, :, :max(row.lengths)]
                    out[:, skip:] = self._layer(row, None, layer, query[b:b + 1, :, skip:], k, v, scaling, None)
                outs.append(out)
            return torch.cat(outs)
        return self._layer(lc, self.prefill, layer, query, key, value, scaling, attention_mask)

    def _layer(self, lc: PolicyCacheLayer, prefill, layer: int, query, key, value, scaling: float, attention_mask) -> torch.Tensor:
        if not lc.compressed:  # the prompt, or a chunk of it
            if lc.seen == query.shape[-2]:  # nothing cached before these queries
                if prefill is not None:
                    out = prefill(layer, query, key, value, scaling=scaling, attention_mask=attention_mask)
                else:
                    out = sdpa(query, key, value, scaling=scaling)
            else:  # a later chunk: over what each head kept of the earlier ones
                out = self._attend(lc, query, key, value, scaling)
            final = self.cache.prefill_final
            snap = final and any(h.kind == "snapkv" for h in lc.heads)
            lc.compress(window_scores(query, key, scaling, lc.heads) if snap else None, final=final)
            return out
        return self._attend(lc, query, key, value, scaling)

    @staticmethod
    def _attend(lc: PolicyCacheLayer, query, key, value, scaling: float) -> torch.Tensor:
        if query.shape[-2] == 1:  # one query over what each KV head holds: no key copies
            return decode_attention(query, key, value, lc.valid, scaling, lc.bias)
        valid = lc.valid if lc.valid is not None else torch.ones_like(lc.positions, dtype=torch.bool)
        return masked_attention(query, key, value, valid, lc.positions, lc.seen, scaling, lc.bias)


def decode_attention(query, key, value, valid: torch.Tensor | None, scaling: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """One query per head over its KV head's keys (``valid [H_kv, M]``: the slots that hold a
    token; None: all; ``bias [H_kv, M]``, when given, replaces ``valid``: an additive logit
    bias, ``-inf`` on empty slots), the group's query heads side by side so no key is copied
    for GQA. ``[b, H, 1, d]`` in, ``[b, 1, H, d]`` out."""
    b, h, _, d = query.shape
    hkv = key.shape[1]
    q = query.reshape(b, hkv, h // hkv, d)
    if bias is not None:
        mask = bias[None, :, None, :]
    else:
        mask = None if valid is None else valid[None, :, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(b, 1, h, value.shape[-1])


def masked_attention(query, key, value, valid: torch.Tensor, positions: torch.Tensor, seen: int, scaling: float,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """Queries at the last ``n_q`` of ``seen`` positions over padded per-head keys: a key counts
    where it is ``valid`` and not after the query (a compensation entry, position
    `COMPENSATION`, is before every query), plus ``bias [H_kv, M]`` when given.
    ``[b, H, n_q, d]`` in, ``[b, n_q, H, d]`` out."""
    n_q = query.shape[-2]
    group = query.shape[1] // key.shape[1]
    q_pos = torch.arange(seen - n_q, seen, device=query.device)
    mask = valid[:, None, :] & (positions[:, None, :] <= q_pos[None, :, None])  # [H_kv, n_q, M]
    if bias is not None:
        mask = torch.where(mask, bias[:, None, :], torch.full((), -math.inf, dtype=bias.dtype, device=bias.device))
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


def make_cache(model: LoadedModel, policy: Policy | None, pads: list[int] | None = None) -> Cache:
    """A `PolicyCache` for ``policy`` (checked against ``model``; ``pads``: each row's left
    padding, for a batch of more than one), or a ``DynamicCache`` for None (dense)."""
    if policy is None:
        from transformers import DynamicCache

        return DynamicCache(config=model.hf_model.config)
    policy.check_model(model.identity())
    return PolicyCache(policy, model.n_layers, pads)


def left_pads(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[int]:
    """Each row's left padding from the attention mask (None: no padding); one `AttnlabError`
    line unless every row is zeros then ones, with at least one token."""
    b, n = input_ids.shape
    if attention_mask is None:
        return [0] * b
    mask = attention_mask.to("cpu").long()
    if mask.shape != (b, n) or not bool(((mask == 0) | (mask == 1)).all()):
        raise AttnlabError(f"attention_mask must be 0/1 of the shape of input_ids {tuple(input_ids.shape)}")
    pads = (mask == 0).sum(-1).tolist()
    for row, pad in enumerate(pads):
        if pad >= n or not bool(mask[row, pad:].all()):
            raise AttnlabError(f"row {row} of the batch is not left-padded (zeros, then ones, at least one token): "
                               "pad on the left (tokenizer.padding_side = 'left')")
    return pads


def _check_chunk(prefill_chunk: int | None) -> None:
    if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1):
        raise AttnlabError(f"prefill_chunk must be a whole number of tokens >= 1, got {prefill_chunk!r}")


def prefill_chunks(model: LoadedModel, cache: Cache, input_ids: torch.Tensor, prefill_chunk: int | None) -> torch.Tensor:
    """Feed every chunk of ``prefill_chunk`` tokens of the prompt but the last (chunks cut from
    the prompt's end, so the last is whole and the first takes the remainder) through the model
    into ``cache`` (inside the cache's attention function; a `PolicyCache` compresses its
    streaming heads after each, see the module docstring) and return the last chunk, which the
    caller feeds as its prefill. Without chunking (None, or a prompt of one chunk) returns the
    whole prompt and feeds nothing."""
    n = input_ids.shape[-1]
    if prefill_chunk is None or n <= prefill_chunk:
        return input_ids
    last = n - prefill_chunk
    bounds = [0, *reversed(range(last, 0, -prefill_chunk))]  # cut from the end: the first chunk takes the remainder
    policy_cache = isinstance(cache, PolicyCache)
    if policy_cache:
        cache.prefill_final = False
    try:
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
            forward_with_cache(model.hf_model, input_ids[:, start:stop].to(model.device), cache, logits_to_keep=1)
    finally:
        if policy_cache:
            cache.prefill_final = True
    return input_ids[:, last:]


@torch.no_grad()
def generate(model: LoadedModel, input_ids: torch.Tensor, policy: Policy | None, *, max_new_tokens: int = 32,
             prefill: Callable[..., torch.Tensor] | None = None, prefill_chunk: int | None = None,
             **kwargs: Any) -> tuple[torch.Tensor, Cache]:
    """``model.generate`` (greedy, or sampling with ``do_sample=True``) through the policy's
    decode cache (None: a dense ``DynamicCache``, same attention function), the prompt
    prefilled in chunks of ``prefill_chunk`` tokens when given (see the module docstring).
    Returns the token ids ``[1, n + new]`` and the cache (for `PolicyCache.kv_report`).

    A batch of more than one sequence (``input_ids [B, n]``, left-padded, with its
    ``attention_mask``) runs through a `PolicyCache` with one cache per row
    (`BatchedPolicyCacheLayer`): each row keeps exactly what it would alone. It needs a policy
    (a dense yardstick loops over rows), a dense prefill and no chunking."""
    _check_chunk(prefill_chunk)
    pads = None
    if input_ids.shape[0] != 1:
        if policy is None or prefill is not None or prefill_chunk is not None:
            raise AttnlabError("a batch of more than one sequence runs through a policy's cache with a dense, unchunked "
                               "prefill: loop over samples for the dense yardstick, a prefill executor or chunking")
        pads = left_pads(input_ids, kwargs.get("attention_mask"))
    check_context(model, input_ids.shape[-1], max_new_tokens)
    cache = make_cache(model, policy, pads)
    fn = CachedAttention(cache, prefill) if isinstance(cache, PolicyCache) else _dense_fn(prefill)
    with route_attention(model, fn):
        prefill_chunks(model, cache, input_ids, prefill_chunk)  # generate feeds what the cache has not seen
        if pads is None:
            out = model.generate(input_ids, max_new_tokens=max_new_tokens, cache=cache, **kwargs)
        else:  # the model's generate assumes one unpadded row: Hugging Face's, with the mask
            kwargs.setdefault("do_sample", False)
            kwargs.setdefault("pad_token_id", model.tokenizer.pad_token_id or model.tokenizer.eos_token_id)
            out = model.hf_model.generate(input_ids.to(model.device), max_new_tokens=max_new_tokens, cache=cache, **kwargs)
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
                  stop: Callable[[list[int]], bool] | None = None, prefill_chunk: int | None = None) -> Decoded:
    """``n`` greedy steps through the policy's cache (None: dense ``DynamicCache``): step ``i``'s
    logits predict token ``i``. With ``force`` (token ids), those tokens are fed instead of the
    argmax (teacher forcing: the logits of two caches compared on the same continuation). With
    ``prefill_chunk``, the prompt is prefilled in chunks of that many tokens."""
    if input_ids.shape[0] != 1:
        raise AttnlabError(_ERR_BATCH)
    _check_chunk(prefill_chunk)
    check_context(model, input_ids.shape[-1], n)
    cache = make_cache(model, policy)
    fn = CachedAttention(cache, prefill) if isinstance(cache, PolicyCache) else _dense_fn(prefill)
    tokens: list[int] = []
    logits: list[torch.Tensor] = []
    with route_attention(model, fn):
        feed = prefill_chunks(model, cache, input_ids, prefill_chunk).to(model.device)
        for i in range(n):
            out = forward_with_cache(model.hf_model, feed, cache, logits_to_keep=1).logits[0, -1].float()
            logits.append(out.cpu())
            token = int(force[i]) if force is not None and i < len(force) else int(out.argmax())
            tokens.append(token)
            if stop is not None and stop(tokens):
                break
            feed = torch.tensor([[token]], device=model.device)
    return Decoded(tokens, torch.stack(logits), cache)
