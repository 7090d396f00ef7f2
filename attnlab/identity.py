"""Model identity: what every later stage checks before it uses a run or a policy with a model.

A `ModelIdentity` is written into run manifests and policy files, and read back from them.
Two identities are compatible when the attention shapes agree (layers, query heads, KV heads,
head_dim) and they are the same weights: compared by ``fingerprint`` (a hash of the
architecture, the parameter shapes and a sample of every parameter) when both sides have one,
by ``name`` for files written before fingerprints existed. ``name`` is what the user typed
(``tiny``, ``./tiny``, a Hub id), so it is shown but never trusted when a fingerprint exists:
the same model under two spellings is compatible, and two different models behind one
spelling are not.

`ModelIdentity.check` is the one compatibility check; its error names the first field that
differs, both values, and the fix.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from attnlab.errors import AttnlabError


class IdentityError(AttnlabError):
    """A run, policy or artifact was made for another model than the one it is used with."""


#: Fields compared by `ModelIdentity.check`, in this order (the first difference is named).
SHAPE_FIELDS = ("n_layers", "n_heads", "n_kv_heads", "head_dim")

ERR_MISMATCH = (
    "{subject} was made for model {theirs_name!r} and does not fit model {ours_name!r}: "
    "{field} is {theirs!r} there and {ours!r} here. {fix}"
)
ERR_FIELDS = "{where} has no usable model identity (missing or invalid {field!r}); re-create it with this attnlab"


def _frozen(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


def _thawed(value: Any) -> Any:
    if isinstance(value, tuple) and all(isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str) for v in value) and value:
        return {k: _thawed(v) for k, v in value}
    if isinstance(value, tuple):
        return [_thawed(v) for v in value]
    return value


@dataclass(frozen=True)
class ModelIdentity(Mapping):
    """Who a model is, as far as attention is concerned.

    It is also a read-only mapping of its fields (``identity["n_layers"]``, ``dict(identity)``),
    which is how it is stored in JSON.

    Attributes:
        name: what the user loaded it as (embedded name, path, Hub id); shown, not compared
            when both sides have a fingerprint.
        source: ``embedded``, ``gguf``, ``local``, ``hub`` or ``config``.
        architecture: the Hugging Face ``model_type`` (``llama``, ``gemma2``, ...).
        n_layers, n_heads, n_kv_heads, head_dim: attention shapes (query head ``h`` reads KV
            head ``h // (n_heads // n_kv_heads)``).
        n_ctx: the model's context length.
        attention: per-model attention-variant fields as the config gives them (sliding
            window, soft-capping, sinks, scaling), frozen as sorted pairs; ``{}`` when plain.
        fingerprint: hash of architecture, parameter shapes and weight samples; ``None`` in
            files written before it existed.
    """

    name: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_ctx: int = 0
    source: str = ""
    architecture: str = ""
    attention: tuple = field(default=())
    fingerprint: str | None = None

    # -- mapping view ----------------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        if key not in self._keys():
            raise KeyError(key)
        value = getattr(self, key)
        if key == "attention":
            return _thawed(value) if value else {}
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    @staticmethod
    def _keys() -> tuple[str, ...]:
        return tuple(f.name for f in fields(ModelIdentity))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (what manifests and policy files hold)."""
        return {k: self[k] for k in self._keys()}

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | ModelIdentity, *, where: str = "the file") -> ModelIdentity:
        """Read an identity from a manifest or policy ``model`` entry (older files lack some fields)."""
        if isinstance(data, ModelIdentity):
            return data
        if not isinstance(data, Mapping):
            raise IdentityError(ERR_FIELDS.format(where=where, field="model"))
        values: dict[str, Any] = {}
        for key in SHAPE_FIELDS[:2]:
            values[key] = _positive_int(data.get(key), where, key)
        values["n_kv_heads"] = _positive_int(data.get("n_kv_heads", values["n_heads"]), where, "n_kv_heads")
        head_dim = data.get("head_dim")
        values["head_dim"] = _positive_int(head_dim, where, "head_dim") if head_dim is not None else 0
        n_ctx = data.get("n_ctx")
        values["n_ctx"] = _positive_int(n_ctx, where, "n_ctx") if n_ctx is not None else 0
        fp = data.get("fingerprint")
        return cls(
            name=str(data.get("name", "")),
            source=str(data.get("source", "") or ""),
            architecture=str(data.get("architecture", "") or ""),
            attention=_frozen(data.get("attention") or {}),
            fingerprint=str(fp) if fp else None,
            **values,
        )

    # -- the one compatibility check ---------------------------------------------------------
    def mismatch(self, other: Mapping[str, Any] | ModelIdentity) -> tuple[str, Any, Any] | None:
        """The first field where ``other`` (what a file was made for) differs from ``self``
        (the model at hand), as ``(field, theirs, ours)``, or ``None`` when compatible.

        ``head_dim`` 0 (unknown, in older files) matches any head_dim."""
        theirs = ModelIdentity.from_dict(other)
        for key in SHAPE_FIELDS:
            a, b = getattr(theirs, key), getattr(self, key)
            if key == "head_dim" and (a == 0 or b == 0):
                continue
            if a != b:
                return key, a, b
        if theirs.fingerprint and self.fingerprint:
            if theirs.fingerprint != self.fingerprint:
                return "fingerprint", theirs.fingerprint, self.fingerprint
        elif theirs.name != self.name:
            return "name", theirs.name, self.name
        return None

    def check(self, other: Mapping[str, Any] | ModelIdentity, *, subject: str, fix: str = "use it with the model it was made for") -> None:
        """Raise `IdentityError` unless ``other`` fits this model; the message names
        ``subject`` (e.g. ``"run runs/r1"``), the first differing field and ``fix``."""
        diff = self.mismatch(other)
        if diff is None:
            return
        key, theirs, ours = diff
        theirs_name = ModelIdentity.from_dict(other).name
        raise IdentityError(ERR_MISMATCH.format(
            subject=subject, theirs_name=theirs_name, ours_name=self.name, field=key, theirs=theirs, ours=ours,
            fix=fix[:1].upper() + fix[1:] if fix else "",
        ))

    def describe(self) -> str:
        """One line for the CLI: ``name (L layers × H heads, KV kv, head_dim d, ctx n)``."""
        return (f"{self.name} ({self.n_layers} layers x {self.n_heads} heads, {self.n_kv_heads} KV heads, "
                f"head_dim {self.head_dim}, ctx {self.n_ctx})")


def _positive_int(value: Any, where: str, key: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise IdentityError(ERR_FIELDS.format(where=where, field=key))
    return value


def weights_fingerprint(hf_model: Any, *, sample: int = 4096) -> str:
    """A short hash that tells models apart by their weights, not their names.

    Hashes the ``model_type``, every parameter's name, shape and dtype, and up to ``sample``
    evenly spaced values of each parameter (as float32). Reading a sample, not every weight,
    keeps it to milliseconds on a 135M model while two checkpoints still differ."""
    import torch

    h = hashlib.sha256()
    h.update(str(getattr(hf_model.config, "model_type", "")).encode())
    with torch.no_grad():
        for name, p in sorted(hf_model.named_parameters(), key=lambda kv: kv[0]):
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            flat = p.detach().reshape(-1)
            if flat.numel() > sample:
                # integer spacing: a float32 linspace rounds its last index up past the end
                idx = torch.arange(sample, device=flat.device, dtype=torch.int64) * (flat.numel() - 1) // (sample - 1)
                flat = flat[idx]
            h.update(flat.to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()[:16]
