"""Model-level validation of a sparse-attention policy against dense attention.

`validate_policy` answers, for one policy on one model: how far each head's sparse attention
output is from dense on the model's own activations, and how much the logits, the perplexity
and the needle accuracy move, next to the sparsity actually achieved and the time taken.

- **Per head** (`attnlab.runs.VALIDATION_HEADS`): on each prompt, every layer's attention runs
  twice on the same post-RoPE q/k/v — densely (fp32 reference with the causal mask) and under
  the policy with the chosen executor — and the layer passes the *dense* output on, so each
  head's error is measured on real dense activations rather than compounded through depth:
  ``rel_l2 = ||o_sparse - o_dense|| / ||o_dense||`` over the head's rows, ``lse_err`` = mean
  ``|lse_sparse - lse_dense|`` over rows that keep at least one key, ``recall`` = mean over rows
  of the dense attention mass the kept keys hold, ``exp(lse_sparse - lse_dense)`` (0 for a row
  that keeps nothing; compare with the policy's expected recall), ``density`` = kept causal
  blocks / causal blocks. Compiled Flex on a CPU returns no LSE; there the sparse LSE is the
  fp32 reference's on the layout's token mask (the same keys).
- **Per model** (`attnlab.runs.VALIDATION_SUMMARY`): mean KL(dense ‖ sparse) of the next-token
  distributions over all positions, perplexity of the prompts dense and sparse, needle accuracy
  dense and sparse (probe suite, greedy answers; sparse prefill, dense decode), mean density,
  and wall time of a dense SDPA forward and of the sparse forward.

The executors (`attnlab.sparsity_stats.executors`) run the policy; the run store writes the report.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from attnlab.attention import PLAIN, AttentionVariant, route_attention
from attnlab.errors import AttnlabError
from attnlab.kernels.reference import reference_attention
from attnlab.models import LoadedModel
from attnlab.names import head_label
from attnlab.prompts import Prompt, builtin_prompts
from attnlab.runs import VALIDATION_HEADS, VALIDATION_SUMMARY, Run, ensure_run, preflight_run

from .executors import PolicyExecutor
from .policy import Policy

_ERR_TOKENS = "--tokens {tokens} is beyond {model}'s context of {n_ctx}: lower it"


@dataclass
class ValidationReport:
    """What `validate_policy` measured. ``heads``: one row per (layer, head); ``summary``: model level."""

    heads: pd.DataFrame
    summary: dict[str, Any]
    run: Run | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)

    def format(self) -> str:
        s = self.summary
        lines = [
            f"policy {s['policy']} on {s['model']} with the {s['executor']} executor "
            f"({s['n_prompts']} prompts of {s['prompt_tokens']} tokens)",
            f"  achieved density {s['density_mean']:.3f}"
            + (f" (expected {s['expected_density']:.3f})," if isinstance(s.get("expected_density"), float) else ",")
            + f" per-head output error rel-L2 mean {s['rel_l2_mean']:.4f}, max {s['rel_l2_max']:.4f}",
            f"  logits KL(dense‖sparse) {s['kl_mean']:.5f} nats/token; perplexity {s['ppl_dense']:.3f} → "
            f"{s['ppl_sparse']:.3f} ({s['ppl_delta']:+.3f})",
        ]
        if s.get("recall_mean") is not None:
            expected = s.get("expected_recall")
            lines.append(
                f"  attention mass kept per head: mean {s['recall_mean']:.3f}, worst {s['recall_min']:.3f}"
                + (f" (policy expected mean {expected:.3f})" if isinstance(expected, float) else "")
            )
        if s.get("needle_dense") is not None:
            lines.append(
                f"  needle accuracy {s['needle_dense']:.2f} dense → {s['needle_sparse']:.2f} sparse "
                f"({s['needle_n']} samples; prefill density {s.get('needle_prefill_density', float('nan')):.3f})"
            )
        lines.append(
            f"  time: dense SDPA forward {s['time_dense_s']:.2f} s, sparse forward {s['time_sparse_s']:.2f} s "
            f"({s['device']})"
        )
        worst = self.heads.sort_values("rel_l2", ascending=False).head(5)
        lines.append(
            "  worst heads: "
            + "  ".join(f"{head_label(r.layer, r.head)} {r.kind} {r.rel_l2:.3f}" for r in worst.itertuples())
        )
        return "\n".join(lines)


def _dense_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
                     variant: AttentionVariant | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own dense attention in fp32 (causal, and the layer's window, soft-cap and
    learned sinks): the yardstick every head is measured against."""
    variant = variant or PLAIN
    n_q, n_k = q.shape[-2], k.shape[-2]
    q_pos = torch.arange(n_k - n_q, n_k)[:, None]
    mask = torch.arange(n_k)[None, :] <= q_pos
    if variant.window:
        mask &= q_pos - torch.arange(n_k)[None, :] < variant.window
    out, lse = reference_attention(q, k, v, mask.to(q.device), scale=scaling, dtype=torch.float32,
                                   softcap=variant.softcap, sinks=variant.sinks)
    return out.to(q.dtype), lse


