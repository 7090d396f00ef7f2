"""``attnlab validate POLICY``: a policy against dense attention, on a real model."""

from __future__ import annotations

import argparse
from pathlib import Path

from attnlab.cliargs import (
    add_model_arguments,
    add_quiet_argument,
    load_model_from_args,
    model_argv,
    nonneg_int,
    positive_int,
)
from attnlab.errors import AttnlabError
from attnlab.shards import add_ray_arguments, add_shard_argument

from .decode_validation import NEW_TOKENS
from .executors import EXECUTORS
from .export import EXPORT_FORMATS


def _job(args: argparse.Namespace, policy) -> dict:
    """The parameters every shard of one ``validate`` job shares (its shard record's)."""
    import hashlib
    import json

    text = json.dumps(policy.to_dict(), sort_keys=True, default=str)
    return {"phase": args.phase, "executor": args.executor, "deployed_as": args.deployed_as, "n_prompts": args.prompts,
            "prompt_tokens": args.tokens, "needle_samples": args.needle, "needle_length": args.needle_length,
            "new_tokens": args.new_tokens, "seed": args.seed, "policy_sha256": hashlib.sha256(text.encode()).hexdigest()}


def _validate_on_ray(args: argparse.Namespace) -> int:
    """``validate --ray``: the prompts and needle samples as Ray tasks, one shard per worker, merged into --out."""
    from attnlab.ray_engine import run_sharded
    from attnlab.runs import DECODE_SUMMARY, VALIDATION_SUMMARY

    if args.shard is not None:
        raise AttnlabError("--ray runs every shard itself: drop --shard (or drop --ray and launch the shards yourself)")
    argv = ["validate", str(Path(args.policy).resolve()), *model_argv(args), "--executor", args.executor,
            "--prompts", str(args.prompts), "--tokens", str(args.tokens), "--needle", str(args.needle),
            "--needle-length", str(args.needle_length), "--phase", args.phase, "--new-tokens", str(args.new_tokens),
            "--seed", str(args.seed)]
    if args.deployed_as:
        argv += ["--as", args.deployed_as]
    run = run_sharded(argv, args.out, shards=args.workers, address=args.ray, progress=not args.quiet)
    summary = run.read(VALIDATION_SUMMARY) if args.phase != "decode" else run.read(DECODE_SUMMARY)
    keys = ("n_prompts", "kl_mean", "ppl_delta", "needle_dense", "needle_sparse", "token_match", "needle_compressed")
    print(", ".join(f"{k}={summary[k]}" for k in keys if summary.get(k) is not None))
    print(f"wrote {run.path} ({args.workers} shards on Ray, merged)")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from .executors import prepare_triton
    from .policy import Policy
    from .validation import validate_policy

    if args.executor == "triton":
        prepare_triton()  # the interpreter must be chosen before the kernel module loads
    policy = Policy.load(args.policy)
    if args.ray is not None:
        return _validate_on_ray(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():  # before the slow model load
        raise AttnlabError(f"--out {out} is a file, not a run directory: give a new folder or an existing run of this model")
    if args.shard is not None and out.exists():
        raise AttnlabError(f"--out {out} exists: a shard writes a run of its own, give a new folder")
    model = load_model_from_args(args)
    policy.check_model(model.identity(), args.policy)
    if args.phase != "prefill":
        return _validate_decode(args, model, policy)
    report = validate_policy(
        model, policy, executor=args.executor, n_prompts=args.prompts, prompt_tokens=args.tokens,
        needle_samples=args.needle, needle_length=args.needle_length, out=args.out, progress=not args.quiet,
        seed=args.seed, deployed_as=args.deployed_as, shard=args.shard, job=_job(args, policy),
    )
    print(report.format())
    print(f"wrote {args.out}")
    return 0


def _validate_decode(args: argparse.Namespace, model, policy) -> int:
    """``--phase decode|both``: the compressed KV cache in generation (`validate_decode`); with
    ``both`` the prefill report first, then the decode one."""
    from .decode_validation import validate_decode
    from .validation import validate_policy

    decoding = policy
    if args.deployed_as is not None:
        if args.deployed_as != "duo":
            raise AttnlabError(f"--as {args.deployed_as} deploys a prefill pattern: validate it with --phase prefill "
                               "(only --as duo, a KV-cache method, has a decode phase)")
        from .deployed import duo_decode_policy

        decoding = duo_decode_policy(policy)
        print("note: decode keeps what the DuoAttention export says (full KV heads, the rest its sink + recent "
              "tokens), read back as DuoAttention reads it")
    elif policy.decode_note():
        print(f"note: {policy.decode_note()}")
    if args.phase == "both":
        report = validate_policy(
            model, policy, executor=args.executor, n_prompts=args.prompts, prompt_tokens=args.tokens,
            needle_samples=args.needle, needle_length=args.needle_length, out=args.out, progress=not args.quiet,
            seed=args.seed, deployed_as=args.deployed_as, shard=args.shard, job=_job(args, policy),
            continuation=args.new_tokens,  # the texts the decode phase continues: both phases read the same prompts
        )
        print(report.format())
    decode = validate_decode(
        model, decoding, phase=args.phase, executor=args.executor, n_prompts=args.prompts, prompt_tokens=args.tokens,
        new_tokens=args.new_tokens, needle_samples=args.needle, needle_length=args.needle_length, out=args.out,
        progress=not args.quiet, seed=args.seed, shard=args.shard, job=_job(args, policy),
    )
    print(decode.format())
    print(f"wrote {args.out}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from .decode_validation import format_side_by_side, side_by_side
    from .policy import Policy

    policy = Policy.load(args.policy)
    model = load_model_from_args(args)
    policy.check_model(model.identity(), args.policy)
    result = side_by_side(model, policy, args.prompt, max_new_tokens=args.max_new_tokens, chat=not args.no_chat,
                          do_sample=args.sample, seed=args.seed, prefill_chunk=args.prefill_chunk)
    print(format_side_by_side(result))
    if args.prefill_chunk is not None and args.prefill_chunk < result["prompt_tokens"]:
        print(f"prefill in chunks of {args.prefill_chunk} tokens (both caches); the compressed cache's buffers peaked at "
              f"{result['compressed']['kv_bytes_peak'] / 2**20:.2f} MiB")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="validate a sparse policy against dense attention (per head and per model)")
    p.add_argument("policy", help="policy.json from `attnlab policy` or `attnlab import`")
    add_model_arguments(p)
    p.add_argument("--executor", choices=EXECUTORS, default="flex",
                   help="reference | flex | triton (triton runs the interpreter on a CPU: slow; default flex)")
    p.add_argument("--as", dest="deployed_as", choices=EXPORT_FORMATS, metavar="FORMAT",
                   help="validate the policy as that tool runs its exported file (emulated; through the fp32 "
                        f"reference, so --executor is not used): {', '.join(EXPORT_FORMATS)}")
    p.add_argument("--prompts", type=positive_int, default=2, help="held-out built-in prompts for errors, KL and perplexity (default 2)")
    p.add_argument("--tokens", type=positive_int, default=1024, help="tokens per prompt (default 1024)")
    p.add_argument("--needle", type=nonneg_int, default=0, help="passkey samples for needle accuracy (default 0: skip)")
    p.add_argument("--needle-length", type=positive_int, default=1024, help="needle context length (default 1024)")
    p.add_argument("--phase", choices=("prefill", "decode", "both"), default="prefill",
                   help="prefill: the policy's prefill heads (default, as before); decode: dense prefill, then generation "
                        "with the policy's compressed KV cache vs a full one; both: the prefill report, then generation "
                        "with both phases")
    p.add_argument("--new-tokens", type=positive_int, default=NEW_TOKENS,
                   help="tokens generated (and of the text's own continuation scored) per prompt with --phase "
                        f"decode|both (default {NEW_TOKENS})")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--out", required=True, help="run directory for the report (created, or added to)")
    add_shard_argument(p)
    add_ray_arguments(p)
    add_quiet_argument(p)
    p.set_defaults(func=_cmd_validate)

    g = sub.add_parser("generate", help="generate from a prompt with a full and with a policy's compressed KV cache, side by side")
    g.add_argument("policy", help="policy.json (its decode section says what the cache keeps per KV head)")
    add_model_arguments(g)
    g.add_argument("--prompt", required=True, help="the prompt text (sent through the chat template when the model has one)")
    g.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate (default 64)")
    g.add_argument("--no-chat", action="store_true", help="send the prompt as plain text, without the chat template")
    g.add_argument("--sample", action="store_true", help="sample (seeded by --seed) instead of greedy decoding")
    g.add_argument("--seed", type=nonneg_int, default=0)
    g.add_argument("--prefill-chunk", type=positive_int, default=None, metavar="N",
                   help="prefill the prompt N tokens at a time, the cache compressed between chunks (streaming heads "
                        "keep sink + recent, as DuoAttention's chunked prefill); default: the whole prompt at once")
    g.set_defaults(func=_cmd_generate)
