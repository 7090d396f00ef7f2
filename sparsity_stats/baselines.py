"""The usual uniform choices, at a given budget, for comparison with the budgeted policy.

Every baseline gets its best shot: at equal cost it takes the most attention its rule allows,
and its free parameters are tuned on the same profile the budgeted policy sees (the setting
with the highest expected recall within the budget wins; ``BaselineResult.params["tuned"]``
and the ``detail`` say what was tuned over which grid).

- **uniform streaming** (StreamingLLM): the same sink and window for every head; the window is
  the largest that fits the budget, the sink (sink vs window split) tuned over a small grid.
- **DuoAttention-style**: whole KV heads either dense ("retrieval heads") or streaming with one
  sink/recent size; heads are ranked by their retrieval score (the run's detections) or, when
  the run has none, by how much attention streaming would lose (the signal DuoAttention's gates
  learn); the most that fit the budget go dense. The streaming size is tuned over a grid.
- **MInference-style**: MInference's fixed grid (stream_llm (100, 800); vertical_and_slash (30,
  800), (100, 750), (500, 700), (3500, 100); block_sparse with 100 blocks of 64), each head
  taking its best by recall, with no global budget. Its sizes are made for 128k-token prompts,
  so the grid is scaled by one factor, tuned: the fitting scale with the best recall.

Under a density budget (cost = tiles a block-sparse kernel computes) sizes are rounded up to
the whole blocks they occupy (`rounded_up`): a token-exact sink 64 + recent 1 at 64-token
blocks computes the first block and the diagonal block, so it keeps both whole (``a_shape``).
Under a KV budget (cost = cached tokens) streaming stays token-exact.

- **SnapKV-style** (`snapkv_uniform`, decode only): dense prefill, every KV head keeps the same
  share of the prompt in its cache, chosen by the observation window's attention.
- **HeadKV-style** (`headkv_style`, decode only): dense prefill, per-KV-head budgets: sink +
  window each, the rest in proportion to the head's retrieval score (`headkv_budgets`), SnapKV
  selection inside each head's budget.
- **RazorAttention-style** (`razor_style`, decode only): dense prefill, retrieval KV heads keep
  the full cache, the others sink + recent + a compensation token for what they dropped.

Under a KV budget (``budget_kind="kv"``) `BaselineResult.to_policy` also writes the decode
section the choice implies (streaming KV heads keep sink + recent, the rest everything), so
the baselines run in generation at the same KV budget (`kv_baselines`).

Each returns a `BaselineResult` with a candidate per head and the same estimates as the
budgeted policy (`ProfileEstimator`), so the comparison is like for like. Heads the user
protects (``protected_heads``, ``protected_layers``: knowledge about the model, not part of the
budgeted method) are kept dense by every baseline too, paid from its budget
(`with_dense_heads`); the budgeted policy's own retrieval-head protection is not given to them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .curves import CandidateEval, ProfileEstimator
from .errors import PolicyError
from .kinds import Candidate

MINFERENCE_GRID = (
    ("streaming", 100, 800),
    ("vertical_slash", 30, 800),
    ("vertical_slash", 100, 750),
    ("vertical_slash", 500, 700),
    ("vertical_slash", 3500, 100),
    ("block_topk", 100 * 64, 0),
)
#: Window (recent) sizes the streaming baselines try, in blocks.
WINDOW_STEPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
#: Sink sizes the token-exact (KV budget) streaming baselines try, in tokens (at least ``min_sink``).
SINK_TOKENS = (4, 16, 64, 256)
#: MInference's scale factors tried before the bisection at the edge of the budget.
MINFERENCE_SCALES = 40
_BISECTIONS = 8


@dataclass
class BaselineResult:
    """A baseline's choice per head and its expected recall, density and KV share ``[L, H]``.

    ``params["tuned"]`` says what was tuned and over which grid (``detail`` says it in words)."""

    name: str
    choices: list[list[Candidate]]
    recall: np.ndarray
    density: np.ndarray
    kv: np.ndarray
    within_budget: bool
    detail: str = ""
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def mean_recall(self) -> float:
        return float(self.recall.mean())

    @property
    def mean_density(self) -> float:
        return float(self.density.mean())

    @property
    def mean_kv(self) -> float:
        return float(self.kv.mean())

    @property
    def tuned(self) -> str:
        """What was tuned, over which grid, in words ("" when nothing was)."""
        return str(self.params.get("tuned", {}).get("text", ""))

    def to_policy(self, curves, budget: float, budget_kind: str = "density"):
        """This baseline as a `Policy` (estimates from ``curves``, extended with its candidates);
        ``policy.budget["method"]`` names the baseline."""
        from .generator import decode_from_prefill, policy_from_choices

        choices = {(la, h): c for la, row in enumerate(self.choices) for h, c in enumerate(row)}
        expected = self.mean_density if budget_kind == "density" else self.mean_kv
        policy = policy_from_choices(curves.extend(self.candidates()), choices, reason=f"{self.name} baseline ({self.detail}"
                                     + (f"; tuned: {self.tuned})" if self.tuned else ")"),
                                     budget={"kind": budget_kind, "value": budget, "method": self.name, "expected": expected})
        return policy.with_decode(decode_from_prefill(policy)) if budget_kind == "kv" else policy

    def candidates(self) -> list[Candidate]:
        """The distinct candidates this baseline uses."""
        seen: dict[str, Candidate] = {}
        for row in self.choices:
            for c in row:
                seen.setdefault(c.key(), c)
        return list(seen.values())


class _DenseHeads:
    """``est`` with the heads of ``mask`` (``[L, H]``) dense whatever candidate they are given,
    so that a baseline tuned on it pays for them from its budget."""

    def __init__(self, est: ProfileEstimator, mask: np.ndarray):
        self._est, self.mask = est, np.asarray(mask, dtype=bool)
        self._dense = est.evaluate(Candidate.make("dense"))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._est, name)

    def evaluate(self, candidate: Candidate) -> CandidateEval:
        e, d, m = self._est.evaluate(candidate), self._dense, self.mask
        return CandidateEval(candidate, np.where(m, d.recall, e.recall), np.where(m, d.density, e.density),
                             np.where(m, d.kv, e.kv), e.density_is)


def with_dense_heads(est: ProfileEstimator, mask: np.ndarray | None,
                     baseline: Callable[..., BaselineResult], *args: Any, **kwargs: Any) -> BaselineResult:
    """``baseline(est, *args, **kwargs)`` with the heads of ``mask`` kept dense: tuned with their
    cost in the budget, and dense in its choices (``detail`` says how many)."""
    if mask is None or not np.any(mask):
        return baseline(est, *args, **kwargs)
    r = baseline(_DenseHeads(est, mask), *args, **kwargs)
    dense = Candidate.make("dense")
    r.choices = [[dense if mask[lay, head] else c for head, c in enumerate(row)] for lay, row in enumerate(r.choices)]
    r.detail += f"; {int(np.sum(mask))} protected heads dense"
    r.params["protected_heads"] = int(np.sum(mask))
    return r


def _assemble(est: ProfileEstimator, name: str, choices: list[list[Candidate]], budget: float,
              budget_kind: str, detail: str, params: dict[str, Any]) -> BaselineResult:
    nl, nh = est.n_layers, est.n_heads
    recall, density, kv = np.zeros((nl, nh)), np.zeros((nl, nh)), np.zeros((nl, nh))
    for lay in range(nl):
        for head in range(nh):
            e = est.evaluate(choices[lay][head])
            recall[lay, head], density[lay, head], kv[lay, head] = e.recall[lay, head], e.density[lay, head], e.kv[lay, head]
    used = density.mean() if budget_kind == "density" else kv.mean()
    return BaselineResult(name, choices, recall, density, kv, bool(used <= budget + 1e-12), detail, params)


def _cost(e, budget_kind: str) -> float:
    return float(e.density.mean() if budget_kind == "density" else e.kv.mean())


def _fits(est: ProfileEstimator, c: Candidate, budget: float, budget_kind: str) -> bool:
    return _cost(est.evaluate(c), budget_kind) <= budget + 1e-12


def _largest(fits: Callable[[int], bool], lo: int, hi: int) -> int | None:
    """The largest ``x`` in ``[lo, hi]`` with ``fits(x)`` (``fits`` monotone: true, then false);
    None when not even ``lo`` fits."""
    if hi < lo or not fits(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


_HUGE = 1 << 40  # a length no fixed size is capped at


def _blocks(tokens: int, block_size: int) -> int:
    return max(1, -(-int(tokens) // block_size))


def block_streaming(sink_blocks: int, window_blocks: int, block_size: int) -> Candidate:
    """Sink and recent on whole blocks (MInference's A-shape): what a block-sparse kernel that
    computes a sink + recent rule's tiles can keep of them."""
    return Candidate.make("a_shape", sink=sink_blocks * block_size, window=window_blocks * block_size)


def rounded_up(c: Candidate, block_size: int) -> Candidate:
    """``c`` with its sizes rounded up to the whole blocks it already computes: the same tiles
    (the same density at every length), at least the same attention.

    - ``streaming(s, w)`` (token-exact) → ``a_shape`` with ``ceil(s / B)`` sink blocks and the
      ``1 + ceil((w - 1) / B)`` blocks the first query of a block reaches back to: e.g. sink 64 +
      recent 1 at 64-token blocks → the first block + the whole diagonal block;
    - ``vertical_slash`` and ``block_topk(topk)`` → their sizes as the whole blocks they keep;
    - other kinds unchanged.
    """
    b = int(block_size)
    p = c.param_dict
    if c.kind == "streaming" and p["sink"].beta == 0 and p["window"].beta == 0:
        s, w = p["sink"].resolve(_HUGE), max(1, p["window"].resolve(_HUGE))
        sb = -(-s // b)
        return Candidate.make("a_shape", sink=sb * b, window=(1 + -(-(w - 1) // b)) * b)
    if c.kind == "vertical_slash" and p["vertical"].beta == 0 and p["slash"].beta == 0:
        return Candidate.make("vertical_slash", vertical=max(1, p["vertical"].blocks(_HUGE, b)) * b,
                              slash=max(1, p["slash"].blocks(_HUGE, b)) * b, estimate=p["estimate"])
    if c.kind == "block_topk" and "topk" in p and p["topk"].beta == 0:
        return Candidate.make("block_topk", topk=max(2, p["topk"].blocks(_HUGE, b)) * b, estimate=p["estimate"])
    return c


def _sizes_text(values: Sequence[int], unit: str) -> str:
    vals = list(values)
    return f"{vals[0]} {unit}" if len(vals) == 1 else f"{{{', '.join(map(str, vals))}}} {unit}"


def _score(recall: np.ndarray, head_weights: np.ndarray | None) -> float:
    """What a baseline's tuning maximises: mean expected recall over heads, weighted by
    ``head_weights`` (``[L, H]``, e.g. `attnlab.sparsity_stats.sensitivity`) when given — the
    budgeted policy's objective, so that both are tuned on the same one."""
    return float(recall.mean() if head_weights is None else np.average(recall, weights=head_weights))


def _best(results: list[tuple[float, Any]]) -> Any:
    """The item of highest mean recall; ties go to the first tried (the smaller setting)."""
    best = results[0]
    for r in results[1:]:
        if r[0] > best[0] + 1e-12:
            best = r
    return best[1]


def uniform_streaming(est: ProfileEstimator, budget: float, *, sink: int | None = None, min_sink: int = 4,
                      budget_kind: str = "density", head_weights: np.ndarray | None = None) -> BaselineResult:
    """Same sink and window for all heads (StreamingLLM); the window is the largest within
    ``budget``; the sink is ``sink`` or, when None, tuned: each sink of a small grid (at least
    ``min_sink``) with its largest fitting window, the highest expected recall wins.

    Under a density budget the sizes are whole blocks (``a_shape``): a block-sparse kernel
    computes whole tiles, and a token-exact window touches the same tiles as the blocks
    `rounded_up` gives. Under a KV budget (cost in tokens) they are token-exact (``streaming``).
    """
    n = max(est.eval_lengths)
    b = est.block_size
    if budget_kind == "density":
        nb = -(-n // b)
        floor = _blocks(max(1, min_sink), b)
        sinks = [_blocks(sink, b)] if sink is not None else sorted({x for x in (floor, 2 * floor, 4 * floor) if x < nb} or {floor})
        unit, scale, wmax = "blocks", b, nb

        def make(s: int, w: int) -> Candidate:
            return block_streaming(s, w, b)
    else:
        floor = max(0, min_sink)
        sinks = [sink] if sink is not None else sorted({floor, *(x for x in SINK_TOKENS if floor <= x < n // 2)})
        unit, scale, wmax = "tokens", 1, n

        def make(s: int, w: int) -> Candidate:
            return Candidate.make("streaming", sink=s, window=w)

    tried = []
    for s in sinks:
        w = _largest(lambda w, s=s: _fits(est, make(s, w), budget, budget_kind), 1, wmax)
        if w is not None:
            tried.append((_score(est.evaluate(make(s, w)).recall, head_weights), (s, w)))
    s, w = _best(tried) if tried else (sinks[0], 1)
    c = make(s, w)
    choices = [[c] * est.n_heads for _ in range(est.n_layers)]
    tuned: dict[str, Any] = {}
    if sink is None:
        tuned = {"sink": [x * scale for x in sinks], "window": "largest within the budget", "granularity": unit,
                 "settings": len(tried),
                 "text": f"sink over {_sizes_text(sinks, unit)}, each with its largest window within the budget"}
    detail = f"sink {s * scale}, window {w * scale}" + (f" (whole blocks: {s} + {w})" if unit == "blocks" else "")
    return _assemble(est, "uniform_streaming", choices, budget, budget_kind, detail,
                     {"sink": s * scale, "window": w * scale, "granularity": unit, "tuned": tuned})


def duo_attention_style(est: ProfileEstimator, budget: float, *, retrieval_scores: np.ndarray | None = None,
                        sink: int | None = None, recent: int | None = None, min_sink: int = 4,
                        budget_kind: str = "density", granularity: str | None = None,
                        head_weights: np.ndarray | None = None) -> BaselineResult:
    """Top-ranked KV heads dense, the rest streaming (sink, recent); as many dense as fit.

    ``sink`` and ``recent`` fixed, or (None) tuned: every pair of a grid (sinks of at least
    ``min_sink``; recents of 1, 2, 3, 4, 6, ... blocks), each with as many dense KV heads as
    then fit, the highest expected recall wins. A fixed ``recent`` that does not fit alone
    shrinks until it does.

    ``granularity`` (default ``"blocks"`` under a density budget, ``"tokens"`` under a KV one):
    ``"blocks"``: the streaming heads keep whole blocks (``a_shape``, as DuoAttention's own
    block-streaming prefill does; sizes rounded up as `rounded_up` does: the same tiles, more
    attention); ``"tokens"``: token-exact ``streaming`` (what DuoAttention's config holds, for
    ``export --format duo``) — under a density budget still rounded up to the most the same
    tiles allow (sink ``k B`` tokens, recent ``(k - 1) B + 1``, at least 2 blocks' reach).
    """
    nl, nh, nkv = est.n_layers, est.n_heads, est.n_kv_heads
    group = nh // nkv
    n = max(est.eval_lengths)
    b = est.block_size
    dense = Candidate.make("dense")
    d_eval = est.evaluate(dense)
    granularity = granularity or ("blocks" if budget_kind == "density" else "tokens")
    if granularity not in ("blocks", "tokens") or (granularity == "blocks" and budget_kind != "density"):
        raise PolicyError(f"granularity {granularity!r}: use 'blocks' (density budgets) or 'tokens'")
    if budget_kind == "density":
        nb = -(-n // b)
        floor = _blocks(max(1, min_sink), b)
        sinks = [_blocks(sink, b)] if sink is not None else sorted({x for x in (floor, 2 * floor) if x < nb} or {floor})
        least = 1 if granularity == "blocks" else 2  # a token window of 1 is DuoAttention's recent_size 0
        recents = [1 + -(-(max(1, recent) - 1) // b)] if recent is not None else [x for x in WINDOW_STEPS if least <= x < nb] or [1]
        unit = "blocks"

        def sink_tokens(s: int) -> int:
            return s * b

        def recent_tokens(r: int) -> int:
            return r * b if granularity == "blocks" else (r - 1) * b + 1

        def make(s: int, r: int) -> Candidate:
            if granularity == "blocks":
                return block_streaming(s, r, b)
            return Candidate.make("streaming", sink=sink_tokens(s), window=recent_tokens(r))
    else:
        floor = max(0, min_sink)
        sinks = [min(sink, n)] if sink is not None else sorted({floor, *(x for x in SINK_TOKENS[1:3] if floor <= x < n // 2)})
        recents = [min(recent, n)] if recent is not None else [x * b for x in WINDOW_STEPS if x * b < n] or [1]
        unit = "tokens"

        def sink_tokens(s: int) -> int:
            return s

        def recent_tokens(r: int) -> int:
            return r

        def make(s: int, r: int) -> Candidate:
            return Candidate.make("streaming", sink=s, window=max(1, r))

    def fits(c: Candidate) -> bool:
        return _fits(est, c, budget, budget_kind)

    if recent is not None:  # a fixed recent that does not fit alone shrinks until it does
        recents = [_largest(lambda r: fits(make(sinks[0], r)), 1, recents[0]) or 1] if not fits(make(sinks[0], recents[0])) else recents

    def with_dense(s: int, r: int) -> tuple[float, tuple]:
        s_eval = est.evaluate(make(s, r))
        if retrieval_scores is not None:
            score = retrieval_scores.reshape(nl, nkv, group).max(-1)
        else:
            lost = (1 - s_eval.recall) * (1.0 if head_weights is None else head_weights)
            score = lost.reshape(nl, nkv, group).sum(-1)
        order = np.argsort(-score.reshape(-1), kind="stable")
        s_cost = s_eval.density if budget_kind == "density" else s_eval.kv
        used = float(s_cost.mean())
        # each dense KV group adds (1 - its heads' streaming cost) * group / heads to the mean
        k = 0
        for g in order:
            lay, kv = divmod(int(g), nkv)
            heads = slice(kv * group, (kv + 1) * group)
            add = float((1.0 - s_cost[lay, heads]).sum()) / (nl * nh)
            if used + add > budget + 1e-12:
                break
            used += add
            k += 1
        groups = {int(g) for g in order[:k]}
        is_dense = np.array([[(lay * nkv + h // group) in groups for h in range(nh)] for lay in range(nl)])
        recall = _score(np.where(is_dense, d_eval.recall, s_eval.recall), head_weights)
        return recall, (s, r, k, groups)

    tried = [with_dense(s, r) for s in sinks for r in recents if fits(make(s, r))]
    if not tried:
        tried = [with_dense(sinks[0], 1)]
    s, r, k, dense_groups = _best(tried)
    ranked_by = "retrieval score" if retrieval_scores is not None else "attention lost to streaming"
    sc = make(s, r)
    choices = [[dense if (lay * nkv + head // group) in dense_groups else sc for head in range(nh)] for lay in range(nl)]
    tuned: dict[str, Any] = {}
    reach = "blocks" if granularity == "blocks" else "blocks' reach"
    if sink is None or recent is None:
        tuned = {"sink": [sink_tokens(x) for x in sinks], "recent": [recent_tokens(x) for x in recents], "granularity": granularity,
                 "settings": len(tried),
                 "text": f"sink over {_sizes_text(sinks, unit)} x recent over "
                         f"{_sizes_text(recents, unit if unit == 'tokens' else reach)}, each with as many dense KV heads as fit"}
    sizes = f"sink {sink_tokens(s)} + recent {recent_tokens(r)}" + (f" (whole blocks: {s} + {r})" if granularity == "blocks" and unit == "blocks" else "")
    return _assemble(est, "duo_attention", choices, budget, budget_kind,
                     f"{k} of {nl * nkv} KV heads dense (by {ranked_by}), rest {sizes}",
                     {"dense_kv_heads": k, "sink": sink_tokens(s), "recent": recent_tokens(r), "granularity": granularity,
                      "ranked_by": ranked_by, "tuned": tuned})


def minference_candidates(scale: float, block_size: int | None = None) -> list[Candidate]:
    """MInference's grid scaled by ``scale``; with ``block_size``, sizes rounded up to the whole
    blocks they compute (`rounded_up`: the streaming entry becomes MInference's own A-shape)."""
    cands = []
    for kind, a, b in MINFERENCE_GRID:
        if kind == "streaming":
            c = Candidate.make("streaming", sink=max(1, round(a * scale)), window=max(1, round(b * scale)))
        elif kind == "vertical_slash":
            c = Candidate.make("vertical_slash", vertical=max(1, round(a * scale)), slash=max(1, round(b * scale)))
        else:
            c = Candidate.make("block_topk", topk=max(1, round(a * scale)))
        cands.append(c if block_size is None else rounded_up(c, block_size))
    return cands


def _minference_choice(est: ProfileEstimator, scale: float, blocks: bool = True) -> tuple[list[list[Candidate]], np.ndarray, np.ndarray]:
    cands = minference_candidates(scale, est.block_size if blocks else None)
    evals = [est.evaluate(c) for c in cands]
    rec = np.stack([e.recall for e in evals], -1)
    den = np.stack([e.density for e in evals], -1)
    # best recall; ties go to the cheaper candidate
    best = np.lexsort((den, -np.round(rec, 12)), axis=-1)[..., 0]
    li, hi = np.meshgrid(np.arange(est.n_layers), np.arange(est.n_heads), indexing="ij")
    choices = [[cands[int(best[lay, head])] for head in range(est.n_heads)] for lay in range(est.n_layers)]
    return choices, rec[li, hi, best], den[li, hi, best]


def minference_style(est: ProfileEstimator, budget: float, *, budget_kind: str = "density",
                     head_weights: np.ndarray | None = None) -> BaselineResult:
    """Each head's best of MInference's grid (no global budget), the grid scaled by one factor:
    tuned over `MINFERENCE_SCALES` geometric steps and a bisection at the budget's edge, the
    fitting scale with the highest expected recall wins. Sizes are the whole blocks they
    compute (`minference_candidates` with the block size)."""
    n = max(est.eval_lengths)
    scales = [float(s) for s in np.geomspace(1.0 / 3500, max(1.0, n / 100), MINFERENCE_SCALES)]
    tried: dict[float, tuple[float, bool]] = {}

    def trial(s: float) -> bool:
        _, rec, den = _minference_choice(est, s)
        ok = (den.mean() if budget_kind == "density" else 1.0) <= budget + 1e-12
        tried[s] = (_score(rec, head_weights), bool(ok))
        return ok

    fits = [trial(s) for s in scales]
    ok = [i for i, f in enumerate(fits) if f]
    if ok and max(ok) + 1 < len(scales):  # refine between the last fitting and the first failing scale
        lo, hi = scales[max(ok)], scales[max(ok) + 1]
        for _ in range(_BISECTIONS):
            mid = (lo * hi) ** 0.5
            if trial(mid):
                lo = mid
            else:
                hi = mid
    fitting = sorted((s, r) for s, (r, f) in tried.items() if f)
    scale = _best([(r, s) for s, r in fitting]) if fitting else scales[0]
    choices, _, _ = _minference_choice(est, scale)
    tuned = {"scale": {"geometric": [scales[0], scales[-1], MINFERENCE_SCALES], "bisections": _BISECTIONS},
             "settings": len(tried), "fitting": len(fitting),
             "text": (f"grid scale over {MINFERENCE_SCALES} geometric steps in [{scales[0]:.3g}, {scales[-1]:.3g}] "
                      f"+ {_BISECTIONS} bisections ({len(fitting)} of {len(tried)} fit), the best recall")}
    return _assemble(est, "minference", choices, budget, budget_kind, f"grid scaled by {scale:.3g}, whole blocks",
                     {"scale": scale, "tuned": tuned})


def snapkv_uniform(curves, budget: float, *, window: int = 32, kernel: int = 7, sink: int = 4):
    """SnapKV at a KV budget, as a `Policy`: dense prefill; every KV head keeps ``budget`` of the
    prompt (``sink`` first tokens and the last ``window`` always, the window shrunk so the two fit
    the budget at the longest evaluation length), the rest chosen by the window's pooled attention."""
    from .generator import policy_from_choices
    from .policy import DecodeHead

    est = curves.estimator
    n = max(est.eval_lengths)
    room = max(1, int(budget * n))
    sink = min(sink, max(0, room - 1))
    window = max(1, min(window, room - sink))
    dense = Candidate.make("dense")
    choices = {(la, h): dense for la in range(est.n_layers) for h in range(est.n_heads)}
    policy = policy_from_choices(curves.extend([dense]), choices, reason="snapkv baseline (dense prefill)",
                                 budget={"kind": "kv", "value": budget, "method": "snapkv"})
    share = max(room, sink + window) / n  # whole tokens at n, so the cache never exceeds the budget by rounding
    heads = [DecodeHead.make(la, kv, "snapkv", budget={"alpha": 0, "beta": share}, window=window, kernel=kernel, sink=sink,
                             reason=f"snapkv baseline: {budget:g} of the prompt, window {window}, pool {kernel}, sink {sink}")
             for la in range(est.n_layers) for kv in range(est.n_kv_heads)]
    policy = policy.with_decode(heads)
    policy.budget["expected"] = policy.predicted_kv_fraction(n)
    return policy


def kv_baselines(curves, budget: float, *, retrieval_scores: np.ndarray | None = None, sink: int = 4,
                 recent: int | None = None) -> dict[str, Any]:
    """The decode-phase baselines at one KV budget, as policies with a decode section:
    StreamingLLM (uniform streaming), DuoAttention-style (streaming heads keep ``sink`` +
    ``recent``, default an eighth of the longest evaluation length, so that budget is left for
    full KV heads), SnapKV-style, HeadKV-style (`headkv_style`) and RazorAttention-style
    (`razor_style`)."""
    est = curves.estimator
    recent = recent or max(1, max(est.eval_lengths) // 8)
    return {
        "uniform_streaming": uniform_streaming(est, budget, sink=sink, budget_kind="kv").to_policy(curves, budget, "kv"),
        "duo_attention": duo_attention_style(est, budget, retrieval_scores=retrieval_scores, sink=sink, recent=recent,
                                             budget_kind="kv").to_policy(curves, budget, "kv"),
        "snapkv": snapkv_uniform(curves, budget, sink=sink),
        "headkv": headkv_style(curves, budget, retrieval_scores=retrieval_scores, sink=sink),
        "razor": razor_style(curves, budget, retrieval_scores=retrieval_scores, sink=sink, recent=recent),
    }


def _kv_head_scores(est, retrieval_scores: np.ndarray | None, sink: int, window: int) -> tuple[np.ndarray, str]:
    """One score per KV head ``[L, H_kv]``: its query heads' largest retrieval score, or, without
    scores, the attention its query heads would lose to a sink + window cache (summed)."""
    nl, nh, nkv = est.n_layers, est.n_heads, est.n_kv_heads
    group = nh // nkv
    if retrieval_scores is not None:
        return np.asarray(retrieval_scores, dtype=float).reshape(nl, nkv, group).max(-1), "retrieval score"
    e = est.evaluate(Candidate.make("streaming", sink=sink, window=max(1, window)))
    return (1 - e.recall).reshape(nl, nkv, group).sum(-1), "attention lost to streaming"


def headkv_budgets(scores: np.ndarray, total: int, minimum: int, cap: int) -> np.ndarray:
    """HeadKV's allocation: every KV head gets ``minimum`` tokens and the rest of ``total`` is
    shared in proportion to ``scores`` (negative ones count as 0; all zero: equally), no head
    above ``cap`` (what a head is given beyond its cap goes to the others, in proportion again).
    Whole tokens (largest remainders), summing to ``total`` (to ``cap`` per head when that is less).

    Raises ``ValueError`` when ``total`` is below ``minimum`` per head or ``minimum > cap``."""
    s = np.clip(np.asarray(scores, dtype=float).reshape(-1), 0, None)
    k = s.size
    if minimum > cap or total < k * minimum:
        raise ValueError(f"a KV budget of {total} tokens is below the minimum {k} heads x {minimum} (sink + window)")
    if s.sum() <= 0:
        s = np.ones(k)
    free = float(min(total, k * cap) - k * minimum)
    room = float(cap - minimum)
    extra = np.zeros(k)
    for weights in (s, np.ones(k)):  # in proportion to the scores; what is left when every scored head is full, equally
        active = (weights > 0) & (extra < room)
        while free > 1e-9 and active.any():
            share = np.where(active, free * weights / weights[active].sum(), 0.0)
            over = active & (extra + share >= room)
            if not over.any():
                extra += share
                free = 0.0
                break
            free -= float((room - extra[over]).sum())
            extra[over] = room
            active &= ~over
    base = np.floor(extra + 1e-9)
    left = int(round(min(total, k * cap) - k * minimum - base.sum()))
    if left > 0:
        order = np.argsort(-(extra - base), kind="stable")
        order = [i for i in order if base[i] < room]
        base[order[:left]] += 1
    return (minimum + base).astype(int)


def headkv_style(curves, budget: float, *, retrieval_scores: np.ndarray | None = None, window: int = 32,
                 kernel: int = 7, sink: int = 4):
    """HeadKV at a KV budget, as a `Policy`: dense prefill; each KV head keeps its own share of
    the prompt, ``sink`` + ``window`` at least and the rest of the budget in proportion to its
    score (`headkv_budgets`; the largest retrieval score of its query heads, or without scores
    the attention streaming would lose), the tokens inside each head's budget chosen as SnapKV
    does (the window's pooled attention). Shares are of the longest evaluation length ``n``:
    the whole cache holds ``budget`` of the prompt at ``n``, like `snapkv_uniform`'s."""
    from .generator import policy_from_choices
    from .policy import DecodeHead

    est = curves.estimator
    nl, nkv = est.n_layers, est.n_kv_heads
    n = max(est.eval_lengths)
    total = max(nl * nkv, int(budget * n * nl * nkv + 1e-9))
    room = total // (nl * nkv)
    sink = min(sink, max(0, room - 1))
    window = max(1, min(window, room - sink))
    score, ranked_by = _kv_head_scores(est, retrieval_scores, sink, window)
    tokens = headkv_budgets(score, total, sink + window, n).reshape(nl, nkv)
    dense = Candidate.make("dense")
    choices = {(la, h): dense for la in range(nl) for h in range(est.n_heads)}
    policy = policy_from_choices(curves.extend([dense]), choices, reason="headkv baseline (dense prefill)",
                                 budget={"kind": "kv", "value": budget, "method": "headkv"})
    heads = [DecodeHead.make(la, kv, "snapkv", budget={"alpha": 0, "beta": int(tokens[la, kv]) / n}, window=window,
                             kernel=kernel, sink=sink,
                             reason=f"headkv baseline: {int(tokens[la, kv])} of {n} prompt tokens by {ranked_by} "
                                    f"{float(score[la, kv]):.3g}, snapkv selection (window {window}, pool {kernel}, sink {sink})")
             for la in range(nl) for kv in range(nkv)]
    policy = policy.with_decode(heads)
    policy.budget["expected"] = policy.predicted_kv_fraction(n)
    policy.budget["ranked_by"] = ranked_by
    return policy


def razor_style(curves, budget: float, *, retrieval_scores: np.ndarray | None = None, sink: int = 4,
                recent: int | None = None):
    """RazorAttention at a KV budget, as a `Policy`: dense prefill; the KV heads ranked first
    (by retrieval score, as `duo_attention_style` ranks them) keep the full cache, as many as
    the budget allows, the others ``sink`` + ``recent`` + the compensation token (the mean key
    and value of what they dropped; its slot is taken from the recent window, so the cache is
    the size the DuoAttention-style baseline's is)."""
    from .generator import policy_from_choices
    from .policy import DecodeHead

    est = curves.estimator
    n = max(est.eval_lengths)
    recent = recent or max(1, n // 8)
    duo = duo_attention_style(est, budget, retrieval_scores=retrieval_scores, sink=sink, recent=recent,
                              budget_kind="kv").to_policy(curves, budget, "kv")
    heads = []
    for e in duo.decode_heads():
        if e.kind != "streaming":
            heads.append(DecodeHead.make(e.layer, e.kv_head, "full", reason=f"razor baseline: a retrieval KV head keeps everything ({e.reason})"))
            continue
        s, r = e.params["sink"], e.params["recent"]
        if r > 1:
            r -= 1
        elif s > 0:
            s -= 1
        heads.append(DecodeHead.make(e.layer, e.kv_head, "streaming", sink=s, recent=r, compensation=True,
                                     reason=f"razor baseline: sink {s} + recent {r} + a compensation token"))
    dense = Candidate.make("dense")
    choices = {(la, h): dense for la in range(est.n_layers) for h in range(est.n_heads)}
    policy = policy_from_choices(curves.extend([dense]), choices, reason="razor baseline (dense prefill)",
                                 budget={"kind": "kv", "value": budget, "method": "razor"})
    policy = policy.with_decode(heads)
    policy.budget["expected"] = policy.predicted_kv_fraction(n)
    return policy