@torch.no_grad()
def head_errors(model: LoadedModel, executor: PolicyExecutor, input_ids: torch.Tensor) -> pd.DataFrame:
    """Per-head errors of one prompt: one forward, both attentions per layer, dense passed on."""
    rows: list[dict[str, Any]] = []

    def attention(layer, query, key, value, *, scaling, attention_mask=None, variant=None):
        variant = variant or PLAIN
        dense, dense_lse = _dense_reference(query, key, value, scaling, variant)
        sparse, sparse_lse = executor.sparse(layer, query, key, value, scaling, variant)
        lay = executor.layouts_[layer]
        if sparse_lse is None:  # compiled Flex on a CPU gives no LSE: take it from the layout's token mask
            _, sparse_lse = reference_attention(query, key, value, lay.to(query.device), scale=scaling, dtype=torch.float32,
                                                softcap=variant.softcap, sinks=variant.sinks)
        diff = (sparse.float() - dense.float())[0]  # [H, n, d]
        norm = dense.float()[0].flatten(1).norm(dim=1).clamp_min(1e-30)
        rel = diff.flatten(1).norm(dim=1) / norm
        dens = lay.density
        kinds = [e.kind for e in executor.policy.layer(layer)]
        for h in range(query.shape[1]):
            ok = torch.isfinite(sparse_lse[0, h])
            if ok.any():
                gap = sparse_lse[0, h].float() - dense_lse[0, h].float()
                lse_err = float(gap[ok].abs().mean())
                recall = float(torch.where(ok, gap.clamp(max=0.0).exp(), torch.zeros_like(gap)).mean())
            else:  # the head keeps nothing: no LSE to compare, and no mass kept
                lse_err, recall = float("nan"), 0.0
            rows.append(
                {
                    "layer": layer, "head": h, "kv_head": h // (query.shape[1] // key.shape[1]), "kind": kinds[h],
                    "density": float(dens[h]), "rel_l2": float(rel[h]), "lse_err": lse_err, "recall": recall,
                    "empty_rows": int((~ok).sum()),
                }
            )
        return dense.transpose(1, 2).contiguous()

    with route_attention(model, attention):
        model.hf_model.base_model(input_ids.to(model.device), use_cache=False)
    return pd.DataFrame(rows)


def _policy_label(policy: Policy) -> str:
    src = getattr(policy, "source_run", None)
    if isinstance(src, dict):
        src = src.get("path") or src.get("name")
    budget = getattr(policy, "budget", None) or {}
    value = budget.get("value", budget.get("budget")) if isinstance(budget, dict) else None
    method = budget.get("method") if isinstance(budget, dict) else None
    return ((f"{method} baseline " if method else "") + f"from {src or 'a file'}"
            + (f" at budget {value}" if value is not None else ""))


def _nll_and_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)
    nll = -logp.gather(-1, ids[0, 1:, None].to(logp.device)).mean()
    return float(nll), logp


