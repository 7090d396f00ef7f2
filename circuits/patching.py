"""Head-level patching: exact activation patching and attribution patching (nodes and edges).

Every forward here runs attention through `attnlab.attention.route_attention`, whose function
receives each layer's queries/keys/values and returns ``z [batch, n, heads, head_dim]`` — the
per-head attention output before ``W_O`` (what TransformerLens calls ``hook_z``), for Llama- and
GPT-2-style models alike. A head is patched by replacing its slice of ``z`` with the same slice
from another run. Residual-stream inputs of each block (and of the final norm) are read with
PyTorch forward pre-hooks, which, like the routing, are always removed when a forward ends,
also when it raises.

- `activation_patching`: one patched run per head (``batch_heads`` of them stacked along the
  batch of one forward). ``denoising``: run the corrupted input with one
  head's ``z`` taken from the clean run, effect = m(patched) − m(corrupted); ``noising``: run
  the clean input with the corrupted ``z``, effect = m(clean) − m(patched).
- `attribution_patching`: one clean and one corrupted forward plus one backward give every
  head's linear estimate ``(z_clean − z_corrupted) · ∂m/∂z`` of the same effect, and (EAP,
  Syed et al.) every edge's estimate: sender → receiver through the residual stream is
  ``Δout_s · ∂m/∂x_r`` where ``Δout_s = (z_clean − z_corrupted)_s W_O,s`` is the change the
  sender writes into the residual stream and ``∂m/∂x_r`` the gradient of the metric with
  respect to the receiver's own residual input (the backward through head ``r`` alone, back to
  its block's input; the heads of a layer go through one batched backward); sender → logits
  uses the gradient at the final residual stream.
- ``method="ig"``: EAP-IG — the same scores with gradients averaged over a few forwards whose
  input embeddings lie between the corrupted and the clean ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from attnlab.attention import attend, route_attention
from attnlab.errors import AttnlabError

from .tasks import Task, logit_diff

DIRECTIONS = ("denoising", "noising")
METHODS = ("attribution", "activation", "ig")


class PatchingError(AttnlabError):
    """A patching request that does not fit the model or the task."""


# ---------------------------------------------------------------------------------------
# model plumbing
# ---------------------------------------------------------------------------------------
def _decoder_layers(model) -> list:
    base = model.hf_model.base_model
    for name in ("layers", "h"):
        layers = getattr(base, name, None)
        if layers is not None:
            return list(layers)
    raise PatchingError(f"cannot find the decoder layers of {model.name!r} (expected .layers or .h)")


def _final_norm(model):
    base = model.hf_model.base_model
    for name in ("norm", "ln_f", "final_layernorm"):
        mod = getattr(base, name, None)
        if mod is not None:
            return mod
    raise PatchingError(f"cannot find the final norm of {model.name!r} (expected .norm or .ln_f)")


def _out_proj(model, layer: int):
    hf = model.bridge.blocks[layer].attn.original_component
    for name in ("o_proj", "c_proj", "out_proj", "dense"):
        mod = getattr(hf, name, None)
        if mod is not None:
            return mod
    raise PatchingError(f"cannot find the output projection of layer {layer} ({type(hf).__name__})")


def head_writes(model, layer: int, dz: torch.Tensor) -> torch.Tensor:
    """What each head writes into the residual stream for a change ``dz [B, n, heads, d]`` of
    its ``z``: ``[heads, B, n, d_model]`` (the output projection, without its bias).

    A linear (``nn.Linear``, possibly inside a bridge component) or GPT-2 ``Conv1D``
    projection is applied head by head through its weight's slices (``heads`` products of
    ``[B·n, d] @ [d, d_model]``); any other module through the projection of per-head
    one-hot copies of ``dz``.
    """
    proj = _out_proj(model, layer)
    b, n, h, d = dz.shape
    inner = getattr(proj, "original_component", None) or proj
    weight = getattr(inner, "weight", None)
    if isinstance(inner, torch.nn.Linear) and weight is not None and weight.shape[1] == h * d:
        return torch.einsum("bnhd,mhd->hbnm", dz, weight.view(-1, h, d).to(dz.dtype))
    if type(inner).__name__ == "Conv1D" and weight is not None and weight.shape[0] == h * d:
        return torch.einsum("bnhd,hdm->hbnm", dz, weight.view(h, d, -1).to(dz.dtype))
    eye = torch.eye(h, dtype=dz.dtype, device=dz.device)
    per_head = (dz[None] * eye[:, None, None, :, None]).reshape(h, b, n, h * d)  # [h, B, n, h*d]
    zero = proj(torch.zeros(1, h * d, dtype=dz.dtype, device=dz.device))
    return proj(per_head) - zero


@dataclass
class Trace:
    """What one forward recorded: logits, every layer's ``z`` and residual inputs."""

    logits: torch.Tensor
    z: list[torch.Tensor] = field(default_factory=list)
    resid: list[torch.Tensor] = field(default_factory=list)
    resid_final: torch.Tensor | None = None


