"""Run a policy the way an export target runs it (``attnlab validate --as FORMAT``).

`DeployedExecutor` has the executor interface `validate_policy` uses (``sparse``,
``attention``, ``layouts_``, ``check_model``) but, instead of compiling the policy, it exports
the policy once per input length to ``FORMAT``, reads the file back through that tool's
emulator (`attnlab.sparsity_stats.emulators.Deployment`) and attends, per layer and input,
with the token mask the tool would run, through the fp32 reference. The numbers a validation
reports are then the deployed ones: MInference's size minimums and per-token selection, a
DuoAttention file's streaming heads as they decode (each query sees the sink and the recent
tokens, as in one-token decoding steps), a Flex or mask file as read without attnlab.

``density`` here is token-level: kept causal pairs over causal pairs, per head.
"""

from __future__ import annotations

import torch

from attnlab.attention import PLAIN, AttentionVariant, attend, key_mask
from attnlab.errors import AttnlabError
from attnlab.kernels.reference import reference_attention
from attnlab.models import LoadedModel

from .export import EXPORT_FORMATS
from .policy import Policy

#: Formats whose file holds one length: a deployment is made per input length.
_PER_LENGTH = ("npz", "safetensors", "flex", "flashinfer", "vllm")  # vllm: its sparse threshold is the export length
_ERR_FORMAT = "unknown deployment format {fmt!r}: choose one of {formats}"
_ERR_BATCH = "validation as deployed takes one sequence at a time (batch 1)"


class _Density:
    """What validation reads of a layer's layout: the per-head density."""

    def __init__(self, density: torch.Tensor):
        self.density = density


class DeployedExecutor:
    """A policy run as ``fmt``'s tool runs it (see the module docstring)."""

    def __init__(self, policy: Policy, fmt: str):
        if fmt not in EXPORT_FORMATS:
            raise AttnlabError(_ERR_FORMAT.format(fmt=fmt, formats=", ".join(EXPORT_FORMATS)))
        self.policy = policy
        self.fmt = fmt
        self.executor = f"reference as {fmt}"
        self.layouts_: dict[int, _Density] = {}
        self._deployments: dict[int | None, object] = {}

    def check_model(self, model: LoadedModel, path: str = "(in memory)") -> None:
        self.policy.check_model(model.identity(), path)

    def deployment(self, n: int):
        """The emulated deployment for inputs of ``n`` tokens (one export per length for the
        mask formats, one for all lengths for the config formats)."""
        from .emulators import Deployment

        key = n if self.fmt in _PER_LENGTH else None
        if key not in self._deployments:
            self._deployments[key] = Deployment(self.policy, self.fmt, seq_len=key)
        return self._deployments[key]

    def sparse(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float, variant: AttentionVariant | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out [1, H, n, d], lse [1, H, n])`` of the layer as the target runs it (prefill), on
        top of the layer's own window, soft-cap and learned sinks (``variant``)."""
        variant = variant or PLAIN
        if query.shape[0] != 1:
            raise AttnlabError(_ERR_BATCH)
        n = int(query.shape[-2])
        mask = self.deployment(n).layer_mask(layer, query[0].float().cpu(), key[0].float().cpu())
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        if variant.window:  # the model's own window bounds what any deployment sees
            causal &= key_mask(torch.arange(n), n, variant.window)
            mask = mask & causal
        kept = (mask & causal).flatten(1).sum(-1).float()
        self.layouts_[layer] = _Density(kept / causal.sum().float())
        out, lse = reference_attention(query, key, value, mask.to(query.device), scale=scaling, dtype=torch.float32,
                                       softcap=variant.softcap, sinks=variant.sinks)
        return out.to(query.dtype), lse

    def attention(self, layer: int, query, key, value, *, scaling: float, attention_mask=None,
                  variant: AttentionVariant | None = None) -> torch.Tensor:
        if query.shape[-2] != key.shape[-2]:  # decode over a cache: dense, as validation's prefill phase
            return attend(query, key, value, scaling=scaling, variant=variant)
        out, _ = self.sparse(layer, query, key, value, scaling, variant)
        return out.transpose(1, 2).contiguous()


def duo_decode_policy(policy: Policy, *, seq_len: int | None = None) -> Policy:
    """``policy`` with the decode section DuoAttention runs from its export: the policy written
    as a DuoAttention pattern folder and read back as Duo reads it (`emulators.read_duo`, the
    full heads chosen by ``sparsify_attention_heads`` at the recorded sparsity); full KV heads keep
    the whole cache, the others the pattern's ``sink_size`` + ``recent_size`` tokens. What
    ``attnlab validate POLICY --as duo --phase decode`` validates: Duo is a KV-cache method, so its
    own phase is decode."""
    import tempfile

    from .emulators import duo_full_heads, read_duo
    from .export import export_policy
    from .policy import DecodeHead

    with tempfile.TemporaryDirectory() as tmp:
        export_policy(policy, tmp, "duo", seq_len=seq_len)
        gates, cfg = read_duo(tmp)
    sparsity = cfg.get("sparsity")
    full = duo_full_heads(gates, sparsity=sparsity, threshold=None if sparsity is not None else 0.5)
    sink, recent = int(cfg["sink_size"]), int(cfg["recent_size"])
    heads = [DecodeHead.make(layer, kv, "full") if full[layer, kv] else
             DecodeHead.make(layer, kv, "streaming", sink=sink, recent=recent)
             for layer in range(full.shape[0]) for kv in range(full.shape[1])]
    return policy.with_decode(heads)