def held_out_prompts(model: LoadedModel, n_prompts: int, prompt_tokens: int, seed: int, continuation: int = 0) -> list[Prompt]:
    """Built-in prompts on another seed than profiling's default (held out from the fit).

    ``continuation > 0``: texts of ``prompt_tokens + continuation`` tokens (the held-out text runs
    on past the prompt, for the decode phase's scored continuation); the prefill and the decode
    validation of one ``--phase both`` job build them alike, so they measure the same texts."""
    from .kvcache import check_context

    if prompt_tokens > model.n_ctx:
        raise AttnlabError(_ERR_TOKENS.format(tokens=prompt_tokens, model=model.name, n_ctx=model.n_ctx))
    if continuation:
        check_context(model, prompt_tokens, continuation, what="--tokens with a continuation")
    return builtin_prompts(model.tokenizer, [prompt_tokens + continuation], n_prompts, seed=seed + 1000)


@dataclass
class _ModelLevel:
    """Per-prompt model-level measures: KL(dense ‖ sparse), NLLs and forward times."""

    kl: list[float] = field(default_factory=list)
    nll_dense: list[float] = field(default_factory=list)
    nll_sparse: list[float] = field(default_factory=list)
    time_dense_s: float = 0.0
    time_sparse_s: float = 0.0

    @torch.no_grad()
    def add(self, model: LoadedModel, executor: PolicyExecutor, ids: torch.Tensor) -> None:
        """One prompt: a dense SDPA forward (the fair time baseline) and a sparse one."""
        t0 = time.perf_counter()
        with route_attention(model):
            dense_logits = model.hf_model(ids, use_cache=False).logits
        self.time_dense_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        with route_attention(model, executor.attention):
            sparse_logits = model.hf_model(ids, use_cache=False).logits
        self.time_sparse_s += time.perf_counter() - t0
        nll_d, lp_d = _nll_and_logprobs(dense_logits, ids)
        nll_s, lp_s = _nll_and_logprobs(sparse_logits, ids)
        self.nll_dense.append(nll_d)
        self.nll_sparse.append(nll_s)
        self.kl.append(float((lp_d.exp() * (lp_d - lp_s)).sum(-1).mean()))


def _per_head_table(samples: list[pd.DataFrame], policy: Policy) -> pd.DataFrame:
    """Mean of every prompt's per-head measures, with the policy's expected recall beside it."""
    table = pd.concat(samples, ignore_index=True)
    per_head = (
        table.groupby(["layer", "head", "kv_head", "kind"], as_index=False)
        .agg(density=("density", "mean"), rel_l2=("rel_l2", "mean"), lse_err=("lse_err", "mean"),
             recall=("recall", "mean"), empty_rows=("empty_rows", "sum"))
    )
    expected = {(e.layer, e.head): e.expected_recall for e in policy.heads}
    per_head["expected_recall"] = [expected.get((int(a), int(b))) for a, b in zip(per_head["layer"], per_head["head"], strict=True)]
    return per_head


def _summary(model: LoadedModel, policy: Policy, executor: str, prompts: list[Prompt], per_head: pd.DataFrame,
             measured: _ModelLevel) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "policy": _policy_label(policy),
        "model": model.name,
        "executor": executor,
        "device": str(model.device) + ("" if model.device.type == "cuda" else " (CPU: times are not GPU speedups)"),
        "n_prompts": len(prompts),
        "prompt_tokens": int(prompts[0].n_tokens),
        "density_mean": float(per_head["density"].mean()),
        "expected_density": policy.expected_density,
        "expected_recall": policy.expected_recall,
        "rel_l2_mean": float(per_head["rel_l2"].mean()),
        "rel_l2_max": float(per_head["rel_l2"].max()),
        "lse_err_mean": float(per_head["lse_err"].mean()),
        "recall_mean": float(per_head["recall"].mean()),
        "recall_min": float(per_head["recall"].min()),
        "kl_mean": float(sum(measured.kl) / len(measured.kl)),
        "ppl_dense": math.exp(sum(measured.nll_dense) / len(measured.nll_dense)),
        "ppl_sparse": math.exp(sum(measured.nll_sparse) / len(measured.nll_sparse)),
        "time_dense_s": measured.time_dense_s,
        "time_sparse_s": measured.time_sparse_s,
        "needle_dense": None,
        "needle_sparse": None,
        "needle_n": 0,
    }
    summary["ppl_delta"] = summary["ppl_sparse"] - summary["ppl_dense"]
    return summary


