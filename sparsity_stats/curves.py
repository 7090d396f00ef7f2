"""Per-head cost-recall curves: expected retained attention and density of every candidate.

For each head and each candidate ``(kind, params)`` the estimator answers two questions from a
profiled run (`attnlab.runs.Run`): how much attention mass would the head keep (*expected
recall*), and what share of the causal blocks would it compute (*density*)?

Recall is read off the run's block mass maps ``mass_sum [L, H, QB, KB]`` (each row: the mean
mass a query of that block puts on each key block, rows weighted by how many samples measured
them). For a candidate that keeps a set of tiles, recall is the mass on those tiles, exactly.
For token-exact kinds (streaming) a tile may be partly kept; it counts with the share of its
causal pairs that are kept — a uniform-within-tile assumption — corrected, where the run
measured them, by the token-level statistics ``sink_mass_{n}`` and ``local_mass_{w}``: the
estimate becomes ``block_estimate + (measured sink - its block estimate) + (measured window -
its block estimate)``, interpolated in ``log2`` between measured sizes.

Dynamic kinds choose their blocks on the profile itself (the row-weighted map as scores), which
is the best *fixed* choice for the profiled prompts: a lower bound on an oracle that chooses
per prompt, an upper bound on a run-time estimator that sees only pooled or last-query scores.

Density counts the tiles a block-sparse kernel computes over the tiles dense causal attention
computes, at each evaluation length. Static kinds and fixed top-k are exact for any input;
vertical-slash uses its worst case (an upper bound); the gamma threshold uses its profile count
(an expectation). Both recall and density average over ``eval_lengths`` (prefixes of the
profiled prompts: causal attention of a prefix is the prefix of the attention).

**The model's own structure.** On a layer with its own sliding window ``W`` (the run's model
identity, ``attention.layer_windows``) no policy can keep more than the window: density is the
kept tiles *inside the window* over the windowed dense cost (`kinds.windowed_causal_tiles`), so a
dense window layer has density 1 and `ProfileEstimator.layer_cost` gives each layer's dense cost
relative to a full causal layer (for budgets across layers); the KV share is at most ``W / n``.
Recall needs no change there (the profile holds no mass outside the window). A learned sink
(gpt-oss) takes mass no key receives — the block maps' rows sum to ``1 -`` its share — and
every policy keeps it: recall is ``sink + (1 - sink) · recall over the keys``.

**Which queries count** (``focus_last``, ``focus_weight``). By default every measured query
counts alike. A task's answer starts from the last rows of the prompt — the first generated
token is the prefill's last query, and the question sits just before it — which are a few dozen
of a thousand rows. With ``focus_last=T`` the objective becomes ``(1 - focus_weight) · recall over
every query + focus_weight · recall over the queries of the blocks holding the last T tokens``
of each evaluation length (rounded out to whole blocks). Density is unchanged: a kernel computes
every row. It needs prompts that end at the evaluation length (a profile of prompts of the length
one deploys at, ending the way the workload's do); elsewhere it is refused. The token-level
streaming correction was measured over every query, so it applies to the first term only.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from attnlab.attention import layer_windows_of
from attnlab.runs import DETECTIONS, HEAD_STATS, BlockMaps, Run

from .errors import ERR_MAP_BLOCK, PolicyError
from .kinds import (
    KINDS,
    BlockTopK,
    Candidate,
    VerticalSlash,
    XAttention,
    get_kind,
    select_vertical_slash,
    windowed_causal_tiles,
)
from .masks import check_block_size, single_thread
from .patterns import Pattern, and_masks, generate_causal, generate_sink, generate_window

Tensor = torch.Tensor

#: XAttention thresholds the generator may give a head (``kinds`` with ``"xattention"``).
XATTENTION_TAUS = (0.8, 0.9, 0.95, 0.98)

_ERR_NO_ROWS = (
    "the run's block maps measured no query block below {n} tokens: evaluate at a length the run "
    "profiled (lengths {lengths}), or re-profile without --last-queries"
)
_ERR_EVAL_LEN = "evaluation length {n} exceeds what the run's block maps cover ({covered} tokens): use lengths <= {covered}"
_ERR_FOCUS_END = (
    "--focus-last {t} weights the queries that end each prompt, but no profiled prompt (lengths {lengths}) ends in "
    "the last {t} tokens of evaluation length {n}: evaluate at the length the prompts were profiled at "
    "(--lengths {longest}) or drop --focus-last"
)
_ERR_FOCUS_SETTING = "{name} must be {what}, got {got!r} ({option})"


# -- tile geometry --------------------------------------------------------------------------
def _tile_bounds(n: int, b: int, n_rows: int | None = None):
    qbn = -(-n // b) if n_rows is None else n_rows
    kbn = -(-n // b)
    qb = torch.arange(qbn)[:, None]
    kb = torch.arange(kbn)[None, :]
    q_lo, q_hi = qb * b, torch.clamp(qb * b + b, max=n) - 1
    k_lo, k_hi = kb * b, torch.clamp(kb * b + b, max=n) - 1
    return qb, kb, q_lo, q_hi, k_lo, k_hi


def count_tiles(pattern: Pattern, n: int, block_size: int) -> int:
    """Tiles the pattern (intersected with causal) touches at length ``n`` (prefill)."""
    _, _, q_lo, q_hi, k_lo, k_hi = _tile_bounds(n, block_size)
    any_, _ = and_masks(generate_causal(), pattern).rect(torch.tensor(0), q_lo, q_hi, k_lo, k_hi)
    return int(any_.expand(q_lo.shape[0], k_lo.shape[1]).sum())


def causal_tiles(n: int, block_size: int) -> int:
    nb = -(-n // block_size)
    return nb * (nb + 1) // 2


def tile_coverage(pattern: Pattern, n_rows: int, block_size: int) -> Tensor:
    """Share of each tile's causal pairs the pattern keeps, float64 ``[n_rows, n_rows]``.

    Whole tiles (every pair kept or none) come from `Pattern.rect`; only tiles the pattern cuts
    are evaluated token by token (O(cut tiles x B^2)).
    """
    b = block_size
    n = n_rows * b
    qb, kb, q_lo, q_hi, k_lo, k_hi = _tile_bounds(n, b, n_rows)
    pat = and_masks(generate_causal(), pattern)
    any_, all_ = pat.rect(torch.tensor(0), q_lo, q_hi, k_lo, k_hi)
    any_ = any_.expand(n_rows, n_rows)
    all_ = all_.expand(n_rows, n_rows)
    cov = torch.zeros(n_rows, n_rows, dtype=torch.float64)
    diag = (qb == kb).expand(n_rows, n_rows)
    causal_pairs = torch.where(diag, torch.tensor(b * (b + 1) / 2, dtype=torch.float64), torch.tensor(float(b * b), dtype=torch.float64))
    cut = any_ & ~all_
    cov[all_ & any_] = 1.0
    if cut.any():
        rows, cols = torch.nonzero(cut, as_tuple=True)
        i = torch.arange(b)
        q = (rows[:, None, None] * b + i[None, :, None])
        k = (cols[:, None, None] * b + i[None, None, :])
        kept = pat(torch.tensor(0), q, k).sum((-1, -2)).to(torch.float64)
        cov[rows, cols] = kept / causal_pairs[rows, cols]
    return cov


# -- the estimator --------------------------------------------------------------------------
@dataclass
class CandidateEval:
    """One candidate evaluated for every head: ``recall``, ``density``, ``kv`` as ``[L, H]``."""

    candidate: Candidate
    recall: np.ndarray
    density: np.ndarray
    kv: np.ndarray
    density_is: str


def _check_focus(focus_last, focus_weight, eval_lengths: Sequence[int], profiled_lengths: Sequence[int]):
    """``(focus_last or None, focus_weight)`` checked: whole tokens (0 or None: no focus), a weight in
    (0, 1], and a profiled prompt ending in the focus window of every evaluation length."""
    if focus_last is None or focus_last == 0:
        return None, float(focus_weight)
    if not (isinstance(focus_last, (int, np.integer)) and not isinstance(focus_last, bool)) or focus_last < 0:
        raise PolicyError(_ERR_FOCUS_SETTING.format(name="focus_last", what="a whole number of tokens >= 1",
                                                    got=focus_last, option="--focus-last"))
    if not (isinstance(focus_weight, (int, float, np.floating)) and not isinstance(focus_weight, bool)
            and 0 < float(focus_weight) <= 1):
        raise PolicyError(_ERR_FOCUS_SETTING.format(name="focus_weight", what="a number in (0, 1]",
                                                    got=focus_weight, option="--focus-weight"))
    ends = sorted({int(x) for x in profiled_lengths})
    for n in eval_lengths:
        if ends and not any(n - int(focus_last) < e <= n for e in ends):
            raise PolicyError(_ERR_FOCUS_END.format(t=focus_last, n=n, lengths=ends, longest=max(ends)))
    return int(focus_last), float(focus_weight)


class ProfileEstimator:
    """Expected recall, density and KV share of any candidate for every head of a profiled model.

    Build it with `ProfileEstimator.from_run`. ``block_size`` defaults to the run's block maps'
    (a power-of-two multiple pools them); ``eval_lengths`` default to the longest profiled length
    the maps cover. `evaluate` memoises per candidate.
    """

    def __init__(
        self,
        maps: BlockMaps,
        model: dict[str, Any],
        *,
        head_stats: pd.DataFrame | None = None,
        profiled_lengths: Sequence[int] = (),
        block_size: int | None = None,
        eval_lengths: Sequence[int] | None = None,
        source: dict[str, Any] | None = None,
        focus_last: int | None = None,
        focus_weight: float = 0.5,
    ):
        self.model = dict(model)
        self.n_layers = int(model["n_layers"])
        #: each layer's own sliding window (0 = none), from the identity's ``attention`` entry
        self.layer_windows = np.array(layer_windows_of(self.model, self.n_layers), dtype=np.int64)
        self.n_heads = int(model["n_heads"])
        self.n_kv_heads = int(model.get("n_kv_heads", self.n_heads))
        self.source = source or {}
        mb = int(maps.block_size)
        b = check_block_size(mb if block_size is None else block_size)
        if b % mb:
            raise PolicyError(ERR_MAP_BLOCK.format(run_block=mb, block=b))
        self.block_size = b
        mass = maps.mass_sum.to(torch.float64)
        count = maps.count.to(torch.float64)
        if tuple(mass.shape[:2]) != (self.n_layers, self.n_heads):
            raise PolicyError(
                f"block maps have {tuple(mass.shape[:2])} (layers, heads) but the model has "
                f"({self.n_layers}, {self.n_heads}): the run is inconsistent; re-profile it"
            )
        f = b // mb
        rows = count[:, 0]  # samples that measured each map row
        if f > 1:
            nb = mass.shape[-1]
            pad = (-nb) % f
            mass = torch.nn.functional.pad(mass, (0, pad, 0, pad))
            rows = torch.nn.functional.pad(rows, (0, pad))
            nbp = (nb + pad) // f
            weighted = mass * rows[None, None, :, None]
            summed = weighted.reshape(self.n_layers, self.n_heads, nbp, f, nbp, f).sum((3, 5))
            rows = rows.reshape(nbp, f).sum(-1)
            mass = summed / rows.clamp(min=1)[None, None, :, None]
        self.mass = mass
        self.row_weight = rows
        measured = torch.nonzero(rows > 0).flatten()
        self.covered = int(mass.shape[-1]) * b if measured.numel() == 0 else int(measured.max() + 1) * b
        self.profiled_lengths = sorted({int(x) for x in profiled_lengths}) or [self.covered]
        if eval_lengths is None:
            eval_lengths = [min(max(self.profiled_lengths), self.covered)]
        self.eval_lengths = [int(n) for n in eval_lengths]
        for n in self.eval_lengths:
            if n > self.covered:
                raise PolicyError(_ERR_EVAL_LEN.format(n=n, covered=self.covered))
        self.focus_last, self.focus_weight = _check_focus(focus_last, focus_weight, self.eval_lengths, self.profiled_lengths)
        self._uniform: dict[int, Tensor] = {}
        self._weighted: dict[int, Tensor] = {}
        self._sink: dict[int, np.ndarray] = {}
        self._sorted: dict[int, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        self._cache: dict[str, CandidateEval] = {}
        self._coverages: dict[tuple[str, int], Tensor] = {}
        self._stats = self._read_stats(head_stats)

    @classmethod
    def from_run(cls, run: Run | str | os.PathLike, *, block_size: int | None = None,
                 eval_lengths: Sequence[int] | None = None, focus_last: int | None = None,
                 focus_weight: float = 0.5) -> ProfileEstimator:
        """Read block maps, head statistics and profiled lengths from a run directory.

        The estimator's ``model`` is the run's `ModelIdentity` (with its weights fingerprint),
        which is what the policies made from it record."""
        run = Run.coerce(run)
        maps = run.block_maps()
        # statistics are optional (recall then comes from the block maps alone); a file that is
        # there but unreadable is an error, not "no statistics"
        stats = run.read_optional(HEAD_STATS)
        lengths = (run.manifest.get("parameters") or {}).get("lengths") or []
        source = {"path": str(run.path), "name": run.name, "created": run.manifest.get("created")}
        return cls(maps, run.identity.to_dict(), head_stats=stats, profiled_lengths=lengths, block_size=block_size,
                   eval_lengths=eval_lengths, source=source, focus_last=focus_last, focus_weight=focus_weight)

    def objective(self) -> dict[str, Any]:
        """Which queries the recall estimates weight (recorded in a policy's generator settings)."""
        return {"focus_last": self.focus_last, "focus_weight": self.focus_weight if self.focus_last else None}

    # -- statistics used as corrections ---------------------------------------------------
    def _read_stats(self, table: pd.DataFrame | None) -> dict[str, np.ndarray]:
        """Mean of each sink/local statistic per head, weighted by sample length: ``[L, H]``."""
        out: dict[str, np.ndarray] = {}
        if table is None or len(table) == 0:
            return out
        t = table[table["statistic"].astype(str).str.match(r"^(sink_mass|local_mass)_\d+$")]
        if t.empty:
            return out
        t = t.assign(w=t["n_tokens"].astype(float), wv=t["value"].astype(float) * t["n_tokens"].astype(float))
        g = t.groupby(["statistic", "layer", "head"], observed=True)[["w", "wv"]].sum()
        g = (g["wv"] / g["w"].where(g["w"] > 0)).rename("v").reset_index()
        for name, sub in g.groupby("statistic", observed=True):
            arr = np.full((self.n_layers, self.n_heads), np.nan)
            arr[sub["layer"].to_numpy(int), sub["head"].to_numpy(int)] = sub["v"].to_numpy(float)
            if not np.isnan(arr).any():
                out[str(name)] = arr
        return out

    # -- maps per evaluation length ---------------------------------------------------------
    def _rows_mass(self, qbn: int, w: Tensor) -> tuple[Tensor, Tensor]:
        """The causal mass of the first ``qbn`` query blocks with rows weighted by ``w [qbn]``,
        scaled to sum to 1 per head, and each head's weighted total before scaling."""
        m = self.mass[:, :, :qbn, :qbn] * torch.tril(torch.ones(qbn, qbn, dtype=torch.bool))
        total = (m.sum(-1) * w).sum(-1)  # [L, H]
        return (m * w[None, None, :, None] / total.clamp(min=1e-30)[:, :, None, None]).to(torch.float32), total

    def _uniform_mass(self, n: int) -> Tensor:
        """``[L, H, QB, QB]`` mass of the first ``n // B`` query blocks, every measured query alike:
        the kept share of all measured queries is ``(mass * keep).sum((-1, -2))``."""
        got = self._uniform.get(n)
        if got is None:
            qbn = n // self.block_size
            w = self.row_weight[:qbn]
            if qbn == 0 or float(w.sum()) == 0:
                raise PolicyError(_ERR_NO_ROWS.format(n=n, lengths=self.profiled_lengths))
            got, total = self._rows_mass(qbn, w)
            self._uniform[n] = got
            sink = (1.0 - total / w.sum()).clamp(min=0).numpy()
            self._sink[n] = np.where(sink > 1e-4, sink, 0.0)  # below that: rounding, not a learned sink
        return got

    def weighted_mass(self, n: int) -> Tensor:
        """``[L, H, QB, QB]`` mass of the first ``n // B`` query blocks, scaled so that the
        objective's kept share is ``(weighted_mass * keep).sum((-1, -2))``: every measured query
        alike, or (``focus_last``) blended with the queries that end the prompts."""
        got = self._weighted.get(n)
        if got is None:
            got = self._uniform_mass(n)
            if self.focus_last:
                qbn = n // self.block_size
                w = self.row_weight[:qbn].clone()
                w[: min(max(0, (n - self.focus_last) // self.block_size), qbn - 1)] = 0  # blocks of the last T tokens
                if float(w.sum()) == 0:
                    raise PolicyError(_ERR_FOCUS_END.format(t=self.focus_last, n=n, lengths=self.profiled_lengths,
                                                            longest=max(self.profiled_lengths)))
                a = float(self.focus_weight)
                got = (1.0 - a) * got + a * self._rows_mass(qbn, w)[0]
            self._weighted[n] = got
        return got

    def sink_share(self, n: int) -> np.ndarray:
        """``[L, H]`` mean softmax mass of a learned attention sink at length ``n`` (0 without one)."""
        self._uniform_mass(n)
        return self._sink[n]

    def layer_cost(self, n: int) -> np.ndarray:
        """``[L]`` each layer's dense cost at length ``n`` relative to a full causal layer's
        (``< 1`` on a layer with its own sliding window)."""
        b = self.block_size
        full = windowed_causal_tiles(n, b)
        return np.array([windowed_causal_tiles(n, b, int(w)) / full for w in self.layer_windows])

    def _windowed_density(self, density: np.ndarray, n: int, kept: Callable[[int], float]) -> np.ndarray:
        """``density [L, H]`` with each window layer's row replaced by ``kept(W) / windowed tiles``."""
        for w in sorted({int(x) for x in self.layer_windows if x}):
            rows = self.layer_windows == w
            density[rows] = min(1.0, kept(w) / max(1, windowed_causal_tiles(n, self.block_size, w)))
        return density

    def _sorted_rows(self, n: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per row, masses in block_topk order (diagonal, first block, then by mass), their
        cumulative sums and the row totals over every measured query — what a row's own gamma
        selection sees, whatever the objective weights — and the objective's cumulative sums in
        the same order (`weighted_mass`): for top-k and gamma selection."""
        got = self._sorted.get(n)
        if got is None:
            from .kinds import _forced_block_order

            wm = self._uniform_mass(n)
            order, _ = _forced_block_order(wm)
            s = torch.gather(wm, -1, order).to(torch.float64)
            objective = torch.gather(self.weighted_mass(n), -1, order).to(torch.float64).cumsum(-1)
            got = (s, s.cumsum(-1), wm.to(torch.float64).sum(-1), objective)
            self._sorted[n] = got
        return got

    def _coverage(self, pattern: Pattern, n_rows: int) -> Tensor:
        """`tile_coverage`, memoised by the pattern's name (names carry the resolved sizes)."""
        key = (pattern.name, n_rows)
        got = self._coverages.get(key)
        if got is None:
            got = tile_coverage(pattern, n_rows, self.block_size).to(torch.float32)
            self._coverages[key] = got
        return got

    # -- evaluation -------------------------------------------------------------------------
    def evaluate(self, candidate: Candidate) -> CandidateEval:
        """Expected recall, density and KV share ``[L, H]`` of ``candidate`` on every head."""
        key = candidate.key()
        got = self._cache.get(key)
        if got is not None:
            return got
        with single_thread():
            return self._evaluate(candidate, key)

    def _evaluate(self, candidate: Candidate, key: str) -> CandidateEval:
        kind = candidate.spec
        params = candidate.param_dict
        recalls, dens, kvs = [], [], []
        density_is = "exact"
        for n in self.eval_lengths:
            qbn = n // self.block_size
            kv = np.full((self.n_layers, self.n_heads), kind.kv_tokens(params, n, self.block_size) / n)
            windowed = self.layer_windows > 0
            kv[windowed] = np.minimum(kv[windowed], (self.layer_windows[windowed] / n)[:, None])
            kvs.append(kv)
            if kind.static:
                r, d = self._static(candidate, kind, params, n, qbn)
            elif isinstance(kind, VerticalSlash):
                r, d = self._vertical_slash(kind, params, n, qbn)
                density_is = "upper_bound"
            elif isinstance(kind, BlockTopK):
                r, d, exact = self._block_topk(kind, params, n, qbn)
                density_is = "exact" if exact else "expected"
            elif isinstance(kind, XAttention):  # on the profile: the blocks reaching tau of each row's mass
                r, d, _ = self._block_topk(get_kind("block_topk"), {"gamma": params["tau"]}, n, qbn)
                density_is = "expected"
            else:  # pragma: no cover - every kind is handled above
                raise PolicyError(f"no estimator for kind {candidate.kind}")
            sink = self.sink_share(n)
            recalls.append(sink + (1.0 - sink) * r)
            dens.append(d)
        out = CandidateEval(
            candidate,
            np.clip(np.mean(recalls, axis=0), 0.0, 1.0),
            np.mean(dens, axis=0),
            np.mean(kvs, axis=0),
            density_is,
        )
        self._cache[key] = out
        return out

    def _static(self, candidate: Candidate, kind, params, n: int, qbn: int) -> tuple[np.ndarray, np.ndarray]:
        b = self.block_size
        full = (self.n_layers, self.n_heads)
        if candidate.kind == "dense":
            return np.ones(full), np.ones(full)
        pattern = kind.pattern(params, n, b)
        density = self._windowed_density(
            np.full(full, count_tiles(pattern, n, b) / causal_tiles(n, b)), n,
            lambda w: count_tiles(and_masks(pattern, generate_window(w)), n, b),
        )
        cov = self._coverage(pattern, qbn)
        wm = self.weighted_mass(n)
        recall = torch.einsum("lhqk,qk->lh", wm, cov).to(torch.float64).numpy()
        if candidate.kind == "streaming":
            s, w = kind.stream(params, n)
            # measured over every query: it corrects the uniform term of a focused objective only
            share = 1.0 - (float(self.focus_weight) if self.focus_last else 0.0)
            recall = recall + share * self._stream_correction(s, w, n, qbn)
        return recall, density

    def _stream_correction(self, s: int, w: int, n: int, qbn: int) -> np.ndarray:
        """Measured-minus-block-estimated mass for the sink and the window (see module docstring),
        over every measured query."""
        b = self.block_size
        wm = self._uniform_mass(n)
        out = np.zeros((self.n_layers, self.n_heads))

        def block_est(p: Pattern) -> np.ndarray:
            return torch.einsum("lhqk,qk->lh", wm, self._coverage(p, qbn)).to(torch.float64).numpy()

        sink_pts = {int(k.split("_")[-1]): v for k, v in self._stats.items() if k.startswith("sink_mass_")}
        local_pts = {int(k.split("_")[-1]): v for k, v in self._stats.items() if k.startswith("local_mass_")}
        if s > 0 and sink_pts:
            known = {x: sink_pts[x] - block_est(generate_sink(x)) for x in sink_pts if x <= n}
            if known:
                anchors = {x: known[x] for x in known}
                if b not in anchors and max(anchors) < b:
                    anchors[b] = np.zeros_like(out)  # whole blocks are measured exactly
                delta = self._interp(anchors, s)
                # Early queries see the sink inside their window, where no correction applies;
                # split the correction over rows like the first block's mass (early rows weigh more).
                first = wm[:, :, :, 0].to(torch.float64)
                late = torch.as_tensor(np.arange(qbn) * b >= s + w)
                frac = (first * late).sum(-1) / first.sum(-1).clamp(min=1e-30)
                out += delta * frac.numpy()
        if local_pts:
            known = {x: local_pts[x] - block_est(generate_window(x)) for x in local_pts if x <= n}
            if known:
                anchors = dict(known)
                anchors[n] = np.zeros_like(out)  # a window of the whole sequence is exact
                out += self._interp(anchors, w)
        return out

    @staticmethod
    def _interp(anchors: dict[int, np.ndarray], x: int) -> np.ndarray:
        xs = sorted(anchors)
        if x in anchors:
            return anchors[x]
        if x <= xs[0]:
            return anchors[xs[0]] * 0 if x <= 0 else anchors[xs[0]]
        if x >= xs[-1]:
            return anchors[xs[-1]]
        for a, c in zip(xs[:-1], xs[1:], strict=False):
            if a < x < c:
                t = (math.log2(x) - math.log2(a)) / (math.log2(c) - math.log2(a))
                return anchors[a] + t * (anchors[c] - anchors[a])
        return anchors[xs[-1]]

    def _vertical_slash(self, kind: VerticalSlash, params, n: int, qbn: int) -> tuple[np.ndarray, np.ndarray]:
        from .kinds import scores_from_mass

        b = self.block_size
        nv, ns = kind.block_counts(params, n, b)
        wm = self.weighted_mass(n)
        lh = wm.reshape(-1, qbn, qbn)
        scores = scores_from_mass(lh, torch.ones(qbn), n, b)
        cols, diags = select_vertical_slash(scores, nv, ns)
        qb = torch.arange(qbn)[:, None]
        kb = torch.arange(qbn)[None, :]
        d = (qb - kb).clamp(min=0)
        keep = (cols[:, None, :] | diags[:, d]) & (kb <= qb)
        recall = (lh * keep).sum((-1, -2)).to(torch.float64).reshape(self.n_layers, self.n_heads).numpy()
        bound = kind.block_bound(params, n, b)
        density = self._windowed_density(np.full((self.n_layers, self.n_heads), bound / causal_tiles(n, b)), n, lambda w: bound)
        return recall, density

    def _block_topk(self, kind: BlockTopK, params, n: int, qbn: int) -> tuple[np.ndarray, np.ndarray, bool]:
        b = self.block_size
        s, cum, total, objective = self._sorted_rows(n)
        n_causal = torch.arange(1, qbn + 1)
        k = kind.topk_blocks(params, n, b)
        if k is not None:
            keep = torch.clamp(n_causal, max=k)
            recall = torch.gather(objective, -1, (keep - 1).expand(cum.shape[:-1])[..., None]).squeeze(-1).sum(-1)
            bound = kind.block_bound(params, n, b)
            density = np.full((self.n_layers, self.n_heads), bound / causal_tiles(n, b))
            return recall.numpy(), self._windowed_density(density, n, lambda w: bound), not self.layer_windows.any()
        gamma = float(params["gamma"])
        before = cum - s
        needed = (before < gamma * total[..., None] - 1e-12).sum(-1)
        keep = torch.minimum(torch.maximum(needed, torch.clamp(n_causal, max=2)), n_causal)
        recall = torch.gather(objective, -1, (keep - 1)[..., None]).squeeze(-1).sum(-1)
        # rows beyond the evaluated ones (a partial last block) keep the same share
        density = (keep.sum(-1).to(torch.float64) / causal_tiles(qbn * b, b)).numpy()
        for w in sorted({int(x) for x in self.layer_windows if x}):
            rows = self.layer_windows == w
            wt = max(1, windowed_causal_tiles(qbn * b, b, w))
            density[rows] = np.minimum(1.0, keep.sum(-1).to(torch.float64).numpy()[rows] / wt)
        return recall.numpy(), density, False


# -- candidate grids ------------------------------------------------------------------------
_STEPS = (1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def default_candidates(
    n_ref: int,
    block_size: int,
    *,
    kinds: Sequence[str] = KINDS,
    min_sink: int = 4,
    elastic: str = "fixed",
) -> list[Candidate]:
    """The candidate grid for heads profiled at ``n_ref`` tokens.

    - ``dense``;
    - ``streaming``: sink ``max(min_sink, 4)`` and ``B`` tokens x windows of 1/4, 1/2, 1, 1.5,
      2, 3, 4, 6, ... blocks below ``n_ref``;
    - ``a_shape``: one sink block (more if ``min_sink`` needs) x windows of 1, 2, 3, 4, 6, ... blocks;
    - ``vertical_slash``: 1, 2, 4, ... 32 blocks of columns x the same of diagonals;
    - ``block_topk``: 2, 3, 4, 6, 8, ... blocks per row, and gamma 0.8, 0.9, 0.95, 0.98;
    - ``xattention`` (only when asked for): tau 0.8, 0.9, 0.95, 0.98 at stride 8.

    ``elastic``: ``"fixed"`` sizes (``alpha`` tokens), ``"proportional"`` (``beta * N`` equal
    at ``n_ref``), or ``"both"``.
    """
    b = check_block_size(block_size)
    if elastic not in ("fixed", "proportional", "both"):
        raise PolicyError(f"elastic must be 'fixed', 'proportional' or 'both', got {elastic!r}")
    nb = -(-n_ref // b)
    out: list[Candidate] = []

    def sizes(tokens: int) -> list[dict[str, float]]:
        forms = []
        if elastic in ("fixed", "both"):
            forms.append({"alpha": tokens, "beta": 0.0})
        if elastic in ("proportional", "both"):
            forms.append({"alpha": 0, "beta": tokens / n_ref})
        return forms

    for k in kinds:
        get_kind(k)
    if "dense" in kinds:
        out.append(Candidate.make("dense"))
    windows_blocks = [s for s in _STEPS if s * b < n_ref]
    if "streaming" in kinds:
        sinks = sorted({max(min_sink, 4), max(min_sink, b)})
        windows = sorted({int(b * s) for s in (0.25, 0.5, *windows_blocks) if int(b * s) >= 1 and b * s < n_ref})
        for s in sinks:
            for w in windows:
                for wf in sizes(w):
                    out.append(Candidate.make("streaming", sink=s, window=wf))
    if "a_shape" in kinds:
        sink_tokens = b * max(1, -(-min_sink // b))
        for wb in (int(x) for x in windows_blocks if float(x).is_integer()):
            for wf in sizes(wb * b):
                out.append(Candidate.make("a_shape", sink=sink_tokens, window=wf))
    if "vertical_slash" in kinds:
        grid = [x for x in (1, 2, 4, 8, 16, 32) if x < nb]
        for v in grid:
            for s in grid:
                if v + s < nb:
                    for vf, sf in zip(sizes(v * b), sizes(s * b), strict=False):
                        out.append(Candidate.make("vertical_slash", vertical=vf, slash=sf))
    if "block_topk" in kinds:
        for k in (int(x) for x in _STEPS if x >= 2 and float(x).is_integer() and x < nb):
            for kf in sizes(k * b):
                out.append(Candidate.make("block_topk", topk=kf))
        for g in (0.8, 0.9, 0.95, 0.98):
            out.append(Candidate.make("block_topk", gamma=g))
    if "xattention" in kinds:  # a per-head tau, XAttention's published stride
        for tau in XATTENTION_TAUS:
            out.append(Candidate.make("xattention", tau=tau, stride=XAttention.defaults["stride"]))
    seen: dict[str, Candidate] = {}
    for c in out:
        seen.setdefault(c.key(), c)
    return list(seen.values())


@dataclass
class HeadCurves:
    """Every candidate evaluated on every head: the cost-recall curves the optimiser reads.

    ``recall``, ``density``, ``kv``: ``[L, H, C]`` float64; ``density_is``: per candidate.
    """

    estimator: ProfileEstimator
    candidates: list[Candidate]
    recall: np.ndarray
    density: np.ndarray
    kv: np.ndarray
    density_is: list[str]
    retrieval_scores: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> dict[str, Any]:
        return self.estimator.model

    def extend(self, candidates: Sequence[Candidate]) -> HeadCurves:
        """These curves plus ``candidates`` (already present ones are skipped)."""
        have = {c.key() for c in self.candidates}
        new = [c for c in candidates if c.key() not in have and not have.add(c.key())]
        if not new:
            return self
        evals = [self.estimator.evaluate(c) for c in new]
        return HeadCurves(
            self.estimator,
            self.candidates + new,
            np.concatenate([self.recall, np.stack([e.recall for e in evals], -1)], -1),
            np.concatenate([self.density, np.stack([e.density for e in evals], -1)], -1),
            np.concatenate([self.kv, np.stack([e.kv for e in evals], -1)], -1),
            self.density_is + [e.density_is for e in evals],
            self.retrieval_scores,
            dict(self.extra),
        )

    def to_frame(self) -> pd.DataFrame:
        """Long table: one row per (layer, head, candidate) with recall, density, kv share."""
        nl, nh, nc = self.recall.shape
        lay, head, cand = np.meshgrid(np.arange(nl), np.arange(nh), np.arange(nc), indexing="ij")
        group = nh // self.estimator.n_kv_heads
        return pd.DataFrame(
            {
                "layer": lay.reshape(-1),
                "head": head.reshape(-1),
                "kv_head": head.reshape(-1) // group,
                "kind": [self.candidates[i].kind for i in cand.reshape(-1)],
                "candidate": [self.candidates[i].describe() for i in cand.reshape(-1)],
                "expected_recall": self.recall.reshape(-1),
                "expected_density": self.density.reshape(-1),
                "kv_share": self.kv.reshape(-1),
                "density_is": [self.density_is[i] for i in cand.reshape(-1)],
            }
        )


def retrieval_scores_from_run(run: Run) -> np.ndarray | None:
    """Max retrieval score per head ``[L, H]`` from the run's detections (`DETECTIONS`); None
    when the run has no detections file yet, or no retrieval rows in it. A detections file
    that is there but unreadable or lacks columns raises `attnlab.errors.RunError`: silently
    dropping it would drop the retrieval heads' protection."""
    det = run.read_optional(DETECTIONS)
    if det is None or det.empty:
        return None
    det = det[det["head_type"].astype(str) == "retrieval"]
    if det.empty:
        return None
    identity = run.identity
    nl, nh = identity.n_layers, identity.n_heads
    out = np.zeros((nl, nh))
    g = det.groupby(["layer", "head"])["score"].max().reset_index()
    ok = (g["layer"] >= 0) & (g["layer"] < nl) & (g["head"] >= 0) & (g["head"] < nh)
    g = g[ok]
    out[g["layer"].to_numpy(int), g["head"].to_numpy(int)] = g["score"].to_numpy(float)
    return out


def compute_curves(
    run: Run | str | os.PathLike | ProfileEstimator,
    candidates: Sequence[Candidate] | None = None,
    *,
    block_size: int | None = None,
    eval_lengths: Sequence[int] | None = None,
    kinds: Sequence[str] = KINDS,
    min_sink: int = 4,
    elastic: str = "auto",
    progress: bool = False,
    focus_last: int | None = None,
    focus_weight: float = 0.5,
) -> HeadCurves:
    """Evaluate ``candidates`` (default: `default_candidates`) on every head of ``run``.

    ``focus_last``/``focus_weight``: which queries the recall weights (`ProfileEstimator`).

    ``elastic="auto"`` offers proportional sizes next to fixed ones only when the run was
    evaluated at more than one length (a single length cannot tell them apart).
    """
    retrieval = None
    if isinstance(run, ProfileEstimator):
        est = run
    else:
        run = Run.coerce(run)
        est = ProfileEstimator.from_run(run, block_size=block_size, eval_lengths=eval_lengths,
                                        focus_last=focus_last, focus_weight=focus_weight)
        retrieval = retrieval_scores_from_run(run)
    if candidates is None:
        mode = elastic if elastic != "auto" else ("both" if len(set(est.eval_lengths)) > 1 else "fixed")
        candidates = default_candidates(max(est.eval_lengths), est.block_size, kinds=kinds, min_sink=min_sink, elastic=mode)
    cands = list({c.key(): c for c in candidates}.values())
    it = cands
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(cands, desc="cost-recall curves", unit="candidate", disable=None)
    evals = [est.evaluate(c) for c in it]
    return HeadCurves(
        est,
        cands,
        np.stack([e.recall for e in evals], -1),
        np.stack([e.density for e in evals], -1),
        np.stack([e.kv for e in evals], -1),
        [e.density_is for e in evals],
        retrieval,
    )
