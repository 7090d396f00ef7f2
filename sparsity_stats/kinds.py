"""Policy kinds: named compositions of the pattern vocabulary, with elastic sizes.

A head's policy is a *kind* plus *parameters*. Each kind is a small composition of the
predicates in `attnlab.sparsity_stats.patterns`:

=================  ==========================================================  =========
kind               pattern                                                     static?
=================  ==========================================================  =========
``dense``          causal                                                      static
``streaming``      causal & (sink(s) | window(w)), token-exact (StreamingLLM)  static
``a_shape``        causal & blocks-of(sink(s/B) | window(w/B)) (MInference)    static
``vertical_slash`` causal & blocks-of(vertical(C) | slash(D)) (MInference)     dynamic
``block_topk``     causal & blocks(top-k or cumulative mass >= gamma)          dynamic
=================  ==========================================================  =========

Sizes are in tokens and *elastic*: ``alpha + beta * N`` for a sequence of ``N`` tokens (MoA's
form), so a policy profiled at one length compiles at another. Block-granular kinds round a
size up to whole blocks of the compile's block size (``ceil(size / B)``).

Static kinds are fixed by the sequence length. Dynamic kinds carry an estimation rule and pick
their blocks per input from `BlockScores`: MInference's last-``q`` queries for
``vertical_slash`` (column and diagonal sums of their attention), and mean-pooled ``q . k``
over blocks for ``block_topk`` (FlexPrefill / SeerAttention style; rule ``antidiagonal``:
XAttention's strided antidiagonal scores instead). `estimate_block_scores`
computes them from an input's queries and keys; `scores_from_block_maps` reads the same from a
profiled run; with neither, a compile uses `prior_block_scores` (first columns, nearest
diagonals). Dynamic kinds always keep the first key block and the diagonal, as MInference
always keeps the first and last tokens.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ERR_PARAM_MISSING, ERR_PARAM_UNKNOWN, ERR_SIZE, ERR_UNKNOWN_KIND, PolicyError
from .patterns import (
    Pattern,
    and_masks,
    generate_blocks,
    generate_causal,
    generate_sink,
    generate_slash,
    generate_vertical,
    generate_window,
    named,
    on_blocks,
    or_masks,
)

Tensor = torch.Tensor

#: Kinds fixed by the sequence length alone.
STATIC_KINDS = ("dense", "streaming", "a_shape")
#: Kinds that pick blocks per input from estimated scores.
DYNAMIC_KINDS = ("vertical_slash", "block_topk")
#: The generator's vocabulary.
KINDS = STATIC_KINDS + DYNAMIC_KINDS
#: Published dynamic methods run as they are, per input (baselines; not generator candidates):
#: XAttention (antidiagonal scores, threshold tau) and FlexPrefill (per-head pattern choice by
#: Jensen-Shannon distance, cumulative attention gamma). See `attnlab.sparsity_stats.dynamic`.
BASELINE_KINDS = ("xattention", "flexprefill")
#: The generator's candidate kinds: `KINDS` by default, and on request (``--kinds ...,xattention``)
#: XAttention with a per-head ``tau``, estimated on the profile as the cumulative-mass block
#: selection it approximates (its antidiagonal scores only exist at run time). FlexPrefill
#: chooses its pattern per input from q/k, which a profile cannot estimate: baseline only.
CANDIDATE_KINDS = KINDS + ("xattention",)

#: Default estimation rules of the dynamic kinds.
DEFAULT_ESTIMATE = {
    "vertical_slash": {"rule": "last_q", "last_q": 64},
    "block_topk": {"rule": "pooled_qk", "pool": "mean"},
}


# -- elastic sizes --------------------------------------------------------------------------
@dataclass(frozen=True)
class Elastic:
    """A size that follows the sequence length: ``alpha + beta * N`` tokens (MoA's elastic rule).

    ``Elastic(256)`` is a fixed 256 tokens; ``Elastic(0, 0.125)`` is an eighth of the sequence.
    `resolve` rounds up and caps at ``N``.
    """

    alpha: float
    beta: float = 0.0

    def resolve(self, n: int) -> int:
        """Tokens at sequence length ``n``: ``ceil(alpha + beta * n)``, at most ``n``."""
        return int(max(0, min(n, math.ceil(self.alpha + self.beta * n - 1e-9))))

    def blocks(self, n: int, block_size: int) -> int:
        """Whole blocks that hold the size at length ``n``: ``ceil(resolve(n) / B)``."""
        return -(-self.resolve(n) // block_size)

    def to_json(self) -> dict[str, float]:
        a = int(self.alpha) if float(self.alpha).is_integer() else float(self.alpha)
        return {"alpha": a, "beta": float(self.beta)}

    def __str__(self) -> str:
        a = f"{self.alpha:g}"
        return a if self.beta == 0 else (f"{self.beta:g}N" if self.alpha == 0 else f"{a}+{self.beta:g}N")

    @classmethod
    def parse(cls, value: Any, where: str, field: str, *, allow_zero: bool = False) -> Elastic:
        """Read a size from JSON: a number (fixed tokens) or ``{"alpha": a, "beta": b}``."""
        if isinstance(value, bool):
            raise PolicyError(ERR_SIZE.format(where=where, field=field, got=value))
        if isinstance(value, (int, float)):
            alpha, beta = float(value), 0.0
        elif isinstance(value, Mapping) and set(value) <= {"alpha", "beta"} and "alpha" in value:
            alpha, beta = value.get("alpha"), value.get("beta", 0.0)
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (alpha, beta)):
                raise PolicyError(ERR_SIZE.format(where=where, field=field, got=value))
            alpha, beta = float(alpha), float(beta)
        else:
            raise PolicyError(ERR_SIZE.format(where=where, field=field, got=value))
        ok = math.isfinite(alpha) and math.isfinite(beta) and alpha >= 0 and beta >= 0
        if not ok or (not allow_zero and alpha + beta <= 0):
            raise PolicyError(ERR_SIZE.format(where=where, field=field, got=value))
        return cls(alpha, beta)


# -- scores for dynamic kinds ---------------------------------------------------------------
@dataclass
class BlockScores:
    """What dynamic kinds choose their blocks from, for one layer at one length and block size.

    - ``vertical [H, KB]``: attention mass per key block (column sums), for ``vertical_slash``;
    - ``slash [H, QB]``: attention mass per block diagonal ``d = qb - kb``, for ``vertical_slash``;
    - ``blocks [H, QB, KB]``: estimated block attention (row-normalised over causal blocks), for
      ``block_topk``.

    Higher is more important; only the order within a head (row) matters, except for the
    ``gamma`` threshold, which reads ``blocks`` as mass.
    """

    n: int
    block_size: int
    vertical: Tensor
    slash: Tensor
    blocks: Tensor
    #: XAttention's antidiagonal block scores ``[H, QB, KB]`` (rows sum to 1), when a layer has
    #: ``xattention`` heads or ``block_topk`` heads with ``estimate.rule`` ``antidiagonal``; None otherwise.
    antidiagonal: Tensor | None = None

    @property
    def n_blocks(self) -> int:
        return -(-self.n // self.block_size)

    def head(self, h: int) -> BlockScores:
        anti = None if self.antidiagonal is None else self.antidiagonal[h : h + 1]
        return BlockScores(self.n, self.block_size, self.vertical[h : h + 1], self.slash[h : h + 1], self.blocks[h : h + 1], anti)


def prior_block_scores(n: int, block_size: int, n_heads: int = 1) -> BlockScores:
    """Scores without an input: earlier columns and nearer diagonals first (sink + local)."""
    nb = -(-n // block_size)
    ar = torch.arange(nb, dtype=torch.float32)
    qb, kb = ar[:, None], ar[None, :]
    blocks = -torch.minimum(kb, qb - kb).clamp(min=0) + torch.where(kb <= qb, 0.0, -float("inf"))
    blocks = torch.softmax(blocks, dim=-1)
    return BlockScores(
        n,
        block_size,
        (-ar).expand(n_heads, nb).clone(),
        (-ar).expand(n_heads, nb).clone(),
        blocks.expand(n_heads, nb, nb).clone(),
    )


def estimate_block_scores(q: Tensor, k: Tensor, block_size: int, *, last_q: int = 64) -> BlockScores:
    """Estimate a layer's `BlockScores` from one input's queries and keys (prefill, causal).

    - vertical and slash: MInference's rule: the attention of the last ``last_q`` queries over
      all keys, summed per key block (vertical) and per block diagonal (slash);
    - blocks: queries and keys mean-pooled over blocks, ``softmax(q_b . k_b / sqrt(d))`` over
      causal key blocks (FlexPrefill's pooled estimate).

    Shapes: ``q [H, n, d]``, ``k [H_kv, n, d]`` (grouped-query heads are expanded: head ``h``
    reads KV head ``h // (H // H_kv)``). Returns scores for ``H`` heads. Memory is
    ``O(H * last_q * n + H * (n / B)^2)``.
    """
    h, n, d = q.shape
    if k.shape[0] != h:
        k = k.repeat_interleave(h // k.shape[0], dim=0)
    b = int(block_size)
    nb = -(-n // b)
    qf, kf = q.float(), k.float()
    scale = 1.0 / math.sqrt(d)

    lq = min(last_q, n)
    pos = torch.arange(n - lq, n)
    logits = torch.einsum("hqd,hkd->hqk", qf[:, n - lq :], kf) * scale
    logits = logits.masked_fill(torch.arange(n)[None, None, :] > pos[None, :, None], -float("inf"))
    att = torch.softmax(logits, dim=-1)  # [H, lq, n]
    key_block = torch.arange(n) // b
    vertical = torch.zeros(h, nb).index_add_(1, key_block, att.sum(1))
    diag = (pos[:, None] // b - key_block[None, :]).clamp(min=0)  # [lq, n]
    slash = torch.zeros(h, nb).scatter_add_(1, diag.reshape(1, -1).expand(h, -1), att.reshape(h, -1))

    pad = nb * b - n
    qp = torch.nn.functional.pad(qf, (0, 0, 0, pad)).reshape(h, nb, b, d)
    kp = torch.nn.functional.pad(kf, (0, 0, 0, pad)).reshape(h, nb, b, d)
    counts = torch.full((nb,), float(b))
    counts[-1] = n - (nb - 1) * b
    qm = qp.sum(2) / counts[None, :, None]
    km = kp.sum(2) / counts[None, :, None]
    bl = torch.einsum("hqd,hkd->hqk", qm, km) * scale
    causal = torch.arange(nb)[None, :] <= torch.arange(nb)[:, None]
    blocks = torch.softmax(bl.masked_fill(~causal, -float("inf")), dim=-1)
    return BlockScores(n, b, vertical, slash, blocks)


def scores_from_mass(mass: Tensor, row_weight: Tensor, n: int, block_size: int) -> BlockScores:
    """`BlockScores` read off block mass maps ``mass [H, QB, KB]`` (rows weighted by ``row_weight [QB]``)."""
    hh, nb, _ = mass.shape
    w = row_weight.to(mass.dtype)[None, :, None]
    vertical = (mass * w).sum(1)
    qb = torch.arange(nb)[:, None]
    kb = torch.arange(nb)[None, :]
    d = (qb - kb).clamp(min=0).expand(nb, nb).reshape(-1)
    causal = (kb <= qb).reshape(-1).to(mass.dtype)
    slash = torch.zeros(hh, nb, dtype=mass.dtype).index_add_(1, d, ((mass * w).reshape(hh, -1) * causal))
    rows = mass.sum(-1, keepdim=True).clamp(min=1e-30)
    return BlockScores(n, block_size, vertical, slash, mass / rows)


# -- block selection (shared by the compiler and the profile estimator) ----------------------
def _top_index_mask(scores: Tensor, k: Tensor | int, force_first: bool = True) -> Tensor:
    """Bool mask of the ``k`` highest entries along the last dim (ties: lower index first).

    ``force_first`` ranks index 0 first whatever its score. ``k`` broadcasts over leading dims.
    """
    s = scores.clone().float()
    if force_first:
        s[..., 0] = float("inf")
    order = torch.argsort(s, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(s.shape[-1]).expand_as(order).contiguous())
    k = torch.as_tensor(k)
    return rank < k.reshape(k.shape + (1,) * (s.dim() - k.dim())) if k.dim() else rank < k


def select_vertical_slash(scores: BlockScores, n_vertical: int, n_slash: int) -> tuple[Tensor, Tensor]:
    """Chosen key-block columns ``[H, KB]`` and block diagonals ``[H, QB]`` (bool), the first
    column and the diagonal always included."""
    cols = _top_index_mask(scores.vertical, max(1, n_vertical))
    diags = _top_index_mask(scores.slash, max(1, n_slash))
    return cols, diags


def _forced_scores(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """Scores ``[..., QB, KB]`` that rank the diagonal first, the first column second, then by
    score, with non-causal blocks at -inf; and the causal block count per row ``[QB]``."""
    nb = blocks.shape[-1]
    qb = torch.arange(nb)[:, None]
    kb = torch.arange(nb)[None, :]
    causal = kb <= qb
    s = blocks.float().masked_fill(~causal, -float("inf"))
    s = s.masked_fill((kb == 0) & causal, 1e30).masked_fill(kb == qb, 2e30)
    return s, causal.sum(-1)


def _forced_block_order(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """Sort each causal row of ``blocks [..., QB, KB]``: diagonal, then first column, then by score.

    Returns (order ``[..., QB, KB]`` of key-block indices, causal block count per row ``[QB]``).
    """
    s, n_causal = _forced_scores(blocks)
    return torch.argsort(s, dim=-1, descending=True, stable=True), n_causal


def select_block_topk(blocks: Tensor, *, topk_blocks: int | None = None, gamma: float | None = None) -> Tensor:
    """Chosen blocks, bool ``[..., QB, KB]``: per query-block row the diagonal, the first block,
    then the highest-scoring causal blocks until ``topk_blocks`` are kept (at least 2) or their
    cumulative score reaches ``gamma`` of the row's (FlexPrefill's threshold)."""
    nb = blocks.shape[-1]
    out = torch.zeros(blocks.shape, dtype=torch.bool)
    if topk_blocks is not None:  # a partial sort is enough
        s, _ = _forced_scores(blocks)
        vals, idx = torch.topk(s, min(nb, max(2, int(topk_blocks))), dim=-1)
        out.scatter_(-1, idx, vals > -float("inf"))
        return out
    order, n_causal = _forced_block_order(blocks)
    mass = blocks.float().clamp(min=0) * (torch.arange(nb)[None, :] <= torch.arange(nb)[:, None])
    sorted_mass = torch.gather(mass, -1, order)
    total = sorted_mass.sum(-1, keepdim=True)
    before = sorted_mass.cumsum(-1) - sorted_mass  # mass kept before taking this block
    needed = (before < float(gamma) * total - 1e-12).sum(-1)
    forced = torch.clamp(n_causal, max=2).expand(needed.shape)
    keep_n = torch.minimum(torch.maximum(needed, forced), n_causal.expand(needed.shape))
    rank_keep = torch.arange(nb).expand(order.shape) < keep_n[..., None]
    out.scatter_(-1, order, rank_keep)
    return out


# -- kinds ----------------------------------------------------------------------------------
class Kind:
    """One policy kind: its parameters, its pattern, its cost. Subclasses are the vocabulary."""

    name: str = ""
    static: bool = True
    sizes: tuple[str, ...] = ()
    zero_ok: tuple[str, ...] = ()

    def validate(self, params: Mapping[str, Any], where: str) -> dict[str, Any]:
        """Parameters read from JSON, checked; sizes become `Elastic`. Raises `PolicyError`."""
        if not isinstance(params, Mapping):
            raise PolicyError(f"{where}: field 'params' must be an object, got {type(params).__name__}; fix the policy file")
        out: dict[str, Any] = {}
        allowed = set(self.sizes) | {"estimate"} if not self.static else set(self.sizes)
        for key in params:
            if key not in allowed:
                raise PolicyError(ERR_PARAM_UNKNOWN.format(where=where, kind=self.name, field=f"params.{key}"))
        for key in self.sizes:
            if key not in params:
                raise PolicyError(ERR_PARAM_MISSING.format(where=where, kind=self.name, field=f"params.{key}"))
            out[key] = Elastic.parse(params[key], where, f"params.{key}", allow_zero=key in self.zero_ok)
        if not self.static:
            est = params.get("estimate", DEFAULT_ESTIMATE[self.name])
            if not isinstance(est, Mapping):
                raise PolicyError(f"{where}: field 'params.estimate' must be an object; use {json.dumps(DEFAULT_ESTIMATE[self.name])}")
            out["estimate"] = dict(est)
        return out

    def to_json(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return {k: (v.to_json() if isinstance(v, Elastic) else v) for k, v in params.items()}

    def pattern(self, params: Mapping[str, Any], n: int, block_size: int, scores: BlockScores | None = None) -> Pattern:
        """The head's predicate at length ``n`` (dynamic kinds: chosen from ``scores`` [1 head])."""
        raise NotImplementedError

    def stream(self, params: Mapping[str, Any], n: int) -> tuple[int, int]:
        """Token-level (sink, window) of the layout contract; (0, 0) when block-granular."""
        return 0, 0

    def kv_tokens(self, params: Mapping[str, Any], n: int, block_size: int) -> int:
        """KV entries the head needs at length ``n`` (all of them unless it never looks back)."""
        return n

    def block_bound(self, params: Mapping[str, Any], n: int, block_size: int) -> int | None:
        """Upper bound on kept blocks at length ``n`` for any input; None if input-dependent."""
        return None

    def describe(self, params: Mapping[str, Any]) -> str:
        inner = ", ".join(f"{k}={v}" for k, v in params.items() if k != "estimate")
        return f"{self.name}({inner})"


def _causal_blocks(n: int, block_size: int) -> int:
    nb = -(-n // block_size)
    return nb * (nb + 1) // 2


def windowed_causal_tiles(n: int, block_size: int, window: int = 0) -> int:
    """Tiles holding at least one pair a model with sliding window ``window`` attends (``j <= i``
    and ``i - j < window``; 0 = no window): the dense cost of such a layer at length ``n``."""
    nb = -(-n // block_size)
    if not window:
        return nb * (nb + 1) // 2
    qb = torch.arange(nb)[:, None]
    kb = torch.arange(nb)[None, :]
    q_lo = qb * block_size
    k_hi = torch.clamp(kb * block_size + block_size, max=n) - 1
    return int(((kb <= qb) & (q_lo - k_hi < window)).sum())


def _row_capped_blocks(n: int, block_size: int, per_row: int) -> int:
    """Sum over query-block rows of min(row's causal blocks, per_row)."""
    nb = -(-n // block_size)
    r = min(per_row, nb)
    return r * (r + 1) // 2 + (nb - r) * r


class Dense(Kind):
    """Full causal attention (on a layer with its own sliding window: everything the window
    shows, whose cost is `windowed_causal_tiles`)."""

    name = "dense"

    def pattern(self, params, n, block_size, scores=None):
        return named(generate_causal(), "dense")

    def block_bound(self, params, n, block_size):
        return _causal_blocks(n, block_size)


class Streaming(Kind):
    """StreamingLLM / DuoAttention streaming heads: ``sink`` first tokens + ``window`` recent ones,
    token-exact. ``sink`` may be 0 (a pure sliding window)."""

    name = "streaming"
    sizes = ("sink", "window")
    zero_ok = ("sink",)

    def pattern(self, params, n, block_size, scores=None):
        s, w = self.stream(params, n)
        p = and_masks(generate_causal(), or_masks(generate_sink(s), generate_window(w)))
        return named(p, f"streaming_sink{s}_window{w}")

    def stream(self, params, n):
        return params["sink"].resolve(n), max(1, params["window"].resolve(n))

    def kv_tokens(self, params, n, block_size):
        s, w = self.stream(params, n)
        return min(n, s + w)


class AShape(Kind):
    """MInference's A-shape: the first and the most recent *blocks* (block-granular streaming)."""

    name = "a_shape"
    sizes = ("sink", "window")
    zero_ok = ("sink",)

    def block_counts(self, params, n, block_size) -> tuple[int, int]:
        return params["sink"].blocks(n, block_size), max(1, params["window"].blocks(n, block_size))

    def pattern(self, params, n, block_size, scores=None):
        sb, wb = self.block_counts(params, n, block_size)
        p = and_masks(generate_causal(), on_blocks(or_masks(generate_sink(sb), generate_window(wb)), block_size))
        return named(p, f"a_shape_sink{sb}b_window{wb}b")

    def kv_tokens(self, params, n, block_size):
        sb, wb = self.block_counts(params, n, block_size)
        return min(n, (sb + wb) * block_size)


class VerticalSlash(Kind):
    """MInference's vertical-slash: ``vertical`` tokens of key columns and ``slash`` tokens of
    diagonals, chosen per input, kept as whole blocks (``ceil(size / B)`` of each)."""

    name = "vertical_slash"
    static = False
    sizes = ("vertical", "slash")

    def block_counts(self, params, n, block_size) -> tuple[int, int]:
        return max(1, params["vertical"].blocks(n, block_size)), max(1, params["slash"].blocks(n, block_size))

    def pattern(self, params, n, block_size, scores=None):
        nv, ns = self.block_counts(params, n, block_size)
        scores = scores if scores is not None else prior_block_scores(n, block_size)
        cols, diags = select_vertical_slash(scores, nv, ns)
        c = torch.nonzero(cols[0]).flatten()
        d = torch.nonzero(diags[0]).flatten()
        p = and_masks(generate_causal(), on_blocks(or_masks(generate_vertical(c), generate_slash(d)), block_size))
        return named(p, f"vertical_slash_v{nv}b_s{ns}b")

    def block_bound(self, params, n, block_size):
        nv, ns = self.block_counts(params, n, block_size)
        return _row_capped_blocks(n, block_size, nv + ns)


class BlockTopK(Kind):
    """Query-aware block selection: per query block, the top ``topk`` tokens' worth of key blocks,
    or (``gamma``) the fewest blocks whose estimated mass reaches ``gamma`` (FlexPrefill)."""

    name = "block_topk"
    static = False
    sizes = ("topk",)

    def validate(self, params, where):
        if not isinstance(params, Mapping):
            return super().validate(params, where)
        if "gamma" in params:
            if "topk" in params:
                raise PolicyError(f"{where}: kind 'block_topk' takes 'params.topk' or 'params.gamma', not both; remove one")
            g = params["gamma"]
            if isinstance(g, bool) or not isinstance(g, (int, float)) or not (0 < float(g) <= 1):
                raise PolicyError(f"{where}: field 'params.gamma' must be a mass share in (0, 1], got {g!r}; fix the value")
            rest = {k: v for k, v in params.items() if k not in ("gamma",)}
            for key in rest:
                if key != "estimate":
                    raise PolicyError(ERR_PARAM_UNKNOWN.format(where=where, kind=self.name, field=f"params.{key}"))
            est = params.get("estimate", DEFAULT_ESTIMATE[self.name])
            if not isinstance(est, Mapping):
                raise PolicyError(f"{where}: field 'params.estimate' must be an object; use {json.dumps(DEFAULT_ESTIMATE[self.name])}")
            return {"gamma": float(g), "estimate": dict(est)}
        return super().validate(params, where)

    def topk_blocks(self, params, n, block_size) -> int | None:
        if "topk" not in params:
            return None
        return max(2, params["topk"].blocks(n, block_size))

    def pattern(self, params, n, block_size, scores=None):
        scores = scores if scores is not None else prior_block_scores(n, block_size)
        k = self.topk_blocks(params, n, block_size)
        blocks = scores.blocks
        if params.get("estimate", {}).get("rule") == "antidiagonal" and scores.antidiagonal is not None:
            blocks = scores.antidiagonal  # XAttention's scores; without an input, the ones given
        table = select_block_topk(blocks[0], topk_blocks=k, gamma=params.get("gamma"))
        p = and_masks(generate_causal(), on_blocks(generate_blocks(table), block_size))
        tag = f"{k}b" if k is not None else f"gamma{params['gamma']:g}"
        return named(p, f"block_topk_{tag}")

    def block_bound(self, params, n, block_size):
        k = self.topk_blocks(params, n, block_size)
        return None if k is None else _row_capped_blocks(n, block_size, k)


class _PublishedDynamic(Kind):
    """A published dynamic method with its own numeric parameters (no sizes, no estimate rule)."""

    static = False
    defaults: dict[str, float] = {}

    def _number(self, params: Mapping[str, Any], key: str, where: str, ok, wanted: str) -> float:
        v = params.get(key, self.defaults[key])
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)) or not ok(float(v)):
            raise PolicyError(f"{where}: field 'params.{key}' of kind {self.name!r} must be {wanted}, got {v!r}; fix the value")
        return float(v)

    def _only(self, params: Any, where: str) -> Mapping[str, Any]:
        if not isinstance(params, Mapping):
            raise PolicyError(f"{where}: field 'params' must be an object, got {type(params).__name__}; fix the policy file")
        for key in params:
            if key not in self.defaults:
                raise PolicyError(ERR_PARAM_UNKNOWN.format(where=where, kind=self.name, field=f"params.{key}"))
        return params

    def block_bound(self, params, n, block_size):
        return None


class XAttention(_PublishedDynamic):
    """XAttention (Xu et al., 2025): blocks scored by strided antidiagonals of the attention map;
    each query-block row keeps its best blocks until their cumulative score reaches ``tau``
    (defaults: stride 8, tau 0.9). Needs input q/k; without them it falls back to the prior."""

    name = "xattention"
    defaults = {"tau": 0.9, "stride": 8}

    def validate(self, params, where):
        from .dynamic import STRIDES

        params = self._only(params, where)
        tau = self._number(params, "tau", where, lambda v: 0 < v <= 1, "a share in (0, 1]")
        stride = self._number(params, "stride", where, lambda v: v in STRIDES, f"one of {STRIDES}")
        return {"tau": tau, "stride": int(stride)}

    def pattern(self, params, n, block_size, scores=None):
        scores = scores if scores is not None else prior_block_scores(n, block_size)
        blocks = scores.antidiagonal if scores.antidiagonal is not None else scores.blocks
        table = select_block_topk(blocks[0], gamma=params["tau"])
        p = and_masks(generate_causal(), on_blocks(generate_blocks(table), block_size))
        return named(p, f"xattention_tau{params['tau']:g}")


class FlexPrefill(_PublishedDynamic):
    """FlexPrefill (Lai et al., 2025): per head and input, query-aware blocks (cumulative pooled
    attention ``gamma``) when the pooled estimate is within Jensen-Shannon distance ``delta`` of
    the last queries' attention, else vertical-slash (the fewest columns and diagonals holding
    ``gamma`` of the last queries' attention). Defaults: gamma 0.9, delta 0.1."""

    name = "flexprefill"
    defaults = {"gamma": 0.9, "delta": 0.1}

    def validate(self, params, where):
        params = self._only(params, where)
        gamma = self._number(params, "gamma", where, lambda v: 0 < v <= 1, "a share in (0, 1]")
        delta = self._number(params, "delta", where, lambda v: v > 0, "a distance > 0")
        return {"gamma": gamma, "delta": delta}

    def pattern(self, params, n, block_size, scores=None):
        from .dynamic import fewest_reaching, flexprefill_query_aware

        scores = scores if scores is not None else prior_block_scores(n, block_size)
        if bool(flexprefill_query_aware(scores.vertical, scores.blocks, params["delta"])[0]):
            table = select_block_topk(scores.blocks[0], gamma=params["gamma"])
            p = and_masks(generate_causal(), on_blocks(generate_blocks(table), block_size))
            return named(p, f"flexprefill_query_aware_g{params['gamma']:g}")
        cols = torch.nonzero(fewest_reaching(scores.vertical[0], params["gamma"])).flatten()
        diags = torch.nonzero(fewest_reaching(scores.slash[0], params["gamma"])).flatten()
        p = and_masks(generate_causal(), on_blocks(or_masks(generate_vertical(cols), generate_slash(diags)), block_size))
        return named(p, f"flexprefill_vertical_slash_g{params['gamma']:g}")


_REGISTRY: dict[str, Kind] = {
    k.name: k for k in (Dense(), Streaming(), AShape(), VerticalSlash(), BlockTopK(), XAttention(), FlexPrefill())
}


def get_kind(name: str, where: str = "policy") -> Kind:
    """The `Kind` called ``name``; `PolicyError` naming ``where`` if unknown."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise PolicyError(ERR_UNKNOWN_KIND.format(where=where, kind=name, known=", ".join(_REGISTRY))) from None


# -- candidates -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    """A (kind, parameters) choice for a head, hashable; ``params`` as validated by the kind."""

    kind: str
    params: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def make(cls, kind: str, **params: Any) -> Candidate:
        """``Candidate.make("streaming", sink=4, window=256)``; numbers become fixed `Elastic` sizes."""
        k = get_kind(kind)
        raw = {key: (v.to_json() if isinstance(v, Elastic) else v) for key, v in params.items()}
        checked = k.validate(raw, f"candidate {kind}")
        return cls(kind, tuple(sorted((key, _freeze(v)) for key, v in checked.items())))

    @property
    def param_dict(self) -> dict[str, Any]:
        return {k: _thaw(v) for k, v in self.params}

    @property
    def spec(self) -> Kind:
        return get_kind(self.kind)

    @property
    def static(self) -> bool:
        return self.spec.static

    def params_json(self) -> dict[str, Any]:
        return self.spec.to_json(self.param_dict)

    def describe(self) -> str:
        return self.spec.describe(self.param_dict)

    def key(self) -> str:
        return json.dumps([self.kind, self.params_json()], sort_keys=True)


def _freeze(v: Any) -> Any:
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    return v


def _thaw(v: Any) -> Any:
    if isinstance(v, tuple) and all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in v):
        return {k: _thaw(x) for k, x in v}
    return v
