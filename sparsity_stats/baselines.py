"""The usual uniform choices, at a given budget, for comparison with the budgeted policy.

- **uniform streaming** (StreamingLLM): the same sink and window for every head; the window is
  the largest that fits the budget.
- **DuoAttention-style**: whole KV heads either dense ("retrieval heads") or streaming with one
  sink/recent size; heads are ranked by their retrieval score (the run's detections) or, when
  the run has none, by how much attention streaming would lose (the signal DuoAttention's gates
  learn); the most that fit the budget go dense.
- **MInference-style**: MInference's fixed grid (stream_llm (100, 800); vertical_and_slash (30,
  800), (100, 750), (500, 700), (3500, 100); block_sparse with 100 blocks of 64), each head
  taking its best by recall, with no global budget. Its sizes are made for 128k-token prompts,
  so the grid is scaled by one factor, the largest whose density fits the budget.

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
budgeted policy (`ProfileEstimator`), so the comparison is like for like.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .curves import ProfileEstimator
from .kinds import Candidate

MINFERENCE_GRID = (
    ("streaming", 100, 800),
    ("vertical_slash", 30, 800),
    ("vertical_slash", 100, 750),
    ("vertical_slash", 500, 700),
    ("vertical_slash", 3500, 100),
    ("block_topk", 100 * 64, 0),
)


@dataclass
class BaselineResult:
    """A baseline's choice per head and its expected recall, density and KV share ``[L, H]``."""

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

    def to_policy(self, curves, budget: float, budget_kind: str = "density"):
        """This baseline as a `Policy` (estimates from ``curves``, extended with its candidates);
        ``policy.budget["method"]`` names the baseline."""
        from .generator import decode_from_prefill, policy_from_choices

        choices = {(la, h): c for la, row in enumerate(self.choices) for h, c in enumerate(row)}
        expected = self.mean_density if budget_kind == "density" else self.mean_kv
        policy = policy_from_choices(curves.extend(self.candidates()), choices, reason=f"{self.name} baseline ({self.detail})",
                                     budget={"kind": budget_kind, "value": budget, "method": self.name, "expected": expected})
        return policy.with_decode(decode_from_prefill(policy)) if budget_kind == "kv" else policy

    def candidates(self) -> list[Candidate]:
        """The distinct candidates this baseline uses."""
        seen: dict[str, Candidate] = {}
        for row in self.choices:
            for c in row:
                seen.setdefault(c.key(), c)
        return list(seen.values())


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


def uniform_streaming(est: ProfileEstimator, budget: float, *, sink: int = 4, budget_kind: str = "density") -> BaselineResult:
    """Same sink and window for all heads: the largest window within ``budget``."""
    n = max(est.eval_lengths)

    def cand(w: int) -> Candidate:
        return Candidate.make("streaming", sink=sink, window=w)

    lo, hi = 1, n
    if _cost(est.evaluate(cand(1)), budget_kind) > budget:
        hi = 1
    while lo < hi:  # largest w with cost <= budget (cost is non-decreasing in w)
        mid = (lo + hi + 1) // 2
        if _cost(est.evaluate(cand(mid)), budget_kind) <= budget:
            lo = mid
        else:
            hi = mid - 1
    c = cand(lo)
    choices = [[c] * est.n_heads for _ in range(est.n_layers)]
    return _assemble(est, "uniform_streaming", choices, budget, budget_kind, f"sink {sink}, window {lo}", {"sink": sink, "window": lo})


