"""The policy file: per head, what attention it keeps, why, and at what expected recall and cost.

A policy is JSON (``policy.json``)::

    {
      "format": "attnlab-policy", "schema": 1,
      "model": {"name": ..., "n_layers": 30, "n_heads": 9, "n_kv_heads": 3, "head_dim": 64, "n_ctx": 8192,
                "fingerprint": "1d153e848eecd09c", ...},
      "block_size": 64,
      "budget": {"kind": "density", "value": 0.15, "expected": 0.1496},
      "profiled_lengths": [...], "eval_lengths": [...],
      "summary": {"expected_recall": 0.93, "optimality_gap": 0.0, ...},
      "source_run": {"path": "runs/r1", "name": "r1", "created": "..."},
      "heads": [
        {"layer": 0, "head": 0, "kv_head": 0, "kind": "streaming",
         "params": {"sink": {"alpha": 64, "beta": 0.0}, "window": {"alpha": 512, "beta": 0.0}},
         "expected_recall": 0.981, "expected_density": 0.094, "density_is": "exact",
         "reason": "..."},
        ...
      ]
    }

Schema 2 adds an optional ``decode`` section: per KV head (the cache is per KV head; the query
heads of a group share it), what the KV cache keeps while generating::

      "decode": {"heads": [
        {"layer": 0, "kv_head": 0, "kind": "full", "params": {}},
        {"layer": 0, "kv_head": 1, "kind": "streaming", "params": {"sink": 4, "recent": 256}},
        {"layer": 1, "kv_head": 0, "kind": "snapkv",
         "params": {"budget": {"alpha": 0, "beta": 0.25}, "window": 32, "kernel": 7, "sink": 4}},
        ...]}

``full`` keeps every token; ``streaming`` keeps the first ``sink`` and the last ``recent`` tokens
(StreamingLLM, DuoAttention's streaming heads); ``snapkv`` keeps, at the end of prefill, ``budget``
prompt tokens (a size, elastic in the prompt length N): the ``sink`` first and the last
``window`` (the observation window) always, the rest the keys the last ``window`` queries attend
to most (their attention summed over queries and the group's query heads, max-pooled over key
positions with kernel ``kernel``), as SnapKV does; tokens generated afterwards are all kept.
``streaming`` and ``snapkv`` take an optional ``"compensation": true`` (RazorAttention): the
tokens the head drops are summarised as one extra cache entry, their mean key and mean value,
whose attention counts for as many tokens as it stands for (its logit plus ``log n_dropped``);
absent means false. A schema 1 file (or ``"decode": null``) has no decode phase: the cache keeps everything
(`Policy.decode_note` says so). A policy without a decode section is still written as schema 1.

Sizes are elastic (``alpha + beta * N`` tokens, see `attnlab.sparsity_stats.kinds.Elastic`).
``density_is`` says whether ``expected_density`` is exact for any input (static kinds, fixed
top-k), an upper bound (vertical-slash) or an expectation over the profile (gamma threshold).
`Policy.load` validates everything and names the head and field of the first problem.

The ``model`` entry is the model's `attnlab.identity.ModelIdentity` (`Policy.identity`);
`Policy.check_model` asks the one compatibility check whether a model fits the policy. Files
written before identities had a weights fingerprint are matched by name and shapes.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from attnlab.identity import IdentityError, ModelIdentity
from attnlab.runs import load_json, write_json

from .dynamic import STRIDES, XATTENTION_DEFAULTS
from .errors import (
    ERR_FIELD,
    ERR_FOREIGN,
    ERR_HEAD_COUNT,
    ERR_HEAD_DUPLICATE,
    ERR_HEAD_MISSING,
    ERR_POLICY_SCHEMA,
    MaskError,
    PolicyError,
    PolicyModelError,
)
from .kinds import Candidate, Elastic, get_kind
from .masks import check_block_size

POLICY_FORMAT = "attnlab-policy"
POLICY_SCHEMA = 2
#: Schemas this attnlab reads: 1 (prefill only) and 2 (with an optional decode section).
POLICY_SCHEMAS = (1, 2)
DENSITY_IS = ("exact", "upper_bound", "expected")


#: Largest block size a policy may carry (kernels tile at 16 to 128 tokens).
MAX_BLOCK_SIZE = 4096
#: Largest token count (a size's ``alpha``, a length) a policy may carry.
MAX_TOKENS = 1 << 31
#: The estimation rule each dynamic kind may carry in ``params.estimate``, with the fields the
#: rule takes (name -> check, message). What attnlab executes: MInference's last-queries rule for
#: vertical-slash heads; for block top-k heads FlexPrefill's mean-pooled q/k blocks (the default)
#: or XAttention's strided antidiagonal scores (``stride`` queries and keys per antidiagonal).
ESTIMATE_RULES: dict[str, dict[str, dict[str, tuple[Any, str]]]] = {
    "vertical_slash": {"last_q": {"last_q": (lambda v: _is_int(v) and 1 <= v <= MAX_TOKENS, f"a whole number of queries in [1, {MAX_TOKENS}]")}},
    "block_topk": {"pooled_qk": {"pool": (lambda v: v == "mean", "'mean'")},
                   "antidiagonal": {"stride": (lambda v: _is_int(v) and v in STRIDES, f"one of {', '.join(map(str, STRIDES))}")}},
}


def antidiagonal_stride(kind: str, params: Mapping[str, Any]) -> int | None:
    """The stride of the antidiagonal scores a head chooses its blocks from: an ``xattention``
    head's ``params.stride``, a ``block_topk`` head's ``params.estimate.stride`` under rule
    ``antidiagonal`` (8 when not given, XAttention's default); None for any other head."""
    if kind == "xattention":
        return int(params["stride"])
    est = params.get("estimate") if kind == "block_topk" else None
    if isinstance(est, Mapping) and est.get("rule") == "antidiagonal":
        return int(est.get("stride", XATTENTION_DEFAULTS["stride"]))
    return None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _finite(x: Any) -> bool:
    return _is_int(x) or (_is_num(x) and math.isfinite(x))


def _check_sizes(params: Any, sizes: tuple[str, ...], where: str) -> None:
    """Every size of the kind (``sizes``) in ``params`` is a number or ``{"alpha": a, "beta": b}``
    of numbers, finite, with ``alpha`` at most `MAX_TOKENS` tokens and ``beta`` a share of the
    sequence in [0, 1]; the kind checks the rest (`Kind.validate`)."""
    if not isinstance(params, Mapping):
        return
    for key in sizes:
        if key not in params:
            continue
        value = params[key]
        alpha, beta = (value.get("alpha"), value.get("beta", 0.0)) if isinstance(value, Mapping) else (value, 0.0)
        if not (_is_num(alpha) and _is_num(beta)):
            raise PolicyError(ERR_FIELD.format(where=where, field=f"params.{key}", problem=f"must be a size in tokens (a number, or {{\"alpha\": a, \"beta\": b}}), got {_short(value)}", fix="fix the value"))
        if _is_num(alpha) and not (_finite(alpha) and abs(alpha) <= MAX_TOKENS):
            raise PolicyError(ERR_FIELD.format(where=where, field=f"params.{key}", problem=f"must be a finite size of at most {MAX_TOKENS} tokens, got {_short(alpha)}", fix="fix the value"))
        if _is_num(beta) and not (_finite(beta) and 0 <= beta <= 1):
            raise PolicyError(ERR_FIELD.format(where=where, field=f"params.{key}.beta", problem=f"must be a share of the sequence in [0, 1], got {_short(beta)}", fix="fix the value"))


def _check_estimate(kind: str, params: dict[str, Any], raw: Any, where: str) -> None:
    """A dynamic head's ``params.estimate``: a rule attnlab executes for its kind, with that
    rule's fields in range. An unknown rule is an error naming the allowed ones (never the
    default in disguise); an absent ``estimate`` is the kind's default rule."""
    rules = ESTIMATE_RULES.get(kind)
    if rules is None or "estimate" not in (raw if isinstance(raw, Mapping) else {}):
        return
    est = params["estimate"]
    rule = est.get("rule")
    if not isinstance(rule, str) or rule not in rules:
        raise PolicyError(ERR_FIELD.format(where=where, field="params.estimate.rule", problem=f"is {_short(rule)}, not a rule kind {kind!r} can use", fix=f"use {' or '.join(map(repr, rules))} (or drop 'estimate' for the default)"))
    fields = rules[rule]
    for key, value in est.items():
        if key == "rule":
            continue
        if key not in fields:
            raise PolicyError(ERR_FIELD.format(where=where, field=f"params.estimate.{key}", problem=f"is not a field of rule {rule!r}", fix=f"remove it (the rule takes {', '.join(fields) or 'nothing'})"))
        ok, wanted = fields[key]
        if not ok(value):
            raise PolicyError(ERR_FIELD.format(where=where, field=f"params.estimate.{key}", problem=f"must be {wanted}, got {_short(value)}", fix="fix the value"))


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters (a hostile file's value can be huge)."""
    try:
        text = repr(value)
    except ValueError:  # an integer beyond the digit limit of str()
        text = "an integer of thousands of digits"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_lengths(value: Any, field_name: str, where: str) -> list[int]:
    """A list of token counts in [1, `MAX_TOKENS`] (None or absent: empty)."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(_is_int(x) and 0 < x <= MAX_TOKENS for x in value):
        raise PolicyError(ERR_FIELD.format(where=where, field=field_name, problem=f"must be a list of token counts in [1, {MAX_TOKENS}], got {_short(value)}", fix="regenerate the policy"))
    return list(value)


def _check_object(value: Any, field_name: str, where: str) -> dict[str, Any]:
    """An optional JSON object (None or absent: empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PolicyError(ERR_FIELD.format(where=where, field=field_name, problem=f"must be an object, got {type(value).__name__}", fix="regenerate the policy"))
    return dict(value)


def _check_budget(value: Any, where: str) -> dict[str, Any] | None:
    """The optional ``budget`` entry: ``kind`` density or kv, ``value`` in (0, 1], ``expected`` finite."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise PolicyError(ERR_FIELD.format(where=where, field="budget", problem=f"must be an object or null, got {type(value).__name__}", fix="regenerate the policy"))
    if "kind" in value and value["kind"] not in ("density", "kv"):
        raise PolicyError(ERR_FIELD.format(where=where, field="budget.kind", problem=f"is {_short(value['kind'])}", fix="use 'density' or 'kv'"))
    v = value.get("value")
    if v is not None and not (_finite(v) and 0 < v <= 1):
        raise PolicyError(ERR_FIELD.format(where=where, field="budget.value", problem=f"must be in (0, 1], got {_short(v)}", fix="regenerate the policy"))
    e = value.get("expected")
    if e is not None and not (_finite(e) and 0 <= e <= 1 + 1e-9):
        raise PolicyError(ERR_FIELD.format(where=where, field="budget.expected", problem=f"must be in [0, 1], got {_short(e)}", fix="regenerate the policy"))
    return dict(value)


def finite_json(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf) replaced by None: what a policy file holds
    for "not measured", since a bare ``NaN`` is not JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    if hasattr(obj, "item") and hasattr(obj, "dtype") and getattr(obj, "ndim", 1) == 0:  # numpy/torch scalars
        return finite_json(obj.item())
    return obj


def model_entry(model: Any, where: str) -> dict[str, Any]:
    """A policy's ``model`` entry, as the plain dict the file stores: read as a `ModelIdentity`
    (positive layer and head counts), with ``n_kv_heads`` (default ``n_heads``) dividing
    ``n_heads``. `PolicyError` names the field otherwise."""
    if not isinstance(model, Mapping):
        raise PolicyError(ERR_FIELD.format(where=where, field="model", problem="must be an object", fix="give name, n_layers, n_heads, n_kv_heads"))
    try:
        identity = ModelIdentity.from_dict(model, where=where)
    except IdentityError as exc:
        raise PolicyError(str(exc)) from None
    if identity.n_heads % identity.n_kv_heads:
        raise PolicyError(ERR_FIELD.format(where=where, field="model.n_kv_heads", problem=f"must divide n_heads={identity.n_heads}, got {identity.n_kv_heads!r}", fix="copy the model identity from the run's manifest"))
    out = dict(model)
    out.update(n_layers=identity.n_layers, n_heads=identity.n_heads, n_kv_heads=identity.n_kv_heads)
    return out


def _identity_of(model: Any) -> ModelIdentity:
    """The `ModelIdentity` of a `LoadedModel`, an identity, or an identity mapping."""
    if callable(getattr(model, "identity", None)):
        return model.identity()
    return ModelIdentity.from_dict(model, where="the target model")


@dataclass
class HeadPolicy:
    """One head's entry: kind, validated parameters, expected recall and density, and why."""

    layer: int
    head: int
    kv_head: int
    kind: str
    params: dict[str, Any]
    expected_recall: float | None = None
    expected_density: float | None = None
    reason: str = ""
    density_is: str = "exact"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def candidate(self) -> Candidate:
        return Candidate.make(self.kind, **get_kind(self.kind).to_json(self.params))

    @property
    def static(self) -> bool:
        return get_kind(self.kind).static

    def describe(self) -> str:
        return get_kind(self.kind).describe(self.params)

    def to_json(self) -> dict[str, Any]:
        out = {
            "layer": self.layer,
            "head": self.head,
            "kv_head": self.kv_head,
            "kind": self.kind,
            "params": get_kind(self.kind).to_json(self.params),
            "expected_recall": None if self.expected_recall is None else round(float(self.expected_recall), 6),
            "expected_density": None if self.expected_density is None else round(float(self.expected_density), 6),
            "density_is": self.density_is,
            "reason": self.reason,
        }
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, d: Any, where: str, model: dict[str, Any]) -> HeadPolicy:
        if not isinstance(d, dict):
            raise PolicyError(ERR_FIELD.format(where=where, field="heads[]", problem="must be an object", fix="regenerate the policy"))
        for key in ("layer", "head"):
            if not _is_int(d.get(key)):
                raise PolicyError(ERR_FIELD.format(where=where, field=key, problem=f"must be an integer, got {_short(d.get(key))}", fix="regenerate the policy"))
        layer, head = d["layer"], d["head"]
        where = f"{where}: head (layer {layer}, head {head})"
        if not 0 <= layer < model["n_layers"]:
            raise PolicyError(ERR_FIELD.format(where=where, field="layer", problem=f"is outside [0, {model['n_layers']})", fix="the policy is for another model; regenerate it"))
        if not 0 <= head < model["n_heads"]:
            raise PolicyError(ERR_FIELD.format(where=where, field="head", problem=f"is outside [0, {model['n_heads']})", fix="the policy is for another model; regenerate it"))
        group = model["n_heads"] // model["n_kv_heads"]
        kv = d.get("kv_head", head // group)
        if not _is_int(kv) or kv != head // group:
            raise PolicyError(ERR_FIELD.format(where=where, field="kv_head", problem=f"is {_short(kv)} but query head {head} reads KV head {head // group}", fix=f"set it to {head // group}"))
        if "kind" not in d:
            raise PolicyError(ERR_FIELD.format(where=where, field="kind", problem="is missing", fix="add one of dense, streaming, a_shape, vertical_slash, block_topk"))
        kind = get_kind(d["kind"], where)
        if "params" not in d:
            raise PolicyError(ERR_FIELD.format(where=where, field="params", problem="is missing", fix="add the kind's parameters ({} for dense)"))
        _check_sizes(d["params"], kind.sizes, where)
        params = kind.validate(d["params"], where)
        _check_estimate(kind.name, params, d["params"], where)
        vals = {}
        for key in ("expected_recall", "expected_density"):
            v = d.get(key)
            if v is not None and (not _finite(v) or not 0 <= v <= 1 + 1e-9):
                raise PolicyError(ERR_FIELD.format(where=where, field=key, problem=f"must be in [0, 1] or null, got {_short(v)}", fix="regenerate the policy"))
            vals[key] = None if v is None else float(v)
        density_is = d.get("density_is", "exact")
        if not isinstance(density_is, str) or density_is not in DENSITY_IS:
            raise PolicyError(ERR_FIELD.format(where=where, field="density_is", problem=f"is {_short(density_is)}", fix=f"use one of {', '.join(DENSITY_IS)}"))
        reason = d.get("reason", "")
        if not isinstance(reason, str):
            raise PolicyError(ERR_FIELD.format(where=where, field="reason", problem="must be a string", fix="regenerate the policy"))
        known = {"layer", "head", "kv_head", "kind", "params", "expected_recall", "expected_density", "density_is", "reason"}
        extra = {k: v for k, v in d.items() if k not in known}
        return cls(layer, head, head // group, d["kind"], params, vals["expected_recall"], vals["expected_density"], reason, density_is, extra)


# -- decode phase ---------------------------------------------------------------------------------
#: What a KV head's cache may keep while generating (see the module docstring).
DECODE_KINDS = ("full", "streaming", "snapkv")
#: The parameters of each decode kind: name -> (check, what it must be, default or None = required).
_DECODE_PARAMS: dict[str, dict[str, tuple[Any, str, Any]]] = {
    "full": {},
    "streaming": {
        "sink": (lambda v: _is_int(v) and 0 <= v <= MAX_TOKENS, f"a whole number of tokens in [0, {MAX_TOKENS}]", 4),
        "recent": (lambda v: _is_int(v) and 1 <= v <= MAX_TOKENS, f"a whole number of tokens in [1, {MAX_TOKENS}]", None),
        "compensation": (lambda v: isinstance(v, bool), "true or false", False),
    },
    "snapkv": {
        "budget": (None, "a size in tokens (a number, or {\"alpha\": a, \"beta\": b})", None),
        "window": (lambda v: _is_int(v) and 1 <= v <= MAX_TOKENS, f"a whole number of queries in [1, {MAX_TOKENS}]", 32),
        "kernel": (lambda v: _is_int(v) and 1 <= v <= 1023 and v % 2 == 1, "an odd whole number in [1, 1023]", 7),
        "sink": (lambda v: _is_int(v) and 0 <= v <= MAX_TOKENS, f"a whole number of tokens in [0, {MAX_TOKENS}]", 4),
        "compensation": (lambda v: isinstance(v, bool), "true or false", False),
    },
}
#: Optional decode parameters: kept in `DecodeHead.params` (and written) only when they differ
#: from their default, so files written before they existed read and write as before.
_DECODE_OPTIONAL = {"compensation": False}
DECODE_NOTE_NONE = "the policy has no decode phase (schema 1 or no 'decode' section): decode keeps the full KV cache"


@dataclass(frozen=True)
class DecodeHead:
    """One KV head's cache during generation: ``kind`` (`DECODE_KINDS`) and its parameters
    (``snapkv``'s ``budget`` an `Elastic` size, the rest whole numbers)."""

    layer: int
    kv_head: int
    kind: str = "full"
    params: Mapping[str, Any] = field(default_factory=dict)
    reason: str = ""

    @property
    def compensation(self) -> bool:
        """Whether the head keeps RazorAttention's compensation token: one extra entry, the
        mean key and mean value of every token it dropped (standing for all of them)."""
        return bool(self.params.get("compensation", False))

    def prompt_tokens_kept(self, n: int) -> int:
        """Prompt tokens the head holds after a prefill of ``n`` tokens (before any decode step;
        the compensation entry not counted)."""
        if self.kind == "streaming":
            return min(n, self.params["sink"] + self.params["recent"])
        if self.kind == "snapkv":
            floor = self.params["sink"] + self.params["window"]
            return min(n, max(floor, self.params["budget"].resolve(n)))
        return n

    def tokens_kept(self, n: int, generated: int = 0) -> int:
        """Entries held after a prefill of ``n`` tokens and ``generated`` decode steps that each
        added one token: ``full`` all, ``streaming`` at most ``sink + recent``, ``snapkv`` its
        prompt selection plus every generated token; plus the compensation entry when the head
        has one and has dropped a token."""
        if self.kind == "streaming":
            kept = min(n + generated, self.params["sink"] + self.params["recent"])
            return kept + int(self.compensation and kept < n + generated)
        kept = self.prompt_tokens_kept(n)
        return kept + generated + int(self.compensation and kept < n)

    def describe(self) -> str:
        p = self.params
        comp = " + compensation token" if self.compensation else ""
        if self.kind == "streaming":
            return f"streaming cache sink {p['sink']} + recent {p['recent']}{comp}"
        if self.kind == "snapkv":
            return f"snapkv cache of {p['budget']} tokens (window {p['window']}, pool {p['kernel']}, sink {p['sink']}){comp}"
        return "full cache"

    def to_json(self) -> dict[str, Any]:
        params = {k: (v.to_json() if isinstance(v, Elastic) else v) for k, v in self.params.items()}
        out: dict[str, Any] = {"layer": self.layer, "kv_head": self.kv_head, "kind": self.kind, "params": params}
        if self.reason:
            out["reason"] = self.reason
        return out

    @classmethod
    def make(cls, layer: int, kv_head: int, kind: str = "full", reason: str = "", **params: Any) -> DecodeHead:
        """A validated entry from keyword parameters (missing ones take their defaults)."""
        raw = {"layer": layer, "kv_head": kv_head, "kind": kind, "params": params, "reason": reason}
        return cls.from_json(raw, "decode policy", None)

    @classmethod
    def from_json(cls, d: Any, where: str, model: Mapping[str, Any] | None) -> DecodeHead:
        if not isinstance(d, dict):
            raise PolicyError(ERR_FIELD.format(where=where, field="decode.heads[]", problem="must be an object", fix="regenerate the policy"))
        for key in ("layer", "kv_head"):
            if not _is_int(d.get(key)):
                raise PolicyError(ERR_FIELD.format(where=where, field=f"decode.heads[].{key}", problem=f"must be an integer, got {_short(d.get(key))}", fix="regenerate the policy"))
        layer, kv = d["layer"], d["kv_head"]
        where = f"{where}: decode head (layer {layer}, kv_head {kv})"
        if model is not None:
            if not 0 <= layer < model["n_layers"]:
                raise PolicyError(ERR_FIELD.format(where=where, field="layer", problem=f"is outside [0, {model['n_layers']})", fix="the policy is for another model; regenerate it"))
            if not 0 <= kv < model["n_kv_heads"]:
                raise PolicyError(ERR_FIELD.format(where=where, field="kv_head", problem=f"is outside [0, {model['n_kv_heads']})", fix="the policy is for another model; regenerate it"))
        kind = d.get("kind")
        if not isinstance(kind, str) or kind not in DECODE_KINDS:
            raise PolicyError(ERR_FIELD.format(where=where, field="kind", problem=f"is {_short(kind)}", fix=f"use one of {', '.join(DECODE_KINDS)}"))
        raw = d.get("params", {})
        if not isinstance(raw, dict):
            raise PolicyError(ERR_FIELD.format(where=where, field="params", problem=f"must be an object, got {type(raw).__name__}", fix="give the kind's parameters ({} for full)"))
        allowed = _DECODE_PARAMS[kind]
        for key in raw:
            if key not in allowed:
                raise PolicyError(ERR_FIELD.format(where=where, field=f"params.{key}", problem=f"is not a parameter of decode kind {kind!r}", fix=f"remove it (the kind takes {', '.join(allowed) or 'nothing'})"))
        params: dict[str, Any] = {}
        for key, (ok, wanted, default) in allowed.items():
            if key not in raw:
                if default is None:
                    raise PolicyError(ERR_FIELD.format(where=where, field=f"params.{key}", problem="is missing", fix=f"add it ({wanted})"))
                params[key] = default
                continue
            value = raw[key]
            if key == "budget":
                _check_sizes(raw, ("budget",), where)
                params[key] = Elastic.parse(value, where, "params.budget")
            elif not ok(value):
                raise PolicyError(ERR_FIELD.format(where=where, field=f"params.{key}", problem=f"must be {wanted}, got {_short(value)}", fix="fix the value"))
            else:
                params[key] = value
        for key, default in _DECODE_OPTIONAL.items():  # an optional field at its default is not kept (nor written)
            if key in params and params[key] == default:
                del params[key]
        if kind == "snapkv":
            b = params["budget"]
            if b.beta == 0 and b.alpha < params["sink"] + params["window"]:
                raise PolicyError(ERR_FIELD.format(where=where, field="params.budget", problem=f"is {b} tokens, fewer than sink {params['sink']} + window {params['window']} it always keeps", fix="raise the budget or lower sink/window"))
        reason = d.get("reason", "")
        if not isinstance(reason, str):
            raise PolicyError(ERR_FIELD.format(where=where, field="reason", problem="must be a string", fix="regenerate the policy"))
        return cls(layer, kv, kind, params, reason)


def _check_decode(value: Any, model: Mapping[str, Any], path: str) -> dict[tuple[int, int], DecodeHead] | None:
    """The optional ``decode`` section: null, or ``{"heads": [...]}`` with exactly one valid entry
    per (layer, kv_head) of the model."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise PolicyError(ERR_FIELD.format(where=path, field="decode", problem=f"must be an object or null, got {type(value).__name__}", fix="regenerate the policy"))
    unknown = [k for k in value if k != "heads"]
    if unknown:
        raise PolicyError(ERR_FIELD.format(where=path, field="decode." + "".join(c if c.isprintable() else "?" for c in str(unknown[0])[:30]), problem="is not a field of the decode section", fix="remove it (the section holds 'heads')"))
    raw = value.get("heads")
    if not isinstance(raw, list):
        raise PolicyError(ERR_FIELD.format(where=path, field="decode.heads", problem="must be a list", fix="regenerate the policy"))
    out: dict[tuple[int, int], DecodeHead] = {}
    for item in raw:
        e = DecodeHead.from_json(item, path, model)
        if (e.layer, e.kv_head) in out:
            raise PolicyError(f"policy {path} lists decode head (layer {e.layer}, kv_head {e.kv_head}) twice: keep one entry per (layer, kv_head)")
        out[(e.layer, e.kv_head)] = e
    for layer in range(model["n_layers"]):
        for kv in range(model["n_kv_heads"]):
            if (layer, kv) not in out:
                raise PolicyError(f"policy {path} has no decode entry for (layer {layer}, kv_head {kv}): every (layer, kv_head) needs exactly one")
    return out


@dataclass
class Policy:
    """A per-head sparse-attention policy for one model (see the module docstring for the file).

    Make one with `PolicyGenerator.emit`, `Policy.load`, or an importer
    (`attnlab.sparsity_stats.export`); compile it with `Policy.compile`.
    """

    model: dict[str, Any]
    block_size: int
    heads: list[HeadPolicy]
    source_run: dict[str, Any] | None = None
    budget: dict[str, Any] | None = None
    profiled_lengths: list[int] = field(default_factory=list)
    eval_lengths: list[int] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    generator: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    schema: int = POLICY_SCHEMA
    #: Per (layer, kv_head) decode entries (`DecodeHead`), or None: no decode phase (full cache).
    decode: dict[tuple[int, int], DecodeHead] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.model, ModelIdentity):
            self.model = self.model.to_dict()
        if self.decode is not None and not isinstance(self.decode, dict):
            self.decode = {(e.layer, e.kv_head): e for e in self.decode}
        self.heads = sorted(self.heads, key=lambda e: (e.layer, e.head))
        self._index = {(e.layer, e.head): e for e in self.heads}

    # -- access --------------------------------------------------------------------------
    @property
    def identity(self) -> ModelIdentity:
        """The model this policy was made for (its ``model`` entry as a `ModelIdentity`)."""
        return ModelIdentity.from_dict(self.model, where="the policy's model entry")

    @property
    def n_layers(self) -> int:
        return int(self.model["n_layers"])

    @property
    def n_heads(self) -> int:
        return int(self.model["n_heads"])

    def entry(self, layer: int, head: int) -> HeadPolicy:
        return self._index[(layer, head)]

    def layer(self, layer: int) -> list[HeadPolicy]:
        """The layer's entries, ordered by head."""
        return [self._index[(layer, h)] for h in range(self.n_heads)]

    @property
    def expected_recall(self) -> float | None:
        vals = [e.expected_recall for e in self.heads]
        return None if any(v is None for v in vals) else sum(vals) / len(vals)

    @property
    def expected_density(self) -> float | None:
        vals = [e.expected_density for e in self.heads]
        return None if any(v is None for v in vals) else sum(vals) / len(vals)

    @property
    def n_kv_heads(self) -> int:
        return int(self.model.get("n_kv_heads") or self.model["n_heads"])

    @property
    def has_decode(self) -> bool:
        """Whether the policy has a decode section (else the cache keeps every token)."""
        return self.decode is not None

    def decode_note(self) -> str | None:
        """A line saying the policy has no decode phase (decode keeps the full cache), or None."""
        return None if self.has_decode else DECODE_NOTE_NONE

    def decode_head(self, layer: int, kv_head: int) -> DecodeHead:
        """What KV head ``kv_head`` of ``layer`` keeps while generating (``full`` without a decode section)."""
        if self.decode is None:
            return DecodeHead(layer, kv_head, "full", {})
        return self.decode[(layer, kv_head)]

    def decode_heads(self) -> list[DecodeHead]:
        """Every (layer, kv_head)'s decode entry, by layer then KV head."""
        return [self.decode_head(la, kv) for la in range(self.n_layers) for kv in range(self.n_kv_heads)]

    def with_decode(self, heads: Any) -> Policy:
        """A copy of this policy with the decode entries ``heads`` (`DecodeHead` list or dict;
        None drops the decode phase)."""
        import copy

        out = copy.copy(self)
        out.decode = None if heads is None else {(e.layer, e.kv_head): e for e in (heads.values() if isinstance(heads, dict) else heads)}
        if out.decode is not None:
            _check_decode({"heads": [e.to_json() for e in out.decode.values()]}, self.model, "policy")
        out.schema = POLICY_SCHEMA if out.decode is not None else 1
        out.__post_init__()
        return out

    def predicted_kv_tokens(self, n: int, generated: int = 0) -> int:
        """Tokens the cache holds over all layers and KV heads after a prefill of ``n`` tokens
        and ``generated`` decode steps (`DecodeHead.tokens_kept`)."""
        return sum(e.tokens_kept(n, generated) for e in self.decode_heads())

    def predicted_kv_fraction(self, n: int, generated: int = 0) -> float:
        """`predicted_kv_tokens` over what a full cache holds (every head ``n + generated``)."""
        dense = self.n_layers * self.n_kv_heads * (n + generated)
        return self.predicted_kv_tokens(n, generated) / dense if dense else 1.0

    def to_frame(self) -> pd.DataFrame:
        """One row per head: layer, head, kv_head, kind, description, expected recall/density, reason."""
        rows = [
            {
                "layer": e.layer, "head": e.head, "kv_head": e.kv_head, "kind": e.kind, "policy": e.describe(),
                "expected_recall": e.expected_recall, "expected_density": e.expected_density,
                "density_is": e.density_is, "reason": e.reason,
            }
            for e in self.heads
        ]
        return pd.DataFrame(rows)

    def check_model(self, model: Any, path: str = "policy") -> None:
        """`PolicyModelError` (a `PolicyError` and an `IdentityError`) unless ``model`` (a
        `LoadedModel`, a `ModelIdentity` or an identity mapping) is the model this policy was
        made for; the message names the first field that differs (`ModelIdentity.check`)."""
        ours = _identity_of(model)
        try:
            ours.check(self.identity, subject=f"policy {path}", fix="generate a policy from a run of this model")
        except IdentityError as exc:
            raise PolicyModelError(str(exc)) from None

    # -- compile -------------------------------------------------------------------------
    def compile(self, seq_len: int, block_size: int | None = None, **kwargs: Any):
        """Compile every layer at ``seq_len``: a list of `BlockSparseLayout` (see `compile_policy`)."""
        from .masks import compile_policy

        return compile_policy(self, seq_len, block_size, **kwargs)

    # -- io ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {
            "format": POLICY_FORMAT,
            "schema": POLICY_SCHEMA if self.decode is not None else 1,
            "model": self.model,
            "block_size": self.block_size,
            "budget": self.budget,
            "profiled_lengths": list(self.profiled_lengths),
            "eval_lengths": list(self.eval_lengths),
            "summary": self.summary,
            "generator": self.generator,
            "source_run": self.source_run,
            "created": self.created,
            "heads": [e.to_json() for e in self.heads],
        }
        if self.decode is not None:
            out["decode"] = {"heads": [e.to_json() for e in self.decode_heads()]}
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write the policy as JSON, atomically; a non-finite number (NaN, inf: "not measured")
        is written as null, never as a bare ``NaN``."""
        path = Path(path)
        write_json(path, finite_json(self.to_dict()))
        return path

    @classmethod
    def from_dict(cls, d: Any, model: Any = None, path: str = "policy") -> Policy:
        """Validate a parsed policy; ``model`` (optional: a `LoadedModel`, `ModelIdentity` or
        identity mapping) must fit it (`check_model`)."""
        if not isinstance(d, dict) or d.get("format") != POLICY_FORMAT:
            raise PolicyError(ERR_FOREIGN.format(path=path))
        schema = d.get("schema")
        if not _is_int(schema) or schema not in POLICY_SCHEMAS:
            raise PolicyError(ERR_POLICY_SCHEMA.format(path=path, found=schema if not _is_int(schema) or abs(schema) < 10**12 else _short(schema), expected=" or ".join(map(str, POLICY_SCHEMAS))))
        if schema == 1 and d.get("decode") is not None:
            raise PolicyError(ERR_FIELD.format(where=path, field="decode", problem="needs policy schema 2 (the file says schema 1)", fix="set \"schema\": 2"))
        pmodel = model_entry(d.get("model"), path)
        bs = d.get("block_size")
        try:
            check_block_size(bs if _is_int(bs) and bs <= MAX_BLOCK_SIZE else -1)
        except MaskError:
            raise PolicyError(ERR_FIELD.format(where=path, field="block_size", problem=f"must be a power of two up to {MAX_BLOCK_SIZE}, got {_short(bs)}", fix="use 16, 32, 64 or 128")) from None
        heads_raw = d.get("heads")
        if not isinstance(heads_raw, list):
            raise PolicyError(ERR_FIELD.format(where=path, field="heads", problem="must be a list", fix="regenerate the policy"))
        if model is not None:
            cls(pmodel, bs, []).check_model(model, path)
        expected = pmodel["n_layers"] * pmodel["n_heads"]
        heads: dict[tuple[int, int], HeadPolicy] = {}
        for raw in heads_raw:
            e = HeadPolicy.from_json(raw, path, pmodel)
            if (e.layer, e.head) in heads:
                raise PolicyError(ERR_HEAD_DUPLICATE.format(path=path, head=f"(layer {e.layer}, head {e.head})"))
            heads[(e.layer, e.head)] = e
        for e in heads.values():
            stride = antidiagonal_stride(e.kind, e.params)
            if stride is not None and int(bs) % stride:
                raise PolicyError(ERR_FIELD.format(where=f"{path}: layer {e.layer} head {e.head}", field="params.stride" if e.kind == "xattention" else "params.estimate.stride",
                                                   problem=f"is {stride}, which does not divide the block size {bs} (antidiagonals are scored within blocks)",
                                                   fix=f"use a stride that divides {bs}, e.g. {min(8, int(bs))}"))
        if len(heads) != expected:
            missing = next(((la, h) for la in range(pmodel["n_layers"]) for h in range(pmodel["n_heads"]) if (la, h) not in heads), None)
            if missing is not None and len(heads) < expected:
                raise PolicyError(ERR_HEAD_MISSING.format(path=path, head=f"(layer {missing[0]}, head {missing[1]})"))
            raise PolicyError(ERR_HEAD_COUNT.format(path=path, found=len(heads), model=ModelIdentity.from_dict(pmodel).describe(), expected=expected, n_layers=pmodel["n_layers"], n_heads=pmodel["n_heads"]))
        lengths = _check_lengths(d.get("profiled_lengths"), "profiled_lengths", path)
        eval_lengths = _check_lengths(d.get("eval_lengths"), "eval_lengths", path)
        src = d.get("source_run")
        if isinstance(src, str):
            src = {"path": src}
        if src is not None and not isinstance(src, dict):
            raise PolicyError(ERR_FIELD.format(where=path, field="source_run", problem=f"must be an object, a path or null, got {type(src).__name__}", fix="regenerate the policy"))
        created = d.get("created", "")
        if not isinstance(created, str):
            raise PolicyError(ERR_FIELD.format(where=path, field="created", problem=f"must be a string, got {type(created).__name__}", fix="regenerate the policy"))
        return cls(
            pmodel, int(bs), list(heads.values()), src, _check_budget(d.get("budget"), path), lengths, eval_lengths,
            _check_object(d.get("summary"), "summary", path), _check_object(d.get("generator"), "generator", path),
            created, int(schema), _check_decode(d.get("decode"), pmodel, path),
        )

    @classmethod
    def load(cls, path: str | os.PathLike, model: Any = None) -> Policy:
        """Read and validate ``path``; with ``model``, also check it is that model's policy."""
        p = Path(path)
        if not p.is_file():
            raise PolicyError(f"no policy file at {p}: create one with `attnlab policy RUN --budget 0.15 --out {p}`")
        d = load_json(p, what="policy", fix="it is corrupt; regenerate it with `attnlab policy`", error=PolicyError)
        return cls.from_dict(d, model=model, path=str(p))



def uniform_policy(model: Any, kind: str, params: Mapping[str, Any] | None = None, *, block_size: int = 64,
                   budget: dict[str, Any] | None = None) -> Policy:
    """One ``kind`` with the same ``params`` on every head of ``model`` (a `LoadedModel`, a
    `ModelIdentity` or an identity dict), checked like a policy file."""
    ident = _identity_of(model).to_dict()
    n_heads, n_kv = int(ident["n_heads"]), int(ident["n_kv_heads"])
    heads = [{"layer": layer, "head": head, "kv_head": head // (n_heads // n_kv), "kind": kind, "params": dict(params or {})}
             for layer in range(int(ident["n_layers"])) for head in range(n_heads)]
    d = {"format": POLICY_FORMAT, "schema": POLICY_SCHEMA, "model": ident, "block_size": block_size, "heads": heads}
    if budget is not None:
        d["budget"] = budget
    return Policy.from_dict(d)
