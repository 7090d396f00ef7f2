"""An exact multiple-choice knapsack solver (no commercial solver needed).

The policy optimiser picks exactly one candidate per group (a head, or a GQA group of heads) to
maximise total value (expected recall) with total cost (density or KV share) within a capacity.
That is the multiple-choice knapsack problem (MCKP). The solver:

1. drops dominated candidates (costlier and no better) and takes each group's upper convex hull;
2. solves the LP relaxation greedily by decreasing value-per-cost along the hulls, which gives an
   upper bound, the exchange rate ``lambda`` (value per unit cost at the margin) and an integer
   solution (the hull points before the fractional step), improved by a greedy fill;
3. removes every candidate whose Lagrangian bound (``sum_g max_j(v - lambda c) + lambda W``
   minus its own reduced-value loss) cannot beat the incumbent, fixing groups left with one;
4. solves the remaining groups exactly: by dynamic programming over capacity when costs are
   whole multiples of a unit (``cost_unit``; densities are block counts over the causal blocks)
   and the table is small enough, else by a depth-first branch-and-bound whose nodes are bounded
   by the LP relaxation of the groups still free (precomputed per depth, O(log n) per node).

When the search finishes the solution is optimal (``gap == 0`` up to ``tol``); if it stops at
``max_nodes`` the returned ``gap = upper_bound - value`` is a proven bound on the loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import PolicyError


class InfeasibleError(PolicyError):
    """Even the cheapest choice of every group exceeds the capacity."""

    def __init__(self, message: str, needed: float):
        super().__init__(message)
        self.needed = needed


@dataclass
class MCKPSolution:
    """Result of `solve_mckp`: ``choice[g]`` indexes group ``g``'s candidates."""

    choice: np.ndarray
    value: float
    cost: float
    upper_bound: float
    gap: float
    optimal: bool
    nodes: int
    exchange_rate: float


