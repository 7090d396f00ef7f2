"""The budgeted policy generator: one candidate per head, most expected recall for the budget.

`PolicyGenerator` reads a profiled run, evaluates every candidate pattern on every head
(`attnlab.sparsity_stats.curves`), and solves a multiple-choice knapsack
(`attnlab.sparsity_stats.knapsack`): pick one candidate per head (or per GQA group) to maximise
the total expected recall, weighted by ``head_weights`` if given, subject to

- a global **density** budget: mean over heads of the share of causal blocks computed
  <= ``budget`` (so ``0.15`` = 15% of dense causal attention), or a **KV** budget: mean over KV
  heads of the share of the KV cache kept <= ``budget`` (streaming heads keep sink + window);
- **protected heads**: retrieval heads (the run's detections score >= ``retrieval_threshold``,
  the Retrieval Head paper's 0.1), any ``protected_heads`` and every head of the
  ``protected_layers`` stay dense, or keep at least
  ``retrieval_floor`` of their attention; ``recall_floor`` does the same for every head;
- **minimum sink**: streaming and A-shape heads keep at least ``min_sink`` first tokens;
- **GQA consistency** (optional; implied by a KV budget): the query heads that read one KV head
  share one candidate, which is what lets a streaming KV head drop its cache.

Weighted recall is the right objective when a head's weight is its output sensitivity:
``sum_h w_h (1 - recall_h)`` bounds the first-order attention-output error, so maximising
``sum_h w_h recall_h`` minimises that bound.

Usage (scikit-learn shape)::

    gen = PolicyGenerator(budget=0.15).fit("runs/r1")
    policy = gen.emit()            # attnlab.sparsity_stats.Policy
    policy.save("budget-0.15.json")
    gen.optimality_gap_            # 0.0 when proven optimal
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from attnlab.names import head_label
from attnlab.runs import BLOCK_MAPS, Run

from .curves import HeadCurves, ProfileEstimator, compute_curves, retrieval_scores_from_run
from .errors import ERR_BUDGET, ERR_BUDGET_KIND, ERR_INFEASIBLE, PolicyError
from .kinds import CANDIDATE_KINDS, KINDS, AShape, Candidate, Streaming, get_kind
from .knapsack import InfeasibleError, MCKPSolution, solve_mckp
from .policy import DecodeHead, HeadPolicy, Policy

BUDGET_KINDS = ("density", "kv")
#: When `PolicyGenerator.emit` writes a decode section: ``auto`` under a KV budget (what the
#: budget promises is the decode cache), ``always``, or ``never``.
DECODE_MODES = ("auto", "always", "never")
PROTECT = ("dense", "floor", "none")


#: Fewest blocks per sequence that leave a sparse choice: with a sink block and the diagonal
#: always kept, two blocks hold every causal tile; three leave one (5 of 6 tiles).
MIN_POLICY_BLOCKS = 3


def _map_block_size(run: Run) -> int | None:
    """The block size of the run's block maps, as its manifest records it (None if it does not)."""
    config = (run.manifest.get("parameters") or {}).get("stat_config") or {}
    b = config.get("block_size") if isinstance(config, dict) else None
    return b if isinstance(b, int) and not isinstance(b, bool) and b > 0 else None


def workable_block_sizes(lengths: Sequence[int], map_block_size: int | None = None) -> list[int]:
    """Powers of two (multiples of the run's map block size, at least 16 when unknown) that cut
    every length in ``lengths`` into at least `MIN_POLICY_BLOCKS` blocks."""
    b = map_block_size or 16
    out = []
    while b * (MIN_POLICY_BLOCKS - 1) < min(lengths):
        out.append(b)
        b *= 2
    return out