def duo_attention_style(est: ProfileEstimator, budget: float, *, retrieval_scores: np.ndarray | None = None,
                        sink: int = 64, recent: int = 256, budget_kind: str = "density") -> BaselineResult:
    """Top-ranked KV heads dense, the rest streaming (sink, recent); as many dense as fit."""
    nl, nh, nkv = est.n_layers, est.n_heads, est.n_kv_heads
    group = nh // nkv
    n = max(est.eval_lengths)
    dense = Candidate.make("dense")

    def stream(r: int) -> Candidate:
        return Candidate.make("streaming", sink=min(sink, n), window=max(1, r))

    r = min(recent, n)
    if _cost(est.evaluate(stream(r)), budget_kind) > budget:  # shrink the recent window to fit
        lo, hi = 1, r
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if _cost(est.evaluate(stream(mid)), budget_kind) <= budget:
                lo = mid
            else:
                hi = mid - 1
        r = lo
    s_eval = est.evaluate(stream(r))
    if retrieval_scores is not None:
        score = retrieval_scores.reshape(nl, nkv, group).max(-1)
        ranked_by = "retrieval score"
    else:
        score = (1 - s_eval.recall).reshape(nl, nkv, group).sum(-1)
        ranked_by = "attention lost to streaming"
    order = np.argsort(-score.reshape(-1), kind="stable")
    s_cost = s_eval.density if budget_kind == "density" else s_eval.kv
    base = float(s_cost.mean())
    # each dense KV group adds (1 - its heads' streaming cost) * group / heads to the mean
    k = 0
    used = base
    for g in order:
        lay, kv = divmod(int(g), nkv)
        heads = slice(kv * group, (kv + 1) * group)
        add = float((1.0 - s_cost[lay, heads]).sum()) / (nl * nh)
        if used + add > budget + 1e-12:
            break
        used += add
        k += 1
    dense_groups = {int(g) for g in order[:k]}
    sc = stream(r)
    choices = [[dense if (lay * nkv + head // group) in dense_groups else sc for head in range(nh)] for lay in range(nl)]
    return _assemble(est, "duo_attention", choices, budget, budget_kind,
                     f"{k} of {nl * nkv} KV heads dense (by {ranked_by}), rest sink {min(sink, n)} + recent {r}",
                     {"dense_kv_heads": k, "sink": min(sink, n), "recent": r, "ranked_by": ranked_by})


def _minference_choice(est: ProfileEstimator, scale: float) -> tuple[list[list[Candidate]], np.ndarray, np.ndarray]:
    cands = []
    for kind, a, b in MINFERENCE_GRID:
        if kind == "streaming":
            cands.append(Candidate.make("streaming", sink=max(1, round(a * scale)), window=max(1, round(b * scale))))
        elif kind == "vertical_slash":
            cands.append(Candidate.make("vertical_slash", vertical=max(1, round(a * scale)), slash=max(1, round(b * scale))))
        else:
            cands.append(Candidate.make("block_topk", topk=max(1, round(a * scale))))
    evals = [est.evaluate(c) for c in cands]
    rec = np.stack([e.recall for e in evals], -1)
    den = np.stack([e.density for e in evals], -1)
    # best recall; ties go to the cheaper candidate
    best = np.lexsort((den, -np.round(rec, 12)), axis=-1)[..., 0]
    li, hi = np.meshgrid(np.arange(est.n_layers), np.arange(est.n_heads), indexing="ij")
    choices = [[cands[int(best[lay, head])] for head in range(est.n_heads)] for lay in range(est.n_layers)]
    return choices, rec[li, hi, best], den[li, hi, best]


def minference_style(est: ProfileEstimator, budget: float, *, budget_kind: str = "density") -> BaselineResult:
    """Each head's best of MInference's grid (no global budget), grid scaled to fit ``budget``."""
    n = max(est.eval_lengths)
    scales = np.geomspace(1.0 / 3500, max(1.0, n / 100), 40)
    fits = []
    for s in scales:
        choices, _, den = _minference_choice(est, float(s))
        cost = den.mean() if budget_kind == "density" else 1.0
        fits.append(cost <= budget + 1e-12)
    ok = [i for i, f in enumerate(fits) if f]
    if not ok:
        scale = float(scales[0])
    else:
        i = max(ok)
        scale = float(scales[i])
        if i + 1 < len(scales):  # refine between the last fitting and the first failing scale
            lo, hi = float(scales[i]), float(scales[i + 1])
            for _ in range(8):
                mid = (lo * hi) ** 0.5
                _, _, den = _minference_choice(est, mid)
                if den.mean() <= budget + 1e-12:
                    lo = mid
                else:
                    hi = mid
            scale = lo
    choices, _, _ = _minference_choice(est, scale)
    return _assemble(est, "minference", choices, budget, budget_kind, f"grid scaled by {scale:.3g}", {"scale": scale})


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