def _add_needle(summary: dict[str, Any], samples: list[dict[str, Any]]) -> None:
    summary["needle_n"] = len(samples)
    summary["needle_dense"] = sum(s["correct_dense"] for s in samples) / len(samples)
    summary["needle_sparse"] = sum(s["correct_sparse"] for s in samples) / len(samples)
    summary["needle_prefill_density"] = sum(s["prefill_density"] for s in samples) / len(samples)


def _write_report(out: str | Path, model: LoadedModel, policy: Policy, report: ValidationReport, needle_samples: int) -> Run:
    s = report.summary
    run = ensure_run(out, model, "validate", {"executor": s["executor"], "prompt_tokens": s["prompt_tokens"],
                                              "n_prompts": s["n_prompts"], "needle_samples": needle_samples})
    run.write(VALIDATION_HEADS, report.heads)
    run.write(VALIDATION_SUMMARY, {**s, "needle": report.samples, "policy_file": policy.to_dict()})
    return run


@torch.no_grad()
def validate_policy(
    model: LoadedModel,
    policy: Policy,
    *,
    executor: str = "flex",
    prompts: list[Prompt] | None = None,
    n_prompts: int = 2,
    prompt_tokens: int = 1024,
    needle_samples: int = 0,
    needle_length: int = 1024,
    out: str | Path | None = None,
    progress: bool = True,
    seed: int = 0,
    deployed_as: str | None = None,
    shard=None,
    job: dict[str, Any] | None = None,
    continuation: int = 0,
) -> ValidationReport:
    """Validate ``policy`` on ``model`` (see the module docstring); write a report when ``out`` is given.

    Args:
        model: a `LoadedModel` the policy was made for.
        policy: a `Policy`.
        executor: ``reference``, ``flex`` or ``triton``.
        prompts: `attnlab.prompts.Prompt` list; default ``n_prompts`` built-in prompts of
            ``prompt_tokens`` tokens (held-out: another seed than profiling's default).
        needle_samples: passkey samples for needle accuracy (0 = skip).
        out: a run directory to add the report to (created if absent; checked before any work).
        deployed_as: an export format (``minference``, ``duo``, ``flex``, ...): run the policy as
            that tool runs the exported file (`attnlab.sparsity_stats.deployed`), through the fp32
            reference, instead of through ``executor``.
        shard: an `attnlab.shards.Shard`: validate only its share (round-robin over the prompts,
            then the needle samples: `shard_units`) into a shard run that also keeps each
            prompt's raw measures (``summary["per_prompt"]``) for `merge_validation_shards`;
            ``job`` is the job's parameters its shard record carries.
        continuation: build the default prompts this many tokens longer and validate their first
            ``prompt_tokens``: the very texts `validate_decode` continues (``--phase both``), so
            both phases are measured on the same prompts.
    """
    if deployed_as is not None:
        from .deployed import DeployedExecutor

        ex = DeployedExecutor(policy, deployed_as)
        executor = ex.executor
    else:
        ex = PolicyExecutor(policy, executor)
    ex.check_model(model)
    if out is not None:
        preflight_run(out, model)
    if prompts is None:  # their first prompt_tokens (a continuation is decode's to score)
        prompts = [replace(p, input_ids=p.input_ids[:, :prompt_tokens])
                   for p in held_out_prompts(model, n_prompts, prompt_tokens, seed, continuation)]
    needles = _needle_samples(model, needle_samples, needle_length, seed) if needle_samples > 0 else []
    t_start = time.perf_counter()
    indices = list(range(len(prompts)))
    if shard is not None:
        indices, needles = shard_share(shard, len(prompts), needles)
    heads: list[pd.DataFrame] = []
    measured = _ModelLevel()
    unit_seconds = []
    for i in tqdm(indices, desc=f"validating ({executor})", unit="prompt", disable=not progress):
        t0 = time.perf_counter()
        ids = prompts[i].input_ids.to(model.device)
        h = head_errors(model, ex, ids)
        h.insert(0, "sample", i)
        heads.append(h)
        measured.add(model, ex, ids)
        unit_seconds.append(time.perf_counter() - t0)
    per_head = _per_head_table(heads, policy)
    report = ValidationReport(per_head, _summary(model, policy, executor, [prompts[i] for i in indices], per_head, measured))
    if needles:
        for s in tqdm(needles, desc="needle accuracy", unit="sample", disable=not progress):
            t0 = time.perf_counter()
            report.samples += needle_accuracy(model, ex, 1, needle_length, seed=seed, progress=False, samples=[s])
            unit_seconds.append(time.perf_counter() - t0)
        _add_needle(report.summary, report.samples)
    if shard is not None:  # the raw per-prompt measures the merge recomputes the report from
        report.summary["per_prompt"] = {
            "sample": indices, "kl": measured.kl, "nll_dense": measured.nll_dense, "nll_sparse": measured.nll_sparse,
            "device": str(model.device), "heads": pd.concat(heads, ignore_index=True).to_dict("list"),
        }
    if out is not None:
        report.run = _write_report(out, model, policy, report, needle_samples)
        if shard is not None:
            from attnlab.shards import mark_shard

            mark_shard(report.run, shard.record("validate", job or {}, [f"prompt{i}" for i in indices] + [s.name for s in needles],
                                                len(prompts) + needle_samples, seconds=time.perf_counter() - t_start,
                                                unit_seconds=unit_seconds))
    return report


