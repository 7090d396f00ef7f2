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

Sizes are elastic (``alpha + beta * N`` tokens, see `attnlab.sparsity_stats.kinds.Elastic`).
``density_is`` says whether ``expected_density`` is exact for any input (static kinds, fixed
top-k), an upper bound (vertical-slash) or an expectation over the profile (gamma threshold).
`Policy.load` validates everything and names the head and field of the first problem.

The ``model`` entry is the model's `attnlab.identity.ModelIdentity` (`Policy.identity`);
`Policy.check_model` asks the one compatibility check whether a model fits the policy. Files
written before identities had a weights fingerprint are matched by name and shapes.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from attnlab.identity import IdentityError, ModelIdentity
from attnlab.runs import write_json

from .errors import (
    ERR_FIELD,
    ERR_FOREIGN,
    ERR_HEAD_COUNT,
    ERR_HEAD_DUPLICATE,
    ERR_HEAD_MISSING,
    ERR_NOT_JSON,
    ERR_POLICY_SCHEMA,
    MaskError,
    PolicyError,
    PolicyModelError,
)
from .kinds import Candidate, get_kind
from .masks import check_block_size

POLICY_FORMAT = "attnlab-policy"
POLICY_SCHEMA = 1
DENSITY_IS = ("exact", "upper_bound", "expected")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


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
                raise PolicyError(ERR_FIELD.format(where=where, field=key, problem=f"must be an integer, got {d.get(key)!r}", fix="regenerate the policy"))
        layer, head = d["layer"], d["head"]
        where = f"{where}: head (layer {layer}, head {head})"
        if not 0 <= layer < model["n_layers"]:
            raise PolicyError(ERR_FIELD.format(where=where, field="layer", problem=f"is outside [0, {model['n_layers']})", fix="the policy is for another model; regenerate it"))
        if not 0 <= head < model["n_heads"]:
            raise PolicyError(ERR_FIELD.format(where=where, field="head", problem=f"is outside [0, {model['n_heads']})", fix="the policy is for another model; regenerate it"))
        group = model["n_heads"] // model["n_kv_heads"]
        kv = d.get("kv_head", head // group)
        if kv != head // group:
            raise PolicyError(ERR_FIELD.format(where=where, field="kv_head", problem=f"is {kv!r} but query head {head} reads KV head {head // group}", fix=f"set it to {head // group}"))
        if "kind" not in d:
            raise PolicyError(ERR_FIELD.format(where=where, field="kind", problem="is missing", fix="add one of dense, streaming, a_shape, vertical_slash, block_topk"))
        kind = get_kind(d["kind"], where)
        if "params" not in d:
            raise PolicyError(ERR_FIELD.format(where=where, field="params", problem="is missing", fix="add the kind's parameters ({} for dense)"))
        params = kind.validate(d["params"], where)
        vals = {}
        for key in ("expected_recall", "expected_density"):
            v = d.get(key)
            if v is not None and (not _is_num(v) or not 0 <= v <= 1 + 1e-9):
                raise PolicyError(ERR_FIELD.format(where=where, field=key, problem=f"must be in [0, 1] or null, got {v!r}", fix="regenerate the policy"))
            vals[key] = None if v is None else float(v)
        density_is = d.get("density_is", "exact")
        if density_is not in DENSITY_IS:
            raise PolicyError(ERR_FIELD.format(where=where, field="density_is", problem=f"is {density_is!r}", fix=f"use one of {', '.join(DENSITY_IS)}"))
        reason = d.get("reason", "")
        if not isinstance(reason, str):
            raise PolicyError(ERR_FIELD.format(where=where, field="reason", problem="must be a string", fix="regenerate the policy"))
        known = {"layer", "head", "kv_head", "kind", "params", "expected_recall", "expected_density", "density_is", "reason"}
        extra = {k: v for k, v in d.items() if k not in known}
        return cls(layer, head, head // group, d["kind"], params, vals["expected_recall"], vals["expected_density"], reason, density_is, extra)


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

    def __post_init__(self) -> None:
        if isinstance(self.model, ModelIdentity):
            self.model = self.model.to_dict()
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
        return {
            "format": POLICY_FORMAT,
            "schema": self.schema,
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

    def save(self, path: str | os.PathLike) -> Path:
        """Write the policy as JSON, atomically."""
        path = Path(path)
        write_json(path, self.to_dict())
        return path

    @classmethod
    def from_dict(cls, d: Any, model: Any = None, path: str = "policy") -> Policy:
        """Validate a parsed policy; ``model`` (optional: a `LoadedModel`, `ModelIdentity` or
        identity mapping) must fit it (`check_model`)."""
        if not isinstance(d, dict) or d.get("format") != POLICY_FORMAT:
            raise PolicyError(ERR_FOREIGN.format(path=path))
        if d.get("schema") != POLICY_SCHEMA:
            raise PolicyError(ERR_POLICY_SCHEMA.format(path=path, found=d.get("schema"), expected=POLICY_SCHEMA))
        pmodel = model_entry(d.get("model"), path)
        bs = d.get("block_size")
        try:
            check_block_size(bs if _is_int(bs) else -1)
        except MaskError:
            raise PolicyError(ERR_FIELD.format(where=path, field="block_size", problem=f"must be a power of two, got {bs!r}", fix="use 16, 32, 64 or 128")) from None
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
        if len(heads) != expected:
            missing = next(((la, h) for la in range(pmodel["n_layers"]) for h in range(pmodel["n_heads"]) if (la, h) not in heads), None)
            if missing is not None and len(heads) < expected:
                raise PolicyError(ERR_HEAD_MISSING.format(path=path, head=f"(layer {missing[0]}, head {missing[1]})"))
            raise PolicyError(ERR_HEAD_COUNT.format(path=path, found=len(heads), model=ModelIdentity.from_dict(pmodel).describe(), expected=expected, n_layers=pmodel["n_layers"], n_heads=pmodel["n_heads"]))
        lengths = d.get("profiled_lengths") or []
        if not isinstance(lengths, list) or not all(_is_int(x) and x > 0 for x in lengths):
            raise PolicyError(ERR_FIELD.format(where=path, field="profiled_lengths", problem="must be a list of positive integers", fix="regenerate the policy"))
        src = d.get("source_run")
        if isinstance(src, str):
            src = {"path": src}
        return cls(
            pmodel, int(bs), list(heads.values()), src, d.get("budget"), list(lengths),
            list(d.get("eval_lengths") or []), dict(d.get("summary") or {}), dict(d.get("generator") or {}),
            str(d.get("created", "")), POLICY_SCHEMA,
        )

    @classmethod
    def load(cls, path: str | os.PathLike, model: Any = None) -> Policy:
        """Read and validate ``path``; with ``model``, also check it is that model's policy."""
        p = Path(path)
        if not p.is_file():
            raise PolicyError(f"no policy file at {p}: create one with `attnlab policy RUN --budget 0.15 --out {p}`")
        try:
            d = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PolicyError(ERR_NOT_JSON.format(path=p, reason=str(exc).splitlines()[0])) from None
        return cls.from_dict(d, model=model, path=str(p))

