"""`attnlab.stats` against hand-computed values and an independent brute force (no model).

Every statistic of the module docstring is re-derived here from the formulas, in float64
numpy loops over the same float32 probabilities the accumulator sees, and compared with
`HeadStatAccumulator.finalize` on constructed attention patterns: uniform causal, a pure sink
head, a previous-token head and random causal softmax patterns.
"""

from __future__ import annotations

import math
import random
from fractions import Fraction

import numpy as np
import pytest
import torch

from attnlab.stats import HeadStatAccumulator, StatConfig

RTOL = 1e-6
ATOL = 1e-7


# --------------------------------------------------------------------------- patterns


def uniform_causal(h: int, n: int) -> torch.Tensor:
    """A[i, j] = 1 / (i + 1) for j <= i."""
    a = torch.tril(torch.ones(n, n, dtype=torch.float64))
    a = a / a.sum(-1, keepdim=True)
    return a.to(torch.float32).expand(h, n, n).contiguous()


def sink_head(h: int, n: int) -> torch.Tensor:
    """All mass on token 0."""
    a = torch.zeros(h, n, n)
    a[:, :, 0] = 1.0
    return a


def previous_token_head(h: int, n: int) -> torch.Tensor:
    """A[i, i - 1] = 1, A[0, 0] = 1."""
    a = torch.zeros(h, n, n)
    a[:, 0, 0] = 1.0
    idx = torch.arange(1, n)
    a[:, idx, idx - 1] = 1.0
    return a


