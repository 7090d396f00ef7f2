"""``attnlab probe ...`` and ``attnlab heads RUN``: head detectors from the command line."""

from __future__ import annotations

import argparse
import json
from typing import Any

from attnlab.cliargs import (
    add_model_arguments,
    add_quiet_argument,
    fraction_list,
    int_list,
    load_model_from_args,
    local_path,
    model_argv,
    nonneg_int,
    positive_int,
    unit_float,
)
from attnlab.errors import AttnlabError
from attnlab.names import head_label
from attnlab.shards import add_ray_arguments, add_shard_argument

from .detections import HEAD_TYPES
from .retrieval import MODES

PROBES = ("retrieval", "sinks", "induction", "previous", "duplicate", "echo", "local", "families", "linear", "all")
#: CLI probe name → head types of `probes.repeated.probe_repeated`.
_REPEATED = {
    "induction": ("induction", "razor_induction"),
    "previous": ("previous_token",),
    "duplicate": ("duplicate_token",),
    "echo": ("echo",),
}
#: Head type → the ``attnlab probe`` detector that writes it.
_PROBE_OF = {
    "retrieval": "retrieval", "retrieval_kv": "retrieval", "sink": "sinks", "hidden_sink": "sinks",
    "razor_induction_kv": "induction", "echo_kv": "echo", "local": "local",
    **{t: name for name, types in _REPEATED.items() for t in types},
}


def _causal_ks(text: str) -> list[int]:
    """``--causal-k``: `int_list`, or nothing (an empty value) to skip the causal check."""
    return [] if not text.strip() else int_list(text)


def _print_top(detections, head_type: str, top: int) -> None:
    from attnlab.probes.detections import top_heads

    rows = detections[detections["head_type"] == head_type]
    if rows.empty:
        return
    best = top_heads(rows, head_type, top)
    print(f"top {head_type} heads: " + "  ".join(f"{head_label(r.layer, r.head)}={r.score:.3f}" for r in best.itertuples()))


def _retrieval(model, args) -> None:
    from attnlab.probes.retrieval import probe_retrieval

    res = probe_retrieval(
        model, args.out, lengths=args.lengths or (512, 1024), depths=args.depths, n_samples=args.samples,
        mode=args.mode, haystack=args.haystack, causal_ks=args.causal_k, draws=args.draws, seed=args.seed,
        progress=not args.quiet, shard=args.shard,
    )
    s = res.summary
    _print_top(res.detections, "retrieval", args.top)
    keys = ("samples", "accuracy", "counted", "retrieval_heads", "mode_spearman", "split_half_spearman", "seconds_per_sample")
    print("retrieval: " + ", ".join(f"{k}={_fmt(s.get(k))}" for k in keys if k in s))
    causal = s.get("causal") or {}
    if causal:
        print("causal check (needle accuracy): " + json.dumps(causal, default=_fmt)[:600])


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _sinks(model, args) -> None:
    from attnlab.probes.sinks import probe_sinks

    res = probe_sinks(model, args.out, n_samples=args.samples or 8, lengths=args.lengths or (512,), eps=args.eps,
                      seed=args.seed, progress=not args.quiet)
    _print_top(res.detections, "sink", args.top)
    _print_top(res.detections, "hidden_sink", args.top)
    _print_summary(res.summary)


def _repeated(model, args, which) -> None:
    from attnlab.probes.repeated import probe_repeated

    res = probe_repeated(model, args.out, which=which, seq_len=args.seq_len, repeats=args.repeats,
                         n_samples=args.samples or 8, seed=args.seed, progress=not args.quiet)
    for t in which:
        _print_top(res.detections, t, args.top)
    _print_summary(res.summary)


def _local(model, args) -> None:
    from attnlab.probes.local import probe_local

    res = probe_local(model, args.out, n_samples=args.samples or 4, lengths=args.lengths or (512,), window=args.window,
                      sink_tokens=args.sink_tokens, seed=args.seed, progress=not args.quiet)
    _print_top(res.detections, "local", args.top)
    _print_summary(res.summary)


