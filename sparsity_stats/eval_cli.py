"""``attnlab eval``: the offline task suite, dense and under one or more policies, paired;
``attnlab eval --compare RUN``: the iso-density report of such a run."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from attnlab.cliargs import (
    add_model_arguments,
    add_quiet_argument,
    fraction,
    int_list,
    layer_list,
    load_model_from_args,
    model_argv,
    nonneg_int,
    positive_int,
    unit_float_list,
)
from attnlab.errors import AttnlabError
from attnlab.shards import add_ray_arguments, add_shard_argument

from .executors import EXECUTORS

_ERR_NAMES = "two policies would both be called {name!r} in the results: give them files with different names"


def _policy_names(paths: list[str]) -> dict[str, str]:
    names: dict[str, str] = {}
    for path in paths:
        p = Path(path)
        name = p.parent.name if p.stem == "policy" and p.parent.name else p.stem
        if name in names or name == "dense":
            raise AttnlabError(_ERR_NAMES.format(name=name))
        names[name] = path
    return names


#: Options that only running the suite uses: refused with --compare, never ignored.
_RUN_ONLY = ("policy", "baseline", "shard", "ray")
#: Options that only --compare uses.
_COMPARE_ONLY = ("densities", "tolerance", "floor", "margin")


def _cmd_compare(args: argparse.Namespace) -> int:
    """``attnlab eval --compare RUN``: the iso-density report, written into RUN."""
    from .evaluate import (
        GAP_MARGIN,
        HEADLINE_FLOOR,
        ISO_DENSITIES,
        ISO_TOLERANCE,
        write_iso_density,
    )

    for name in _RUN_ONLY:
        if getattr(args, name, None) is not None:
            raise AttnlabError(f"--{name} does not apply to eval --compare, which reads the results already in "
                               f"{args.compare}: drop --{name}, or run the suite with --out")
    densities = args.densities or list(ISO_DENSITIES)
    tolerance = ISO_TOLERANCE if args.tolerance is None else args.tolerance
    floor = HEADLINE_FLOOR if args.floor is None else args.floor
    margin = GAP_MARGIN if args.margin is None else args.margin
    _, markdown, paths = write_iso_density(args.compare, densities, tolerance=tolerance, floor=floor, margin=margin)
    print(markdown)
    print(f"wrote {paths['csv']}, {paths['markdown']} and {paths['html']}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    if args.compare is not None:
        return _cmd_compare(args)
    for name in _COMPARE_ONLY:
        if getattr(args, name, None) is not None:
            raise AttnlabError(f"--{name} applies only to eval --compare RUN (the iso-density report): drop it, "
                               "or run the report on this run's results afterwards")
    from attnlab.runs import EVAL_SAMPLES, EVAL_SUMMARY, ensure_run, preflight_run
    from attnlab.shards import mark_shard
    from attnlab.tasks import resolve_tasks, task_suite

    from .dynamic import baseline_name, parse_baselines, published_policy
    from .evaluate import (
        DENSE,
        combine_answers,
        earlier_answers,
        evaluate,
        format_summary,
        method_digest,
        summarize,
    )
    from .executors import prepare_triton
    from .kinds import BASELINE_KINDS, get_kind
    from .policy import Policy

    tasks = resolve_tasks(args.tasks)  # bad names before the model loads
    if args.ray is not None:
        return _eval_on_ray(args, tasks)
    if args.executor == "triton":
        prepare_triton()
    policies = {name: Policy.load(path) for name, path in _policy_names(args.policy or []).items()}
    baselines = [run for spec in args.baseline or [] for run in parse_baselines(spec)]
    if args.baseline_dense_layers and not baselines:
        raise AttnlabError("--baseline-dense-layers applies to the --baseline methods: add a --baseline (e.g. "
                           "xattention:tau=0.7), or drop it (a --policy file keeps the layers its maker protected)")
    for kind, params in baselines:  # bad names and parameters before the model loads
        get_kind(kind).validate(params, f"--baseline {kind}")
        if kind not in BASELINE_KINDS:
            raise AttnlabError(f"--baseline {kind!r} is not a published dynamic method: choose {', '.join(BASELINE_KINDS)}")
    model = load_model_from_args(args)
    for name, policy in policies.items():
        policy.check_model(model.identity(), name)
    for kind, params in baselines:
        name = baseline_name(kind, params, args.baseline_dense_layers)
        if name in policies or name == "dense":
            raise AttnlabError(_ERR_NAMES.format(name=name))
        policies[name] = published_policy(model, kind, block_size=args.baseline_block_size,
                                          dense_layers=args.baseline_dense_layers, **params)
    too_long = [n for n in args.lengths if n > model.n_ctx]
    if too_long:
        raise AttnlabError(f"--lengths {too_long} exceed the model's context of {model.n_ctx} tokens: choose lengths <= {model.n_ctx}")
    preflight_run(args.out, model)
    samples = task_suite(model.tokenizer, tasks, args.lengths, args.samples, seed=args.seed)
    total = len(samples)
    if args.shard is not None:
        samples = args.shard.take(samples)
        if not samples:
            raise AttnlabError(f"--shard {args.shard} gets no sample of {total}: use at most {total} shards")
    digests = {name: method_digest(policy, args.executor) for name, policy in policies.items()}
    earlier, recorded = earlier_answers(args.out, seed=args.seed, digests=digests)
    done = set(zip(earlier["sample"], earlier["method"], strict=True))
    t_start = time.perf_counter()
    new = evaluate(model, samples, policies, executor=args.executor, progress=not args.quiet, done=done)
    if not earlier.empty:
        kept = sum((s.name, m) in done for s in samples for m in [DENSE, *policies])
        print(f"kept {kept} answers {args.out} already held (same --seed and methods); answered {len(new)}")
    def parameters_with(recorded: dict) -> dict:
        return {"tasks": list(dict.fromkeys([*recorded.get("tasks", []), *tasks])),
                "lengths": list(dict.fromkeys([*recorded.get("lengths", []), *args.lengths])),
                "samples": max(args.samples, recorded.get("samples", 0)), "seed": args.seed,
                "executor": args.executor,
                "policies": {**recorded.get("policies", {}),
                             **{k: str(v) for k, v in _policy_names(args.policy or []).items()}},
                "digests": {**recorded.get("digests", {}), **digests}}

    run = ensure_run(args.out, model, "eval", parameters_with(recorded), record=False)
    with run.locked():
        # another eval may have added answers to --out while these were computed (two methods
        # answered into one folder at once): merge with what is there now, never over it
        now, recorded = earlier_answers(args.out, seed=args.seed, digests=digests)
        held = set(zip(now["sample"], now["method"], strict=True))
        fresh = new[[(s, m) not in held for s, m in zip(new["sample"], new["method"], strict=True)]] if len(new) else new
        table = combine_answers(now, fresh)
        summary = summarize(table)
        parameters = parameters_with(recorded)
        run.record_stage_locked("eval", parameters=parameters)
        run.write(EVAL_SAMPLES, table)
        run.write(EVAL_SUMMARY, summary)
    if args.shard is not None:
        mark_shard(run, args.shard.record("eval", parameters, [s.name for s in samples], total,
                                          seconds=time.perf_counter() - t_start))
    print(format_summary(summary))
    print(f"wrote {run.file(EVAL_SAMPLES)} and {run.file(EVAL_SUMMARY)}")
    return 0


def _eval_on_ray(args: argparse.Namespace, tasks: list[str]) -> int:
    """The same job as Ray tasks, one shard per worker, merged into --out."""
    from attnlab.ray_engine import run_sharded
    from attnlab.runs import EVAL_SUMMARY
    from attnlab.shards import ShardError

    from .evaluate import format_summary

    if args.shard is not None:
        raise ShardError("--ray runs every shard itself: drop --shard (or drop --ray and launch the shards yourself)")
    argv = ["eval", *model_argv(args), "--tasks", ",".join(tasks),
            "--lengths", ",".join(map(str, args.lengths)), "--samples", str(args.samples), "--executor", args.executor,
            "--seed", str(args.seed)]
    for policy in args.policy or []:
        argv += ["--policy", str(Path(policy).resolve())]
    for spec in args.baseline or []:
        argv += ["--baseline", spec]
    argv += ["--baseline-block-size", str(args.baseline_block_size)]
    if args.baseline_dense_layers:
        argv += ["--baseline-dense-layers", ",".join(map(str, args.baseline_dense_layers))]
    run = run_sharded(argv, args.out, shards=args.workers, address=args.ray, progress=not args.quiet)
    print(format_summary(run.read(EVAL_SUMMARY)))
    print(f"wrote {run.path} ({args.workers} shards on Ray, merged)")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    from attnlab.tasks import TASKS

    p = sub.add_parser(
        "eval", help="run the offline long-context task suite densely and under policies, paired per sample",
        description="Generate the task suite (RULER-style, offline, deterministic by --seed) at each length, answer "
                    "every sample greedily with dense attention and under each --policy (sparse prefill, dense "
                    "decode), grade by string match, and store per-sample results and a summary with 95%% "
                    f"intervals in --out. Tasks: {', '.join(TASKS)}. `attnlab eval --compare RUN` reports such a run "
                    "at equal achieved densities (iso-density tables and plot).",
    )
    add_model_arguments(p)
    p.add_argument("--policy", action="append", metavar="POLICY.json",
                   help="a policy to evaluate (repeat for several); without one, only dense runs")
    p.add_argument("--baseline", action="append", metavar="METHOD[:K=V,...]",
                   help="a published dynamic method run as its authors do, per input, on every head: xattention "
                        "(tau 0.9, stride 8) or flexprefill (gamma 0.9, delta 0.1); parameters override the "
                        "defaults, e.g. xattention:tau=0.95; KEY=A/B/C runs a sweep, one baseline per value "
                        "(e.g. xattention:tau=0.8/0.9/0.95), for `--compare` to report each at the density it "
                        "reaches (repeat for several)")
    p.add_argument("--baseline-block-size", type=positive_int, default=64,
                   help="block size of the --baseline methods (default 64, as both papers)")
    p.add_argument("--baseline-dense-layers", type=layer_list, default=[], metavar="LAYERS",
                   help="keep every head of these layers dense in the --baseline methods, e.g. 6-8: the layers a "
                        "budgeted policy protects (policy make --protect-layers), given to the baselines too so a win "
                        "is not the protection's alone; results are named e.g. xattention[dense6-8]:tau=0.7 and "
                        "their density counts the dense heads (a lower tau/gamma reaches the same density)")
    p.add_argument("--tasks", default="all", help="comma-separated task names, or 'all' (default)")
    p.add_argument("--lengths", type=int_list, default=[1024], help="prompt lengths in tokens, comma-separated (default 1024)")
    p.add_argument("--samples", type=positive_int, default=5, help="samples per task and length (default 5)")
    p.add_argument("--executor", choices=EXECUTORS, default="flex", help="how sparse prefill runs (default flex)")
    p.add_argument("--seed", type=nonneg_int, default=0)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", help="run directory for the results (created, or added to: the answers an earlier "
                                      "eval of the same --seed left there are kept, not answered again — dense once "
                                      "for any number of methods added later)")
    target.add_argument("--compare", metavar="RUN", default=None,
                        help="instead of running the suite: the iso-density report of an eval run's results — every "
                             "method at the same achieved densities per task and length, with 95%% intervals "
                             "(markdown printed; the table, the markdown and a self-contained HTML plot written into RUN)")
    p.add_argument("--densities", type=unit_float_list, default=None,
                   help="--compare: target densities, comma-separated (default 0.1,0.2,0.3,0.5)")
    p.add_argument("--tolerance", type=fraction, default=None,
                   help="--compare: how far a measured setting's achieved density may be from a target (default 0.05); "
                        "the nearest one within it is reported, nothing is interpolated")
    p.add_argument("--floor", type=fraction, default=None,
                   help="--compare: tasks where dense scores below this are shown but left out of the mean (default 0.2)")
    p.add_argument("--margin", type=fraction, default=None,
                   help="--compare: a method is shown within this of dense when the upper end of its paired gap's "
                        "interval is below it (default 0.05: 5 points)")
    add_shard_argument(p)
    add_ray_arguments(p)
    add_quiet_argument(p)
    p.set_defaults(func=_cmd_eval)
