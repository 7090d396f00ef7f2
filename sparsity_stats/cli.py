"""Command-line commands of the policy stage: ``policy make``, ``policy compare``, ``policy
sensitivity``, ``export``, ``import``.

::

    attnlab policy RUN --budget 0.15 [--out policy.json]             # = attnlab policy make RUN ...
    attnlab policy compare RUN --budgets 0.05,0.1,0.2,0.4            # table + HTML trade-off plot
    attnlab policy sensitivity policy.json --prompts p.jsonl --out w.json   # per-layer damage -> head weights
    attnlab policy make RUN --budget 0.15 --head-weights w.json      # the budget goes where it costs most
    attnlab export policy.json --seq-len 8192 --block-size 64 --format npz|safetensors|flex|minference|duo|flashinfer --out masks/
    attnlab import minference|duo|npz|safetensors|flex FILE --run RUN --out policy.json

``attnlab/cli.py`` registers them with `add_commands`; options are typed and range-checked by
`attnlab.cliargs` (a bad value stops argparse, exit 2), and each handler raises
`attnlab.errors.AttnlabError` (printed as one line by ``attnlab.cli.main``) for bad input,
before writing.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from attnlab.cliargs import (
    DeprecatedAlias,
    add_model_arguments,
    add_quiet_argument,
    add_subcommands,
    fraction,
    int_list,
    layer_list,
    name_list,
    nonneg_int,
    positive_int,
    unit_float,
    unit_float_list,
)
from attnlab.errors import AttnlabError
from attnlab.names import parse_head_label
from attnlab.runs import (
    BLOCK_MAPS,
    POLICY,
    POLICY_COMPARE,
    Run,
    atomic_path,
    check_output_files,
    load_json,
)

from .errors import PolicyError
from .executors import EXECUTORS
from .kinds import CANDIDATE_KINDS, KINDS

#: Fewer blocks per row than this at the evaluated length: `attnlab policy` suggests a smaller block.
FEW_BLOCKS = 64
#: The table ``attnlab policy compare`` writes into the run by default (the plot goes beside it).
COMPARE_TABLE = POLICY_COMPARE.filename

_ERR_HEADS = "expected heads as LAYER:HEAD or L<layer>.H<head>, comma-separated (e.g. 3:1,10:4 or L3.H1), got {got!r}"


def head_list(text: str) -> list[tuple[int, int]]:
    """``3:1,L10.H4`` → ``[(3, 1), (10, 4)]`` (an argparse type: each ``LAYER:HEAD`` or a head label)."""
    out = []
    for item in (x.strip() for x in str(text).split(",")):
        if not item:
            continue
        try:
            if ":" in item:
                lay, head = (int(x) for x in item.split(":"))
            else:
                lay, head = parse_head_label(item)
        except (ValueError, AttnlabError):  # a malformed pair or label: argparse reports the whole value
            raise argparse.ArgumentTypeError(_ERR_HEADS.format(got=text)) from None
        if lay < 0 or head < 0:
            raise argparse.ArgumentTypeError(_ERR_HEADS.format(got=text))
        out.append((lay, head))
    if not out:
        raise argparse.ArgumentTypeError(_ERR_HEADS.format(got=text))
    return out


def _refuse_existing(path: Path, force: bool) -> None:
    check_output_files([path], force=force, error=PolicyError)


def _generator_kwargs(args: argparse.Namespace, run: Run) -> dict[str, Any]:
    if args.focus_weight is not None and not args.focus_last:
        raise PolicyError("--focus-weight weights the queries --focus-last names: give --focus-last T too (e.g. 64)")
    weights = None
    if args.head_weights is not None:
        from .sensitivity import Sensitivity

        weights = Sensitivity.load(args.head_weights, model=run.identity).weights
    return {
        "head_weights": weights,
        "block_size": args.block_size,
        "eval_lengths": args.lengths,
        "focus_last": args.focus_last,
        "focus_weight": 0.5 if args.focus_weight is None else args.focus_weight,
        "kinds": args.kinds,
        "min_sink": args.min_sink,
        "protect_retrieval": args.protect,
        "retrieval_threshold": args.retrieval_threshold,
        "retrieval_floor": args.retrieval_floor,
        "recall_floor": args.recall_floor,
        "protected_heads": args.protect_heads,
        "protected_layers": args.protect_layers,
        "gqa_consistent": args.gqa,
        "progress": not args.quiet,
    }


# -- policy make / policy compare -------------------------------------------------------------
def _policy_make(args: argparse.Namespace) -> int:
    from .generator import PolicyGenerator

    run = Run.open(args.run)
    out = Path(args.out) if args.out is not None else run.file(POLICY)  # '' is refused, not the default
    _refuse_existing(out, args.force)
    gen = PolicyGenerator(budget=args.budget, budget_kind=args.budget_kind, **_generator_kwargs(args, run)).fit(run)
    policy = gen.emit()
    policy.save(out)
    s = policy.summary
    kinds = ", ".join(f"{k} {v}" for k, v in s["kinds"].items() if v)
    print(f"policy for {policy.model.get('name')} ({policy.n_layers} layers x {policy.n_heads} heads), block {policy.block_size}")
    print(f"  budget      {args.budget_kind} <= {args.budget:g}   expected {policy.budget['expected']:.4f}")
    print(f"  recall      mean {s['expected_recall']:.4f}   worst head {s['min_head_recall']:.4f}"
          + (f"   weighted by {args.head_weights}" if args.head_weights else ""))
    print(f"  heads       {kinds}" + (f"   ({len(s['protected_heads'])} protected)" if s["protected_heads"] else ""))
    gap = "optimal" if s["optimal"] else f"gap <= {s['optimality_gap_per_head']:.2e} recall per head"
    print(f"  optimiser   {s['n_candidates']} candidates per head, {s['solver_nodes']} nodes, {gap}")
    print(f"  wrote       {out}")
    _coarse_note(policy.block_size, max(policy.eval_lengths or [0]))
    return 0


def _coarse_note(block_size: int, n_eval: int) -> None:
    """A note on stderr when ``block_size`` leaves few blocks per row at ``n_eval`` tokens."""
    if n_eval and n_eval // block_size < FEW_BLOCKS:
        finer = max(16, 1 << (max(n_eval // FEW_BLOCKS, 1).bit_length() - 1))  # a power of two, at least 16
        hint = (f"; profile with --block-size {finer} for finer ones (README: Validating a policy)"
                if finer < block_size else "")
        print(f"note: at {n_eval} tokens a {block_size}-token block leaves {n_eval // block_size} blocks per row, "
              f"so patterns are coarse{hint}", file=sys.stderr)


def _policy_compare(args: argparse.Namespace) -> int:
    from .compare import compare_policies, format_table, write_tradeoff_html

    run = Run.open(args.run)
    out = Path(args.out) if args.out is not None else run.path / COMPARE_TABLE  # '' is refused, not the default
    _refuse_existing(out, args.force)  # before with_suffix, which fails on '.' and 'x/..'
    html = out.with_suffix(".html")
    _refuse_existing(html, args.force)
    kwargs = _generator_kwargs(args, run)
    progress = kwargs.pop("progress")
    table = compare_policies(run, args.budgets, budget_kind=args.budget_kind, progress=progress,
                             policies_out=args.save_policies, **kwargs)
    print(format_table(table))
    with atomic_path(out) as tmp:
        table.to_csv(tmp, index=False)
    write_tradeoff_html(table, html, title=f"{run.identity.name or run.name}: expected recall vs {args.budget_kind}")
    print(f"wrote {out} and {html}")
    if args.save_policies:
        print(f"saved the policies to {args.save_policies}/ (attnlab validate DIR/METHOD-BUDGET.json --out RUN)")
    _coarse_note(table.attrs["block_size"], max(table.attrs["eval_lengths"]))
    return 0


def _policy_sensitivity(args: argparse.Namespace) -> int:
    from attnlab.cliargs import load_model_from_args
    from attnlab.prompts import load_prompts

    from .executors import prepare_triton
    from .policy import Policy
    from .sensitivity import dropped_mass, layer_sensitivity

    _refuse_existing(Path(args.out), args.force)
    if args.executor == "triton":
        prepare_triton()  # the interpreter must be chosen before the kernel module loads
    policy = Policy.load(args.policy)  # before the slow model load
    dropped_mass(policy)  # a policy without expected recall is refused here, not after the load
    if args.windows is not None and args.windows > policy.n_layers:
        raise PolicyError(f"--windows {args.windows}: the policy has only {policy.n_layers} layers; give at most that")
    model = load_model_from_args(args)
    policy.check_model(model.identity(), args.policy)  # named by its file (layer_sensitivity's check is not)
    whole = args.prompts.endswith(".jsonl")  # a JSONL file's lines are the prompts, whole
    prompts = load_prompts(model, args.prompts, lengths=args.lengths if whole or args.lengths else [1024],
                           n_samples=args.samples if whole or args.samples else 4, chat=args.chat, seed=args.seed)
    sens = layer_sensitivity(model, policy, prompts, executor=args.executor, focus_last=args.focus_last,
                             window=args.windows, progress=not args.quiet)
    sens.source.update(policy=str(args.policy), prompt_spec=args.prompts, seed=args.seed)
    sens.save(args.out)
    per = sens.weights.mean(axis=1)
    order = np.argsort(-per)
    print(f"layer sensitivity of {args.policy} on {len(prompts)} prompts ({sens.identity.name})")
    print("  most sensitive   " + "  ".join(f"L{i} w={per[i]:.2f} (KL {sens.kl[i]:.3g}, drops {sens.dropped[i]:.2f})" for i in order[:5]))
    print("  least sensitive  " + "  ".join(f"L{i} w={per[i]:.2f} (KL {sens.kl[i]:.3g}, drops {sens.dropped[i]:.2f})" for i in order[::-1][:5]))
    by_kl = np.argsort(-sens.kl)
    print("  most damage (KL) " + "  ".join(f"L{i} {sens.kl[i]:.3g}" for i in by_kl[:5]))
    width = args.windows or 3
    if len(sens.kl) >= width:
        top = sens.layer_windows(width)[:3]
        if sens.measured_windows(width):
            print(f"  {width} adjacent layers sparse together (KL)  " + "  ".join(f"L{a}-{b} {s:.3g}" for a, b, s in top))
        else:
            share = max(float(sens.kl.sum()), 1e-30)
            print(f"  {width} adjacent layers  " + "  ".join(f"L{a}-{b} {s / share:.0%}" for a, b, s in top)
                  + " of the summed KL (--windows 3 measures them together)")
        print(f"  to keep the top ones dense: `attnlab policy make RUN --protect-layers {top[0][0]}-{top[0][1]}`; "
              "near-ties can differ on a task, so make a policy per window and validate each on your task "
              "(`attnlab eval`, or benchmarks/task_suite_layers.py --candidate)")
    print(f"wrote {args.out} (attnlab policy make RUN --head-weights {args.out}, or --protect-layers)")
    return 0


# -- export / import ----------------------------------------------------------------------------
def _model_from(arg: str | None) -> tuple[Any, Any]:
    """The model identity given by ``--run`` (and an estimator when it is a run with block maps)."""
    if not arg:
        return None, None
    p = Path(arg)
    if p.is_dir():
        run = Run.open(p)
        est = None
        if run.has(BLOCK_MAPS):
            from .curves import ProfileEstimator

            est = ProfileEstimator.from_run(run)
        return run.identity, est
    if not p.is_file():
        raise PolicyError(f"--run {arg}: no run directory or JSON file there; pass a profiled run of the model")
    d = load_json(p, what="policy or profile", fix="pass a run directory, or a JSON with n_layers, n_heads", error=PolicyError)
    return (d.get("model") if isinstance(d, dict) and isinstance(d.get("model"), dict) else d), None


#: Options only some formats read, as option → (dest, those formats): given with another format
#: they would be silently ignored, so they are refused instead.
_EXPORT_ONLY_FOR = {"--lossy": ("lossy", ("minference", "vllm")), "--dense-blocks": ("dense_blocks", ("npz", "safetensors"))}
_IMPORT_ONLY_FOR = {"--threshold": ("threshold", ("duo",)), "--sparsity": ("sparsity", ("duo",)),
                    "--block-size": ("block_size", ("minference", "duo", "vllm")), "--seq-len": ("seq_len", ("minference", "duo", "vllm"))}
#: Defaults of the import options above (None on the parser, so that "given" can be told apart).
_IMPORT_DEFAULTS = {"threshold": 0.5, "block_size": 64}


def _refuse_unused(args: argparse.Namespace, only_for: dict[str, tuple[str, tuple[str, ...]]], verb: str) -> None:
    for flag, (dest, formats) in only_for.items():
        if args.format not in formats and getattr(args, dest) not in (None, False):
            raise PolicyError(f"{flag} does not apply when you {verb} {args.format} (only {', '.join(formats)} read it): remove it")


def _print_warnings(caught: list[warnings.WarningMessage]) -> None:
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)


def _export(args: argparse.Namespace) -> int:
    from .export import export_policy
    from .policy import Policy

    _refuse_unused(args, _EXPORT_ONLY_FOR, "export")
    model, _ = _model_from(args.run)
    policy = Policy.load(args.policy, model=model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = export_policy(policy, args.out, args.format, seq_len=args.seq_len, block_size=args.block_size,
                              force=args.force, lossy=args.lossy, dense_blocks=args.dense_blocks, progress=not args.quiet)
    _print_warnings(caught)
    for p in paths:
        print(f"wrote {p}")
    if args.format in REPORTED_FORMATS and not args.no_report:
        from .emulators import deployment_report

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = deployment_report(policy, args.format, export_length(policy, args.seq_len), block_size=args.block_size, lossy=args.lossy)
        for line in report.lines():
            print(line)
    return 0


#: Formats whose file runs differently in the target tool: ``attnlab export`` emulates and reports them.
REPORTED_FORMATS = ("minference", "duo", "flex", "flashinfer", "vllm")


def export_length(policy: Any, seq_len: int | None) -> int:
    """The length an export resolved its sizes at (as `export_policy` chooses it)."""
    if seq_len is not None:
        return int(seq_len)
    return int(max(policy.profiled_lengths) if policy.profiled_lengths else (policy.model.get("n_ctx") or 4096))


def _import(args: argparse.Namespace) -> int:
    from .export import MASK_FORMATS, import_policy

    _refuse_unused(args, _IMPORT_ONLY_FOR, "import")
    for dest, default in _IMPORT_DEFAULTS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, default)
    model, est = _model_from(args.run)
    out = Path(args.out)
    _refuse_existing(out, args.force)
    if est is not None and est.block_size != args.block_size:
        est = None  # recall estimates need the policy's block size
    policy = import_policy(args.format, args.path, model, threshold=args.threshold, sparsity=args.sparsity,
                           block_size=args.block_size, seq_len=args.seq_len, estimator=None if args.format in MASK_FORMATS else est)
    policy.save(out)
    kinds: dict[str, int] = {}
    for e in policy.heads:
        kinds[e.kind] = kinds.get(e.kind, 0) + 1
    print(f"imported {args.format} {args.path}: " + ", ".join(f"{k} {v}" for k, v in kinds.items()))
    print(f"wrote {out}")
    return 0


# -- the parsers --------------------------------------------------------------------------------
_RUN_HELP = ("a profiled run directory of the model, or a JSON file holding its identity (a policy, a run manifest, "
             "or {name, n_layers, n_heads, n_kv_heads, ...})")


def _add_run_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    """``--run`` (a run or an identity JSON); ``--model``, its old spelling here, still works with a note."""
    parser.add_argument("--run", default=None, metavar="RUN|JSON", help=f"{help_text}: {_RUN_HELP}")
    parser.add_argument("--model", dest="run", action=DeprecatedAlias, new="--run", metavar="RUN|JSON",
                        help="deprecated spelling of --run (here it never meant a model to load)")


def _generator_options() -> argparse.ArgumentParser:
    """The options ``policy make`` and ``policy compare`` share: what the optimiser may choose."""
    from .generator import BUDGET_KINDS, PROTECT

    g = argparse.ArgumentParser(add_help=False)
    g.add_argument("--budget-kind", choices=BUDGET_KINDS, default="density", help="density (FLOPs) or kv (KV cache) budget")
    g.add_argument("--block-size", type=positive_int, default=None, help="policy block size (default: the run's block maps)")
    g.add_argument("--lengths", type=int_list, default=None, help="comma-separated lengths to evaluate at (default: the longest profiled)")
    g.add_argument("--focus-last", type=positive_int, default=None, metavar="T",
                   help="weight the queries of the last T tokens of each profiled prompt (its question and the start of "
                        "the answer) by --focus-weight in the objective (default: every query alike)")
    g.add_argument("--focus-weight", type=unit_float, default=None, metavar="W",
                   help="with --focus-last, those queries' share of the objective, in (0, 1] (default 0.5)")
    g.add_argument("--kinds", type=name_list(CANDIDATE_KINDS), default=list(KINDS), metavar="KIND,...",
                   help=f"kinds to choose from, some of {','.join(CANDIDATE_KINDS)} (default: {','.join(KINDS)}; "
                        "xattention: a per-head tau, run per input)")
    g.add_argument("--min-sink", type=nonneg_int, default=4, help="minimum sink tokens of streaming/A-shape heads (default 4)")
    g.add_argument("--gqa", action="store_true", help="heads sharing a KV head share a policy")
    g.add_argument("--protect", choices=PROTECT, default="dense", help="protected heads (retrieval heads, --protect-heads, --protect-layers): keep dense, or hold "
                   "a recall floor (--retrieval-floor); none: retrieval heads are not protected (the others stay dense)")
    g.add_argument("--retrieval-threshold", type=fraction, default=0.1, help="retrieval score in [0, 1] from which a head is protected (default 0.1)")
    g.add_argument("--retrieval-floor", type=fraction, default=0.95, help="recall floor in [0, 1] of protected heads with --protect floor")
    g.add_argument("--recall-floor", type=fraction, default=None, help="recall floor in [0, 1] of every head")
    g.add_argument("--protect-heads", type=head_list, default=[], metavar="HEADS",
                   help="extra heads to protect, LAYER:HEAD or L<layer>.H<head>, comma-separated (e.g. circuit heads)")
    g.add_argument("--protect-layers", type=layer_list, default=[], metavar="LAYERS",
                   help="protect every head of these layers, e.g. 6-8 or 6,7,8 (the layers `attnlab policy sensitivity "
                        "--focus-last` finds the answers depend on)")
    g.add_argument("--head-weights", default=None, metavar="FILE",
                   help="weight each head's recall in the objective by a sensitivity file from `attnlab policy "
                        "sensitivity` (default: every head alike); baselines are tuned on the same weights")
    g.add_argument("--force", action="store_true", help="overwrite existing outputs")
    add_quiet_argument(g)
    return g


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``policy`` (sub-commands ``make``, the default, ``compare`` and ``sensitivity``), ``export`` and ``import``."""
    from .export import EXPORT_FORMATS, IMPORT_FORMATS

    p = subparsers.add_parser(
        "policy",
        help="choose a sparse-attention policy per head within a budget (policy make RUN, policy compare RUN)",
        description="Fit per-head cost-recall curves from a profiled run and choose, per head, the pattern that "
        "keeps the most attention within a global budget (exact multiple-choice knapsack). "
        "`attnlab policy RUN` is `attnlab policy make RUN`; `attnlab policy compare RUN --budgets ...` compares "
        "against uniform streaming, DuoAttention- and MInference-style baselines and writes a table and an HTML plot.",
    )
    commands = add_subcommands(p, dest="policy_command", default="make", required=True)
    shared = _generator_options()

    make = commands.add_parser(
        "make", parents=[shared], help="the budgeted policy of a run (the default: attnlab policy RUN)",
        description="Choose one pattern per head that keeps the most expected attention within --budget.",
    )
    make.add_argument("run", metavar="RUN", help="profiled run directory")
    make.add_argument("--budget", type=unit_float, default=0.15, help="share of dense causal attention (or KV) to use, in (0, 1] (default 0.15)")
    make.add_argument("--out", help=f"policy JSON (default RUN/{POLICY.filename})")
    make.set_defaults(func=_policy_make)

    compare = commands.add_parser(
        "compare", parents=[shared], help="the budgeted policy against uniform baselines at several budgets",
        description="At each budget, the budgeted policy and uniform streaming, DuoAttention- and MInference-style "
        "baselines, estimated from the same run: a table (CSV) and an HTML plot of expected recall against cost.",
    )
    compare.add_argument("run", metavar="RUN", help="profiled run directory")
    compare.add_argument("--budgets", type=unit_float_list, default=[0.05, 0.1, 0.2, 0.4],
                         help="comma-separated budgets, each in (0, 1] (default 0.05,0.1,0.2,0.4)")
    compare.add_argument("--out", help=f"table CSV (default RUN/{COMPARE_TABLE}; the plot is written beside it as .html)")
    compare.add_argument("--save-policies", default=None, metavar="DIR",
                         help="also save every compared policy (budgeted and baselines) as DIR/METHOD-BUDGET.json, "
                         "for `attnlab validate`")
    compare.set_defaults(func=_policy_compare)

    sens = commands.add_parser(
        "sensitivity", help="how much each layer's sparsity under a policy costs the output: head weights for --head-weights",
        description="Run each prompt densely and once per layer with only that layer under POLICY; the KL divergence of "
        "the next-token distributions (dense || one layer sparse) per layer, divided by the attention mass the policy "
        "expects that layer to drop, weighs the layer's heads in `policy make/compare --head-weights`: the budget goes "
        "where a dropped unit of mass costs the output most. One dense and one forward per layer per prompt.",
    )
    sens.add_argument("policy", metavar="POLICY", help="the policy to measure around (e.g. from policy make, unweighted)")
    add_model_arguments(sens)
    sens.add_argument("--prompts", default="builtin", help="builtin | builtin:narrative,... | a text file | a .jsonl file "
                      "(prompts like the workload: e.g. the ones the run was profiled on)")
    sens.add_argument("--lengths", type=int_list, default=None, help="prompt lengths in tokens (default 1024; not for .jsonl)")
    sens.add_argument("--samples", type=positive_int, default=None, help="number of prompts (default 4; not for .jsonl)")
    sens.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    sens.add_argument("--seed", type=nonneg_int, default=0)
    sens.add_argument("--focus-last", type=positive_int, default=None, metavar="T",
                      help="average the KL over the last T positions of each prompt only (where a task's question and "
                           "answer start sit), not every position")
    sens.add_argument("--windows", type=positive_int, default=None, metavar="W",
                      help="also run every W adjacent layers under the policy together and rank them for "
                           "--protect-layers by that KL, not by the sum of single-layer KLs (one more forward per "
                           "window per prompt)")
    sens.add_argument("--executor", choices=EXECUTORS, default="flex", help="how the sparse layer runs (default flex)")
    sens.add_argument("--out", required=True, help="sensitivity JSON to write")
    sens.add_argument("--force", action="store_true", help="overwrite --out")
    add_quiet_argument(sens)
    sens.set_defaults(func=_policy_sensitivity)

    e = subparsers.add_parser(
        "export",
        help="compile a policy into per-head masks or another tool's config",
        description="Compile POLICY at --seq-len and --block-size into per-layer block-sparse masks "
        "(npz, safetensors, flex, FlashInfer block-sparse rows) or write it as a MInference, DuoAttention or vLLM "
        "dual-chunk (Qwen2.5-1M) config; for minference, duo, flex, flashinfer and vllm it then prints the policy as that tool will run it (emulated), "
        "against the mask attnlab validates.",
    )
    e.add_argument("policy", metavar="POLICY", help="policy JSON from `attnlab policy`")
    e.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    e.add_argument("--out", required=True, help="output directory")
    e.add_argument("--seq-len", type=positive_int, default=None, help="sequence length to compile at (required for masks)")
    e.add_argument("--block-size", type=positive_int, default=None, help="block size (default: the policy's)")
    _add_run_option(e, "check the policy against this model")
    e.add_argument("--lossy", action="store_true", help="minference/vllm: approximate kinds it cannot express")
    e.add_argument("--dense-blocks", action="store_true", help="npz/safetensors: also store dense [heads, q_blocks, k_blocks] masks")
    e.add_argument("--force", action="store_true", help="overwrite existing files")
    e.add_argument("--no-report", action="store_true",
                   help="minference/duo/flex/flashinfer/vllm: skip emulating the target (what it runs against what attnlab validated)")
    add_quiet_argument(e)
    e.set_defaults(func=_export)

    i = subparsers.add_parser(
        "import",
        help="read a MInference/DuoAttention/vLLM config or an exported mask file as an attnlab policy",
        description="Import FORMAT file PATH as an attnlab policy, validated against --run "
        "(a profiled run of the model: its statistics also give expected recall).",
    )
    i.add_argument("format", choices=IMPORT_FORMATS)
    i.add_argument("path", metavar="PATH")
    _add_run_option(i, "the model the file is for (required for minference, duo and vllm)")
    i.add_argument("--out", required=True, help="policy JSON to write")
    i.add_argument("--seq-len", type=positive_int, default=None,
                   help="minference/duo/vllm: length for expected density (default: the model's context)")
    i.add_argument("--block-size", type=positive_int, default=None, help="minference/duo/vllm: block size of the imported policy (default 64)")
    i.add_argument("--threshold", type=fraction, default=None, help="duo: gate in [0, 1] from which a KV head is full (default 0.5)")
    i.add_argument("--sparsity", type=fraction, default=None, help="duo: share in [0, 1] of KV heads to stream (overrides --threshold)")
    i.add_argument("--force", action="store_true", help="overwrite --out")
    i.set_defaults(func=_import)
