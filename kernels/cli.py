"""``attnlab validate POLICY``: a policy against dense attention, on a real model."""

from __future__ import annotations

import argparse


def _cmd_validate(args: argparse.Namespace) -> int:
    from attnlab.kernels.executors import check_executor, prepare_triton
    from attnlab.models import load_model
    from attnlab.runs import check_writable_target
    from attnlab.sparsity_stats.policy import Policy
    from attnlab.sparsity_stats.validation import validate_policy

    check_executor(args.executor)
    if args.executor == "triton":
        prepare_triton()  # the interpreter must be chosen before the kernel module loads
    check_writable_target(args.out, force=True)
    policy = Policy.load(args.policy)
    model = load_model(args.model, device=args.device, trust_remote_code=args.trust_remote_code)
    policy.check_model(model.identity(), args.policy)
    report = validate_policy(
        model, policy, executor=args.executor, n_prompts=args.prompts, prompt_tokens=args.tokens,
        needle_samples=args.needle, needle_length=args.needle_length, out=args.out, progress=not args.quiet,
        seed=args.seed,
    )
    print(report.format())
    print(f"wrote {args.out}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    from attnlab.cli import add_model_argument

    p = sub.add_parser("validate", help="validate a sparse policy against dense attention (per head and per model)")
    p.add_argument("policy", help="policy.json from `attnlab policy` or `attnlab import`")
    add_model_argument(p)
    p.add_argument("--executor", default="flex", help="reference | flex | triton (triton runs the interpreter on a CPU: slow)")
    p.add_argument("--prompts", type=int, default=2, help="held-out built-in prompts for errors, KL and perplexity (default 2)")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per prompt (default 1024)")
    p.add_argument("--needle", type=int, default=0, help="passkey samples for needle accuracy (default 0: skip)")
    p.add_argument("--needle-length", type=int, default=1024, help="needle context length (default 1024)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="run directory for the report (created, or added to)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_validate)