@contextmanager
def traced(model, *, patch: dict[int, tuple[list[int], torch.Tensor]] | None = None) -> Iterator[Trace]:
    """Route attention (recording ``z``, optionally patching heads) and hook the residual stream.

    ``patch``: ``{layer: (heads, z_source [B, n, heads, d])}`` — those heads' ``z`` is replaced
    by the source's. Inside the block, call ``model.hf_model(ids)`` and fill ``trace.logits``
    yourself, or use `forward`. Routing and hooks are removed on exit, also on error.
    """
    trace = Trace(logits=torch.empty(0))
    n_layers = model.n_layers
    trace.z = [None] * n_layers  # type: ignore[list-item]
    trace.resid = [None] * n_layers  # type: ignore[list-item]
    patch = patch or {}

    def attention(layer: int, query, key, value, *, scaling: float, attention_mask=None, variant=None) -> torch.Tensor:
        out = attend(query, key, value, scaling=scaling, variant=variant)
        if layer in patch:
            heads, source = patch[layer]
            if source.shape != out.shape:
                raise PatchingError(f"patch for layer {layer} has shape {tuple(source.shape)}, the run has {tuple(out.shape)}")
            out = out.clone()
            out[:, :, heads, :] = source[:, :, heads, :].to(out.dtype)
        trace.z[layer] = out
        return out

    def pre_hook(layer: int):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states")
            trace.resid[layer] = x

        return hook

    def final_hook(module, args, kwargs):
        trace.resid_final = args[0] if args else kwargs.get("hidden_states", kwargs.get("input"))

    handles = []
    try:
        for layer, mod in enumerate(_decoder_layers(model)):
            handles.append(mod.register_forward_pre_hook(pre_hook(layer), with_kwargs=True))
        handles.append(_final_norm(model).register_forward_pre_hook(final_hook, with_kwargs=True))
        with route_attention(model, attention):
            yield trace
    finally:
        for handle in handles:
            handle.remove()


def forward(
    model, ids: torch.Tensor | None, *, patch=None, grad: bool = False, embeds: torch.Tensor | None = None,
    last_only: bool = False,
) -> Trace:
    """One routed forward of ``ids [B, n]`` (or ``embeds [B, n, d_model]``); with ``grad=True``
    the trace keeps the graph. ``last_only``: unembed the last position only (``logits
    [B, 1, vocab]``, all the task metric reads; the unembedding of every position is the
    largest single cost of a forward over a large vocabulary)."""
    extra = {"logits_to_keep": 1} if last_only else {}
    with torch.set_grad_enabled(grad), traced(model, patch=patch) as trace:
        if embeds is not None:
            trace.logits = model.hf_model(inputs_embeds=embeds, use_cache=False, **extra).logits
        else:
            trace.logits = model.hf_model(ids.to(model.device), use_cache=False, **extra).logits
    return trace


# ---------------------------------------------------------------------------------------
# scores
# ---------------------------------------------------------------------------------------
@dataclass
class Scores:
    """Per-head (and, for attribution, per-edge) effects in metric units (logit difference).

    ``nodes [layers, heads]``; ``edges [layers, heads, layers, heads]`` sender → receiver
    (zero unless the sender's layer is earlier); ``logit_edges [layers, heads]`` head → logits.
    ``clean_metric`` / ``corrupted_metric``: the task metric on the two inputs.
    """

    nodes: torch.Tensor
    method: str
    direction: str
    clean_metric: float
    corrupted_metric: float
    edges: torch.Tensor | None = None
    logit_edges: torch.Tensor | None = None
    seconds: float = 0.0

    @property
    def total_effect(self) -> float:
        return self.clean_metric - self.corrupted_metric


