"""Errors of the policy, mask and export stages, and the messages they carry.

Every message is one line that says what was wrong (naming the head and field where there is
one) and how to fix it. The CLI prints an `AttnlabError` as ``error: <message>``.
"""

from __future__ import annotations

from attnlab.errors import AttnlabError
from attnlab.identity import IdentityError


class PolicyError(AttnlabError):
    """A policy (file or generator setting) is invalid or does not fit the model."""


class PolicyModelError(PolicyError, IdentityError):
    """A policy was made for another model (raised by `Policy.check_model`, from the one
    compatibility check `attnlab.identity.ModelIdentity.check`)."""


class MaskError(AttnlabError):
    """A mask cannot be compiled as asked (bad length, block size, scores)."""


class FormatError(AttnlabError):
    """A file is corrupt, of a foreign format, or cannot represent the policy."""


class ExtrapolationWarning(UserWarning):
    """A policy is compiled far outside the lengths it was profiled at."""


# -- generic value checks -------------------------------------------------------------------
ERR_BLOCK_SIZE = "block size {got} is not a power of two: use 16, 32, 64 or 128 (--block-size)"
ERR_SEQ_LEN = "sequence length {got} must be a positive integer (--seq-len)"
ERR_SEQ_TOO_LONG = (
    "sequence length {got} is beyond the model's context of {n_ctx} tokens ({model}): "
    "choose --seq-len <= {n_ctx}"
)
ERR_BUDGET = "budget {got} is outside (0, 1]: give the share of dense causal attention to keep, e.g. --budget 0.15"
ERR_BUDGET_KIND = "budget kind {got!r} is unknown: use 'density' (share of causal blocks) or 'kv' (share of KV cache)"
ERR_INFEASIBLE = (
    "budget {budget:g} is below what any policy can reach here (at least {needed:.4f} {kind}: {why}): {fix}"
)

# -- policy files ---------------------------------------------------------------------------
ERR_FOREIGN = (
    "{path} is not an attnlab policy (no 'format': 'attnlab-policy'); "
    "for MInference or DuoAttention files use `attnlab import minference|duo`"
)
ERR_POLICY_SCHEMA = "{path} has policy schema {found!r}, this attnlab reads schema {expected}: regenerate it with `attnlab policy`"
ERR_FIELD = "{where}: field {field!r} {problem}; {fix}"
ERR_HEAD_COUNT = (
    "policy {path} has {found} head entries, model {model} has {expected} "
    "({n_layers} layers x {n_heads} heads): regenerate the policy for this model"
)
ERR_HEAD_MISSING = "policy {path} has no entry for head {head}: every (layer, head) needs exactly one entry"
ERR_HEAD_DUPLICATE = "policy {path} lists head {head} twice: keep one entry per (layer, head)"
ERR_UNKNOWN_KIND = "{where}: unknown kind {kind!r}; use one of {known}"
ERR_SIZE = "{where}: size {field!r} must be positive (alpha + beta*N > 0 with alpha, beta >= 0), got {got}; fix the value"
ERR_PARAM_MISSING = "{where}: kind {kind!r} needs parameter {field!r}; add it (see the kind's docstring)"
ERR_PARAM_UNKNOWN = "{where}: kind {kind!r} does not take parameter {field!r}; remove it"

# -- masks ----------------------------------------------------------------------------------
ERR_SCORES_SHAPE = (
    "scores for layer {layer} have shape {got}, expected {expected} for {n} tokens at block size {block}: "
    "estimate them with estimate_block_scores at the same length and block size"
)
ERR_MAP_BLOCK = (
    "the run's block maps use block size {run_block}, policy block size {block} is not a multiple of it: "
    "use --block-size {run_block} (or a power-of-two multiple)"
)
ERR_LAYER = "layer {layer} is out of range for a model with {n_layers} layers"

# -- export / import ------------------------------------------------------------------------
ERR_FORMAT = "unknown format {got!r}: use one of {known}"
ERR_NOT_REPRESENTABLE = (
    "head {head} ({kind}) cannot be written in {fmt} format: {why}; "
    "export with --format npz|safetensors|flex, or regenerate the policy with kinds {fmt} supports"
)
ERR_CORRUPT = "{path} is not a readable {fmt} file ({reason}): it is corrupt or of another format; re-export it"
ERR_SHAPE = "{path}: {what} has shape {got}, model {model} needs {expected}: import it with the model it was made for"
