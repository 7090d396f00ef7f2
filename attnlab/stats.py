"""Per-head attention statistics, reduced from attention probabilities one row-chunk at a time.

Both capture paths feed the same `HeadStatAccumulator`: the pattern path hands it row chunks
of the model's own ``hook_pattern``; the q/k path recomputes the same rows from post-RoPE
queries and keys. Only ``O(heads × n)`` state is kept per layer (column sums, diagonal sums,
running sums), plus the block maps, so nothing ``n × n`` outlives the chunk being reduced.

Notation for one sample and one head: ``A[i, j]`` is the attention probability of query ``i``
on key ``j`` (``j <= i``); ``Q`` is the set of *measured* queries (all queries, or the last
``k`` — MInference's shortcut for long inputs), ``m = |Q|``; ``col[j] = Σ_{i∈Q} A[i, j]`` and
``diag[d] = Σ_{i∈Q} A[i, i - d]``. Every statistic is a mean over measured queries:

=====================  =====================================================================
statistic              formula
=====================  =====================================================================
``sink_mass_{n}``      ``(1/m) Σ_{j<n} col[j]`` — mass on the first ``n`` tokens
``local_mass_{w}``     ``(1/m) Σ_{d<w} diag[d]`` — mass on the ``w`` most recent keys (incl. itself)
``entropy_norm``       mean over ``i ∈ Q, i ≥ 1`` of ``H(A[i, :i+1]) / log(i + 1)`` (0 = one key, 1 = uniform)
``keys_frac_{90,95}``  mean over coverage rows of ``keys_c(A[i]) / (i + 1)``, where ``keys_c`` is the
                       fractional number of top keys whose mass reaches ``c``: ``k + (c - S_k) / p_(k+1)``
                       with ``S_k < c <= S_(k+1)`` the top-``k`` mass (uniform attention gives exactly ``c``)
``vertical_mass_{k}``  ``(1/m) Σ_{j ∈ top-k(col)} col[j]`` — mass on the head's top ``k`` columns
``slash_mass_{k}``     ``(1/m) Σ_{d ∈ top-k(diag)} diag[d]`` — mass on its top ``k`` diagonals
=====================  =====================================================================

**Attention variants.** On a sliding-window layer (window ``W``, Hugging Face's convention:
query ``i`` sees keys ``i - W < j <= i``) the statistics are over the keys the model can see:
the probabilities outside the window are 0, and every "visible keys" count above —
``log(i + 1)`` in ``entropy_norm``, ``i + 1`` in ``keys_frac`` — becomes ``min(i + 1, W)``
(`HeadStatAccumulator.window`). A learned attention sink (gpt-oss) takes softmax mass but is
no key: rows then sum to ``1 - s`` (``s`` the sink's share), every statistic stays a fraction
of the *whole* softmax mass (so ``sink_mass_{n}`` is mass on the first ``n`` real tokens, not
the learned sink's), and the learned sink's mean mass is reported on its own as
`SampleStats.learned_sink_mass` ``= 1 - (1/m) Σ_j col[j]`` (0 on models without one).

``keys_frac`` needs each row sorted, which costs ~10× the rest together, so it is measured on
at most ``coverage_rows`` evenly spaced measured queries (exact on each of them); both paths
use the same rows. Block maps are described in `attnlab.runs.BlockMaps`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch


@dataclass(frozen=True)
class StatConfig:
    """Which statistics to compute, and how.

    Attributes:
        sink_tokens: ``n`` of ``sink_mass_{n}``.
        windows: ``w`` of ``local_mass_{w}``.
        coverages: ``c`` of ``keys_frac_{100c}``.
        budgets: ``k`` of ``vertical_mass_{k}`` and ``slash_mass_{k}``.
        block_size: block of the block maps (tokens).
        last_queries: measure only the last ``k`` queries (``None`` = all).
        coverage_rows: at most this many rows are sorted for ``keys_frac``.
        query_chunk: rows reduced at once (bounds transient memory to ``heads × chunk × n``);
            rounded down to a multiple of ``block_size`` (at least one block).
    """

    sink_tokens: tuple[int, ...] = (1, 4)
    windows: tuple[int, ...] = (16, 64, 256, 1024)
    coverages: tuple[float, ...] = (0.90, 0.95)
    budgets: tuple[int, ...] = (16, 64, 256)
    block_size: int = 64
    last_queries: int | None = None
    coverage_rows: int = 128
    query_chunk: int = 256

    def __post_init__(self) -> None:
        bs = self.block_size
        if bs <= 0 or bs & (bs - 1):
            raise ValueError(f"block_size must be a positive power of two, got {bs}")
        if self.last_queries is not None and self.last_queries <= 0:
            raise ValueError(f"last_queries must be positive or None, got {self.last_queries}")
        for name in ("sink_tokens", "windows", "budgets"):
            if any(v <= 0 for v in getattr(self, name)):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if any(not 0 < c < 1 for c in self.coverages):
            raise ValueError(f"coverages must lie in (0, 1), got {self.coverages}")
        if self.coverage_rows <= 0:
            raise ValueError(f"coverage_rows must be positive, got {self.coverage_rows}")
        if self.query_chunk <= 0:
            raise ValueError(f"query_chunk must be positive, got {self.query_chunk}")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"two statistics would share a name: {self.names}; give distinct sizes and coverages")
        if self.query_chunk % bs:
            object.__setattr__(self, "query_chunk", max(bs, (self.query_chunk // bs) * bs))

    @property
    def names(self) -> list[str]:
        """Statistic names in the order `HeadStatAccumulator.finalize` returns them."""
        out = [f"sink_mass_{n}" for n in self.sink_tokens]
        out += [f"local_mass_{w}" for w in self.windows]
        out += ["entropy_norm"]
        out += [f"keys_frac_{round(c * 100)}" for c in self.coverages]
        out += [f"vertical_mass_{k}" for k in self.budgets]
        out += [f"slash_mass_{k}" for k in self.budgets]
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    def measured_range(self, n: int) -> tuple[int, int]:
        """Absolute positions ``[start, n)`` of the measured queries for an ``n``-token sample."""
        start = 0 if self.last_queries is None else max(0, n - self.last_queries)
        return start, n

    def chunks(self, n: int) -> list[tuple[int, int]]:
        """Row chunks ``[a, b)`` over the measured queries, aligned to ``query_chunk``."""
        start, end = self.measured_range(n)
        step = self.query_chunk
        out = []
        a = start
        while a < end:
            b = min(end, (a // step + 1) * step)
            out.append((a, b))
            a = b
        return out

    def coverage_positions(self, n: int) -> torch.Tensor:
        """Absolute positions of the rows sorted for ``keys_frac`` (evenly spaced, deterministic)."""
        start, end = self.measured_range(n)
        m = end - start
        k = min(m, self.coverage_rows)
        if k == m:
            return torch.arange(start, end)
        return torch.unique(torch.linspace(start, end - 1, k).round().to(torch.long))


@dataclass
class SampleStats:
    """What one sample's capture yields for one layer.

    ``values``: ``[heads, n_stats]`` in `StatConfig.names` order; ``block_sum``/``block_max``:
    ``[heads, q_blocks, k_blocks]``; ``block_rows``: ``[q_blocks]`` measured rows per q block;
    ``learned_sink_mass``: ``[heads]`` mean softmax mass of a learned attention sink (the mass no
    key received; 0 up to rounding on a model without sinks).
    """

    values: torch.Tensor
    block_sum: torch.Tensor
    block_max: torch.Tensor
    block_rows: torch.Tensor
    learned_sink_mass: torch.Tensor | None = None


@dataclass
class HeadStatAccumulator:
    """Running reduction of one layer's attention for one sample (see the module docstring).

    Feed it row chunks with `update`, in any order, then call `finalize`. ``window`` is the
    layer's sliding window (0 = none): it bounds the visible keys of ``entropy_norm`` and
    ``keys_frac``.
    """

    n_heads: int
    n_keys: int
    config: StatConfig
    device: torch.device | str = "cpu"
    window: int = 0
    col: torch.Tensor = field(init=False)
    diag: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        h, n, bs = self.n_heads, self.n_keys, self.config.block_size
        dev = self.device
        self.n_blocks = math.ceil(n / bs)
        self.col = torch.zeros(h, n, dtype=torch.float64, device=dev)
        self.diag = torch.zeros(h, n, dtype=torch.float64, device=dev)
        self.entropy_sum = torch.zeros(h, dtype=torch.float64, device=dev)
        self.entropy_rows = 0
        self.coverage_sum = torch.zeros(h, len(self.config.coverages), dtype=torch.float64, device=dev)
        self.coverage_count = 0
        self.rows = 0
        self.block_sum = torch.zeros(h, self.n_blocks, self.n_blocks, dtype=torch.float64, device=dev)
        self.block_max = torch.zeros(h, self.n_blocks, self.n_blocks, dtype=torch.float32, device=dev)
        self.block_rows = torch.zeros(self.n_blocks, dtype=torch.float64)
        self._coverage_pos = self.config.coverage_positions(n).to(dev)

    @torch.no_grad()
    def update(self, probs: torch.Tensor, start: int) -> None:
        """Reduce rows ``start .. start+R-1`` of the pattern.

        Args:
            probs: ``[heads, R, n_keys]`` attention probabilities of queries at absolute
                positions ``start + r`` (rows sum to 1 over ``j <= start + r``).
            start: absolute position of the first row.
        """
        probs = probs.to(self.device, torch.float32)  # a no-op unless the rows come from another device
        h, r, n = probs.shape
        if h != self.n_heads or n != self.n_keys:
            raise ValueError(f"expected [{self.n_heads}, R, {self.n_keys}] probabilities, got {list(probs.shape)}")
        if start < 0 or start + r > n:
            raise ValueError(f"rows {start}..{start + r - 1} fall outside a {n}-token sample")
        self.rows += r
        # per-chunk sums in fp32 (fast), running totals in fp64
        self.col += probs.sum(1)
        self.diag += _diagonal_sums(probs, start)

        # entropy, normalised by log(visible keys); a query that sees one key is skipped
        ent = -torch.special.xlogy(probs, probs).sum(-1)  # [h, r]
        pos = torch.arange(start, start + r, device=probs.device)
        seen = self._visible(pos)
        keep = seen >= 2
        if keep.any():
            self.entropy_sum += (ent[:, keep] / torch.log(seen[keep].to(torch.float32))).sum(-1)
            self.entropy_rows += int(keep.sum())

        cov = self._coverage_pos
        sel = cov[(cov >= start) & (cov < start + r)]
        if sel.numel():
            rows = probs[:, sel - start, :]  # [h, s, n]
            sorted_p = torch.sort(rows, dim=-1, descending=True).values.to(torch.float64)
            csum = sorted_p.cumsum(-1)
            visible = self._visible(sel).to(torch.float64)
            last = n - 1
            for c_i, c in enumerate(self.config.coverages):
                # Fractional keys needed: k whole keys keep S_k < c, the next key p_{k+1} is
                # counted by the share of it that reaches c. Continuous in the probabilities,
                # so two paths that differ by float noise cannot differ by a whole key.
                k = (csum < c).sum(-1, keepdim=True)
                below = torch.where(k > 0, csum.gather(-1, (k - 1).clamp_min(0)), torch.zeros_like(csum[..., :1]))
                p_next = sorted_p.gather(-1, k.clamp_max(last)).clamp_min(1e-30)
                need = (k + ((c - below) / p_next).clamp(0, 1)).squeeze(-1)
                need = torch.minimum(need, visible)
                self.coverage_sum[:, c_i] += (need / visible).sum(-1)
            self.coverage_count += int(sel.numel())

        self._update_blocks(probs, start)

    def _visible(self, positions: torch.Tensor) -> torch.Tensor:
        """Keys a query at each absolute position sees: ``i + 1``, at most the window."""
        seen = positions + 1
        return seen.clamp(max=self.window) if self.window else seen

    def _update_blocks(self, probs: torch.Tensor, start: int) -> None:
        bs = self.config.block_size
        h, r, n = probs.shape
        # Pool keys first (a contiguous inner reduction over the big tensor), then rows on the
        # small [h, r, k_blocks] result, padded out to the enclosing q-block boundaries.
        # Padding is 0, which neither the sum nor the max sees (probabilities are >= 0).
        kpad = self.n_blocks * bs - n
        keyed = torch.nn.functional.pad(probs, (0, kpad)) if kpad else probs
        keyed = keyed.reshape(h, r, self.n_blocks, bs)
        row_sum, row_max = keyed.sum(-1), keyed.amax(-1)
        first = start // bs
        lead = start - first * bs
        nb = math.ceil((lead + r) / bs)
        tail = nb * bs - lead - r
        row_sum = torch.nn.functional.pad(row_sum, (0, 0, lead, tail)).view(h, nb, bs, self.n_blocks)
        row_max = torch.nn.functional.pad(row_max, (0, 0, lead, tail)).view(h, nb, bs, self.n_blocks)
        self.block_sum[:, first : first + nb] += row_sum.sum(2)
        self.block_max[:, first : first + nb] = torch.maximum(self.block_max[:, first : first + nb], row_max.amax(2))
        rows = torch.full((nb,), float(bs), dtype=torch.float64)
        rows[0] -= lead
        rows[-1] -= tail
        self.block_rows[first : first + nb] += rows

    def finalize(self) -> SampleStats:
        """Statistics ``[heads, n_stats]`` (`StatConfig.names` order) and this sample's block maps."""
        cfg = self.config
        m = max(self.rows, 1)
        n = self.n_keys
        cols: list[torch.Tensor] = []
        cols += [self.col[:, : min(k, n)].sum(-1) / m for k in cfg.sink_tokens]
        cols += [self.diag[:, : min(w, n)].sum(-1) / m for w in cfg.windows]
        cols.append(self.entropy_sum / max(self.entropy_rows, 1))
        cols += [self.coverage_sum[:, i] / max(self.coverage_count, 1) for i in range(len(cfg.coverages))]
        cols += [torch.topk(self.col, min(k, n), dim=-1).values.sum(-1) / m for k in cfg.budgets]
        cols += [torch.topk(self.diag, min(k, n), dim=-1).values.sum(-1) / m for k in cfg.budgets]
        values = torch.stack(cols, dim=-1).to(torch.float32)
        rows = self.block_rows.clamp_min(1)
        block_sum = (self.block_sum / rows.to(self.block_sum.device)[None, :, None]).to(torch.float32)
        sink = (1.0 - self.col.sum(-1) / m).clamp_min(0).to(torch.float32) if self.rows else torch.zeros(self.n_heads)
        return SampleStats(
            values=values.cpu(), block_sum=block_sum.cpu(), block_max=self.block_max.cpu(), block_rows=self.block_rows.to(torch.int32),
            learned_sink_mass=sink.cpu(),
        )


def _diagonal_sums(probs: torch.Tensor, start: int) -> torch.Tensor:
    """``out[h, d] = Σ_r probs[h, r, start + r - d]`` over ``d in [0, n)`` (0 where no such key).

    With rows of stride ``n``, element ``(r, start + r - d)`` sits at ``r·(n + 1) + start - d``:
    a strided view with row stride ``n + 1`` lines every diagonal up in one column, without a
    copy. Where ``d > start + r`` the view reads the previous row's future keys, which a causal
    pattern holds at exactly 0. The chunk's first row would read before the tensor, so it is
    added on its own.
    """
    h, r, n = probs.shape
    out = torch.zeros(h, n, dtype=torch.float32, device=probs.device)
    out[:, : start + 1] += probs[:, 0, : start + 1].flip(-1)
    if r > 1:
        if probs.stride(-1) != 1 or probs.stride(-2) != n:
            probs = probs.contiguous()
        # element (1 + i, t) of the view is probs[:, 1 + i, (start + 1 + i) - (n - 1 - t)]
        base = probs[:, 1:, :]
        view = base.as_strided((h, r - 1, n), (base.stride(0), n + 1, 1), base.storage_offset() + start + 1 - (n - 1))
        out += view.sum(1).flip(-1)
    return out