def shard_units(n_prompts: int, needles: list[Any]) -> list[str]:
    """The work list `validate` shards, in the single-process order: the held-out prompts
    (``prompt{i}``), then the needle samples (by name)."""
    return [f"prompt{i}" for i in range(n_prompts)] + [s.name for s in needles]


def shard_share(shard, n_prompts: int, needles: list[Any], *, need_prompt: bool = True) -> tuple[list[int], list[Any]]:
    """``shard``'s prompts (indices) and needle samples: its round-robin share of `shard_units`.
    ``need_prompt``: every shard must get a prompt (the prefill report is a mean over prompts)."""
    from attnlab.shards import ShardError, check_share

    units = list(range(n_prompts)) + list(needles)
    share = check_share(shard, units, "prompt or needle sample")
    indices = [u for u in share if isinstance(u, int)]
    if need_prompt and not indices:
        raise ShardError(f"--shard {shard} gets no prompt of {n_prompts}, and every shard needs one for the "
                         f"prefill report: use at most {n_prompts} shards (or raise --prompts)")
    return indices, [u for u in share if not isinstance(u, int)]


def _needle_samples(model: LoadedModel, n: int, length: int, seed: int) -> list[Any]:
    """``n`` passkey samples of ``length`` tokens. The needle probe's errors name its own option
    (``--lengths``); here the length is ``--needle-length``, so that is the option they name."""
    from attnlab.probes.base import ProbeError
    from attnlab.probes.needle import needle_samples

    try:
        return needle_samples(model, lengths=[length], kinds=("passkey",), n_samples=n, seed=seed)
    except ProbeError as exc:
        raise ProbeError(str(exc).replace("--lengths", "--needle-length").replace("--samples", "--needle")) from None