def random_causal(h: int, n: int, seed: int) -> torch.Tensor:
    """Causal softmax of random logits; heads range from flat to peaky, one sinks, one is local."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((h, n, n))
    scales = np.linspace(0.3, 4.0, h)
    logits *= scales[:, None, None]
    logits[0, :, 0] += 5.0  # a sink-ish head
    if h > 1:
        i = np.arange(n)
        for d in range(3):  # a local-ish head
            logits[1, i[d:], i[d:] - d] += 3.0
    logits[:, np.triu_indices(n, 1)[0], np.triu_indices(n, 1)[1]] = -np.inf
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(-1, keepdims=True)
    return torch.from_numpy(p).to(torch.float32)


# --------------------------------------------------------------------------- brute force


def _keys_needed(row: np.ndarray, c: float) -> float:
    """Fractional keys of the docstring: k + (c - S_k) / p_(k+1), S_k < c <= S_(k+1)."""
    s = 0.0
    for k, p in enumerate(sorted(row.tolist(), reverse=True)):
        if s + p >= c:
            return k + (c - s) / p
        s += p
    raise AssertionError("row mass never reaches c")


def brute_force(probs: torch.Tensor, cfg: StatConfig) -> dict[str, np.ndarray]:
    """All statistics and block maps straight from the formulas (float64 loops)."""
    a = probs.to(torch.float64).numpy()
    h, n, _ = a.shape
    start, end = cfg.measured_range(n)
    rows = range(start, end)
    m = end - start
    col = np.zeros((h, n))
    diag = np.zeros((h, n))
    for i in rows:
        for j in range(i + 1):
            col[:, j] += a[:, i, j]
            diag[:, i - j] += a[:, i, j]
    values: dict[str, np.ndarray] = {}
    for s in cfg.sink_tokens:
        values[f"sink_mass_{s}"] = col[:, :s].sum(-1) / m
    for w in cfg.windows:
        values[f"local_mass_{w}"] = diag[:, :w].sum(-1) / m
    ent = np.zeros(h)
    ent_rows = [i for i in rows if i >= 1]
    for i in ent_rows:
        p = a[:, i, : i + 1]
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(p > 0, p * np.log(p), 0.0)
        ent += -terms.sum(-1) / math.log(i + 1)
    values["entropy_norm"] = ent / max(len(ent_rows), 1)
    cov_rows = cfg.coverage_positions(n).tolist()
    for c in cfg.coverages:
        acc = np.zeros(h)
        for i in cov_rows:
            for hh in range(h):
                acc[hh] += min(_keys_needed(a[hh, i, : i + 1], c), i + 1) / (i + 1)
        values[f"keys_frac_{round(c * 100)}"] = acc / len(cov_rows)
    for k in cfg.budgets:
        values[f"vertical_mass_{k}"] = np.sort(col, -1)[:, ::-1][:, :k].sum(-1) / m
    for k in cfg.budgets:
        values[f"slash_mass_{k}"] = np.sort(diag, -1)[:, ::-1][:, :k].sum(-1) / m

    bs = cfg.block_size
    nb = math.ceil(n / bs)
    bsum = np.zeros((h, nb, nb))
    bmax = np.zeros((h, nb, nb))
    brows = np.zeros(nb, dtype=np.int64)
    for qb in range(nb):
        q_rows = [i for i in rows if qb * bs <= i < (qb + 1) * bs]
        brows[qb] = len(q_rows)
        if not q_rows:
            continue
        for kb in range(nb):
            tile = a[:, q_rows, kb * bs : (kb + 1) * bs]
            bsum[:, qb, kb] = tile.sum((1, 2)) / len(q_rows)
            bmax[:, qb, kb] = tile.max((1, 2))
    return {
        "values": np.stack([values[name] for name in cfg.names], -1),
        "block_sum": bsum,
        "block_max": bmax,
        "block_rows": brows,
    }


# --------------------------------------------------------------------------- helpers


def run(probs: torch.Tensor, cfg: StatConfig, chunks: list[tuple[int, int]] | None = None):
    h, n, _ = probs.shape
    acc = HeadStatAccumulator(h, n, cfg)
    for a, b in cfg.chunks(n) if chunks is None else chunks:
        acc.update(probs[:, a:b, :], a)
    return acc.finalize()


def stat(out, cfg: StatConfig, name: str) -> torch.Tensor:
    return out.values[:, cfg.names.index(name)].to(torch.float64)


def assert_stat(out, cfg: StatConfig, name: str, expected) -> None:
    got = stat(out, cfg, name).numpy()
    expected = np.broadcast_to(np.asarray(expected, dtype=np.float64), got.shape)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL, err_msg=name)


def assert_matches_brute(out, probs: torch.Tensor, cfg: StatConfig) -> None:
    ref = brute_force(probs, cfg)
    assert out.values.shape == (probs.shape[0], len(cfg.names))
    for idx, name in enumerate(cfg.names):
        np.testing.assert_allclose(out.values[:, idx].numpy(), ref["values"][:, idx], rtol=RTOL, atol=ATOL, err_msg=name)
    np.testing.assert_allclose(out.block_sum.numpy(), ref["block_sum"], rtol=RTOL, atol=ATOL, err_msg="block_sum")
    # block_max is a max of float32 inputs: exact
    np.testing.assert_array_equal(out.block_max.numpy(), ref["block_max"].astype(np.float32), err_msg="block_max")
    np.testing.assert_array_equal(out.block_rows.numpy(), ref["block_rows"], err_msg="block_rows")


def mean_over_rows(rows, f) -> float:
    rows = list(rows)
    return float(sum(Fraction(f(i)) for i in rows) / len(rows))


# --------------------------------------------------------------------------- uniform causal


UNIFORM_CFG = StatConfig(
    sink_tokens=(1, 4, 16, 500),
    windows=(1, 2, 16, 64, 1000),
    coverages=(0.5, 0.9, 0.95),
    budgets=(1, 4, 16, 1000),
    block_size=16,
    query_chunk=32,
)


@pytest.mark.parametrize("last_queries", [None, 37])
def test_uniform_causal_by_hand(last_queries):
    n = 100
    cfg = StatConfig(**{**UNIFORM_CFG.to_dict(), "last_queries": last_queries})
    out = run(uniform_causal(2, n), cfg)
    start, end = cfg.measured_range(n)
    assert (start, end) == ((0, n) if last_queries is None else (n - last_queries, n))
    rows = range(start, end)
    for s in cfg.sink_tokens:
        expected = mean_over_rows(rows, lambda i, s=s: Fraction(min(s, i + 1), i + 1))
        assert_stat(out, cfg, f"sink_mass_{s}", expected)
    for w in cfg.windows:
        expected = mean_over_rows(rows, lambda i, w=w: Fraction(min(w, i + 1), i + 1))
        assert_stat(out, cfg, f"local_mass_{w}", expected)
    for k in cfg.budgets:
        # col[j] and diag[d] are both Σ_{i >= j} 1/(i+1) over measured rows: decreasing, so the
        # top-k columns / diagonals are the first k, i.e. the sink / local masses of width k
        expected = mean_over_rows(rows, lambda i, k=k: Fraction(min(k, i + 1), i + 1))
        assert_stat(out, cfg, f"vertical_mass_{k}", expected)
        assert_stat(out, cfg, f"slash_mass_{k}", expected)
    assert_stat(out, cfg, "entropy_norm", 1.0)
    for c in cfg.coverages:
        assert_stat(out, cfg, f"keys_frac_{round(c * 100)}", c)  # fractional definition: exactly c
    assert_stat(out, cfg, "sink_mass_500", 1.0)
    assert_stat(out, cfg, "local_mass_1000", 1.0)
    assert_matches_brute(out, uniform_causal(2, n), cfg)


def test_uniform_causal_known_numbers():
    """A few statistics spelled out as plain numbers for n = 4 (H_4 = 25/12)."""
    cfg = StatConfig(sink_tokens=(1, 2), windows=(1, 2), coverages=(0.5,), budgets=(1,), block_size=2)
    out = run(uniform_causal(1, 4), cfg)
    # sink_mass_1 = (1 + 1/2 + 1/3 + 1/4) / 4 = 25/48; sink_mass_2 = (1 + 1 + 2/3 + 2/4) / 4 = 19/24
    assert_stat(out, cfg, "sink_mass_1", 25 / 48)
    assert_stat(out, cfg, "sink_mass_2", 19 / 24)
    assert_stat(out, cfg, "local_mass_1", 25 / 48)
    assert_stat(out, cfg, "local_mass_2", 19 / 24)
    # keys_0.5 on row i is (i + 1) / 2: 0.5, 1, 1.5, 2 keys -> fraction 0.5 each
    assert_stat(out, cfg, "keys_frac_50", 0.5)
    # block maps, blocks of 2: rows 0-1 put all their mass on key block 0; rows 2-3 put
    # (2/3 + 2/4) / 2 = 7/12 on block 0 and (1/3 + 2/4) / 2 = 5/12 on block 1
    np.testing.assert_allclose(out.block_sum.numpy(), [[[1.0, 0.0], [7 / 12, 5 / 12]]], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(out.block_max.numpy(), [[[1.0, 0.0], [1 / 3, 1 / 3]]], rtol=RTOL, atol=0)
    assert out.block_rows.tolist() == [2, 2]


# --------------------------------------------------------------------------- pure sink


def test_pure_sink_head():
    n = 45
    cfg = StatConfig(
        sink_tokens=(1, 4), windows=(1, 8, 16, 64), coverages=(0.9, 0.95), budgets=(1, 4, 16, 64),
        block_size=16, coverage_rows=10, query_chunk=16,
    )
    out = run(sink_head(3, n), cfg)
    assert_stat(out, cfg, "sink_mass_1", 1.0)
    assert_stat(out, cfg, "sink_mass_4", 1.0)
    assert_stat(out, cfg, "entropy_norm", 0.0)
    for w in cfg.windows:  # only rows i < w see token 0 inside their window
        assert_stat(out, cfg, f"local_mass_{w}", min(w, n) / n)
    for k in cfg.budgets:
        assert_stat(out, cfg, f"vertical_mass_{k}", 1.0)
        # row i adds 1 to diagonal i: every diagonal holds 1, the top k hold min(k, n)
        assert_stat(out, cfg, f"slash_mass_{k}", min(k, n) / n)
    # one key holds all the mass: the fractional count is k + (c - S_k)/p_(k+1) = 0 + c/1 = c
    # (not 1), so keys_frac = mean over coverage rows of c / (i + 1)
    pos = cfg.coverage_positions(n).tolist()
    assert len(pos) == 10
    for c in cfg.coverages:
        assert_stat(out, cfg, f"keys_frac_{round(c * 100)}", sum(c / (i + 1) for i in pos) / len(pos))
    # block maps: every q block puts all its mass, and its max, on key block 0
    expected = np.zeros((3, 3, 3))
    expected[:, :, 0] = 1.0
    np.testing.assert_allclose(out.block_sum.numpy(), expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(out.block_max.numpy(), expected)
    assert out.block_rows.tolist() == [16, 16, 13]
    assert_matches_brute(out, sink_head(3, n), cfg)


# --------------------------------------------------------------------------- previous token


def test_previous_token_head():
    n = 40
    cfg = StatConfig(
        sink_tokens=(1, 4), windows=(1, 2, 3), coverages=(0.9,), budgets=(1, 2, 5),
        block_size=8, query_chunk=8,
    )
    out = run(previous_token_head(2, n), cfg)
    assert_stat(out, cfg, "local_mass_1", 1 / n)  # only row 0 attends to itself
    assert_stat(out, cfg, "local_mass_2", 1.0)
    assert_stat(out, cfg, "local_mass_3", 1.0)
    assert_stat(out, cfg, "slash_mass_1", (n - 1) / n)  # diag[1] = n - 1, diag[0] = 1
    assert_stat(out, cfg, "slash_mass_2", 1.0)
    assert_stat(out, cfg, "slash_mass_5", 1.0)
    assert_stat(out, cfg, "sink_mass_1", 2 / n)  # rows 0 and 1 read token 0
    assert_stat(out, cfg, "sink_mass_4", 5 / n)  # rows 0..4 read tokens 0..3
    # col = [2, 1, ..., 1, 0]: top-1 = 2, top-k = k + 1
    assert_stat(out, cfg, "vertical_mass_1", 2 / n)
    assert_stat(out, cfg, "vertical_mass_2", 3 / n)
    assert_stat(out, cfg, "vertical_mass_5", 6 / n)
    assert_stat(out, cfg, "entropy_norm", 0.0)
    assert_stat(out, cfg, "keys_frac_90", sum(0.9 / (i + 1) for i in range(n)) / n)
    # block maps: q block qb puts 7/8 on itself and 1/8 on the block before (row qb*8 reads qb*8-1)
    nb = n // 8
    expected = np.zeros((2, nb, nb))
    expected[:, 0, 0] = 1.0
    for qb in range(1, nb):
        expected[:, qb, qb] = 7 / 8
        expected[:, qb, qb - 1] = 1 / 8
    np.testing.assert_allclose(out.block_sum.numpy(), expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(out.block_max.numpy(), (expected > 0).astype(np.float32))
    assert_matches_brute(out, previous_token_head(2, n), cfg)


# --------------------------------------------------------------------------- random patterns


def random_cfg(**kw) -> StatConfig:
    base = dict(
        sink_tokens=(1, 4, 200), windows=(1, 4, 16, 64, 300), coverages=(0.5, 0.9, 0.95),
        budgets=(1, 4, 16, 64, 300), block_size=16, query_chunk=32,
    )
    base.update(kw)
    return StatConfig(**base)


@pytest.mark.parametrize("n", [45, 130])
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"last_queries": 50},
        {"last_queries": 7},
        {"coverage_rows": 9},
        {"last_queries": 61, "coverage_rows": 13, "query_chunk": 16},
        {"last_queries": 1000},  # more than n: all rows
    ],
    ids=["all", "last50", "last7", "cov9", "last61-cov13", "last1000"],
)
def test_random_patterns_match_brute_force(n, kw):
    cfg = random_cfg(**kw)
    probs = random_causal(4, n, seed=n)
    out = run(probs, cfg)
    assert_matches_brute(out, probs, cfg)
    start, end = cfg.measured_range(n)
    assert out.block_rows.sum().item() == end - start
    # rows of block_sum sum to 1 for every measured q block, 0 for the others
    measured = out.block_rows > 0
    sums = out.block_sum.sum(-1).to(torch.float64)
    torch.testing.assert_close(sums[:, measured], torch.ones_like(sums[:, measured]), rtol=0, atol=1e-6)
    assert (sums[:, ~measured] == 0).all() and (out.block_max[:, ~measured] == 0).all()


def test_random_pattern_statistics_are_distinct_per_head():
    """Guard against a broadcasting bug that would give every head the same numbers."""
    cfg = random_cfg()
    out = run(random_causal(4, 130, seed=3), cfg)
    for idx, name in enumerate(cfg.names):
        if name in ("sink_mass_200", "local_mass_300", "vertical_mass_300", "slash_mass_300"):
            continue  # all mass for every head
        assert len(set(out.values[:, idx].tolist())) == 4, name


def test_last_queries_measures_only_the_last_rows():
    n, k = 130, 20
    cfg = random_cfg(last_queries=k, coverage_rows=1000)
    probs = random_causal(3, n, seed=7)
    out = run(probs, cfg)
    assert cfg.chunks(n)[0][0] == n - k and cfg.chunks(n)[-1][1] == n
    assert_matches_brute(out, probs, cfg)
    assert out.block_rows.tolist() == [0] * 6 + [2, 16, 2]  # rows 110..129
    assert cfg.coverage_positions(n).tolist() == list(range(n - k, n))
    full = run(probs, random_cfg(coverage_rows=1000))
    assert not torch.allclose(full.values, out.values)


def test_coverage_rows_select_evenly_spaced_rows():
    n = 130
    cfg = random_cfg(coverage_rows=9)
    pos = cfg.coverage_positions(n).tolist()
    assert pos == sorted(set(pos)) and len(pos) == 9 and pos[0] == 0 and pos[-1] == n - 1
    assert cfg.coverage_positions(n).tolist() == pos  # deterministic
    # keys_frac is the mean over exactly those rows: rows whose keys_frac we set by hand
    probs = sink_head(1, n)  # row i: c / (i + 1)
    out = run(probs, cfg)
    expected = sum(0.9 / (i + 1) for i in pos) / len(pos)
    assert_stat(out, cfg, "keys_frac_90", expected)
    all_rows = sum(0.9 / (i + 1) for i in range(n)) / n
    assert abs(expected - all_rows) > 1e-3  # the row choice matters for this pattern


@pytest.mark.parametrize(
    "n,k,last", [(130, 9, None), (130, 128, None), (1000, 7, None), (4, 3, None), (5000, 128, 777), (300, 2, 100), (50, 1, None)]
)
def test_coverage_positions_evenly_spaced(n, k, last):
    cfg = StatConfig(coverage_rows=k, last_queries=last)
    start, end = cfg.measured_range(n)
    m = end - start
    pos = cfg.coverage_positions(n)
    assert pos.dtype == torch.long
    pos = pos.tolist()
    assert len(pos) == min(k, m)
    assert pos == sorted(set(pos))
    assert all(start <= p < end for p in pos)
    if k == 1:
        assert pos == [start]
        return
    step = Fraction(m - 1, k - 1)
    for t, p in enumerate(pos):  # within rounding of the ideal even grid
        assert abs(p - (start + t * step)) <= Fraction(1, 2) + Fraction(1, 10**6)
    gaps = {b - a for a, b in zip(pos[:-1], pos[1:], strict=True)}
    assert gaps <= {math.floor(step), math.ceil(step)}


def test_coverage_positions_all_rows_when_few():
    cfg = StatConfig(coverage_rows=128, last_queries=50)
    assert cfg.coverage_positions(40).tolist() == list(range(40))
    assert cfg.coverage_positions(300).tolist() == list(range(250, 300))


# --------------------------------------------------------------------------- chunking


def _irregular_chunks(start: int, end: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    out, a = [], start
    while a < end:
        b = min(end, a + rng.randint(1, 23))
        out.append((a, b))
        a = b
    return out


@pytest.mark.parametrize("last_queries", [None, 83])
def test_chunking_independence(last_queries):
    n = 130
    probs = random_causal(3, n, seed=11)
    cfg16 = random_cfg(query_chunk=16, last_queries=last_queries, coverage_rows=17)
    cfg256 = random_cfg(query_chunk=256, last_queries=last_queries, coverage_rows=17)
    assert len(cfg16.chunks(n)) > 1 and len(cfg256.chunks(n)) == 1
    ref = run(probs, cfg256)
    start, end = cfg16.measured_range(n)
    orders = {
        "chunk16": cfg16.chunks(n),
        "reversed": cfg16.chunks(n)[::-1],
        "shuffled": random.Random(0).sample(cfg16.chunks(n), len(cfg16.chunks(n))),
        "irregular": random.Random(1).sample(_irregular_chunks(start, end, 2), len(_irregular_chunks(start, end, 2))),
        "rows": [(i, i + 1) for i in range(start, end)][::-1],
    }
    for label, chunks in orders.items():
        out = run(probs, cfg16, chunks)
        torch.testing.assert_close(out.values, ref.values, rtol=1e-6, atol=1e-7, msg=label)
        torch.testing.assert_close(out.block_sum, ref.block_sum, rtol=1e-6, atol=1e-7, msg=label)
        assert torch.equal(out.block_max, ref.block_max), label
        assert torch.equal(out.block_rows, ref.block_rows), label
    assert_matches_brute(ref, probs, cfg256)


def test_chunks_cover_measured_rows_aligned_to_query_chunk():
    cfg = StatConfig(block_size=16, query_chunk=32, last_queries=50)
    assert cfg.chunks(130) == [(80, 96), (96, 128), (128, 130)]
    assert StatConfig(block_size=16, query_chunk=32).chunks(64) == [(0, 32), (32, 64)]
    # query_chunk is rounded down to whole blocks (at least one block)
    assert StatConfig(block_size=16, query_chunk=100).query_chunk == 96
    assert StatConfig(block_size=16, query_chunk=10).query_chunk == 16
    assert StatConfig(block_size=64, query_chunk=256).query_chunk == 256


def test_float64_input_is_reduced_as_float32():
    probs = random_causal(2, 45, seed=5)
    cfg = random_cfg()
    ref = run(probs, cfg)
    out = run(probs.to(torch.float64), cfg)
    torch.testing.assert_close(out.values, ref.values, rtol=0, atol=0)
    assert out.values.dtype == torch.float32 and out.block_sum.dtype == torch.float32
    assert out.block_max.dtype == torch.float32 and out.block_rows.dtype == torch.int32


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("bs", [0, -16, 3, 48, 100])
def test_block_size_must_be_power_of_two(bs):
    with pytest.raises(ValueError, match="block_size must be a positive power of two"):
        StatConfig(block_size=bs)


@pytest.mark.parametrize("field", ["sink_tokens", "windows", "budgets"])
@pytest.mark.parametrize("bad", [(0,), (16, -1)])
def test_sizes_must_be_positive(field, bad):
    with pytest.raises(ValueError, match=f"{field} must be positive"):
        StatConfig(**{field: bad})


@pytest.mark.parametrize("bad", [(0.0,), (1.0,), (1.5,), (-0.1,), (0.9, 1.0)])
def test_coverages_must_lie_in_open_unit_interval(bad):
    with pytest.raises(ValueError, match=r"coverages must lie in \(0, 1\)"):
        StatConfig(coverages=bad)


@pytest.mark.parametrize("bad", [0, -3])
def test_last_queries_must_be_positive(bad):
    with pytest.raises(ValueError, match="last_queries must be positive"):
        StatConfig(last_queries=bad)


def test_valid_config_and_names():
    cfg = StatConfig(sink_tokens=(2,), windows=(8,), coverages=(0.9,), budgets=(3,), block_size=1)
    assert cfg.names == ["sink_mass_2", "local_mass_8", "entropy_norm", "keys_frac_90", "vertical_mass_3", "slash_mass_3"]
    assert StatConfig().names[:3] == ["sink_mass_1", "sink_mass_4", "local_mass_16"]
    assert cfg.to_dict()["budgets"] == (3,)


def test_coverage_rows_must_be_positive():
    with pytest.raises(ValueError):
        StatConfig(coverage_rows=0)


@pytest.mark.parametrize("bad", [0, -16])
def test_query_chunk_must_be_positive(bad):
    with pytest.raises(ValueError):
        StatConfig(block_size=16, query_chunk=bad)


def test_update_rejects_bad_shapes_and_rows():
    acc = HeadStatAccumulator(2, 10, StatConfig(block_size=4))
    with pytest.raises(ValueError, match=r"expected \[2, R, 10\]"):
        acc.update(torch.zeros(3, 2, 10), 0)
    with pytest.raises(ValueError, match=r"expected \[2, R, 10\]"):
        acc.update(torch.zeros(2, 2, 9), 0)
    with pytest.raises(ValueError, match="fall outside a 10-token sample"):
        acc.update(torch.zeros(2, 3, 10), 8)
    with pytest.raises(ValueError, match="fall outside"):
        acc.update(torch.zeros(2, 1, 10), -1)


# --------------------------------------------------------------------------- attention variants


def test_window_layer_statistics_are_over_the_keys_the_model_sees():
    """Uniform attention over a sliding window of W keys is as spread as it can be there:
    entropy_norm 1 and keys_frac_c exactly c, as uniform causal attention is without a window."""
    h, n, w = 2, 40, 6
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    seen = ((j <= i) & (i - j < w)).to(torch.float64)
    probs = (seen / seen.sum(-1, keepdim=True)).to(torch.float32).expand(h, n, n).contiguous()
    cfg = StatConfig(sink_tokens=(1,), windows=(w,), coverages=(0.5, 0.9), budgets=(4,), block_size=8, query_chunk=16)
    acc = HeadStatAccumulator(h, n, cfg, window=w)
    for a, b in cfg.chunks(n):
        acc.update(probs[:, a:b, :], a)
    out = acc.finalize()
    assert_stat(out, cfg, "entropy_norm", 1.0)
    assert_stat(out, cfg, "keys_frac_50", 0.5)
    assert_stat(out, cfg, "keys_frac_90", 0.9)
    assert_stat(out, cfg, f"local_mass_{w}", 1.0)
    np.testing.assert_allclose(out.learned_sink_mass.numpy(), 0.0, atol=1e-6)
    # without the window the same pattern reads as concentrated: the window is what makes it uniform
    plain = run(probs, cfg)
    assert float(stat(plain, cfg, "entropy_norm").max()) < 0.8


def test_learned_sink_mass_is_the_mass_no_key_received():
    h, n = 2, 24
    probs = uniform_causal(h, n) * 0.75  # a learned sink took a quarter of every row
    cfg = StatConfig(sink_tokens=(1,), windows=(4,), budgets=(4,), block_size=8, query_chunk=8)
    out = run(probs, cfg)
    np.testing.assert_allclose(out.learned_sink_mass.numpy(), 0.25, rtol=1e-6)
    assert_stat(out, cfg, "local_mass_4", 0.75 * float(np.mean([min(4, i + 1) / (i + 1) for i in range(n)])))