def _check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise PatchingError(f"direction must be one of {list(DIRECTIONS)}, got {direction!r}")


def task_metrics(model, task: Task) -> tuple[float, float]:
    """Mean clean and corrupted logit difference over the task."""
    clean = corr = 0.0
    total = len(task)
    with torch.no_grad():
        for c_ids, x_ids, good, bad in task.groups():
            w = c_ids.shape[0] / total
            clean += w * float(logit_diff(forward(model, c_ids, last_only=True).logits, good, bad))
            corr += w * float(logit_diff(forward(model, x_ids, last_only=True).logits, good, bad))
    return clean, corr


def activation_patching(
    model, task: Task, *, direction: str = "denoising", heads=None, batch_heads: int = 1,
) -> Scores:
    """Exact per-head patching effect (one patched run per head and length group).

    ``heads``: the ``(layer, head)`` pairs to patch (default: all); the others score 0.
    ``batch_heads``: patched runs stacked along the batch dimension of one forward
    (``batch_heads`` heads × the group's examples; each copy of the batch has its own head
    patched). 1 is one forward per head; larger values give the same scores up to float
    rounding, faster where the per-forward overhead dominates.
    """
    import time

    _check_direction(direction)
    if batch_heads < 1:
        raise PatchingError(f"batch_heads must be at least 1, got {batch_heads}")
    t0 = time.perf_counter()
    todo = [(layer, h) for layer in range(model.n_layers) for h in range(model.n_heads)] if heads is None else list(heads)
    scores = torch.zeros(model.n_layers, model.n_heads, dtype=torch.float64)
    clean_m = corr_m = 0.0
    total = len(task)
    with torch.no_grad():
        for c_ids, x_ids, good, bad in task.groups():
            w = c_ids.shape[0] / total
            clean, corr = forward(model, c_ids, last_only=True), forward(model, x_ids, last_only=True)
            mc, mx = float(logit_diff(clean.logits, good, bad)), float(logit_diff(corr.logits, good, bad))
            clean_m += w * mc
            corr_m += w * mx
            base_ids, source = (x_ids, clean) if direction == "denoising" else (c_ids, corr)
            for start in range(0, len(todo), batch_heads):
                chunk = todo[start : start + batch_heads]
                if batch_heads == 1:
                    (layer, h), = chunk
                    patched = forward(model, base_ids, patch={layer: ([h], source.z[layer])}, last_only=True)
                    mps = [float(logit_diff(patched.logits, good, bad))]
                else:
                    mps = _stacked_patch_metrics(model, base_ids, source.z, chunk, good, bad)
                for (layer, h), mp in zip(chunk, mps, strict=True):
                    scores[layer, h] += w * ((mp - mx) if direction == "denoising" else (mc - mp))
    return Scores(scores.float(), "activation", direction, clean_m, corr_m, seconds=time.perf_counter() - t0)


def _stacked_patch_metrics(model, base_ids: torch.Tensor, source_z: list[torch.Tensor], chunk, good, bad) -> list[float]:
    """Mean metric of ``base_ids [B, n]`` with each head of ``chunk`` patched from ``source_z``,
    one copy of the batch per head, all in one forward of batch ``len(chunk) × B``."""
    b, k = base_ids.shape[0], len(chunk)
    rows: dict[int, list[tuple[int, int]]] = {}
    for j, (layer, h) in enumerate(chunk):
        rows.setdefault(int(layer), []).append((j, int(h)))

    def attention(layer: int, query, key, value, *, scaling: float, attention_mask=None, variant=None) -> torch.Tensor:
        out = attend(query, key, value, scaling=scaling, variant=variant)
        if layer in rows:
            out = out.clone()
            src = source_z[layer].to(out.dtype)
            for j, h in rows[layer]:
                out[j * b : (j + 1) * b, :, h, :] = src[:, :, h, :]
        return out

    with route_attention(model, attention):
        logits = model.hf_model(base_ids.repeat(k, 1).to(model.device), use_cache=False, logits_to_keep=1).logits
    diff = logit_diff(logits, good.repeat(k), bad.repeat(k), reduce=False).double().view(k, b).mean(1)
    return diff.tolist()


