"""Layer sensitivity: what a policy's sparsity in one layer costs the model's output.

The generator maximises the attention mass its heads keep, every head alike. But mass dropped
in one layer does not cost the output what the same mass costs in another: an early layer's
error reaches every later layer and every position's keys and values, which is what a decode
step reads. `layer_sensitivity` measures it on the user's prompts:

- each prompt runs densely, and then once per layer ``L`` with only ``L``'s heads under the
  policy (every other layer dense);
- ``kl[L]``: the KL divergence of the next-token distributions, dense ‖ only-``L``, mean over
  positions (or, with ``focus_last``, the last positions of each prompt, where a task's
  question and answer start sit) and prompts — the damage ``L``'s sparsity does on its own,
  through every later layer;
- ``dropped[L]``: the attention mass the policy expects ``L``'s heads to drop, the sum over them
  of ``1 - expected_recall`` (the generator's own figures);
- the per-head weight of layer ``L``'s heads is ``kl[L] / dropped[L]``, scaled to mean 1 over
  the heads. At the measured policy, ``sum_h w_h (1 - recall_h)`` over ``L``'s heads is then
  proportional to ``kl[L]``: `PolicyGenerator` (``head_weights=``; ``attnlab policy make
  --head-weights FILE``) spends the budget where a dropped unit of mass costs the output most.

With ``window=W`` it also runs every run of ``W`` adjacent layers under the policy together
(every other layer dense) and records that KL per window (``window_kl``): layers that build an
answer together can cost more together than the sum of their single-layer KLs says, so
`Sensitivity.layer_windows` ranks ``--protect-layers`` candidates by the measured KL when there
is one. It costs one more forward per window per prompt. Neither ranking is a verdict: on
SmolLM2's task suite the measured windows put layers 5-7 first (as did the log p of dense's
answers on unscored samples), and protecting 5-7 scored 0.63 where 6-8 (third) scored 0.69 (5-7
won multi-key and lost variable tracking), so validate the top windows: build a policy per window
and score each on unscored task samples. There, the log p of dense's replies (partly right ones
kept, each task weighted alike; `benchmarks/task_suite_layers.py --candidate`) ranked 6-8, 7-9,
5-7, the order of their scores.

This is a first-order model (damage linear in the mass dropped, layers independent), measured
around one policy; so that one measurement does not strip a layer bare, each weight is held
within ``[1/10, 10]`` of the mean (as far as the number of layers allows: with
few layers a mean of 1 caps the largest lower). A layer the policy leaves dense (nothing dropped, nothing to
measure) gets the median weight of the measured layers.

The weights are saved as JSON (``attnlab-sensitivity``, `Sensitivity.save`) with the model's
identity; `Sensitivity.load` validates a file and names its first problem.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attnlab.attention import attend, route_attention
from attnlab.identity import IdentityError, ModelIdentity
from attnlab.runs import load_json, write_json

from .errors import PolicyError
from .executors import PolicyExecutor
from .policy import Policy

SENSITIVITY_FORMAT = "attnlab-sensitivity"
#: Each weight is held within [1/CLIP, CLIP] times the mean.
CLIP = 10.0
#: Below this much expected dropped mass a layer counts as dense (nothing to measure).
_NOTHING_DROPPED = 1e-6


def _err(path: Any, problem: str, fix: str = "re-create it with `attnlab policy sensitivity`") -> PolicyError:
    return PolicyError(f"{path}: {problem}; {fix}")


@dataclass
class Sensitivity:
    """Per-layer damage of a policy's sparsity, and the head weights it implies.

    ``kl``, ``dropped``: ``[L]``; ``weights``: ``[L, H]`` (mean 1); ``model``: the identity;
    ``source``: what was measured (policy, prompts, executor); ``window_kl``: ``[L - W + 1]``,
    the KL with layers ``i..i+W-1`` under the policy together, when windows of ``W = window``
    layers were measured (else None)."""

    model: dict[str, Any]
    kl: np.ndarray
    dropped: np.ndarray
    weights: np.ndarray
    source: dict[str, Any] = field(default_factory=dict)
    window_kl: np.ndarray | None = None

    @property
    def identity(self) -> ModelIdentity:
        return ModelIdentity.from_dict(self.model)

    @property
    def window(self) -> int | None:
        """The width of the measured windows (None when none were measured)."""
        return None if self.window_kl is None else len(self.kl) - len(self.window_kl) + 1

    @classmethod
    def from_measure(cls, model: dict[str, Any], kl: Sequence[float], dropped: Sequence[float], n_heads: int,
                     source: dict[str, Any] | None = None, window_kl: Sequence[float] | None = None) -> Sensitivity:
        """The weights implied by ``kl`` and ``dropped`` (see the module docstring); ``window_kl``
        (``[L - W + 1]``) the measured KL of every window of ``W`` adjacent layers, if any."""
        kl_a = np.asarray(kl, dtype=float)
        dropped_a = np.asarray(dropped, dtype=float)
        if kl_a.shape != dropped_a.shape or kl_a.ndim != 1 or not len(kl_a):
            raise ValueError(f"kl and dropped must be equal-length 1-d arrays, got {kl_a.shape} and {dropped_a.shape}")
        win_kl = None
        if window_kl is not None:
            win_kl = np.asarray(window_kl, dtype=float)
            if win_kl.ndim != 1 or not 1 <= len(win_kl) <= len(kl_a):
                raise ValueError(f"window_kl must be a 1-d array of 1 to {len(kl_a)} windows, got shape {win_kl.shape}")
        return cls(dict(model), kl_a, dropped_a, head_weights(kl_a, dropped_a, n_heads), dict(source or {}), win_kl)

    def layer_windows(self, width: int = 3) -> list[tuple[int, int, float]]:
        """Every run of ``width`` consecutive layers as ``(first, last, KL)``, the highest KL first
        (ties: the earlier window): the candidates for ``--protect-layers first-last``. The KL is
        the one measured with the window's layers sparse together when windows of this width were
        measured (``window_kl``; `measured_windows`), else the sum of its layers' single-layer KLs.
        Consecutive, because a task's answer is often assembled over a few adjacent layers (on
        SmolLM2's task suite, layers 6-8 caused 75% of the log p its answers lost;
        `benchmarks/task_suite_layers.py`). The ranking is a shortlist, not a verdict: there the
        summed focused KL put layers 7-9 first and the measured one 5-7, which scored 0.64 and 0.63
        where 6-8 (second and third) scored 0.69, so validate the top windows on your task (each
        window's policy scored by dense's reply log p on unscored samples put 6-8 first)."""
        if not (isinstance(width, int) and not isinstance(width, bool) and 1 <= width <= len(self.kl)):
            raise ValueError(f"width must be a whole number of layers in [1, {len(self.kl)}], got {width!r}")
        if self.measured_windows(width):
            sums = self.window_kl
        else:
            sums = np.convolve(self.kl, np.ones(width), mode="valid")
        order = sorted(range(len(sums)), key=lambda i: (-sums[i], i))
        return [(i, i + width - 1, float(sums[i])) for i in order]

    def measured_windows(self, width: int) -> bool:
        """Whether windows of ``width`` layers were measured together (else `layer_windows` sums)."""
        return self.window_kl is not None and self.window == width

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SENSITIVITY_FORMAT, "schema": 1, "model": self.model, "source": self.source,
            "layers": [{"layer": i, "kl": float(k), "dropped_mass": float(d), "weight": float(self.weights[i].mean())}
                       for i, (k, d) in enumerate(zip(self.kl, self.dropped, strict=True))],
            "head_weights": [[round(float(w), 6) for w in row] for row in self.weights],
        } | ({} if self.window_kl is None else {
            "window": self.window,
            "windows": [{"first": i, "last": i + self.window - 1, "kl": float(k)} for i, k in enumerate(self.window_kl)]})

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model: Any = None) -> Sensitivity:
        """Read and validate ``path``; with ``model`` (an identity, a run's or a policy's), also
        check it was measured on that model."""
        d = load_json(path, what="sensitivity file", fix="re-create it with `attnlab policy sensitivity`", error=PolicyError)
        if not isinstance(d, dict) or d.get("format") != SENSITIVITY_FORMAT:
            raise _err(path, f"is not an attnlab sensitivity file (no \"format\": \"{SENSITIVITY_FORMAT}\")",
                       "give the JSON `attnlab policy sensitivity` wrote")
        try:
            ident = ModelIdentity.from_dict(d.get("model"), where=str(path))
        except IdentityError as exc:
            raise PolicyError(str(exc)) from None
        layers, rows = d.get("layers"), d.get("head_weights")
        if not isinstance(layers, list) or len(layers) != ident.n_layers:
            raise _err(path, f"\"layers\" must list {ident.n_layers} layers (the model's)")
        try:
            kl = np.array([float(x["kl"]) for x in layers])
            dropped = np.array([float(x["dropped_mass"]) for x in layers])
            weights = np.array(rows, dtype=float)
        except (TypeError, KeyError, ValueError):
            raise _err(path, "a layer lacks a numeric kl or dropped_mass, or head_weights is not a table of numbers") from None
        if weights.shape != (ident.n_layers, ident.n_heads):
            raise _err(path, f"head_weights is {list(weights.shape)}, not [{ident.n_layers}, {ident.n_heads}] (layers x heads)")
        if not np.isfinite(weights).all() or (weights < 0).any() or not weights.any():
            raise _err(path, "head_weights must be finite, non-negative and not all zero")
        win_kl = None
        if "windows" in d or "window" in d:
            win, wins = d.get("window"), d.get("windows")
            if not (isinstance(win, int) and not isinstance(win, bool) and 1 <= win <= ident.n_layers):
                raise _err(path, f"\"window\" must be a whole number of layers in [1, {ident.n_layers}], got {win!r}")
            n_win = ident.n_layers - win + 1
            try:
                ok = isinstance(wins, list) and len(wins) == n_win and all(
                    int(w["first"]) == i and int(w["last"]) == i + win - 1 for i, w in enumerate(wins))
                win_kl = np.array([float(w["kl"]) for w in wins]) if ok else None
            except (TypeError, KeyError, ValueError):
                ok = False
            if not ok or not np.isfinite(win_kl).all():
                raise _err(path, f"\"windows\" must list the {n_win} windows of {win} layers in order, each with "
                                 "first, last and a finite kl")
        out = cls(ident.to_dict(), kl, dropped, weights, d.get("source") if isinstance(d.get("source"), dict) else {},
                  win_kl)
        if model is not None:
            try:
                ModelIdentity.from_dict(model).check(ident, subject=f"sensitivity file {path}",
                                                     fix="measure it on this model (attnlab policy sensitivity)")
            except IdentityError as exc:
                raise PolicyError(str(exc)) from None
        return out


def head_weights(kl: np.ndarray, dropped: np.ndarray, n_heads: int) -> np.ndarray:
    """``[L, n_heads]``: layer ``L``'s heads weigh ``kl[L] / dropped[L]``, scaled to mean 1 and
    held within ``[1/CLIP, CLIP]`` of it; a layer with nothing dropped gets the median of the
    measured layers (all 1 when no layer dropped anything)."""
    measured = dropped > _NOTHING_DROPPED
    per = np.ones(len(kl))
    if measured.any():
        raw = np.maximum(kl[measured], 0.0) / dropped[measured]
        if raw.max() > 0:
            per[measured] = raw
            per[~measured] = float(np.median(raw))
            for _ in range(100):  # clip and rescale until both hold (a few rounds)
                per = per / per.mean()
                if per.max() <= CLIP * (1 + 1e-9) and per.min() >= (1 - 1e-9) / CLIP:
                    break
                per = np.clip(per, 1.0 / CLIP, CLIP)
    return np.repeat(per[:, None], n_heads, axis=1)


def dropped_mass(policy: Policy) -> np.ndarray:
    """``[L]``: the sum over each layer's heads of ``1 - expected_recall`` (the policy's own
    estimates; one clear error when a head has none)."""
    out = np.zeros(policy.n_layers)
    for e in policy.heads:
        if e.kind == "dense":
            continue
        if e.expected_recall is None or not math.isfinite(e.expected_recall):
            raise PolicyError(f"head (layer {e.layer}, head {e.head}) of the policy has no expected recall, so the mass it "
                              "drops is unknown: measure a policy made by `attnlab policy make` or `policy compare "
                              "--save-policies`")
        out[e.layer] += max(0.0, 1.0 - float(e.expected_recall))
    return out


def _log_probs(model, ids: torch.Tensor, fn, keep: int) -> torch.Tensor:
    """Next-token log-probabilities of the last ``keep`` positions (0: all)."""
    with route_attention(model, fn):
        logits = model.hf_model(ids.to(model.device), use_cache=False, logits_to_keep=keep).logits
    return torch.log_softmax(logits[0].float(), dim=-1)


def _only(ex: PolicyExecutor, layers: frozenset[int]):
    """An attention function that runs ``layers`` under the policy and every other layer densely."""

    def fn(layer, query, key, value, *, scaling, attention_mask=None, variant=None):
        if layer in layers:
            return ex.attention(layer, query, key, value, scaling=scaling, attention_mask=attention_mask,
                                **({} if variant is None else {"variant": variant}))
        return attend(query, key, value, scaling=scaling, variant=variant)

    return fn


@torch.no_grad()
def layer_sensitivity(model, policy: Policy, prompts: Sequence[Any], *, executor: str = "flex",
                      focus_last: int | None = None, window: int | None = None, progress: bool = True) -> Sensitivity:
    """Measure ``policy``'s per-layer damage on ``prompts`` (each with ``input_ids [1, n]``)
    with ``model`` (a `LoadedModel`): one dense forward and one per layer per prompt.

    ``focus_last``: the KL is averaged over the last ``focus_last`` positions of each prompt only
    (where a task prompt's question and answer start sit: the damage an answer sees) instead
    of every position. ``window``: also measure every run of ``window`` adjacent layers under
    the policy together (one more forward per window per prompt; ``Sensitivity.window_kl``)."""
    if not prompts:
        raise PolicyError("no prompts to measure sensitivity on: give at least one")
    if window is not None and (not isinstance(window, int) or isinstance(window, bool)
                               or not 1 <= window <= policy.n_layers):
        raise PolicyError(f"window must be a whole number of layers in [1, {policy.n_layers}] (the policy's layers), "
                          f"got {window!r}")
    if focus_last is not None and (not isinstance(focus_last, int) or isinstance(focus_last, bool) or focus_last < 1):
        raise PolicyError(f"focus_last must be a whole number of tokens >= 1, got {focus_last!r}")
    short = [p for p in prompts if int(p.input_ids.shape[-1]) < (focus_last or 1)]
    if short:
        raise PolicyError(f"a prompt of {int(short[0].input_ids.shape[-1])} tokens is shorter than --focus-last {focus_last}: "
                          "give a smaller --focus-last or longer prompts")
    keep = int(focus_last or 0)
    ex = PolicyExecutor(policy, executor)
    ex.check_model(model)
    dropped = dropped_mass(policy)
    nl = policy.n_layers
    kl = np.zeros(nl)
    measured = [lay for lay in range(nl) if dropped[lay] > _NOTHING_DROPPED]
    # (what is measured, layers run sparse): single layers, then windows with anything dropped
    groups: list[tuple[tuple[str, int], frozenset[int]]] = [(("layer", lay), frozenset([lay])) for lay in measured]
    win_kl = None
    if window is not None:
        win_kl = np.zeros(nl - window + 1)
        groups += [] if window == 1 else [(("window", i), frozenset(range(i, i + window))) for i in range(nl - window + 1)
                   if dropped[i:i + window].max() > _NOTHING_DROPPED]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(prompts) * (1 + len(groups)), desc="sensitivity", unit="forward", disable=not progress or None)
    for p in prompts:
        ids = p.input_ids
        dense = _log_probs(model, ids, None, keep)
        bar.update()
        p_dense = dense.exp()
        for (what, i), layers in groups:
            sparse = _log_probs(model, ids, _only(ex, layers), keep)
            value = float((p_dense * (dense - sparse)).sum(-1).mean()) / len(prompts)
            if what == "layer":
                kl[i] += value
            else:
                win_kl[i] += value
            bar.update()
    bar.close()
    if window == 1:
        win_kl = kl.copy()  # a window of one layer is that layer
    run = policy.source_run if isinstance(policy.source_run, dict) else {}
    source = {"policy": f"made from {run['path']}" if run.get("path") else "", "block_size": policy.block_size,
              "prompts": len(prompts), "lengths": sorted({int(p.input_ids.shape[-1]) for p in prompts}),
              "executor": executor, "focus_last": focus_last,
              "measure": "KL(dense || only this layer sparse), mean over "
                         + (f"the last {focus_last} positions" if focus_last else "positions") + " and prompts"
                         + (f"; windows of {window} adjacent layers sparse together" if window else "")}
    return Sensitivity.from_measure(model.identity().to_dict(), kl, dropped, policy.n_heads, source, window_kl=win_kl)
