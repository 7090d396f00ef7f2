"""Circuits on the embedded model: does attribution patching rank heads like exact patching, what
does it cost, and how small is a faithful IOI circuit?

On the IOI task (`attnlab.circuits.tasks.ioi_task`, ABC corruption) this measures

1. **the behaviour** — mean clean and corrupted logit difference (IO − S) and IOI accuracy
   (share of examples whose IO logit beats the S logit on the clean prompt);
2. **cost** — wall time of attribution patching over all 270 heads (node scores only; nodes
   and edges with the batched edge backward; nodes and edges with the one-backward-per-receiver
   reference loop) against the exhaustive per-head activation patching baseline, run both ways:
   one forward per head (the literal baseline) and several heads' patches stacked along the
   batch (``--batch-heads``, the fairer baseline; identical scores up to float rounding).
   Target: attribution (nodes) ≥ 20× faster than the exhaustive baseline;
3. **agreement** — Spearman rank correlation of the two node-score vectors over all 270 heads
   (target ≥ 0.7) and the overlap of their top-k heads;
4. **faithfulness** (``f = (m(C) − m(∅)) / (m(N) − m(∅))``, heads outside C mean-ablated) of
   the top-k heads of each ranking — attribution denoising / noising / |denoising|, EAP-IG,
   exact activation patching — under per-position means (the task's corrupted prompts, or a
   larger independent ABC reference set) and global means, and of the circuits found by
   `refine_circuit` (grow / prune by attribution under the current circuit). Every circuit is
   also measured on held-out examples (another seed). Target: f ≥ 0.8 with ≤ 10% of heads (27).

    OMP_NUM_THREADS=1 python benchmarks/circuits.py --threads 1                    # ~25 min on a busy machine
    python benchmarks/circuits.py --examples 8 --skip-unbatched --no-faithfulness   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

GRID = (0, 5, 10, 15, 20, 24, 27, 30, 35, 40, 50, 60, 70, 80, 100, 120, 150, 200, 270)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=16, help="IOI examples (default 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heldout-seed", type=int, default=1, help="seed of the held-out IOI examples")
    parser.add_argument("--reference", type=int, default=96,
                        help="size of the independent ABC reference set for per-position means (default 96; 0: skip)")
    parser.add_argument("--batch-heads", type=int, default=9, help="heads stacked per forward in the batched baseline")
    parser.add_argument("--skip-unbatched", action="store_true", help="skip the one-forward-per-head baseline")
    parser.add_argument("--skip-loop", action="store_true", help="skip the per-receiver edge loop")
    parser.add_argument("--act-noising", action="store_true", help="also rank by exact noising activation patching")
    parser.add_argument("--no-faithfulness", action="store_true", help="skip the faithfulness comparison")
    parser.add_argument("--out", default="/tmp/circuits_results.md", help="markdown section to write")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared, busy machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from attnlab.circuits.faithfulness import faithfulness_curve, rank_heads, refine_circuit
    from attnlab.circuits.patching import activation_patching, attribution_patching
    from attnlab.circuits.tasks import example_metrics, ioi_task
    from attnlab.models import load_model
    from attnlab.probes.retrieval import spearman

    started = time.perf_counter()
    model = load_model("smollm2-135m", verbose=False)
    task = ioi_task(model.tokenizer, n=args.examples, seed=args.seed)
    heldout = ioi_task(model.tokenizer, n=args.examples, seed=args.heldout_seed)
    L, H = model.n_layers, model.n_heads
    n_heads = L * H

    # 1. the behaviour ----------------------------------------------------------------------
    clean_ld, corr_ld = example_metrics(model, task)
    held_clean, _ = example_metrics(model, heldout)
    fig: dict = {
        "examples": len(task), "groups": [int(g[0].shape[0]) for g in task.groups()],
        "clean_logit_diff": float(clean_ld.mean()), "corrupted_logit_diff": float(corr_ld.mean()),
        "ioi_accuracy": float((clean_ld > 0).double().mean()),
        "heldout_clean_logit_diff": float(held_clean.mean()), "heldout_ioi_accuracy": float((held_clean > 0).double().mean()),
    }
    log(f"clean {fig['clean_logit_diff']:.3f} corrupted {fig['corrupted_logit_diff']:.3f} acc {fig['ioi_accuracy']:.2f}")

    # 2. cost ---------------------------------------------------------------------------------
    attribution_patching(model, task, edges=False)  # warm-up: first calls pay one-off costs

    def timed(fn, **kw):
        t0 = time.perf_counter()
        out = fn(model, task, **kw)
        return out, time.perf_counter() - t0

    attr, fig["t_attr_nodes"] = timed(attribution_patching, edges=False)
    log(f"attribution nodes {fig['t_attr_nodes']:.1f}s")
    attr_e, fig["t_attr_edges"] = timed(attribution_patching, edges=True)
    log(f"attribution nodes+edges (batched) {fig['t_attr_edges']:.1f}s")
    if not args.skip_loop:
        attr_loop, fig["t_attr_edges_loop"] = timed(attribution_patching, edges=True, batch_edges=False)
        scale = float(attr_loop.edges.abs().max())
        fig["edges_max_rel_diff"] = float((attr_e.edges - attr_loop.edges).abs().max()) / scale
        log(f"attribution nodes+edges (loop) {fig['t_attr_edges_loop']:.1f}s, rel diff {fig['edges_max_rel_diff']:.2e}")
    act, fig["t_act_batched"] = timed(activation_patching, batch_heads=args.batch_heads)
    log(f"activation patching, {args.batch_heads} heads per forward {fig['t_act_batched']:.1f}s")
    if not args.skip_unbatched:
        act1, fig["t_act_unbatched"] = timed(activation_patching, batch_heads=1)
        fig["act_max_abs_diff"] = float((act.nodes - act1.nodes).abs().max())
        log(f"activation patching, one forward per head {fig['t_act_unbatched']:.1f}s, max diff {fig['act_max_abs_diff']:.2e}")

    # 3. agreement ----------------------------------------------------------------------------
    fig["spearman_attr_vs_act"] = spearman(attr.nodes, act.nodes)
    fig["spearman_abs"] = spearman(attr.nodes.abs(), act.nodes.abs())
    ra, rx = rank_heads(attr.nodes), rank_heads(act.nodes)
    fig["top_overlap"] = {k: len(set(ra[:k]) & set(rx[:k])) for k in (5, 10, 27)}
    fig["top_attr"] = [f"{a}.{b} ({float(attr.nodes[a, b]):.2f})" for a, b in ra[:10]]
    fig["top_act"] = [f"{a}.{b} ({float(act.nodes[a, b]):.2f})" for a, b in rx[:10]]
    log(f"spearman {fig['spearman_attr_vs_act']:.3f}, top overlap {fig['top_overlap']}")

    # 4. faithfulness -------------------------------------------------------------------------
    rows = []
    if not args.no_faithfulness:
        rankings = {
            "attribution, denoising": attr.nodes,
            "attribution, noising": attribution_patching(model, task, edges=False, direction="noising").nodes,
            "attribution, denoising, \\|score\\|": attr.nodes.abs(),
            "EAP-IG (5 steps), denoising": attribution_patching(model, task, edges=False, ig_steps=5).nodes,
            "activation patching (exact), denoising": act.nodes,
            "activation patching (exact), \\|score\\|": act.nodes.abs(),
        }
        if args.act_noising:
            rankings["activation patching (exact), noising"] = activation_patching(
                model, task, direction="noising", batch_heads=args.batch_heads).nodes
        reference = ioi_task(model.tokenizer, n=args.reference, seed=1000 + args.seed) if args.reference else None
        mean_kinds = [("position", None), ("global", None)] + ([("position", reference)] if reference else [])

        def kind_name(means, ref):
            if ref is None:
                return f"{means}, task's corrupted prompts"
            return f"{means}, {len(ref)} independent ABC prompts"

        for means, ref in mean_kinds:
            for name, scores in rankings.items():
                t0 = time.perf_counter()
                ranking = rank_heads(scores)
                curve = faithfulness_curve(model, task, ranking, sizes=GRID, means=means, reference=ref)
                held = faithfulness_curve(model, heldout, ranking, sizes=[0, 27, 270], means=means, reference=ref)
                rows.append({
                    "ranking": name, "means": kind_name(means, ref), "f": dict(zip(curve["sizes"], curve["f"], strict=True)),
                    "smallest": curve["smallest_at_level"], "cpr": curve["cpr"], "cmd": curve["cmd"],
                    "heldout_f27": held["f"][1], "m_full": curve["m_full"], "m_empty": curve["m_empty"],
                    "seconds": time.perf_counter() - t0,
                })
                log(f"{name} / {kind_name(means, ref)}: f@27 {curve['f'][GRID.index(27)]:.2f}, smallest {curve['smallest_at_level']}")
            for mode, step in (("grow", 1), ("prune", 5)):
                t0 = time.perf_counter()
                ref_out = refine_circuit(model, task, mode=mode, step=step, means=means, reference=ref,
                                         max_size=n_heads if mode == "prune" else 60)
                f_path = dict(zip(ref_out["sizes"], ref_out["f"], strict=True))
                circuit = ref_out["circuit"]
                held = faithfulness_curve(model, heldout, ref_out["ranking"], sizes=[0, 27, 270], means=means, reference=ref,
                                          circuit=circuit)
                near27 = max((k for k in f_path if k <= 27), default=None)
                rows.append({
                    "ranking": f"refine {mode} (step {step}), attribution under the current circuit",
                    "means": kind_name(means, ref), "f": f_path, "smallest": ref_out["smallest_at_level"],
                    "f27_size": near27, "heldout_f27": held["f"][1],
                    "heldout_circuit_f": held.get("circuit_f"), "circuit": circuit,
                    "m_full": ref_out["m_full"], "m_empty": ref_out["m_empty"], "seconds": time.perf_counter() - t0,
                    "steps": ref_out["forwards"],
                })
                log(f"refine {mode} / {kind_name(means, ref)}: smallest {ref_out['smallest_at_level']}, "
                    f"{time.perf_counter() - t0:.0f}s")
    fig["faithfulness"] = rows
    total_s = time.perf_counter() - started
    fig["runtime_s"] = total_s
    if args.json:
        with open(args.json, "w") as f:
            json.dump(fig, f, indent=2, default=str)

    # markdown ------------------------------------------------------------------------------
    def fmt(x, spec=".2f"):
        return "n/a" if x is None else format(x, spec)

    command = "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "unset") + " python benchmarks/circuits.py " + " ".join(sys.argv[1:])
    t_base = fig.get("t_act_unbatched")
    t_fair = fig["t_act_batched"]
    lines = [
        f"### circuits: IOI on the embedded model — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()} "
        f"({os.cpu_count()} cores, shared; {torch.get_num_threads()} torch thread(s), {platform.machine()}, torch {torch.__version__}), "
        f"`{command.strip()}`, {total_s / 60:.1f} min",
        "",
        f"SmolLM2-135M-Instruct (30 layers × 9 query heads = 270 heads), {len(task)} IOI examples (seed {args.seed}; "
        f"{len(fig['groups'])} length groups of {fig['groups']} examples), ABC corruption (S replaced by a third name). "
        "Baseline for timings: exhaustive per-head activation patching (`activation_patching`) of the same examples in "
        "the same run.",
        "",
        "| measure | value | target |",
        "|---|---:|---:|",
        f"| clean logit difference IO − S (mean) | {fmt(fig['clean_logit_diff'])} | |",
        f"| corrupted logit difference (mean) | {fmt(fig['corrupted_logit_diff'])} | |",
        f"| IOI accuracy (IO logit > S logit, clean) | {fmt(fig['ioi_accuracy'])} "
        f"(held-out seed {args.heldout_seed}: {fmt(fig['heldout_ioi_accuracy'])}, logit diff {fmt(fig['heldout_clean_logit_diff'])}) | |",
    ]
    if t_base is not None:
        lines.append(f"| exhaustive activation patching, one forward per head (literal baseline) | {t_base:.1f} s | |")
    lines += [
        f"| exhaustive activation patching, {args.batch_heads} heads stacked per forward (batched baseline) | {t_fair:.1f} s"
        + (f" ({t_base / t_fair:.2f}× faster than one per head; max score diff {fig['act_max_abs_diff']:.1e})" if t_base else "")
        + " | |",
        f"| attribution patching, 270 node scores | {fig['t_attr_nodes']:.1f} s | |",
        "| speedup nodes: batched baseline ÷ attribution" + (" (literal baseline ÷ attribution)" if t_base else "")
        + f" | {t_fair / fig['t_attr_nodes']:.1f}×" + (f" ({t_base / fig['t_attr_nodes']:.1f}×)" if t_base else "") + " | ≥ 20× |",
        f"| attribution patching, nodes + all 270×270 edges (batched edge backward) | {fig['t_attr_edges']:.1f} s "
        f"(batched baseline ÷ this: {t_fair / fig['t_attr_edges']:.1f}×) | |",
    ]
    if "t_attr_edges_loop" in fig:
        lines.append(
            f"| attribution patching, nodes + edges, one backward per receiver head (previous code) | {fig['t_attr_edges_loop']:.1f} s "
            f"(batched edges {fig['t_attr_edges_loop'] / fig['t_attr_edges']:.2f}× faster; max edge diff "
            f"{fig['edges_max_rel_diff']:.1e} of the largest edge) | |")
    lines += [
        f"| Spearman, attribution vs activation node scores (270 heads) | {fmt(fig['spearman_attr_vs_act'])} "
        f"(of \\|scores\\|: {fmt(fig['spearman_abs'])}) | ≥ 0.7 |",
        "| top-k overlap attribution vs activation (k = 5, 10, 27) | "
        + ", ".join(f"{v}/{k}" for k, v in fig["top_overlap"].items()) + " | |",
        "",
        f"Top heads by attribution (layer.head, logit-diff units): {', '.join(fig['top_attr'])}.",
        f"Top heads by activation patching: {', '.join(fig['top_act'])}.",
        "",
    ]
    if rows:
        lines += [
            "#### Faithfulness of IOI circuits (target: f ≥ 0.8 with ≤ 27 heads)",
            "",
            "f = (m(C) − m(∅)) / (m(N) − m(∅)), m = mean logit difference on the clean prompts, heads outside C "
            "mean-ablated (the documented ablation; means over corrupted prompts). \"smallest\" = smallest size on the grid "
            f"{list(GRID)} (refine: on its own path, and f@k is f at the largest size ≤ k on that path) with f ≥ 0.8. Held-out: the same ranking / circuit on {args.examples} "
            f"other examples (seed {args.heldout_seed}), same kind of means.",
            "",
            "| ranking | means | m(N) | m(∅) | f@10 | f@20 | f@27 | smallest reaching 0.8 | held-out f@27 | CPR | s |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            f = r["f"]
            refine = r["ranking"].startswith("refine")
            if refine:
                def at(k, f=f):
                    ks = [s for s in f if s <= k]
                    return f[max(ks)] if ks else None
                f10, f20, f27 = at(10), at(20), at(27)
            else:
                f10, f20, f27 = f.get(10), f.get(20), f.get(27)
            held = fmt(r["heldout_f27"])
            if refine and r.get("heldout_circuit_f") is not None:
                held += f" (its {r['smallest']}-head circuit: {fmt(r['heldout_circuit_f'])})"
            lines.append(
                f"| {r['ranking']} | {r['means']} | {r['m_full']:.2f} | {r['m_empty']:.2f} | {fmt(f10)} | {fmt(f20)} | {fmt(f27)} | "
                f"{r['smallest'] if r['smallest'] is not None else '> grid'} | {held} | "
                f"{fmt(r.get('cpr'))} | {r['seconds']:.0f} |")
        lines.append("")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
