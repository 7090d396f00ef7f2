"""The estimators of two training-free dynamic methods, written from their papers.

- **XAttention** (Xu et al., 2025, "XAttention: Block Sparse Attention with Antidiagonal
  Scoring"): the attention map is scored on ``S x S`` tiles by the sum of each tile's
  antidiagonal (with stride ``S`` along queries and keys), normalised per query row, pooled to
  layout blocks; each query-block row keeps its highest-scoring blocks until their cumulative
  score reaches ``tau``.
- **FlexPrefill** (Lai et al., 2025, "FlexPrefill: A Context-Aware Sparse Attention Mechanism
  for Efficient Long-Sequence Inference"): per head and per input, the Jensen–Shannon distance
  between the true attention of the last queries pooled to key blocks and the block-pooled
  estimate (mean-pooled queries and keys) decides the pattern: close → query-aware (each row
  keeps blocks of the pooled estimate until cumulative ``gamma``); far → vertical-slash (the
  fewest key columns and the fewest diagonals whose shares of the last queries' attention reach
  ``gamma``).

Everything here works on one layer's ``q [H, n, d]`` and ``k [H_kv, n, d]`` (grouped heads are
expanded) or on `BlockScores`, and returns tensors; `attnlab.sparsity_stats.kinds` turns the
choices into the kinds ``xattention`` and ``flexprefill``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attnlab.cliargs import layers_text

#: Published defaults (XAttention: stride 8, threshold 0.9; FlexPrefill: gamma 0.9, tau 0.1).
XATTENTION_DEFAULTS = {"tau": 0.9, "stride": 8}
FLEXPREFILL_DEFAULTS = {"gamma": 0.9, "delta": 0.1}
STRIDES = (1, 2, 4, 8, 16, 32, 64)


def antidiagonal_block_scores(q: Tensor, k: Tensor, block_size: int, *, stride: int = 8) -> Tensor:
    """XAttention's block scores ``[H, QB, KB]``: rows sum to 1 over causal blocks.

    Tile ``(i, j)`` (queries ``iS..iS+S-1``, keys ``jS..jS+S-1``) is scored by its antidiagonal,
    ``sum_t q[iS+S-1-t] . k[jS+t]``, divided by ``S * sqrt(d)`` (the mean of ``S`` scaled dot
    products); a softmax over the causal tiles of each tile row gives an attention estimate at
    stride resolution, which is summed into layout blocks and normalised per query-block row.
    ``block_size`` must be a multiple of ``stride``. Memory ``O(H (n / S)^2)``.
    """
    h, n, d = q.shape
    s = int(stride)
    b = int(block_size)
    if s not in STRIDES or b % s:
        raise ValueError(f"XAttention's stride must be one of {STRIDES} and divide the block size {b}, got {s}")
    if k.shape[0] != h:
        k = k.repeat_interleave(h // k.shape[0], dim=0)
    nb = -(-n // b)
    padded = nb * b
    qf = torch.nn.functional.pad(q.float(), (0, 0, 0, padded - n))
    kf = torch.nn.functional.pad(k.float(), (0, 0, 0, padded - n))
    tiles = padded // s
    # queries of a tile in reverse order, keys in order: their dot product is the antidiagonal sum
    q_tiles = qf.reshape(h, tiles, s, d).flip(2).reshape(h, tiles, s * d)
    k_tiles = kf.reshape(h, tiles, s, d).reshape(h, tiles, s * d)
    logits = torch.einsum("hid,hjd->hij", q_tiles, k_tiles) / (s * math.sqrt(d))
    ti = torch.arange(tiles)
    valid_keys = ti * s < n  # a tile of padding only holds no key
    allowed = (ti[None, :] <= ti[:, None]) & valid_keys[None, :]
    att = torch.softmax(logits.masked_fill(~allowed, -float("inf")), dim=-1)
    att = torch.nan_to_num(att, nan=0.0)
    per = b // s
    blocks = att.reshape(h, nb, per, nb, per).sum(dim=(2, 4))
    return blocks / blocks.sum(-1, keepdim=True).clamp(min=1e-30)


def js_distance(p: Tensor, q: Tensor) -> Tensor:
    """Jensen–Shannon distance (the square root of the divergence, natural log) between the
    distributions in the last dimension of ``p`` and ``q`` (each normalised here)."""
    p = p.float().clamp(min=0)
    q = q.float().clamp(min=0)
    p = p / p.sum(-1, keepdim=True).clamp(min=1e-30)
    q = q / q.sum(-1, keepdim=True).clamp(min=1e-30)
    m = (p + q) / 2

    def kl(a: Tensor, b: Tensor) -> Tensor:
        return torch.where(a > 0, a * (a.clamp(min=1e-30).log() - b.clamp(min=1e-30).log()), 0.0).sum(-1)

    return ((kl(p, m) + kl(q, m)) / 2).clamp(min=0).sqrt()


def flexprefill_query_aware(vertical: Tensor, blocks: Tensor, delta: float) -> Tensor:
    """Per head (bool ``[H]``): query-aware (True) when the last queries' attention over key
    blocks (``vertical [H, KB]``) and the pooled estimate of the last query block
    (``blocks[:, -1] [H, KB]``) are within Jensen–Shannon distance ``delta``."""
    return js_distance(vertical, blocks[:, -1, :]) < float(delta)


def fewest_reaching(mass: Tensor, gamma: float, *, force_first: bool = True) -> Tensor:
    """Bool mask ``[..., X]``: the fewest entries of ``mass`` (largest first) whose sum reaches
    ``gamma`` of the total; index 0 is always kept when ``force_first``."""
    m = mass.float().clamp(min=0)
    total = m.sum(-1, keepdim=True)
    ranked = m.clone()
    if force_first:
        ranked[..., 0] = float("inf")
    order = torch.argsort(ranked, dim=-1, descending=True, stable=True)
    sorted_mass = torch.gather(m, -1, order)
    before = sorted_mass.cumsum(-1) - sorted_mass
    keep_sorted = before < float(gamma) * total - 1e-12
    keep_sorted[..., 0] = True
    out = torch.zeros_like(keep_sorted)
    return out.scatter(-1, order, keep_sorted)


def published_policy(model, kind: str, *, block_size: int = 64, dense_layers=(), **params: float):
    """A policy that runs one published dynamic method (``xattention`` or ``flexprefill``) on
    every head of ``model`` (a `LoadedModel` or a `ModelIdentity`), with its published defaults
    unless ``params`` say otherwise: the baseline as its authors run it.

    ``dense_layers`` keeps every head of those layers dense and runs the method on the rest: the
    same layers a budgeted policy protects (``--protect-layers``) given to the baseline, so that a
    win is not the protection's alone. Its achieved density counts the dense heads, so a lower
    ``tau``/``gamma`` reaches the same density."""
    from .kinds import BASELINE_KINDS
    from .policy import PolicyError, _identity_of, uniform_policy

    if kind not in BASELINE_KINDS:
        raise PolicyError(f"unknown published method {kind!r}: choose one of {', '.join(BASELINE_KINDS)}")
    layers = sorted({int(x) for x in dense_layers})
    budget: dict = {"method": kind}
    if layers:
        n_layers = int(_identity_of(model).to_dict()["n_layers"])
        outside = [x for x in layers if not 0 <= x < n_layers]
        if outside:
            raise PolicyError(f"dense layer(s) {outside} outside the model's layers 0-{n_layers - 1}: "
                              "give layers the model has")
        budget["dense_layers"] = layers
    policy = uniform_policy(model, kind, params, block_size=block_size, budget=budget)
    if not layers:
        return policy
    d = policy.to_dict()
    for h in d["heads"]:
        if h["layer"] in layers:
            h["kind"], h["params"] = "dense", {}
    return type(policy).from_dict(d)


def baseline_name(kind: str, params: dict, dense_layers=()) -> str:
    """The result name of a published method: ``xattention:tau=0.7``, or with dense layers
    ``xattention[dense6-8]:tau=0.7`` (its own family in ``eval --compare``)."""
    base = kind + (f"[dense{layers_text(dense_layers)}]" if len(dense_layers) else "")
    return base + ("" if not params else ":" + ",".join(f"{k}={v:g}" for k, v in params.items()))


def parse_baseline_name(name: str) -> tuple[str, dict[str, float], list[int]]:
    """The inverse of `baseline_name`: ``xattention[dense6-8]:tau=0.7`` → ``("xattention",
    {"tau": 0.7}, [6, 7, 8])``."""
    from attnlab.cliargs import layer_list

    kind, _, rest = name.partition(":")
    kind, bracket, dense = kind.partition("[dense")
    if bracket and not dense.endswith("]"):
        from .policy import PolicyError

        raise PolicyError(f"baseline {name!r}: dense layers are written [denseA-B], e.g. xattention[dense6-8]:tau=0.7")
    kind, params = parse_baseline(kind + (":" + rest if rest else ""))
    return kind, params, (layer_list(dense[:-1]) if bracket else [])


def parse_baseline(spec: str) -> tuple[str, dict[str, float]]:
    """``"flexprefill"`` or ``"xattention:tau=0.95,stride=16"`` → ``(kind, params)``."""
    runs = parse_baselines(spec)
    if len(runs) != 1:
        from .policy import PolicyError

        raise PolicyError(f"baseline {spec!r} is a sweep of {len(runs)} settings: give one value per parameter")
    return runs[0]


def parse_baselines(spec: str) -> list[tuple[str, dict[str, float]]]:
    """A baseline or a sweep of one: ``"xattention:tau=0.8/0.9/0.95,stride=8"`` → one
    ``(kind, params)`` per combination of the ``/``-separated values, in order (a dynamic
    method's density is only known per input: run several settings and let ``eval --compare``
    report each at the density it reaches)."""
    import itertools

    from .policy import PolicyError

    kind, _, rest = spec.partition(":")
    grid: dict[str, list[float]] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        try:
            if not eq:
                raise ValueError
            grid[key.strip()] = [float(v) for v in value.split("/")]
        except ValueError:
            raise PolicyError(f"baseline {spec!r}: parameters are KEY=NUMBER (or KEY=A/B/C for a sweep), comma-separated "
                              "(e.g. xattention:tau=0.95,stride=16)") from None
    keys = list(grid)
    return [(kind.strip(), dict(zip(keys, values, strict=True))) for values in itertools.product(*(grid[k] for k in keys))]