def attribution_patching(
    model, task: Task, *, direction: str = "denoising", edges: bool = True, ig_steps: int = 0,
    batch_edges: bool = True,
) -> Scores:
    """Attribution patching (EAP): every head's and every edge's linear estimate.

    Gradients are taken on the corrupted run (``denoising``) or the clean run (``noising``);
    both estimate the effect with a positive sign when the head carries the clean behaviour.
    ``ig_steps > 0``: EAP-IG (Hanna et al.) — the gradients are averaged over ``ig_steps``
    forwards whose input embeddings lie between the corrupted and the clean ones.
    ``batch_edges``: the receivers' backward passes run as one batched (``is_grads_batched``)
    backward per receiver layer; False runs one backward per receiver head (the reference,
    ``heads × layers`` backward passes; the same scores up to float rounding).
    """
    import time

    _check_direction(direction)
    t0 = time.perf_counter()
    L, H = model.n_layers, model.n_heads
    nodes = torch.zeros(L, H, dtype=torch.float64)
    edge_scores = torch.zeros(L, H, L, H, dtype=torch.float64)
    logit_edges = torch.zeros(L, H, dtype=torch.float64)
    clean_m = corr_m = 0.0
    total = len(task)
    for c_ids, x_ids, good, bad in task.groups():
        w = c_ids.shape[0] / total
        with torch.no_grad():
            clean, corr = forward(model, c_ids, last_only=True), forward(model, x_ids, last_only=True)
        clean_m += w * float(logit_diff(clean.logits, good, bad))
        corr_m += w * float(logit_diff(corr.logits, good, bad))
        delta = [(clean.z[layer] - corr.z[layer]).detach() for layer in range(L)]
        # positions before the first one where clean and corrupted differ write nothing (their z
        # is the same in both runs): edge products skip them
        start = _first_changed_position(delta) if edges else 0
        # every sender's write on one device (layers may live on several: a device map)
        writes = [head_writes(model, layer, delta[layer][:, start:]).detach().to(model.device) for layer in range(L)] if edges else []
        if ig_steps > 0:
            alphas = [(k + 0.5) / ig_steps for k in range(ig_steps)]
        else:
            alphas = [None]
        for alpha in alphas:
            if alpha is None:
                base_ids = x_ids if direction == "denoising" else c_ids
            weight = w / len(alphas)
            with torch.enable_grad():
                if alpha is None:
                    trace = forward(model, base_ids, grad=True, last_only=True)
                else:  # EAP-IG: input embeddings between corrupted and clean
                    emb = model.hf_model.get_input_embeddings()
                    e_clean, e_corr = emb(c_ids.to(model.device)).detach(), emb(x_ids.to(model.device)).detach()
                    trace = forward(model, None, grad=True, embeds=e_corr + alpha * (e_clean - e_corr), last_only=True)
                metric = logit_diff(trace.logits, good, bad)
                wanted = list(trace.z) + ([trace.resid_final] if edges else [])
                grads = torch.autograd.grad(metric, wanted, retain_graph=edges, allow_unused=True)
                dz = [g if g is not None else torch.zeros_like(z) for g, z in zip(grads[:L], trace.z, strict=False)]
                for layer in range(L):
                    nodes[layer] += weight * (delta[layer] * dz[layer]).sum(dim=(0, 1, 3)).double().cpu()
                if edges:
                    d_final = grads[L][:, start:].to(model.device)
                    if batch_edges:
                        flat = torch.stack(writes).reshape(L * H, -1)  # [senders, B*n*d_model], layer-major
                        logit_edges += weight * (flat @ d_final.reshape(-1)).reshape(L, H).double().cpu()
                        _edges_batched(trace, dz, flat, edge_scores, weight, start)
                    else:
                        for layer in range(L):
                            logit_edges[layer] += weight * (writes[layer] * d_final[None]).sum(dim=(1, 2, 3)).double().cpu()
                        _edges_loop(trace, dz, writes, edge_scores, weight, start)
                del trace, grads
    method = "ig" if ig_steps > 0 else "attribution"
    return Scores(
        nodes.float(), method, direction, clean_m, corr_m,
        edges=edge_scores.float() if edges else None, logit_edges=logit_edges.float() if edges else None,
        seconds=time.perf_counter() - t0,
    )


