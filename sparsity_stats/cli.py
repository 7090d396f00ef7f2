"""Command-line commands of the policy stage: ``policy``, ``policy compare``, ``export``, ``import``.

::

    attnlab policy RUN --budget 0.15 [--out policy.json]             # budgeted per-head policy
    attnlab policy compare RUN --budgets 0.05,0.1,0.2,0.4            # table + HTML trade-off plot
    attnlab export policy.json --seq-len 8192 --block-size 64 --format npz|safetensors|flex|minference|duo --out masks/
    attnlab import minference|duo|npz|safetensors|flex FILE --model RUN --out policy.json

``attnlab/cli.py`` registers them with `add_commands`; each handler returns an exit code and
raises `attnlab.errors.AttnlabError` (printed as one line) for bad input, before writing.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

from attnlab.errors import AttnlabError
from attnlab.runs import POLICY, Run, atomic_path

from .errors import ERR_EXISTS, PolicyError
from .kinds import KINDS

_ERR_LIST = "{flag} {got!r} is not a comma-separated list of {what}: e.g. {example}"


#: Fewer blocks per row than this at the evaluated length: `attnlab policy` suggests a smaller block.
FEW_BLOCKS = 64


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PolicyError(_ERR_LIST.format(flag=flag, got=text, what="numbers", example="0.05,0.1,0.2")) from None


def _ints(text: str | None, flag: str) -> list[int] | None:
    if not text:
        return None
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PolicyError(_ERR_LIST.format(flag=flag, got=text, what="whole numbers", example="2048,4096")) from None
    if any(x <= 0 for x in out):
        raise PolicyError(f"{flag} {text!r}: lengths must be positive token counts")
    return out


def _heads(text: str | None) -> list[tuple[int, int]]:
    if not text:
        return []
    out = []
    for item in text.split(","):
        try:
            lay, head = item.split(":")
            out.append((int(lay), int(head)))
        except ValueError:
            raise PolicyError(f"--protect-heads {text!r}: give LAYER:HEAD pairs separated by commas, e.g. 3:1,10:4") from None
    return out


def _kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise PolicyError(f"--kinds {text!r}: unknown kind {bad[0] if bad else '(none)'}; use some of {','.join(KINDS)}")
    return kinds


def _refuse_existing(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise PolicyError(ERR_EXISTS.format(path=path))


def _generator_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "block_size": args.block_size,
        "eval_lengths": _ints(args.lengths, "--lengths"),
        "kinds": _kinds(args.kinds),
        "min_sink": args.min_sink,
        "protect_retrieval": args.protect,
        "retrieval_threshold": args.retrieval_threshold,
        "retrieval_floor": args.retrieval_floor,
        "recall_floor": args.recall_floor,
        "protected_heads": _heads(args.protect_heads),
        "gqa_consistent": args.gqa,
        "progress": not args.quiet,
    }


# -- policy -----------------------------------------------------------------------------------
def _policy(args: argparse.Namespace) -> int:
    if args.run == "compare":
        if not args.compare_run:
            raise PolicyError("`attnlab policy compare` needs a run directory: attnlab policy compare RUN --budgets 0.05,0.1,0.2,0.4")
        return _policy_compare(args)
    if args.compare_run:
        raise PolicyError(f"unexpected argument {args.compare_run!r}: use `attnlab policy RUN --budget B` or `attnlab policy compare RUN`")
    from .generator import PolicyGenerator, check_budget

    budget = check_budget(args.budget)
    run = Run.open(args.run)
    out = Path(args.out) if args.out else run.path / POLICY
    _refuse_existing(out, args.force)
    kwargs = _generator_kwargs(args)
    gen = PolicyGenerator(budget=budget, budget_kind=args.budget_kind, **kwargs).fit(run)
    policy = gen.emit()
    policy.save(out)
    s = policy.summary
    kinds = ", ".join(f"{k} {v}" for k, v in s["kinds"].items() if v)
    print(f"policy for {policy.model.get('name')} ({policy.n_layers} layers x {policy.n_heads} heads), block {policy.block_size}")
    print(f"  budget      {args.budget_kind} <= {budget:g}   expected {policy.budget['expected']:.4f}")
    print(f"  recall      mean {s['expected_recall']:.4f}   worst head {s['min_head_recall']:.4f}")
    print(f"  heads       {kinds}" + (f"   ({len(s['protected_heads'])} protected)" if s["protected_heads"] else ""))
    gap = "optimal" if s["optimal"] else f"gap <= {s['optimality_gap_per_head']:.2e} recall per head"
    print(f"  optimiser   {s['n_candidates']} candidates per head, {s['solver_nodes']} nodes, {gap}")
    print(f"  wrote       {out}")
    n_eval = max(policy.eval_lengths or [0])
    if n_eval and n_eval // policy.block_size < FEW_BLOCKS:
        finer = max(16, 1 << (max(n_eval // FEW_BLOCKS, 1).bit_length() - 1))  # a power of two, at least 16
        hint = (f"; profile with --block-size {finer} for finer ones (README: Validating a policy)"
                if finer < policy.block_size else "")
        print(f"note: at {n_eval} tokens a {policy.block_size}-token block leaves {n_eval // policy.block_size} blocks per row, "
              f"so patterns are coarse{hint}", file=sys.stderr)
    return 0


def _policy_compare(args: argparse.Namespace) -> int:
    from .compare import compare_policies, format_table, write_tradeoff_html

    budgets = _floats(args.budgets, "--budgets")
    if not budgets:
        raise PolicyError("--budgets is empty: give e.g. 0.05,0.1,0.2,0.4")
    from .generator import check_budget

    budgets = [check_budget(b) for b in budgets]
    run = Run.open(args.compare_run)
    out = Path(args.out) if args.out else run.path / "policy_compare.csv"
    html = out.with_suffix(".html")
    for p in (out, html):
        _refuse_existing(p, args.force)
    kwargs = _generator_kwargs(args)
    progress = kwargs.pop("progress")
    table = compare_policies(run, budgets, budget_kind=args.budget_kind, progress=progress,
                             policies_out=args.save_policies, **kwargs)
    print(format_table(table))
    with atomic_path(out) as tmp:
        table.to_csv(tmp, index=False)
    write_tradeoff_html(table, html, title=f"{run.model.get('name', run.name)}: expected recall vs {args.budget_kind}")
    print(f"wrote {out} and {html}")
    if args.save_policies:
        print(f"saved the policies to {args.save_policies}/ (attnlab validate DIR/METHOD-BUDGET.json --out RUN)")
    return 0


# -- export / import ----------------------------------------------------------------------------
def _model_from(arg: str | None) -> tuple[dict[str, Any] | None, Any]:
    """Model identity (and an estimator when it is a run with block maps) from --model."""
    if not arg:
        return None, None
    p = Path(arg)
    if p.is_dir():
        run = Run.open(p)
        est = None
        if run.has("block_maps.safetensors"):
            from .curves import ProfileEstimator

            est = ProfileEstimator.from_run(run)
        return run.model, est
    if not p.is_file():
        raise PolicyError(f"--model {arg}: no run directory or model JSON there; pass a profiled run of the model")
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PolicyError(f"--model {arg} is not valid JSON ({exc}); pass a run directory or a JSON with n_layers, n_heads") from None
    return (d.get("model") if isinstance(d, dict) and isinstance(d.get("model"), dict) else d), None


def _print_warnings(caught: list[warnings.WarningMessage]) -> None:
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)


def _export(args: argparse.Namespace) -> int:
    from .export import export_policy
    from .policy import Policy

    model, _ = _model_from(args.model)
    policy = Policy.load(args.policy, model=model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = export_policy(policy, args.out, args.format, seq_len=args.seq_len, block_size=args.block_size,
                              force=args.force, lossy=args.lossy, dense_blocks=args.dense_blocks, progress=not args.quiet)
    _print_warnings(caught)
    for p in paths:
        print(f"wrote {p}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from .export import MASK_FORMATS, import_policy

    model, est = _model_from(args.model)
    out = Path(args.out)
    _refuse_existing(out, args.force)
    if est is not None and est.block_size != args.block_size:
        est = None  # recall estimates need the policy's block size
    policy = import_policy(args.format, args.path, model, threshold=args.threshold, sparsity=args.sparsity,
                           block_size=args.block_size, seq_len=args.seq_len, estimator=None if args.format in MASK_FORMATS else est)
    policy.save(out)
    kinds = {}
    for e in policy.heads:
        kinds[e.kind] = kinds.get(e.kind, 0) + 1
    print(f"imported {args.format} {args.path}: " + ", ".join(f"{k} {v}" for k, v in kinds.items()))
    print(f"wrote {out}")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``policy`` (with ``policy compare``), ``export`` and ``import``."""
    from .export import EXPORT_FORMATS, IMPORT_FORMATS
    from .generator import BUDGET_KINDS, PROTECT

    p = subparsers.add_parser(
        "policy",
        help="choose a sparse-attention policy per head within a budget (or: policy compare RUN)",
        description="Fit per-head cost-recall curves from a profiled run and choose, per head, the pattern that "
        "keeps the most attention within a global budget (exact multiple-choice knapsack). "
        "`attnlab policy compare RUN --budgets ...` compares against uniform streaming, DuoAttention- and "
        "MInference-style baselines and writes a table and an HTML plot.",
    )
    p.add_argument("run", metavar="RUN", help="profiled run directory (or the word 'compare' followed by RUN)")
    p.add_argument("compare_run", nargs="?", metavar="RUN", help=argparse.SUPPRESS)
    p.add_argument("--budget", type=float, default=0.15, help="share of dense causal attention (or KV) to use, in (0, 1] (default 0.15)")
    p.add_argument("--budgets", default="0.05,0.1,0.2,0.4", help="compare: comma-separated budgets")
    p.add_argument("--budget-kind", choices=BUDGET_KINDS, default="density", help="density (FLOPs) or kv (KV cache) budget")
    p.add_argument("--out", help="policy JSON (default RUN/policy.json); compare: table CSV (default RUN/policy_compare.csv, plot beside it)")
    p.add_argument("--block-size", type=int, default=None, help="policy block size (default: the run's block maps)")
    p.add_argument("--lengths", default=None, help="comma-separated lengths to evaluate at (default: the longest profiled)")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"kinds to choose from (default {','.join(KINDS)})")
    p.add_argument("--min-sink", type=int, default=4, help="minimum sink tokens of streaming/A-shape heads (default 4)")
    p.add_argument("--gqa", action="store_true", help="heads sharing a KV head share a policy")
    p.add_argument("--protect", choices=PROTECT, default="dense", help="retrieval heads: keep dense, hold a recall floor, or none")
    p.add_argument("--retrieval-threshold", type=float, default=0.1, help="retrieval score from which a head is protected (default 0.1)")
    p.add_argument("--retrieval-floor", type=float, default=0.95, help="recall floor of protected heads with --protect floor")
    p.add_argument("--recall-floor", type=float, default=None, help="recall floor of every head")
    p.add_argument("--protect-heads", default=None, help="extra heads to protect, LAYER:HEAD,... (e.g. circuit heads)")
    p.add_argument("--save-policies", default=None, metavar="DIR",
                   help="compare: also save every compared policy (budgeted and baselines) as DIR/METHOD-BUDGET.json, "
                   "for `attnlab validate`")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_policy)

    e = subparsers.add_parser(
        "export",
        help="compile a policy into per-head masks or another tool's config",
        description="Compile POLICY at --seq-len and --block-size into per-layer block-sparse masks "
        "(npz, safetensors, flex) or write it as a MInference or DuoAttention config.",
    )
    e.add_argument("policy", metavar="POLICY", help="policy JSON from `attnlab policy`")
    e.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    e.add_argument("--out", required=True, help="output directory")
    e.add_argument("--seq-len", type=int, default=None, help="sequence length to compile at (required for masks)")
    e.add_argument("--block-size", type=int, default=None, help="block size (default: the policy's)")
    e.add_argument("--model", default=None, help="check the policy against this run's (or model JSON's) model")
    e.add_argument("--lossy", action="store_true", help="minference: approximate kinds it cannot express")
    e.add_argument("--dense-blocks", action="store_true", help="npz/safetensors: also store dense [heads, q_blocks, k_blocks] masks")
    e.add_argument("--force", action="store_true", help="overwrite existing files")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=_export)

    i = subparsers.add_parser(
        "import",
        help="read a MInference/DuoAttention config or an exported mask file as an attnlab policy",
        description="Import FORMAT file PATH as an attnlab policy, validated against --model "
        "(a profiled run of the model: its statistics also give expected recall).",
    )
    i.add_argument("format", choices=IMPORT_FORMATS)
    i.add_argument("path", metavar="PATH")
    i.add_argument("--model", default=None, help="run directory or model JSON (required for minference and duo)")
    i.add_argument("--out", required=True, help="policy JSON to write")
    i.add_argument("--seq-len", type=int, default=None, help="length for expected density (default: the model's context)")
    i.add_argument("--block-size", type=int, default=64, help="block size of the imported policy (default 64)")
    i.add_argument("--threshold", type=float, default=0.5, help="duo: gate from which a KV head is full (default 0.5)")
    i.add_argument("--sparsity", type=float, default=None, help="duo: share of KV heads to stream (overrides --threshold)")
    i.add_argument("--force", action="store_true", help="overwrite --out")
    i.set_defaults(func=_import)


def main(argv: list[str] | None = None) -> int:
    """Run these commands alone (the lead's ``attnlab`` CLI is the usual entry point)."""
    parser = argparse.ArgumentParser(prog="attnlab")
    sub = parser.add_subparsers(dest="command", required=True)
    add_commands(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except AttnlabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