def too_coarse_message(block_size: int, n: int, lengths: Sequence[int], map_block_size: int | None = None) -> str:
    """Why a policy at ``block_size`` cannot be sparse at length ``n``, and which block sizes can."""
    nb = -(-n // block_size)
    ok = workable_block_sizes(lengths, map_block_size)
    sizes = f"use --block-size {' or '.join(map(str, ok))}" if ok else "no block size the run's maps allow is small enough"
    return (
        f"block size {block_size} is too coarse for length {n}: it makes {nb} block(s) per sequence and a policy needs "
        f"at least {MIN_POLICY_BLOCKS} to leave any tile out (the first block and the diagonal are always kept); "
        f"{sizes}, or evaluate at --lengths >= {MIN_POLICY_BLOCKS * block_size - block_size + 1} if the run profiled them"
    )


def _number(x: Any) -> bool:
    """A real, finite number (not a bool)."""
    try:
        return not isinstance(x, (bool, str)) and math.isfinite(float(x))
    except (TypeError, ValueError, OverflowError):
        return False


def _whole(x: Any) -> bool:
    """A finite whole number (not a bool)."""
    return _number(x) and float(x) == int(x)


def check_block_granularity(estimator: ProfileEstimator, run: Run | None = None) -> None:
    """`PolicyError` when the estimator's block size is longer than an evaluation length (not
    one query block to measure or choose from), naming the block sizes that work (from the
    run's map block size when ``run`` is given). Call it before evaluating candidates."""
    map_block = _map_block_size(run) if run is not None else None
    for n in estimator.eval_lengths:
        if n < estimator.block_size:
            raise PolicyError(too_coarse_message(estimator.block_size, n, estimator.eval_lengths, map_block))


def check_budget(budget: float) -> float:
    """``budget`` as a float in (0, 1], else `PolicyError`."""
    try:
        b = float(budget)
    except (TypeError, ValueError, OverflowError):
        raise PolicyError(ERR_BUDGET.format(got=budget)) from None
    if isinstance(budget, bool) or not (0 < b <= 1):  # NaN fails this too
        raise PolicyError(ERR_BUDGET.format(got=budget))
    return b


class PolicyGenerator:
    """Fit per-head cost-recall curves from a run and emit the best policy within a budget.

    Args:
        budget: share of dense causal attention (``budget_kind="density"``) or of the KV cache
            (``"kv"``) the policy may use, in (0, 1].
        budget_kind: ``"density"`` or ``"kv"``.
        block_size: tile size of the policy (default: the run's block maps).
        eval_lengths: lengths (tokens) at which recall and density are averaged (default: the
            longest profiled length).
        focus_last: weight the queries of the last ``focus_last`` tokens of each evaluation
            length (where a prompt's question and answer start sit) by ``focus_weight`` in the
            objective, every query by the rest (`ProfileEstimator`; default: every query alike).
        focus_weight: the focused queries' share of the objective, in (0, 1] (default 0.5).
        kinds: policy kinds to choose from.
        candidates: an explicit candidate grid (default: `default_candidates`).
        extra_candidates: candidates added to the grid (e.g. the baselines' choices).
        min_sink: minimum sink tokens of streaming and A-shape heads.
        elastic: ``"auto"``, ``"fixed"``, ``"proportional"`` or ``"both"`` sizes.
        protect_retrieval: ``"dense"`` (retrieval heads stay dense), ``"floor"`` (keep at least
            ``retrieval_floor``), or ``"none"``.
        retrieval_threshold: retrieval score from which a head is protected.
        retrieval_floor: recall floor of protected heads when ``protect_retrieval="floor"``.
        recall_floor: recall floor of every head (None: none).
        protected_heads: extra ``(layer, head)`` pairs to protect (e.g. circuit heads).
        protected_layers: layers whose every head is protected (e.g. the layers
            ``attnlab policy sensitivity`` finds the answer depends on).
        gqa_consistent: heads sharing a KV head share a candidate.
        head_weights: ``[L, H]`` weights of the objective (default 1).
        max_nodes: branch-and-bound node limit (the gap is reported if reached).
        progress: show progress bars.

    Attributes (after `fit`):
        curves_: the `HeadCurves` evaluated.
        allowed_: bool ``[L, H, C]``: candidates each head may take under the constraints.
        protected_: list of ``(layer, head, why)``.
        choice_: int ``[L, H]``: index into ``curves_.candidates``.
        expected_recall_, expected_density_, expected_kv_: ``[L, H]`` of the chosen candidates.
        solution_: the `MCKPSolution`; optimality_gap_ (objective units; 0 if proven optimal),
        upper_bound_, exchange_rate_ (recall per unit budget at the margin).
    """

    def __init__(
        self,
        budget: float = 0.15,
        *,
        budget_kind: str = "density",
        block_size: int | None = None,
        eval_lengths: Sequence[int] | None = None,
        focus_last: int | None = None,
        focus_weight: float = 0.5,
        kinds: Sequence[str] = KINDS,
        candidates: Sequence[Candidate] | None = None,
        extra_candidates: Sequence[Candidate] = (),
        min_sink: int = 4,
        elastic: str = "auto",
        protect_retrieval: str = "dense",
        retrieval_threshold: float = 0.1,
        retrieval_floor: float = 0.95,
        recall_floor: float | None = None,
        protected_heads: Iterable[tuple[int, int]] = (),
        protected_layers: Iterable[int] = (),
        gqa_consistent: bool = False,
        head_weights: np.ndarray | None = None,
        max_nodes: int = 2_000_000,
        progress: bool = False,
        decode: str = "auto",
    ):
        self.budget = budget
        self.budget_kind = budget_kind
        self.block_size = block_size
        self.eval_lengths = eval_lengths
        self.focus_last = focus_last
        self.focus_weight = focus_weight
        self.kinds = tuple(kinds)
        self.candidates = candidates
        self.extra_candidates = tuple(extra_candidates)
        self.min_sink = min_sink
        self.elastic = elastic
        self.protect_retrieval = protect_retrieval
        self.retrieval_threshold = retrieval_threshold
        self.retrieval_floor = retrieval_floor
        self.recall_floor = recall_floor
        self.protected_heads = tuple(tuple(x) for x in protected_heads)
        self.protected_layers = tuple(protected_layers)
        self.gqa_consistent = gqa_consistent
        self.head_weights = head_weights
        self.max_nodes = max_nodes
        self.progress = progress
        self.decode = decode

    # -- settings -------------------------------------------------------------------------
    def get_params(self) -> dict[str, Any]:
        """Settings as JSON-friendly values (recorded in the policy file)."""
        return {
            "budget": self.budget,
            "budget_kind": self.budget_kind,
            "block_size": self.block_size,
            "eval_lengths": list(self.eval_lengths) if self.eval_lengths else None,
            "focus_last": self.focus_last,
            "focus_weight": self.focus_weight if self.focus_last else None,
            "kinds": list(self.kinds),
            "min_sink": self.min_sink,
            "elastic": self.elastic,
            "protect_retrieval": self.protect_retrieval,
            "retrieval_threshold": self.retrieval_threshold,
            "retrieval_floor": self.retrieval_floor,
            "recall_floor": self.recall_floor,
            "protected_heads": [list(x) for x in self.protected_heads],
            "protected_layers": [int(x) if _whole(x) else x for x in self.protected_layers],
            "gqa_consistent": self.gqa_consistent,
            "weighted": self.head_weights is not None,
            "max_nodes": self.max_nodes,
            "decode": self.decode,
        }

    def _check(self) -> None:
        self.budget_ = check_budget(self.budget)
        if self.budget_kind not in BUDGET_KINDS:
            raise PolicyError(ERR_BUDGET_KIND.format(got=self.budget_kind))
        if self.protect_retrieval not in PROTECT:
            raise PolicyError(f"protect_retrieval {self.protect_retrieval!r} is unknown: use dense, floor or none")
        if not _whole(self.min_sink) or self.min_sink < 0:
            raise PolicyError(f"min_sink must be a whole number of tokens >= 0, got {self.min_sink!r} (--min-sink)")
        for name, option in (("recall_floor", "--recall-floor"), ("retrieval_floor", "--retrieval-floor"),
                             ("retrieval_threshold", "--retrieval-threshold")):
            v = getattr(self, name)
            if v is not None and not (_number(v) and 0 <= float(v) <= 1):
                raise PolicyError(f"{name} must be a number in [0, 1], got {v!r} ({option})")
        if self.decode not in DECODE_MODES:
            raise PolicyError(f"decode {self.decode!r} is unknown: use {', '.join(DECODE_MODES)}")
        if not _whole(self.max_nodes) or self.max_nodes < 1:
            raise PolicyError(f"max_nodes must be a positive whole number, got {self.max_nodes!r}")
        for k in self.kinds:
            if k not in CANDIDATE_KINDS:
                raise PolicyError(f"unknown kind {k!r} in kinds: use some of {', '.join(CANDIDATE_KINDS)}")

    # -- fit ------------------------------------------------------------------------------
    def fit(self, data: Run | str | os.PathLike | HeadCurves) -> PolicyGenerator:
        """Evaluate the candidates on every head of a run (or take precomputed `HeadCurves`)
        and solve the budgeted choice. Returns ``self``.

        Steps: the cost-recall curves (`_curves`), what each head may take (`_constraints`),
        the groups that choose together (`_groups`), then the knapsack (`_solve`)."""
        self._check()
        curves = self._curves(data)
        self.curves_ = curves
        self.allowed_, self.protected_ = self._constraints(curves)
        self._solve(curves, self._groups(curves))
        return self

    def _curves(self, data: Run | str | os.PathLike | HeadCurves) -> HeadCurves:
        """The curves to choose from: computed from the run, or given; always with dense and
        ``extra_candidates``."""
        if isinstance(data, HeadCurves):
            curves = data
            made = curves.estimator.objective()
            if self.focus_last and made != {"focus_last": self.focus_last, "focus_weight": float(self.focus_weight)}:
                raise PolicyError(f"the curves weight queries by {made}, not focus_last={self.focus_last}, "
                                  f"focus_weight={self.focus_weight}: compute them with those settings "
                                  "(compute_curves(..., focus_last=, focus_weight=))")
            if self.candidates is not None:
                curves = curves.extend(self.candidates)
        else:
            run = Run.coerce(data)
            est = ProfileEstimator.from_run(run, block_size=self.block_size, eval_lengths=self.eval_lengths,
                                            focus_last=self.focus_last, focus_weight=self.focus_weight)
            self.map_block_size_ = _map_block_size(run)
            check_block_granularity(est, run)
            curves = compute_curves(
                est, self.candidates, kinds=self.kinds, min_sink=int(self.min_sink), elastic=self.elastic, progress=self.progress,
            )
            curves = dataclasses.replace(curves, retrieval_scores=retrieval_scores_from_run(run))
            bad = ~(np.isfinite(curves.recall) & np.isfinite(curves.density) & np.isfinite(curves.kv)).all(-1)
            if bad.any():
                lay, head = (int(x) for x in np.argwhere(bad)[0])
                raise PolicyError(
                    f"{run.file(BLOCK_MAPS)} gives head {head_label(lay, head)} a non-finite attention mass (NaN or inf; "
                    f"{int(bad.sum())} head(s) in all): the profile is damaged; re-create it with `{run.command_for(BLOCK_MAPS)}`"
                )
        return curves.extend([Candidate.make("dense"), *self.extra_candidates])

    def _infeasible_message(self, needed: float, values, costs, units: int, curves, est) -> str:
        """Why ``budget`` can't be met, and the smallest budget (4 decimals) that can: checked by
        solving again, so the hint is never itself refused."""
        suggest = math.ceil(needed * 1e4 - 1e-9) / 1e4
        for _ in range(50):
            try:
                solve_mckp(values, costs, suggest * units, max_nodes=self.max_nodes, cost_unit=self._cost_unit(est))
                break
            except InfeasibleError:
                suggest = round(suggest + 1e-4, 4)
        kind = "mean density" if self.budget_kind == "density" else "mean KV share"
        cost = curves.density if self.budget_kind == "density" else curves.kv
        floor = float(np.mean(np.min(cost, axis=-1)))  # every head's cheapest candidate, no constraints
        n = min(est.eval_lengths)
        why = (f"at block size {est.block_size} and {n} tokens the cheapest pattern of every head already costs "
               f"{floor:.4f} (the first block and the diagonal of each row are always kept)")
        if needed > floor + 5e-5:
            why += (f", and the constraints (protected heads, --min-sink, recall floors) add {needed - floor:.4f}")
        smaller = [b for b in (16, 32, 64) if b < est.block_size]
        fix = f"use --budget {suggest:.4f} or more"
        if smaller:
            fix += f", or profile and build with a finer --block-size ({smaller[-1]}) to go lower"
        return ERR_INFEASIBLE.format(budget=self.budget_, needed=needed, kind=kind, why=why, fix=fix)

    def _too_coarse(self, block_size: int, n: int, lengths: Sequence[int]) -> str:
        """The message for a block size that leaves no sparse choice at length ``n``."""
        return too_coarse_message(block_size, n, lengths, getattr(self, "map_block_size_", None))

    def _constraints(self, curves: HeadCurves) -> tuple[np.ndarray, list[tuple[int, int, str]]]:
        """``allowed [L, H, C]`` (kinds, explicit grid, minimum sink, protected heads, recall
        floors; dense is always allowed) and the protected heads ``(layer, head, why)``."""
        est = curves.estimator
        nl, nh, nc = curves.recall.shape
        allowed = np.ones((nl, nh, nc), dtype=bool)
        keys = [c.key() for c in curves.candidates]
        restrict = None if self.candidates is None else {c.key() for c in self.candidates}
        extra = {c.key() for c in self.extra_candidates}
        dense_idx = keys.index(Candidate.make("dense").key())
        for i, c in enumerate(curves.candidates):
            ok = c.kind in self.kinds or c.key() in extra or i == dense_idx
            if restrict is not None and c.key() not in restrict and c.key() not in extra and i != dense_idx:
                ok = False
            if ok:
                ok = self._meets_min_sink(c, est.eval_lengths, est.block_size)
            allowed[:, :, i] = ok
        allowed[:, :, dense_idx] = True
        protected = self._protected(curves.retrieval_scores, nl, nh)
        for lay, head, _why in protected:
            if self.protect_retrieval == "floor":
                allowed[lay, head] &= curves.recall[lay, head] >= float(self.retrieval_floor) - 1e-12
            else:
                allowed[lay, head] = False
            allowed[lay, head, dense_idx] = True
        if self.recall_floor is not None:
            allowed &= curves.recall >= float(self.recall_floor) - 1e-12
            allowed[:, :, dense_idx] = True
        return allowed, protected

    def _protected(self, scores: np.ndarray | None, nl: int, nh: int) -> list[tuple[int, int, str]]:
        """Retrieval heads (score >= ``retrieval_threshold``) and ``protected_heads``, with why."""
        protected: list[tuple[int, int, str]] = []
        if scores is not None and self.protect_retrieval != "none":
            for lay, head in zip(*np.nonzero(scores >= self.retrieval_threshold), strict=False):
                protected.append((int(lay), int(head), f"retrieval head (score {scores[lay, head]:.2f} >= {self.retrieval_threshold:g})"))
        seen = {(lay, head) for lay, head, _ in protected}
        for lay, head in self.protected_heads:
            if not (0 <= lay < nl and 0 <= head < nh):
                raise PolicyError(f"protected head {head_label(lay, head)} is outside the model's {nl} layers x {nh} heads")
            if (lay, head) not in seen:
                seen.add((lay, head))
                protected.append((int(lay), int(head), "protected by request"))
        for lay in self.protected_layers:
            if not (_whole(lay) and 0 <= lay < nl):
                raise PolicyError(f"protected layer {lay!r} is outside the model's layers 0-{nl - 1} (--protect-layers)")
            for head in range(nh):
                if (lay, head) not in seen:
                    seen.add((lay, head))
                    protected.append((int(lay), head, f"protected layer {lay}"))
        return protected

    def _groups(self, curves: HeadCurves) -> list[list[tuple[int, int]]]:
        """The heads that choose one candidate together: a KV head's query heads (GQA
        consistency, implied by a KV budget), else each head alone."""
        nl, nh = curves.recall.shape[:2]
        n_kv = curves.estimator.n_kv_heads
        group_size = nh // n_kv
        if self.gqa_consistent or self.budget_kind == "kv":
            return [[(lay, kv * group_size + j) for j in range(group_size)] for lay in range(nl) for kv in range(n_kv)]
        return [[(lay, head)] for lay in range(nl) for head in range(nh)]

    def _solve(self, curves: HeadCurves, groups: list[list[tuple[int, int]]]) -> None:
        """The multiple-choice knapsack over ``groups``; sets ``choice_``, the expected
        recall/density/KV of the choice, and the solver's gap, bound and exchange rate."""
        est = curves.estimator
        nl, nh = curves.recall.shape[:2]
        weights = np.ones((nl, nh)) if self.head_weights is None else np.asarray(self.head_weights, dtype=float)
        if weights.shape != (nl, nh) or not np.isfinite(weights).all() or (weights < 0).any():
            raise PolicyError(f"head_weights must be a finite, non-negative [{nl}, {nh}] array")
        values, costs, options = [], [], []
        for members in groups:
            ok = np.logical_and.reduce([self.allowed_[lay, head] for lay, head in members])
            idx = np.nonzero(ok)[0]
            v = sum(weights[lay, head] * curves.recall[lay, head, idx] for lay, head in members)
            if self.budget_kind == "density":
                c = sum(curves.density[lay, head, idx] for lay, head in members)
            else:
                lay, head = members[0]
                c = curves.kv[lay, head, idx]
            values.append(np.asarray(v, dtype=float))
            costs.append(np.asarray(c, dtype=float))
            options.append(idx)
        units = nl * nh if self.budget_kind == "density" else nl * est.n_kv_heads
        try:
            sol = solve_mckp(values, costs, self.budget_ * units, max_nodes=self.max_nodes, cost_unit=self._cost_unit(est))
        except InfeasibleError as exc:
            if self.budget_kind == "density" and exc.needed / units >= 1 - 1e-9 and np.all(curves.density >= 1 - 1e-9):
                # no candidate of any head computes fewer blocks than dense: the tiles are too
                # big for the length, and no budget below 1 (nor any other option) can help
                n = min(est.eval_lengths)
                raise PolicyError(self._too_coarse(est.block_size, n, est.eval_lengths)) from None
            raise PolicyError(self._infeasible_message(exc.needed / units, values, costs, units, curves, est)) from None
        choice = np.zeros((nl, nh), dtype=np.int64)
        for g, members in enumerate(groups):
            for lay, head in members:
                choice[lay, head] = options[g][sol.choice[g]]
        self.groups_ = groups
        self.group_options_ = options
        self.group_values_ = values
        self.group_costs_ = costs
        self.solution_: MCKPSolution = sol
        self.choice_ = choice
        li, hi = np.meshgrid(np.arange(nl), np.arange(nh), indexing="ij")
        self.expected_recall_ = curves.recall[li, hi, choice]
        self.expected_density_ = curves.density[li, hi, choice]
        self.expected_kv_ = curves.kv[li, hi, choice]
        self.optimality_gap_ = float(sol.gap)
        self.upper_bound_ = float(sol.upper_bound)
        self.exchange_rate_ = float(sol.exchange_rate)
        self.units_ = units

    def _cost_unit(self, est) -> float | None:
        """The unit every cost is a whole multiple of, when there is one (one evaluation length):
        a block over the causal blocks (density), a token over the length (KV)."""
        if len(est.eval_lengths) != 1:
            return None
        n = est.eval_lengths[0]
        if self.budget_kind == "kv":
            return 1.0 / n
        nb = -(-n // est.block_size)
        return 1.0 / (nb * (nb + 1) // 2)

    def _meets_min_sink(self, c: Candidate, lengths: Sequence[int], block_size: int) -> bool:
        if self.min_sink <= 0:
            return True
        kind = c.spec
        p = c.param_dict
        for n in lengths:
            if isinstance(kind, Streaming):
                sink = kind.stream(p, n)[0]
            elif isinstance(kind, AShape):
                sink = kind.block_counts(p, n, block_size)[0] * block_size
            elif c.kind == "dense":
                sink = n
            else:  # dynamic kinds always keep the first block
                sink = block_size
            if sink < min(self.min_sink, n):
                return False
        return True

    # -- emit -----------------------------------------------------------------------------
    def _reason(self, g: int, lay: int, head: int, chosen: int) -> str:
        curves = self.curves_
        cand = curves.candidates[chosen]
        r, d = curves.recall[lay, head, chosen], curves.density[lay, head, chosen]
        kvs = curves.kv[lay, head, chosen]
        parts = [f"{cand.describe()} keeps {r:.3f} of the attention at density {d:.3f} (KV {kvs:.2f})"]
        why = [w for (pl, ph, w) in self.protected_ if (pl, ph) == (lay, head)]
        if why:
            parts.append(f"{why[0]}: " + ("kept dense" if self.protect_retrieval != "floor" else f"recall held >= {self.retrieval_floor:g}"))
        members = self.groups_[g]
        if len(members) > 1:
            parts.append(f"shares its KV head's policy with heads {[h for _, h in members if h != head]}")
        v, c, opts = self.group_values_[g], self.group_costs_[g], self.group_options_[g]
        pos = int(np.nonzero(opts == chosen)[0][0])
        better = np.nonzero((v > v[pos] + 1e-12) & (c > c[pos]))[0]
        unit = "density" if self.budget_kind == "density" else "KV share"
        if better.size:
            # the cheapest candidate that would gain recall: what this head gave up
            j = better[np.argmin(c[better])]
            nxt = curves.candidates[opts[j]]
            rate = (v[j] - v[pos]) / (c[j] - c[pos])
            why = (f"less than the {self.exchange_rate_:.3g} per unit at which the budget is spent" if rate < self.exchange_rate_
                   else "but the budget has no room left for it")
            parts.append(
                f"next option {nxt.describe()} would add {v[j] - v[pos]:.3f} recall for {c[j] - c[pos]:.3f} {unit} "
                f"({rate:.3g} per unit, {why})"
            )
        else:
            parts.append("no allowed candidate keeps more")
        return "; ".join(parts)

    def emit(self) -> Policy:
        """The fitted policy: one `HeadPolicy` per head with expected recall, density and reason."""
        if not hasattr(self, "choice_"):
            raise PolicyError("the generator is not fitted: call fit(run) before emit()")
        curves = self.curves_
        est = curves.estimator
        nl, nh = self.choice_.shape
        group_size = nh // est.n_kv_heads
        group_of = {m: g for g, members in enumerate(self.groups_) for m in members}
        heads = []
        for lay in range(nl):
            for head in range(nh):
                i = int(self.choice_[lay, head])
                cand = curves.candidates[i]
                heads.append(
                    HeadPolicy(
                        lay, head, head // group_size, cand.kind, cand.param_dict,
                        float(curves.recall[lay, head, i]), float(min(1.0, curves.density[lay, head, i])),
                        self._reason(group_of[(lay, head)], lay, head, i), curves.density_is[i],
                        {"expected_kv": round(float(curves.kv[lay, head, i]), 6)},
                    )
                )
        achieved = float(self.expected_density_.mean()) if self.budget_kind == "density" else float(self.expected_kv_.mean())
        summary = {
            "objective": "weighted expected recall" if self.head_weights is not None else "expected recall",
            "expected_recall": float(self.expected_recall_.mean()),
            "expected_density": float(self.expected_density_.mean()),
            "expected_kv": float(self.expected_kv_.mean()),
            "min_head_recall": float(self.expected_recall_.min()),
            "dense_heads": int(sum(1 for h in heads if h.kind == "dense")),
            "kinds": {k: int(sum(1 for h in heads if h.kind == k))
                      for k in (*KINDS, *(k for k in CANDIDATE_KINDS if k not in KINDS and k in self.kinds))},
            "optimal": bool(self.solution_.optimal),
            "optimality_gap": self.optimality_gap_,
            "optimality_gap_per_head": self.optimality_gap_ / (nl * nh),
            "upper_bound": self.upper_bound_,
            "exchange_rate": self.exchange_rate_,
            "solver_nodes": int(self.solution_.nodes),
            "n_candidates": len(curves.candidates),
            "protected_heads": [[lay, head, why] for lay, head, why in self.protected_],
        }
        policy = Policy(
            model=dict(est.model),
            block_size=est.block_size,
            heads=heads,
            source_run=dict(est.source) or None,
            budget={"kind": self.budget_kind, "value": self.budget_, "expected": achieved},
            profiled_lengths=list(est.profiled_lengths),
            eval_lengths=list(est.eval_lengths),
            summary=summary,
            generator={**self.get_params(), **est.objective()},  # what the curves weighted
        )
        if self.decode == "always" or (self.decode == "auto" and self.budget_kind == "kv"):
            policy = policy.with_decode(decode_from_prefill(policy))
            n = max(est.eval_lengths)
            summary["decode_kv_predicted"] = policy.predicted_kv_fraction(n)
            summary["decode_kinds"] = {k: sum(1 for e in policy.decode_heads() if e.kind == k) for k in ("full", "streaming", "snapkv")}
        return policy

    def __repr__(self) -> str:
        return f"PolicyGenerator(budget={self.budget}, budget_kind={self.budget_kind!r})"


def policy_from_choices(curves: HeadCurves, choices: Mapping[tuple[int, int], Candidate] | np.ndarray,
                        *, reason: str, budget: dict[str, Any] | None = None) -> Policy:
    """A `Policy` from an explicit candidate per head (used for baselines), with estimates."""
    est = curves.estimator
    nl, nh = curves.recall.shape[:2]
    group_size = nh // est.n_kv_heads
    keys = {c.key(): i for i, c in enumerate(curves.candidates)}
    heads = []
    for lay in range(nl):
        for head in range(nh):
            c = choices[lay][head] if isinstance(choices, np.ndarray) else choices[(lay, head)]
            i = keys[c.key()]
            heads.append(HeadPolicy(lay, head, head // group_size, c.kind, c.param_dict, float(curves.recall[lay, head, i]),
                                    float(min(1.0, curves.density[lay, head, i])), reason, curves.density_is[i],
                                    {"expected_kv": round(float(curves.kv[lay, head, i]), 6)}))
    # the estimates' objective (which queries their recall weights), as a budgeted policy records it
    return Policy(dict(est.model), est.block_size, heads, dict(est.source) or None, budget,
                  list(est.profiled_lengths), list(est.eval_lengths), generator=est.objective())


def decode_from_prefill(policy: Policy, n: int | None = None) -> list[DecodeHead]:
    """The decode section a prefill policy implies, per KV head: when every query head of the
    group is streaming (or A-shape), a streaming cache of the group's largest sink and window
    (resolved at ``n`` tokens, default the policy's longest evaluation length; A-shape blocks as
    tokens); otherwise (a dense, retrieval-protected or dynamic head needs every key) the full
    cache. This is what DuoAttention applies in decode."""
    lengths = policy.eval_lengths or policy.profiled_lengths
    n = int(n or (max(lengths) if lengths else policy.model.get("n_ctx") or 4096))
    group = policy.n_heads // policy.n_kv_heads
    out = []
    for lay in range(policy.n_layers):
        for kv in range(policy.n_kv_heads):
            members = [policy.entry(lay, kv * group + j) for j in range(group)]
            sinks, windows = [], []
            for e in members:
                spec = get_kind(e.kind)
                if isinstance(spec, Streaming):
                    s, w = spec.stream(e.params, n)
                elif isinstance(spec, AShape):
                    sb, wb = spec.block_counts(e.params, n, policy.block_size)
                    s, w = sb * policy.block_size, wb * policy.block_size
                else:
                    break
                sinks.append(s)
                windows.append(w)
            else:
                s, w = max(sinks), max(1, max(windows))
                kinds = sorted({e.kind for e in members})
                out.append(DecodeHead.make(lay, kv, "streaming", sink=s, recent=w,
                                           reason=f"its query heads are {'/'.join(kinds)}: the cache keeps sink {s} + recent {w} (at {n} tokens)"))
                continue
            why = next(e for e in members if not isinstance(get_kind(e.kind), (Streaming, AShape)))
            out.append(DecodeHead.make(lay, kv, "full", reason=f"query head {why.head} is {why.kind}: it needs every key"))
    return out