def _first_changed_position(delta: list[torch.Tensor]) -> int:
    """The first position where any head's ``z`` differs between the two runs (0 if none)."""
    changed = torch.stack([d.abs().amax(dim=(0, 2, 3)) for d in delta]).amax(0) > 0  # [n]
    return int(changed.nonzero()[0, 0]) if bool(changed.any()) else 0


def _edges_loop(trace: Trace, dz: list[torch.Tensor], writes: list[torch.Tensor], edge_scores: torch.Tensor,
                weight: float, start: int = 0) -> None:
    """Edge scores, one backward per receiver head (the reference for `_edges_batched`)."""
    L, H = len(trace.z), dz[0].shape[2]
    for r_layer in range(1, L):
        for r in range(H):
            mask = torch.zeros_like(dz[r_layer])
            mask[:, :, r, :] = dz[r_layer][:, :, r, :]
            (g,) = torch.autograd.grad(trace.z[r_layer], trace.resid[r_layer], grad_outputs=mask, retain_graph=True)
            g = g[:, start:].to(writes[0].device)
            for s_layer in range(r_layer):
                edge_scores[s_layer, :, r_layer, r] += weight * (writes[s_layer] * g[None]).sum(dim=(1, 2, 3)).double().cpu()


def _edges_batched(trace: Trace, dz: list[torch.Tensor], senders: torch.Tensor, edge_scores: torch.Tensor,
                   weight: float, start: int = 0) -> None:
    """Edge scores with one batched backward per receiver layer.

    The gradient of receiver head ``r``'s term ``dz_r · z_r`` with respect to its block's input
    is a vector-Jacobian product of ``z`` (layer ``r``) with a grad-output that is ``dz`` on head
    ``r`` and zero elsewhere; the ``H`` one-head grad-outputs of a layer go through
    ``autograd.grad(..., is_grads_batched=True)`` together (``L − 1`` backward calls instead of
    ``(L − 1) · H``). Sender · receiver products are one matrix product per receiver layer,
    ``senders [(layers·H), B·n'·d_model] @ g.T`` with ``n'`` the positions from ``start`` on.
    """
    L, H = len(trace.z), dz[0].shape[2]
    eye = torch.eye(H, dtype=dz[0].dtype, device=dz[0].device)
    for r_layer in range(1, L):
        outs = dz[r_layer][None] * eye[:, None, None, :, None]  # [H, B, n, H, d]: head r's slice only
        (g,) = torch.autograd.grad(trace.z[r_layer], trace.resid[r_layer], grad_outputs=outs, retain_graph=True,
                                   is_grads_batched=True)
        g = g[:, :, start:].reshape(H, -1).to(senders.device)  # [H receivers, B*n'*d_model]
        prod = senders[: r_layer * H] @ g.T  # [r_layer*H senders, H receivers]
        edge_scores[:r_layer, :, r_layer, :] += weight * prod.reshape(r_layer, H, H).double().cpu()


# ---------------------------------------------------------------------------------------
# path patching: verify one edge exactly
# ---------------------------------------------------------------------------------------
@contextmanager
def _add_to_input(module, delta: torch.Tensor) -> Iterator[None]:
    """Add ``delta`` to the hidden states ``module`` (a decoder layer or the final norm) receives."""

    def hook(mod, args, kwargs):
        if args:
            return (args[0] + delta.to(args[0].dtype), *args[1:]), kwargs
        key = "hidden_states" if "hidden_states" in kwargs else "input"
        return args, {**kwargs, key: kwargs[key] + delta.to(kwargs[key].dtype)}

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _node(node) -> tuple[int, int] | str:
    if node == "logits":
        return "logits"
    layer, head = node
    return int(layer), int(head)