def _families(args) -> None:
    from attnlab.probes.families import compute_families

    res = compute_families(args.out, seed=args.seed)
    counts = res.tables["families"]["family"].value_counts()
    print("head families: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


def _linear(model, args) -> None:
    from attnlab.probes.linear import run_linear_probe

    res = run_linear_probe(model, args.out, label_file=args.labels, seed=args.seed, progress=not args.quiet)
    table = res.tables["linear_probes"]
    if len(table):
        best = table.sort_values("test_acc", ascending=False).head(args.top)
        print("best linear probes (held-out accuracy): " + "  ".join(
            f"{head_label(r.layer, r.head)}={r.test_acc:.3f}" for r in best.itertuples()))


def _print_summary(summary: dict[str, Any]) -> None:
    short = {k: v for k, v in summary.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    if short:
        print("  " + ", ".join(f"{k}={_fmt(v)}" for k, v in list(short.items())[:8]))


def _retrieval_on_ray(args: argparse.Namespace) -> int:
    """``probe retrieval --ray``: the needle suite as Ray tasks, one shard per worker, merged into --out."""

    from attnlab.ray_engine import run_sharded
    from attnlab.runs import RETRIEVAL_SUMMARY
    from attnlab.shards import ShardError

    if args.shard is not None:
        raise ShardError("--ray runs every shard itself: drop --shard (or drop --ray and launch the shards yourself)")
    if args.causal_k:
        raise ShardError("--ray can't run the causal check (it ablates the top heads ranked over every sample): "
                         "give --causal-k '' with --ray, or run it without --ray")

    argv = ["probe", "retrieval", *model_argv(args), "--depths", ",".join(map(str, args.depths)),
            "--mode", args.mode, "--causal-k", ",".join(map(str, args.causal_k)), "--draws", str(args.draws),
            "--seed", str(args.seed)]
    for flag, value in (("--lengths", args.lengths and ",".join(map(str, args.lengths))), ("--samples", args.samples),
                        ("--haystack", args.haystack and local_path(args.haystack))):
        if value:
            argv += [flag, str(value)]
    run = run_sharded(argv, args.out, shards=args.workers, address=args.ray, progress=not args.quiet)
    s = run.read(RETRIEVAL_SUMMARY)
    _print_top(run.detections(), "retrieval", args.top)
    print("retrieval: " + ", ".join(f"{k}={_fmt(s.get(k))}" for k in ("samples", "accuracy", "counted", "retrieval_heads")))
    print(f"wrote {run.path} ({args.workers} shards on Ray, merged)")
    return 0


def _cmd_probe(args: argparse.Namespace) -> int:
    from attnlab.runs import check_writable_target, preflight_run

    if (args.shard is not None or args.ray is not None) and args.probe != "retrieval":
        option = "--shard" if args.shard is not None else "--ray"
        raise AttnlabError(f"{option} shards `attnlab probe retrieval` only (one greedy answer per needle sample); "
                           f"run `attnlab probe {args.probe}` without {option}")
    if args.ray is not None:
        return _retrieval_on_ray(args)
    if args.probe == "families":
        _families(args)
        return 0
    # a probe adds to an existing run of the same model, or creates one; refuse a plain file
    # before loading the model, and a run of another model before any probe runs
    check_writable_target(args.out, force=True)
    model = load_model_from_args(args)
    preflight_run(args.out, model)
    todo = ["sinks", "induction", "previous", "duplicate", "echo", "local", "retrieval"] if args.probe == "all" else [args.probe]
    for name in todo:
        if name == "retrieval":
            _retrieval(model, args)
        elif name == "sinks":
            _sinks(model, args)
        elif name in _REPEATED:
            _repeated(model, args, _REPEATED[name])
        elif name == "local":
            _local(model, args)
        elif name == "linear":
            _linear(model, args)
    if args.probe == "all":
        _families(args)
    print(f"wrote {args.out}")
    return 0


def _cmd_heads(args: argparse.Namespace) -> int:
    from attnlab.probes.detections import top_heads
    from attnlab.runs import Run

    det = Run.open(args.run).detections()
    try:
        best = top_heads(det, args.type, args.top)
    except KeyError as exc:
        raise AttnlabError(f"{exc.args[0]}: run `attnlab probe {_PROBE_OF[args.type]} --out {args.run}` first") from None
    print(f"{'layer':>5} {'head':>4} {'kv':>3} {'score':>8}")
    for r in best.itertuples():
        print(f"{int(r.layer):>5} {int(r.head):>4} {int(r.kv_head):>3} {r.score:>8.4f}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probe", help="detect head types (retrieval, sinks, induction, ...) into a run directory")
    p.add_argument("probe", choices=PROBES, help="which detector; 'all' runs every one, then the head families")
    add_model_arguments(p)
    p.add_argument("--out", required=True, help="run directory (created, or added to when it holds this model's run)")
    p.add_argument("--samples", type=positive_int, default=None, help="number of samples (each probe has its own default)")
    p.add_argument("--lengths", type=int_list, default=None, help="prompt/context lengths in tokens")
    p.add_argument("--depths", type=fraction_list, default=[0.1, 0.3, 0.5, 0.7, 0.9], help="needle depths in [0, 1] (retrieval)")
    p.add_argument("--mode", choices=MODES, default="greedy", help="retrieval scoring mode")
    p.add_argument("--haystack", default=None, help="a UTF-8 text file to build haystacks from (retrieval)")
    p.add_argument("--causal-k", "--causal-ks", dest="causal_k", type=_causal_ks, default=[5, 10, 20], help="K of the causal check (retrieval); empty to skip")
    p.add_argument("--draws", type=positive_int, default=3, help="random-head draws per K in the causal check")
    p.add_argument("--eps", type=unit_float, default=0.3, help="sink threshold ε in (0, 1) (sinks)")
    p.add_argument("--seq-len", type=positive_int, default=50, help="random-sequence length (induction/previous/duplicate/echo)")
    p.add_argument("--repeats", type=positive_int, default=2, help="repetitions of the random sequence")
    p.add_argument("--window", type=positive_int, default=64, help="local window (local)")
    p.add_argument("--sink-tokens", type=nonneg_int, default=4, help="sink tokens kept with the window (local)")
    p.add_argument("--labels", default=None, help="JSONL of {text, labels: [[start_char, end_char], ...]} (linear)")
    p.add_argument("--top", type=positive_int, default=10, help="heads to print")
    p.add_argument("--seed", type=int, default=0)
    add_shard_argument(p)
    add_ray_arguments(p)
    add_quiet_argument(p)
    p.set_defaults(func=_cmd_probe)

    p = sub.add_parser("heads", help="the top heads of one type in a run")
    p.add_argument("run")
    p.add_argument("--type", required=True, choices=HEAD_TYPES, help="the head type")
    p.add_argument("--top", type=positive_int, default=20)
    p.set_defaults(func=_cmd_heads)