def needle_accuracy(model: LoadedModel, executor: PolicyExecutor, n: int, length: int, *, seed: int = 0,
                    progress: bool = True, samples: list[Any] | None = None) -> list[dict[str, Any]]:
    """Passkey retrieval with dense and with sparse prefill (greedy answers; decode is dense).
    ``samples``: the passkey samples, if already made (else ``n`` of ``length`` tokens)."""
    from attnlab.probes.needle import greedy_answer

    if samples is None:
        samples = _needle_samples(model, n, length, seed)
    rows = []
    for s in tqdm(samples, desc="needle accuracy", unit="sample", disable=not progress):
        dense = greedy_answer(model, s)
        sparse = greedy_answer(model, s, attention=executor.attention)
        layouts = executor.layouts_.values()
        density = float(torch.cat([lay.density for lay in layouts]).mean()) if layouts else float("nan")
        rows.append({"sample": s.name, "answer": s.answer, "dense": dense.text, "sparse": sparse.text,
                     "correct_dense": bool(dense.contains), "correct_sparse": bool(sparse.contains),
                     "prefill_tokens": int(s.input_ids.shape[-1]), "prefill_density": density})
    return rows


# ---------------------------------------------------------------------------------------
# merging shards
# ---------------------------------------------------------------------------------------
class _Measured:
    """What `_summary` reads of a model, from a shard's summary."""

    def __init__(self, name: str, device: str):
        self.name = name
        self.device = torch.device(device)


def merge_validation_shards(shards: list[Run], merged: Run) -> None:
    """`attnlab merge` of ``validate`` shards: the per-head table, KL, perplexities and needle
    accuracy recomputed from every prompt's raw measures in the single-process order (the
    prefill phase), and the decode samples and summary (`decode_validation.merge_decode_shards`)
    for ``--phase decode|both``; the manifest as one process writes it. Times are the sums of
    the shards'."""
    from attnlab.runs import MANIFEST, write_json
    from attnlab.shards import full_order

    job = merged.manifest["parameters"]
    phase = job["phase"]
    position = full_order(shards)
    stages: dict[str, Any] = {}
    kind = "validate_decode"
    if phase in ("prefill", "both"):
        kind = "validate"
        parts = [run.read(VALIDATION_SUMMARY) for run in shards]
        first = parts[0]
        policy = Policy.from_dict(first["policy_file"])
        raw = sorted(((i, k, nd, ns) for p in parts for i, k, nd, ns in
                      zip(p["per_prompt"]["sample"], p["per_prompt"]["kl"], p["per_prompt"]["nll_dense"],
                          p["per_prompt"]["nll_sparse"], strict=True)))
        measured = _ModelLevel(kl=[r[1] for r in raw], nll_dense=[r[2] for r in raw], nll_sparse=[r[3] for r in raw],
                               time_dense_s=sum(p["time_dense_s"] for p in parts),
                               time_sparse_s=sum(p["time_sparse_s"] for p in parts))
        table = pd.concat([pd.DataFrame(p["per_prompt"]["heads"]) for p in parts], ignore_index=True)
        table = table.iloc[table["sample"].argsort(kind="stable")].reset_index(drop=True)
        per_head = _per_head_table([table], policy)

        class _Prompt:
            n_tokens = int(first["prompt_tokens"])

        summary = _summary(_Measured(first["model"], first["per_prompt"]["device"]), policy, first["executor"],
                           [_Prompt()] * len(raw), per_head, measured)
        needle = sorted((s for p in parts for s in p["needle"]), key=lambda s: position[s["sample"]])
        if needle:
            _add_needle(summary, needle)
        merged.write(VALIDATION_HEADS, per_head)
        merged.write(VALIDATION_SUMMARY, {**summary, "needle": needle, "policy_file": first["policy_file"]})
        stages["validate"] = {"executor": summary["executor"], "prompt_tokens": summary["prompt_tokens"],
                              "n_prompts": summary["n_prompts"], "needle_samples": job["needle_samples"]}
    if phase in ("decode", "both"):
        from .decode_validation import merge_decode_shards

        stages["validate_decode"] = merge_decode_shards(shards, merged, position)
    # the manifest one process writes: the first stage's kind and parameters, every stage's entry
    manifest = dict(merged.manifest)
    entry = manifest["stages"].pop("validate")
    manifest.update(kind=kind, parameters=stages[kind], job=job)
    manifest["stages"] = {name: {**(entry if name == kind else {}), "parameters": params} for name, params in stages.items()}
    write_json(merged.file(MANIFEST), manifest)
    merged.manifest = manifest