def path_patching(model, task: Task, sender, receiver, *, direction: str = "denoising") -> float:
    """Exact effect of one edge: ``sender (layer, head)`` → ``receiver (layer, head)`` or ``"logits"``.

    Denoising: on the corrupted run, only the receiver sees the change the sender's clean output
    writes into the residual stream (``Δout_s = (z_clean − z_corrupted)_s W_O,s``): the receiver's
    layer is run once with ``Δout_s`` added to its input and the receiver head's ``z`` taken from
    that run; everything else (other heads of that layer, the MLPs, every path that bypasses the
    receiver) stays as in the corrupted run, and the change flows on from the receiver to the
    logits. For ``"logits"`` the change is added to the final norm's input. Effect = m(patched) −
    m(corrupted); noising mirrors it on the clean run (effect = m(clean) − m(patched)). This is the
    exact quantity attribution patching's edge score estimates linearly.
    """
    return path_patching_edges(model, task, [(sender, receiver)], direction=direction)[0]


def path_patching_edges(model, task: Task, edges, *, direction: str = "denoising") -> list[float]:
    """`path_patching` of several ``(sender, receiver)`` edges, sharing the clean and corrupted runs."""
    _check_direction(direction)
    n_layers, n_heads = model.n_layers, model.n_heads
    checked = []
    for sender, receiver in edges:
        s_layer, s_head = _node(sender)
        r = _node(receiver)
        if not (0 <= s_layer < n_layers and 0 <= s_head < n_heads):
            raise PatchingError(f"sender {sender} is outside the model's {n_layers} layers × {n_heads} heads")
        if r != "logits":
            if not (0 <= r[0] < n_layers and 0 <= r[1] < n_heads):
                raise PatchingError(f"receiver {receiver} is outside the model's {n_layers} layers × {n_heads} heads")
            if r[0] <= s_layer:
                raise PatchingError(f"an edge runs from an earlier layer to a later one: {sender} → {receiver} does not")
        checked.append(((s_layer, s_head), r))
    total, effects = len(task), [0.0] * len(checked)
    with torch.no_grad():
        for c_ids, x_ids, good, bad in task.groups():
            clean, corr = forward(model, c_ids), forward(model, x_ids)
            base_ids, base, other = (x_ids, corr, clean) if direction == "denoising" else (c_ids, clean, corr)
            m_base = float(logit_diff(base.logits, good, bad))
            writes: dict[int, torch.Tensor] = {}  # per sender layer: [heads, B, n, d_model]
            for i, ((s_layer, s_head), r) in enumerate(checked):
                if s_layer not in writes:
                    writes[s_layer] = head_writes(model, s_layer, other.z[s_layer] - base.z[s_layer])
                delta = writes[s_layer][s_head]  # [B, n, d_model]
                if r == "logits":
                    with _add_to_input(_final_norm(model), delta):
                        m_patched = float(logit_diff(forward(model, base_ids).logits, good, bad))
                else:
                    with _add_to_input(_decoder_layers(model)[r[0]], delta):
                        shifted = forward(model, base_ids)
                    patched = forward(model, base_ids, patch={r[0]: ([r[1]], shifted.z[r[0]])})
                    m_patched = float(logit_diff(patched.logits, good, bad))
                effects[i] += c_ids.shape[0] / total * ((m_patched - m_base) if direction == "denoising" else (m_base - m_patched))
    return effects


def score_heads(
    model, task: Task, *, method: str = "attribution", direction: str = "denoising", ig_steps: int = 5,
    batch_heads: int = 1,
) -> Scores:
    """Dispatch on ``method``: ``attribution`` (EAP, with edges), ``ig`` or ``activation``
    (``batch_heads``: see `activation_patching`)."""
    if method == "attribution":
        return attribution_patching(model, task, direction=direction)
    if method == "ig":
        return attribution_patching(model, task, direction=direction, ig_steps=ig_steps)
    if method == "activation":
        return activation_patching(model, task, direction=direction, batch_heads=batch_heads)
    raise PatchingError(f"method must be one of {list(METHODS)}, got {method!r}")
