"""Decode-phase validation: a policy's compressed KV cache against a full one, in generation.

`validate_decode` runs, on held-out prompts and (optionally) passkey needles, greedy generation
twice — with a full ``DynamicCache`` and with the policy's `attnlab.sparsity_stats.kvcache.PolicyCache`
— under the same attention function, and reports paired per-sample results:

- **continuation agreement**: the share of the ``new_tokens`` greedy tokens the compressed cache
  generates that equal dense's at the same step (``token_match``) and the first step they differ
  (``first_divergence``, ``new_tokens`` when never);
- **per-step KL(dense ‖ compressed)**: the compressed cache fed dense's own continuation (teacher
  forcing), so both predict from the same tokens; ``forced_agreement`` is the share of steps
  whose argmax agrees;
- **perplexity of the prompt's own continuation** (the held-out text's next ``new_tokens``
  tokens, teacher-forced) scored through the full and through the compressed cache;
- **per-head recall of decode attention**: at every decode step of that scoring, the share of
  each query head's dense attention (dense queries over every key seen, the layer's variant
  honoured) that falls on the tokens its KV head still holds — 1.0 for a full cache;
- **needle accuracy** with the compressed cache (the needle probe's samples and grading);
- **KV bytes** held at the end vs a full cache and vs the policy's prediction
  (`Policy.predicted_kv_tokens`), and decode tokens/s of both.

``phase="decode"`` prefills densely; ``phase="both"`` prefills under the policy's prefill heads
(the chosen executor) as well. A policy with no decode section runs with a full cache and says
so (`Policy.decode_note`). Results go to `attnlab.runs.DECODE_SAMPLES` and `DECODE_SUMMARY`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from attnlab.attention import layer_variants, route_attention, scores_to_probs
from attnlab.models import LoadedModel, forward_with_cache
from attnlab.names import head_label
from attnlab.runs import DECODE_SAMPLES, DECODE_SUMMARY, Run, ensure_run, preflight_run

from .kvcache import (
    CachedAttention,
    PolicyCache,
    _dense_fn,
    check_context,
    greedy_decode,
    make_cache,
)
from .policy import Policy

#: Default tokens generated (and scored) per continuation prompt.
NEW_TOKENS = 256

PHASES = ("prefill", "decode", "both")


@dataclass
class DecodeReport:
    """What `validate_decode` measured: ``samples`` one paired row per sample, ``summary`` model level."""

    samples: pd.DataFrame
    summary: dict[str, Any]
    run: Run | None = None

    def format(self) -> str:
        s = self.summary
        lines = [f"decode phase of policy {s['policy']} on {s['model']} ({s['phase']}: "
                 + ("dense prefill" if s["phase"] == "decode" else f"prefill under the policy, {s['executor']} executor")
                 + ", compressed KV cache in decode)"]
        if s.get("note"):
            lines.append(f"  note: {s['note']}")
        if s["n_prompts"]:
            lines.append(
                f"  continuation ({s['n_prompts']} prompts of {s['prompt_tokens']} tokens, {s['new_tokens']} generated): "
                f"token match {s['token_match']:.3f}, first divergence at step {s['first_divergence']:.1f} (mean), "
                f"teacher-forced KL(dense‖compressed) {s['kl_mean']:.5f} nats/step (max {s['kl_max']:.4f}), "
                f"argmax agreement {s['forced_agreement']:.3f}")
        if s.get("ppl_dense") is not None:
            lines.append(
                f"  perplexity of the text's own continuation: {s['ppl_dense']:.3f} full cache → "
                f"{s['ppl_compressed']:.3f} compressed ({s['ppl_delta']:+.3f}); decode attention kept per head "
                f"{s['decode_recall_mean']:.3f} (mean), worst {s['decode_recall_worst_head']} {s['decode_recall_worst']:.3f}")
        if s["needle_n"]:
            lines.append(
                f"  needle accuracy {s['needle_dense']:.3f} dense → {s['needle_compressed']:.3f} compressed "
                f"({s['needle_n']} samples: both right {s['needle_both']}, dense only {s['needle_dense_only']}, "
                f"compressed only {s['needle_compressed_only']}, neither {s['needle_neither']})")
        lines.append(
            f"  KV cache held {s['kv_fraction']:.3f} of dense (bytes held/predicted {s['kv_vs_predicted']:.4f}, "
            f"policy predicts {s['kv_fraction_predicted']:.3f}; this cache's padded buffers {s['kv_fraction_allocated']:.3f})")
        if s.get("tokens_per_s_dense"):
            lines.append(f"  decode {s['tokens_per_s_dense']:.1f} tokens/s dense, {s['tokens_per_s_compressed']:.1f} compressed ({s['device']})")
        return "\n".join(lines)


def _kl(dense: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Per-row KL(dense ‖ other) of two ``[steps, vocab]`` logit tables."""
    lp, lq = torch.log_softmax(dense.float(), -1), torch.log_softmax(other.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def _kv(cache: PolicyCache) -> dict[str, Any]:
    r = cache.kv_report()
    return {"kv_bytes_held": r["kv_bytes_held"], "kv_bytes_dense": r["kv_bytes_dense"],
            "kv_bytes_predicted": r["kv_bytes_predicted"], "kv_bytes_allocated": r["kv_bytes_allocated"],
            "kv_fraction": r["kv_fraction"]}


def _nll(logits: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """Negative log-likelihood of ``tokens[i]`` under ``logits[i]`` (nats), per step."""
    target = torch.tensor(tokens[: logits.shape[0]], dtype=torch.long)
    return -torch.log_softmax(logits.float(), -1).gather(-1, target[:, None])[:, 0]


@torch.no_grad()
def _forced(model: LoadedModel, ids: torch.Tensor, policy: Policy | None, tokens: list[int], prefill, observe) -> torch.Tensor:
    """Teacher-forced decode of ``tokens`` through ``policy``'s cache (None: a full cache);
    ``observe(layer, step, query, key, scaling, cache)`` at every forward of every layer: step 0
    is the prefill (``key`` every prompt key), step ``i >= 1`` the query at position ``n + i - 1``
    (``key`` what the cache holds, its new token last). The logits ``[len(tokens), vocab]``."""
    cache = make_cache(model, policy)
    inner = CachedAttention(cache, prefill) if isinstance(cache, PolicyCache) else _dense_fn(prefill)
    step = [0]

    def fn(layer, query, key, value, *, scaling, attention_mask=None):
        out = inner(layer, query, key, value, scaling=scaling, attention_mask=attention_mask)
        observe(layer, step[0], query, key, scaling, cache)
        return out

    logits = []
    with route_attention(model, fn):
        feed = ids.to(model.device)
        for i, token in enumerate(tokens):
            step[0] = i
            logits.append(forward_with_cache(model.hf_model, feed, cache, logits_to_keep=1).logits[0, -1].float().cpu())
            feed = torch.tensor([[int(token)]], device=model.device)
    return torch.stack(logits)


def scored_continuation(model: LoadedModel, policy: Policy, ids: torch.Tensor, reference: list[int], prefill=None) -> dict[str, Any]:
    """``reference`` (the text that follows ``ids``) teacher-forced through a full and through
    the policy's compressed cache: the NLL of each (nats/token) and, per query head, the mean
    over decode steps of the share of its dense attention that falls on the tokens its KV head
    holds (``recall [L, H]``; dense queries and keys, so the yardstick is what full attention
    would have read)."""
    variants = layer_variants(model)
    n = int(ids.shape[-1])
    queries: dict[tuple[int, int], torch.Tensor] = {}
    keys: dict[int, torch.Tensor] = {}

    def record(layer, step, query, key, scaling, cache):
        # every key seen, kept here: a sliding-window layer's cache holds only its window
        if step == 0:
            keys[layer] = key[0].clone()
            return
        queries[layer, step] = query[0, :, 0, :].float()
        keys[layer] = torch.cat([keys[layer], key[0][:, -1:]], dim=1)

    dense_logits = _forced(model, ids, None, reference, prefill, record)
    n_layers, n_heads, group = model.n_layers, model.n_heads, model.group_size
    kept_mass = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    steps = torch.zeros(n_layers, dtype=torch.float64)

    def recall(layer, step, query, key, scaling, cache):
        if step == 0:
            return
        pos = n + step - 1
        q = queries[layer, step]
        k = keys[layer][:, : pos + 1].float()
        scores = torch.matmul(q.reshape(k.shape[0], group, -1), k.transpose(-1, -2)).reshape(n_heads, 1, pos + 1) * scaling
        probs = scores_to_probs(scores, torch.tensor([pos], device=scores.device), variants[layer])[:, 0]
        slots = cache.layers[layer].positions
        held = torch.zeros(slots.shape[0], pos + 1, dtype=torch.bool, device=probs.device)
        ok = slots >= 0
        rows = torch.arange(slots.shape[0], device=slots.device)[:, None].expand_as(slots)
        held[rows[ok], slots[ok]] = True
        held = held.repeat_interleave(group, dim=0)
        kept_mass[layer] += ((probs * held).sum(-1) / probs.sum(-1).clamp_min(1e-30)).double().cpu()
        steps[layer] += 1

    comp_logits = _forced(model, ids, policy, reference, prefill, recall)
    per_head = (kept_mass / steps.clamp_min(1)[:, None]).numpy()
    return {"nll_dense": float(_nll(dense_logits, reference).mean()), "nll_compressed": float(_nll(comp_logits, reference).mean()),
            "decode_recall": per_head.reshape(-1).tolist(), "decode_recall_mean": float(per_head.mean())}


def continuation_row(model: LoadedModel, policy: Policy, ids: torch.Tensor, new_tokens: int, prefill=None,
                     reference: list[int] | None = None) -> dict[str, Any]:
    """One prompt: dense and compressed greedy continuations, and the compressed cache fed the
    dense continuation (teacher forcing) for per-step KL; with ``reference`` (the prompt text's
    own next tokens) also its perplexity through both caches and the per-head recall of decode
    attention (`scored_continuation`)."""
    t0 = time.perf_counter()
    dense = greedy_decode(model, ids, None, new_tokens, prefill=prefill)
    t_dense = time.perf_counter() - t0
    t0 = time.perf_counter()
    free = greedy_decode(model, ids, policy, new_tokens, prefill=prefill)
    t_comp = time.perf_counter() - t0
    forced = greedy_decode(model, ids, policy, new_tokens, prefill=prefill, force=dense.tokens)
    same = [a == b for a, b in zip(dense.tokens, free.tokens, strict=True)]
    kl = _kl(dense.logits, forced.logits)
    return {
        "task": "continuation", "prompt_tokens": int(ids.shape[-1]), "new_tokens": len(dense.tokens),
        "token_match": sum(same) / len(same), "first_divergence": same.index(False) if False in same else len(same),
        "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
        "forced_agreement": float((dense.logits.argmax(-1) == forced.logits.argmax(-1)).float().mean()),
        "dense": model.tokenizer.decode(dense.tokens, skip_special_tokens=True),
        "compressed": model.tokenizer.decode(free.tokens, skip_special_tokens=True),
        "tokens_per_s_dense": len(dense.tokens) / t_dense, "tokens_per_s_compressed": len(free.tokens) / t_comp,
        **_kv(free.cache),
        **(scored_continuation(model, policy, ids, reference, prefill) if reference else {}),
    }


def needle_row(model: LoadedModel, policy: Policy, sample: Any, prefill=None) -> dict[str, Any]:
    """One passkey sample answered greedily with a full and with the compressed cache, graded."""
    from attnlab.probes.needle import default_max_new_tokens, grade, make_stop

    limit = default_max_new_tokens(sample)
    stop = make_stop(model, sample, stop_on_answer=True)
    ids = sample.input_ids
    dense = greedy_decode(model, ids, None, limit, prefill=prefill, stop=stop)
    comp = greedy_decode(model, ids, policy, limit, prefill=prefill, stop=stop)
    text_d = model.tokenizer.decode(dense.tokens, skip_special_tokens=True)
    text_c = model.tokenizer.decode(comp.tokens, skip_special_tokens=True)
    return {"task": "needle", "sample": sample.name, "answer": sample.answer, "prompt_tokens": int(ids.shape[-1]),
            "new_tokens": len(comp.tokens), "dense": text_d, "compressed": text_c,
            "correct_dense": bool(grade(sample, text_d)["contains"]), "correct_compressed": bool(grade(sample, text_c)["contains"]),
            **_kv(comp.cache)}


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    vals = [r[key] for r in rows if r.get(key) is not None and not (isinstance(r[key], float) and math.isnan(r[key]))]
    return sum(vals) / len(vals) if vals else float("nan")


def _summary(model: LoadedModel, policy: Policy, phase: str, executor: str, rows: list[dict[str, Any]], new_tokens: int) -> dict[str, Any]:
    from .validation import _policy_label

    cont = [r for r in rows if r["task"] == "continuation"]
    needle = [r for r in rows if r["task"] == "needle"]
    held = sum(r["kv_bytes_held"] for r in rows)
    dense = sum(r["kv_bytes_dense"] for r in rows)
    predicted = sum(r["kv_bytes_predicted"] for r in rows)
    s: dict[str, Any] = {
        "policy": _policy_label(policy), "model": model.name, "phase": phase, "executor": executor,
        "note": policy.decode_note(),
        "device": str(model.device),
        "n_prompts": len(cont), "prompt_tokens": cont[0]["prompt_tokens"] if cont else None, "new_tokens": new_tokens,
        "token_match": _mean(cont, "token_match"), "first_divergence": _mean(cont, "first_divergence"),
        "kl_mean": _mean(cont, "kl_mean"), "kl_max": max((r["kl_max"] for r in cont), default=float("nan")),
        "forced_agreement": _mean(cont, "forced_agreement"),
        "tokens_per_s_dense": _mean(cont, "tokens_per_s_dense") if cont else None,
        "tokens_per_s_compressed": _mean(cont, "tokens_per_s_compressed") if cont else None,
        "kv_bytes_held": held, "kv_bytes_dense": dense, "kv_bytes_predicted": predicted,
        "kv_fraction": held / dense if dense else 1.0, "kv_vs_predicted": held / predicted if predicted else 1.0,
        "kv_fraction_predicted": predicted / dense if dense else 1.0,
        "kv_fraction_allocated": sum(r["kv_bytes_allocated"] for r in rows) / dense if dense else 1.0,
        "needle_n": len(needle),
    }
    scored = [r for r in cont if r.get("decode_recall") is not None and len(r["decode_recall"])]
    if scored:
        heads = np.mean([np.asarray(r["decode_recall"], dtype=float) for r in scored], axis=0)
        worst = int(np.argmin(heads))
        n_heads = int(policy.identity["n_heads"])  # the policy's model (a merge has no model loaded)
        nll_d, nll_c = _mean(scored, "nll_dense"), _mean(scored, "nll_compressed")
        s.update(ppl_dense=math.exp(nll_d), ppl_compressed=math.exp(nll_c), ppl_delta=math.exp(nll_c) - math.exp(nll_d),
                 decode_recall_mean=float(heads.mean()), decode_recall_worst=float(heads[worst]),
                 decode_recall_worst_head=head_label(worst // n_heads, worst % n_heads),
                 decode_recall_heads=heads.reshape(-1, n_heads).tolist())
    if needle:
        from .evaluate import paired_counts

        d = [bool(r["correct_dense"]) for r in needle]
        c = [bool(r["correct_compressed"]) for r in needle]
        pc = paired_counts(d, c)
        s.update(needle_dense=sum(d) / len(d), needle_compressed=sum(c) / len(c), needle_both=pc["both"],
                 needle_dense_only=pc["only_dense"], needle_compressed_only=pc["only_sparse"], needle_neither=pc["neither"])
    return s


@torch.no_grad()
def validate_decode(
    model: LoadedModel,
    policy: Policy,
    *,
    phase: str = "decode",
    executor: str = "flex",
    n_prompts: int = 2,
    prompt_tokens: int = 1024,
    new_tokens: int = NEW_TOKENS,
    needle_samples: int = 0,
    needle_length: int = 1024,
    out: str | Path | None = None,
    progress: bool = True,
    seed: int = 0,
    shard=None,
    job: dict[str, Any] | None = None,
) -> DecodeReport:
    """Validate ``policy``'s decode phase on ``model`` (see the module docstring); write the
    paired samples and the summary to the run ``out`` when given (checked before any work).
    ``shard`` (an `attnlab.shards.Shard`): only its round-robin share of the prompts, then the
    needle samples (`attnlab.sparsity_stats.validation.shard_units`), into a shard run with the
    job's parameters ``job`` (with ``phase="both"`` the prefill report has recorded it already)."""
    from .executors import PolicyExecutor
    from .validation import _needle_samples, held_out_prompts, shard_share

    if phase not in ("decode", "both"):
        raise ValueError(f"phase must be 'decode' or 'both', got {phase!r}")
    if n_prompts <= 0 and needle_samples <= 0:
        raise ValueError("validate_decode needs prompts or needle samples (n_prompts or needle_samples > 0)")
    policy.check_model(model.identity())
    if out is not None:
        preflight_run(out, model)
    prefill = None
    if phase == "both":
        ex = PolicyExecutor(policy, executor)
        prefill = ex.attention
    prompts = []
    if n_prompts > 0:
        # the held-out text runs on past the prompt: its next new_tokens are the scored continuation
        prompts = held_out_prompts(model, n_prompts, prompt_tokens, seed, continuation=new_tokens)
    needles = _needle_samples(model, needle_samples, needle_length, seed) if needle_samples > 0 else []
    indices = list(range(len(prompts)))
    if shard is not None:
        indices, needles = shard_share(shard, len(prompts), needles, need_prompt=phase == "both")
    t_start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    unit_seconds = []
    for i in tqdm(indices, desc="decode: continuations", unit="prompt", disable=not progress):
        t0 = time.perf_counter()
        ids, reference = prompts[i].input_ids[:, :prompt_tokens], prompts[i].input_ids[0, prompt_tokens:].tolist()
        rows.append({"sample": f"prompt{i}", **continuation_row(model, policy, ids, new_tokens, prefill, reference)})
        unit_seconds.append(time.perf_counter() - t0)
    for s in tqdm(needles, desc="decode: needle", unit="sample", disable=not progress):
        t0 = time.perf_counter()
        rows.append(needle_row(model, policy, s, prefill))
        unit_seconds.append(time.perf_counter() - t0)
    samples = pd.DataFrame(rows)
    if "decode_recall" in samples:  # a list per continuation, None (not NaN) on needle rows
        samples["decode_recall"] = [r.get("decode_recall") for r in rows]
    report = DecodeReport(samples, _summary(model, policy, phase, executor, rows, new_tokens))
    if out is not None:
        run = ensure_run(out, model, "validate_decode", {"phase": phase, "executor": executor, "prompt_tokens": prompt_tokens,
                                                          "n_prompts": n_prompts, "new_tokens": new_tokens, "needle_samples": needle_samples})
        run.write(DECODE_SAMPLES, report.samples)
        run.write(DECODE_SUMMARY, {**report.summary, "policy_file": policy.to_dict()})
        report.run = run
        if shard is not None:
            from attnlab.shards import mark_shard

            rec = shard.record("validate", job or {}, [r["sample"] for r in rows], len(prompts) + needle_samples,
                               seconds=time.perf_counter() - t_start, unit_seconds=unit_seconds)
            old = run.manifest.get("shard") if phase == "both" else None
            if old:  # the prefill part of the same units ran first: one record, both times
                rec["seconds"] += old.get("seconds", 0.0)
                rec["unit_seconds"] = [a + b for a, b in zip(old["unit_seconds"], rec["unit_seconds"], strict=True)]
            mark_shard(run, rec)
    return report


def merge_decode_shards(shards: list[Run], merged: Run, position: dict[str, int]) -> dict[str, Any]:
    """The decode part of `attnlab merge` of ``validate`` shards: the paired samples in the
    single-process order and the summary recomputed from them; returns the stage's parameters."""
    from attnlab.shards import ShardError, shard_units

    from .validation import _Measured

    for run in shards:  # e.g. --phase both stopped after its prefill part had recorded the shard
        if not (run.has(DECODE_SUMMARY) and run.has(DECODE_SAMPLES)):
            index, count, _ = shard_units(run)
            raise ShardError(f"shard {index}/{count} ({run.path}) has no decode results: its decode phase did not "
                             f"finish; re-run that shard (--shard {index}/{count}) and merge again")
    parts = [run.read(DECODE_SUMMARY) for run in shards]
    first = parts[0]
    table = pd.concat([run.read(DECODE_SAMPLES) for run in shards], ignore_index=True)
    table = table.iloc[table["sample"].map(position).argsort(kind="stable")].reset_index(drop=True)
    rows = [{k: v for k, v in r.items()} for r in table.to_dict("records")]
    policy = Policy.from_dict(first["policy_file"])
    summary = _summary(_Measured(first["model"], first["device"]), policy, first["phase"], first["executor"], rows,
                       int(first["new_tokens"]))
    merged.write(DECODE_SAMPLES, table)
    merged.write(DECODE_SUMMARY, {**summary, "policy_file": first["policy_file"]})
    job = merged.manifest["parameters"]
    return {"phase": first["phase"], "executor": first["executor"], "prompt_tokens": job["prompt_tokens"],
            "n_prompts": job["n_prompts"], "new_tokens": first["new_tokens"], "needle_samples": job["needle_samples"]}


@torch.no_grad()
def side_by_side(model: LoadedModel, policy: Policy, text: str, *, max_new_tokens: int = 64, chat: bool = True,
                 do_sample: bool = False, seed: int = 0, **kwargs: Any) -> dict[str, Any]:
    """``text``'s continuation with a full cache and with the policy's compressed one (greedy,
    or sampled from ``seed``), with each cache's size at the end."""
    from .kvcache import generate

    ids = model.encode(text, chat=chat)
    check_context(model, ids.shape[-1], max_new_tokens)
    out: dict[str, Any] = {"prompt_tokens": int(ids.shape[-1]), "note": policy.decode_note()}
    for name, pol in (("dense", None), ("compressed", policy)):
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        tokens, cache = generate(model, ids, pol, max_new_tokens=max_new_tokens, do_sample=do_sample, **kwargs)
        seconds = time.perf_counter() - t0
        new = tokens[0, ids.shape[-1]:].tolist()
        out[name] = {"text": model.tokenizer.decode(new, skip_special_tokens=True), "tokens": len(new), "seconds": seconds}
        if isinstance(cache, PolicyCache):
            out[name].update(cache.kv_report())
        else:
            held = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers if layer.is_initialized)
            out[name].update(kv_bytes_held=held, kv_fraction=1.0)
    return out


def format_side_by_side(result: dict[str, Any]) -> str:
    d, c = result["dense"], result["compressed"]
    lines = [f"prompt: {result['prompt_tokens']} tokens"]
    if result.get("note"):
        lines.append(f"note: {result['note']}")
    lines.append(f"--- dense (full KV cache: {d['kv_bytes_held'] / 2**20:.2f} MiB, {d['tokens']} tokens in {d['seconds']:.1f} s)")
    lines.append(d["text"])
    lines.append(f"--- compressed ({c['kv_bytes_held'] / 2**20:.2f} MiB = {c['kv_fraction']:.3f} of dense; the policy predicts "
                 f"{c['kv_bytes_predicted'] / 2**20:.2f} MiB; {c['tokens']} tokens in {c['seconds']:.1f} s)")
    lines.append(c["text"])
    return "\n".join(lines)