def _pareto(v: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Indices of non-dominated candidates, by increasing cost (and strictly increasing value)."""
    order = np.lexsort((-v, c))
    vs = v[order]
    prev_best = np.maximum.accumulate(np.concatenate([[-np.inf], vs[:-1]]))
    return order[vs > prev_best]


def _hull(c: np.ndarray, v: np.ndarray) -> list[int]:
    """Upper concave hull (positions into the Pareto arrays ``c``, ``v``) from the cheapest point."""
    h: list[int] = [0]
    for i in range(1, len(c)):
        while len(h) >= 2:
            a, b = h[-2], h[-1]
            if (v[b] - v[a]) * (c[i] - c[b]) <= (v[i] - v[b]) * (c[b] - c[a]):
                h.pop()
            else:
                break
        h.append(i)
    return h


class _SuffixLP:
    """LP bound of the groups ``order[d:]`` for any remaining capacity, for every depth ``d``."""

    def __init__(self, groups: list[tuple[np.ndarray, np.ndarray]], max_cells: int = 8_000_000):
        n = len(groups)
        self.base_v = np.zeros(n + 1)
        self.base_c = np.zeros(n + 1)
        slopes, dcs, dvs, gpos = [], [], [], []
        for d, (c, v) in enumerate(groups):
            self.base_v[d] = v[0]
            self.base_c[d] = c[0]
            h = _hull(c, v)
            for a, b in zip(h[:-1], h[1:], strict=False):
                dcs.append(c[b] - c[a])
                dvs.append(v[b] - v[a])
                slopes.append((v[b] - v[a]) / (c[b] - c[a]) if c[b] > c[a] else np.inf)
                gpos.append(d)
        # suffix sums of the cheapest choices
        self.base_v = np.concatenate([np.cumsum(self.base_v[:n][::-1])[::-1], [0.0]])
        self.base_c = np.concatenate([np.cumsum(self.base_c[:n][::-1])[::-1], [0.0]])
        order = np.argsort(-np.asarray(slopes, dtype=float), kind="stable")
        self.slope = np.asarray(slopes, dtype=float)[order]
        self.dc = np.asarray(dcs, dtype=float)[order]
        self.dv = np.asarray(dvs, dtype=float)[order]
        self.gpos = np.asarray(gpos, dtype=np.int64)[order]
        self.n = n
        self.cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.precompute = (n + 1) * max(1, len(self.slope)) <= max_cells

    def _arrays(self, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        got = self.cache.get(d)
        if got is None:
            m = self.gpos >= d
            got = (np.cumsum(self.dc[m]), np.cumsum(self.dv[m]), self.slope[m])
            if self.precompute:
                self.cache[d] = got
        return got

    def bound(self, d: int, capacity: float) -> float:
        """Max LP value of groups d.. within ``capacity`` (-inf if their cheapest choices do not fit)."""
        cap = capacity - self.base_c[d]
        if cap < 0:
            return -math.inf
        cumc, cumv, slope = self._arrays(d)
        k = int(np.searchsorted(cumc, cap, side="right"))
        val = cumv[k - 1] if k > 0 else 0.0
        if k < len(cumc):
            val += (cap - (cumc[k - 1] if k > 0 else 0.0)) * slope[k]
        return float(self.base_v[d] + val)


def _integer_dp(groups: list[tuple[np.ndarray, np.ndarray]], capacity: float, unit: float | None,
                max_cells: int) -> list[int] | None:
    """Exact DP over capacity for groups whose costs are whole multiples of ``unit``.

    Returns the chosen position in each group, or None when costs are not integral in ``unit``
    or the table (groups x capacity units) would exceed ``max_cells``.
    """
    if not unit or unit <= 0 or not groups:
        return None
    width = int(math.floor(capacity / unit + 1e-9))
    if width < 0 or len(groups) * (width + 1) > max_cells:
        return None
    ints = []
    for c, _ in groups:
        r = c / unit
        ri = np.rint(r)
        if np.abs(r - ri).max() > 1e-6 * max(1.0, float(np.abs(ri).max())):
            return None
        ints.append(ri.astype(np.int64))
    best = np.zeros(width + 1)  # best value with total cost <= w over the groups so far
    picks = np.zeros((len(groups), width + 1), dtype=np.int32)
    for gi, ((_, v), ci) in enumerate(zip(groups, ints, strict=True)):
        new = np.full(width + 1, -np.inf)
        for j, (cj, vj) in enumerate(zip(ci.tolist(), v.tolist(), strict=True)):
            if cj > width:
                continue
            cand = np.full(width + 1, -np.inf)
            cand[cj:] = best[: width + 1 - cj] + vj
            better = cand > new
            new[better] = cand[better]
            picks[gi, better] = j
        best = new
    if not np.isfinite(best[width]):
        return None
    out = [0] * len(groups)
    w = width
    for gi in range(len(groups) - 1, -1, -1):
        j = int(picks[gi, w])
        out[gi] = j
        w -= int(ints[gi][j])
    return out


class _Incumbent:
    """The best integer solution found so far: a position per group into the Pareto lists."""

    def __init__(self, pv: list[np.ndarray], pc: list[np.ndarray], pos: list[int]):
        self.pv, self.pc = pv, pc
        self.pos = list(pos)
        self.value, self.cost = self.total(self.pos)

    def total(self, p: list[int]) -> tuple[float, float]:
        """``(value, cost)`` of positions ``p``, summed exactly (`math.fsum`)."""
        return (math.fsum(float(self.pv[g][i]) for g, i in enumerate(p)),
                math.fsum(float(self.pc[g][i]) for g, i in enumerate(p)))


def _check_inputs(values: Sequence[Sequence[float]], costs: Sequence[Sequence[float]]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    vs = [np.asarray(v, dtype=np.float64).reshape(-1) for v in values]
    cs = [np.asarray(c, dtype=np.float64).reshape(-1) for c in costs]
    if len(vs) != len(cs) or any(len(v) != len(c) or len(v) == 0 for v, c in zip(vs, cs, strict=False)):
        raise ValueError("values and costs must list the same non-empty candidate sets per group")
    if any(not (np.isfinite(v).all() and np.isfinite(c).all()) for v, c in zip(vs, cs, strict=False)):
        raise ValueError("values and costs must be finite")
    return vs, cs


def _lp_relaxation(pv: list[np.ndarray], pc: list[np.ndarray], capacity: float, cheapest: float) -> tuple[list[int], float, float]:
    """Step 2: the LP relaxation, greedily along the hull increments by decreasing slope.

    Returns the hull positions taken before the fractional step (an integer solution), the LP
    upper bound, and the exchange rate ``lambda`` (the slope of the fractional step, 0 if none)."""
    n_groups = len(pv)
    incs = []
    for g in range(n_groups):
        h = _hull(pc[g], pv[g])
        for a, b in zip(h[:-1], h[1:], strict=False):
            dc, dv = pc[g][b] - pc[g][a], pv[g][b] - pv[g][a]
            incs.append(((dv / dc) if dc > 0 else math.inf, g, b, dc, dv))
    incs.sort(key=lambda t: -t[0])
    pos = [0] * n_groups  # position in Pareto list (on the hull)
    room = capacity - cheapest
    upper = math.fsum(float(v[0]) for v in pv)
    lam = 0.0
    for slope, g, b, dc, dv in incs:
        if dc <= room:
            room -= dc
            upper += dv
            pos[g] = b
        else:
            upper += room / dc * dv if dc > 0 else 0.0
            lam = slope
            break
    return pos, upper, lam


def _greedy_fill(best: _Incumbent, capacity: float) -> None:
    """Step 2, continued: spend the room left by the LP's integer solution, one best gain at a time."""
    pv, pc = best.pv, best.pc
    lp_pos = list(best.pos)
    while True:
        room = capacity - best.cost
        move = None
        for g in range(len(pv)):
            cur_v, cur_c = pv[g][best.pos[g]], pc[g][best.pos[g]]
            ok = (pc[g] - cur_c <= room) & (pv[g] > cur_v)
            if ok.any():
                j = int(np.argmax(np.where(ok, pv[g] - cur_v, -np.inf)))
                gain = pv[g][j] - cur_v
                if move is None or gain > move[0]:
                    move = (gain, g, j)
        if move is None:
            break
        best.pos[move[1]] = move[2]
        v2, c2 = best.total(best.pos)
        if c2 > capacity:  # rounding: undo and stop
            best.pos[move[1]] = lp_pos[move[1]]
            break
        best.value, best.cost = v2, c2


def _survivors(red: list[np.ndarray], lag_upper: float, incumbent: float, atol: float) -> list[np.ndarray] | None:
    """Step 3: per group, the candidates whose Lagrangian bound can still beat the incumbent;
    None when some group has none left (then the incumbent is optimal)."""
    survivors = []
    for r in red:
        delta = r.max() - r
        survivors.append(np.nonzero(lag_upper - delta > incumbent + atol)[0])
    return survivors if all(len(s) for s in survivors) else None


def _search_survivors(best: _Incumbent, survivors: list[np.ndarray], red: list[np.ndarray], capacity: float, *,
                      cost_unit: float | None, max_dp_cells: int, max_nodes: int, atol: float) -> tuple[bool, int]:
    """Step 4: solve the groups left with more than one survivor exactly (dynamic programme over
    integer costs, else branch and bound). Updates ``best``; returns ``(finished, nodes)``."""
    pv, pc = best.pv, best.pc
    n_groups = len(pv)
    fixed = [g for g in range(n_groups) if len(survivors[g]) == 1]
    free = [g for g in range(n_groups) if len(survivors[g]) > 1]
    fixed_v = math.fsum(float(pv[g][survivors[g][0]]) for g in fixed)
    fixed_c = math.fsum(float(pc[g][survivors[g][0]]) for g in fixed)
    cap_free = capacity - fixed_c
    free.sort(key=lambda g: -len(survivors[g]))
    groups = [(pc[g][survivors[g]], pv[g][survivors[g]]) for g in free]

    def with_free(free_pos: Sequence[int]) -> list[int]:
        cand = list(best.pos)
        for g in fixed:
            cand[g] = int(survivors[g][0])
        for gi, g in enumerate(free):
            cand[g] = int(free_pos[gi])
        return cand

    dp_choice = _integer_dp(groups, cap_free, cost_unit, max_dp_cells)
    if dp_choice is not None:  # exact dynamic programme over integer costs
        cand = with_free([survivors[g][dp_choice[gi]] for gi, g in enumerate(free)])
        v_tot, c_tot = best.total(cand)
        if c_tot <= capacity * (1 + 1e-12) + 1e-12 and v_tot > best.value:
            best.value, best.cost, best.pos = v_tot, c_tot, cand
        return True, 0
    lp = _SuffixLP(groups)
    if free and lp.bound(0, cap_free) <= best.value - fixed_v + atol:
        return True, 0  # the free groups' LP bound cannot beat the incumbent
    # children of each depth: survivors by increasing reduced-value loss
    children = []
    for g in free:
        s = survivors[g]
        loss = red[g].max() - red[g][s]
        order = s[np.argsort(loss, kind="stable")]
        children.append([(int(i), float(pv[g][i]), float(pc[g][i])) for i in order])
    return _branch_and_bound(best, children, lp, with_free, capacity, cap_free, fixed_v, max_nodes=max_nodes, atol=atol)


def _branch_and_bound(best: _Incumbent, children: list[list[tuple[int, float, float]]], lp: _SuffixLP, with_free,
                      capacity: float, cap_free: float, fixed_v: float, *, max_nodes: int, atol: float) -> tuple[bool, int]:
    """Depth-first search over the free groups (``children[d]``: group ``d``'s survivors, best
    first), each node bounded by the LP relaxation of the groups below it. Returns
    ``(finished, nodes)``; ``finished`` is False when ``max_nodes`` stopped it."""
    depth_n = len(children)
    path = [0] * depth_n
    val = [0.0] * (depth_n + 1)
    cst = [0.0] * (depth_n + 1)
    nxt = [0] * (depth_n + 1)
    d = 0
    nodes = 0
    target = best.value - fixed_v  # value the free groups must beat
    while d >= 0 and nodes < max_nodes:
        if d == depth_n:
            cand = with_free(path)
            v_tot, c_tot = best.total(cand)
            if c_tot <= capacity and v_tot > best.value + atol:
                best.value, best.cost, best.pos = v_tot, c_tot, cand
                target = best.value - fixed_v
            d -= 1
            continue
        kids = children[d]
        i = nxt[d]
        advanced = False
        while i < len(kids):
            idx, v, c = kids[i]
            i += 1
            nodes += 1
            nc = cst[d] + c
            rem = cap_free - nc
            if rem < 0:
                continue
            bound = val[d] + v + lp.bound(d + 1, rem)
            if bound <= target + atol:
                continue
            path[d] = idx
            val[d + 1] = val[d] + v
            cst[d + 1] = nc
            nxt[d] = i
            d += 1
            nxt[d] = 0
            advanced = True
            break
        if not advanced:
            nxt[d] = 0
            d -= 1
    return d < 0, nodes


def solve_mckp(
    values: Sequence[Sequence[float]],
    costs: Sequence[Sequence[float]],
    capacity: float,
    *,
    max_nodes: int = 2_000_000,
    tol: float = 1e-9,
    cost_unit: float | None = None,
    max_dp_cells: int = 30_000_000,
) -> MCKPSolution:
    """Maximise ``sum_g values[g][choice[g]]`` s.t. ``sum_g costs[g][choice[g]] <= capacity``.

    ``values[g]`` and ``costs[g]`` are group ``g``'s candidates (any number >= 1, costs >= 0).
    Optimal within ``tol`` (relative) unless ``max_nodes`` branch-and-bound nodes are not enough;
    the result states the gap either way. Raises `InfeasibleError` when even the cheapest
    choices exceed ``capacity``. When every cost is a whole multiple of ``cost_unit`` (densities
    are kept blocks over causal blocks) the groups left after the reduction are solved by an
    exact dynamic programme over capacity, if its table fits ``max_dp_cells``; otherwise by the
    branch and bound. The steps are those of the module docstring.
    """
    vs, cs = _check_inputs(values, costs)
    n_groups = len(vs)
    cheapest = math.fsum(float(c.min()) for c in cs)
    if cheapest > capacity:
        raise InfeasibleError(f"the cheapest choices cost {cheapest:.6g} > capacity {capacity:.6g}", cheapest)

    # 1. dominated candidates out
    pareto = [_pareto(v, c) for v, c in zip(vs, cs, strict=False)]
    pv = [vs[g][p] for g, p in enumerate(pareto)]
    pc = [cs[g][p] for g, p in enumerate(pareto)]

    # 2. LP relaxation (bound, exchange rate, integer start) and a greedy fill
    pos, upper, lam = _lp_relaxation(pv, pc, capacity, cheapest)
    best = _Incumbent(pv, pc, pos)
    _greedy_fill(best, capacity)

    # 3. Lagrangian bound and reduction; 4. exact search over what survives
    red = [pv[g] - lam * pc[g] for g in range(n_groups)]
    lag_upper = math.fsum(float(r.max()) for r in red) + lam * capacity
    upper = min(upper, lag_upper) if lam > 0 else upper
    atol = tol * max(1.0, abs(upper))
    nodes = 0
    if upper - best.value > atol:
        survivors = _survivors(red, lag_upper, best.value, atol)
        if survivors is None:
            upper = best.value  # some group cannot take part in a better solution: incumbent is optimal
        else:
            finished, nodes = _search_survivors(best, survivors, red, capacity, cost_unit=cost_unit,
                                                max_dp_cells=max_dp_cells, max_nodes=max_nodes, atol=atol)
            if finished:
                upper = best.value
    gap = max(0.0, upper - best.value)
    optimal = gap <= atol
    choice = np.array([int(pareto[g][best.pos[g]]) for g in range(n_groups)], dtype=np.int64)
    value = math.fsum(float(vs[g][choice[g]]) for g in range(n_groups))
    cost = math.fsum(float(cs[g][choice[g]]) for g in range(n_groups))
    return MCKPSolution(choice, value, cost, max(upper, value), 0.0 if optimal else gap, optimal, nodes, float(lam))
