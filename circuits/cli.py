"""``attnlab circuit``: head-level circuit discovery from the command line."""

from __future__ import annotations

import argparse
from pathlib import Path

from attnlab.cliargs import (
    add_model_arguments,
    add_quiet_argument,
    load_model_from_args,
    model_argv,
    positive_int,
    unit_float,
)
from attnlab.errors import AttnlabError
from attnlab.names import head_label
from attnlab.runs import Run, preflight_run
from attnlab.shards import add_ray_arguments, add_shard_argument

from .circuit import CUTS, node_label
from .faithfulness import REFINE_MODES
from .patching import DIRECTIONS, METHODS
from .tasks import BUILTIN_TASKS


def _check_shardable(args: argparse.Namespace) -> None:
    """``--shard``/``--ray`` split activation patching over heads; what needs every head's score
    (or has no per-head loop) is refused with the option to change."""
    option = "--shard" if args.shard is not None else "--ray"
    if args.method != "activation":
        raise AttnlabError(f"{option} splits activation patching over heads: add --method activation "
                           f"({args.method} scores every head in one pass)")
    for given, name in ((not args.no_faithfulness, "the faithfulness curve"), (args.refine, "--refine"),
                        (args.verify_edges, "--verify-edges")):
        if given:
            fix = "add --no-faithfulness" if name == "the faithfulness curve" else f"drop {name}"
            raise AttnlabError(f"{option} can't run {name} (it needs every head's score): {fix}, "
                               f"or run it without {option}")


def _circuit_on_ray(args: argparse.Namespace) -> int:
    """``circuit --method activation --ray``: the heads as Ray tasks, one shard per worker, merged into --out."""
    from attnlab.ray_engine import run_sharded
    from attnlab.runs import CIRCUIT

    if args.shard is not None:
        raise AttnlabError("--ray runs every shard itself: drop --shard (or drop --ray and launch the shards yourself)")
    task = str(Path(args.task).resolve()) if args.task.endswith(".jsonl") else args.task
    argv = ["circuit", *model_argv(args), "--task", task, "--method", args.method, "--direction", args.direction,
            "--threshold", repr(args.threshold), "--examples", str(args.examples), "--seed", str(args.seed),
            "--no-faithfulness"]
    run = run_sharded(argv, args.out, shards=args.workers, address=args.ray, progress=not args.quiet)
    nodes = run.read(CIRCUIT)["nodes"]
    print(f"heads ({len(nodes)}): " + "  ".join(f"{n['name']}={n['score']:.3f}" for n in nodes))
    print(f"wrote {run.path} ({args.workers} shards on Ray, merged)")
    return 0


def _circuit_shard(args: argparse.Namespace, model, task) -> int:
    """``--shard I/N``: activation patching of this shard's heads into a shard run."""
    from attnlab.shards import mark_shard

    from .circuit import discover_shard, save_circuit

    circuit, heads, seconds = discover_shard(model, task, args.shard, direction=args.direction, threshold=args.threshold)
    extra = {"examples": len(task), "seed": args.seed}
    path = save_circuit(circuit, model, args.out, extra)
    run = Run.open(path.parent)
    parameters = {"method": circuit.method, "direction": circuit.direction, "threshold": circuit.threshold,
                  "task": circuit.task.get("name"), **extra}
    mark_shard(run, args.shard.record("circuit", parameters, [head_label(a, b) for a, b in heads],
                                      model.n_layers * model.n_heads, seconds=seconds))
    print(f"shard {args.shard}: patched {len(heads)} heads; join the shards with `attnlab merge`")
    print(f"wrote {path}")
    return 0


def _cmd_circuit(args: argparse.Namespace) -> int:
    from .circuit import discover, save_circuit, verify_edges
    from .faithfulness import refine_circuit
    from .tasks import load_task

    if args.task not in BUILTIN_TASKS and not args.task.endswith(".jsonl"):
        raise AttnlabError(f"unknown task {args.task!r}: use one of {list(BUILTIN_TASKS)} or a .jsonl file")
    if args.task.endswith(".jsonl") and not Path(args.task).is_file():
        raise AttnlabError(f"task file {args.task} does not exist")
    if args.cut == "faithfulness" and args.no_faithfulness:
        raise AttnlabError("--cut faithfulness needs the faithfulness curve: drop --no-faithfulness")
    if args.shard is not None or args.ray is not None:
        _check_shardable(args)
    if args.ray is not None:
        return _circuit_on_ray(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():  # before the slow model load
        raise AttnlabError(f"--out {out} is a file, not a run directory: give a new folder or an existing run of this model")
    model = load_model_from_args(args)
    preflight_run(out, model)
    task = load_task(model, args.task, n=args.examples, seed=args.seed)
    if args.shard is not None:
        return _circuit_shard(args, model, task)
    circuit = discover(model, task, method=args.method, direction=args.direction, threshold=args.threshold,
                       faithfulness=not args.no_faithfulness, cut=args.cut)
    if args.refine:
        refined = refine_circuit(model, task, mode=args.refine, step=args.refine_step)
        keys = ("mode", "sizes", "f", "smallest_at_level", "circuit", "level", "m_full", "m_empty")
        circuit.faithfulness = {**(circuit.faithfulness or {}), "refined": {k: refined[k] for k in keys}}
    if args.verify_edges:
        if not circuit.edges:
            print("no edges to verify (activation patching gives none; try --method attribution or ig)")
        verify_edges(model, task, circuit)
    path = save_circuit(circuit, model, args.out, {"examples": len(task), "seed": args.seed})
    print(f"task {task.name}: clean {circuit.clean_metric:.3f}, corrupted {circuit.corrupted_metric:.3f} (logit difference)")
    print(f"heads ({len(circuit.nodes)}, cut by {args.cut}): "
          + "  ".join(f"{head_label(a, b)}={circuit.node_scores[(a, b)]:.3f}" for a, b in circuit.nodes))
    if circuit.edges:
        print("edges: " + "  ".join(f"{node_label(s)}->{node_label(r)}" for s, r in circuit.edges))
        for (s, r), exact in circuit.edge_checks.items():
            print(f"  path patching {node_label(s)}->{node_label(r)}: exact {exact:.3f}, attribution {circuit.edge_scores[(s, r)]:.3f}")
    if circuit.faithfulness and "f" in circuit.faithfulness:
        f = circuit.faithfulness
        print(f"faithfulness of the circuit {f.get('circuit_f', float('nan')):.3f}, completeness "
              f"{f.get('completeness', float('nan')):.3f}, smallest circuit reaching {f['level']}: {f['smallest_at_level']}")
    if args.refine:
        r = circuit.faithfulness["refined"]
        if r["circuit"] is None:
            print(f"refined ({r['mode']}): no circuit on the path reached {r['level']} (largest f {max(r['f']):.3f})")
        else:
            print(f"refined ({r['mode']}): {len(r['circuit'])} heads reach faithfulness {r['level']}: "
                  + "  ".join(head_label(a, b) for a, b in r["circuit"]))
    print(f"wrote {path}")
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("circuit", help="discover a head-level circuit for a task")
    add_model_arguments(p)
    p.add_argument("--task", required=True, help="ioi | induction | greater_than | needle (passkey retrieval, 512 tokens or half the context) | FILE.jsonl (clean, corrupted, correct, wrong)")
    p.add_argument("--method", default="attribution", choices=METHODS,
                   help="attribution (EAP, with edges) | ig | activation (exact, one forward per head)")
    p.add_argument("--direction", default="denoising", choices=DIRECTIONS, help="denoising (patch clean into corrupted) | noising")
    p.add_argument("--threshold", type=unit_float, default=0.5,
                   help="keep heads/edges scoring at least this fraction of the best, in (0, 1] (default 0.5)")
    p.add_argument("--examples", type=positive_int, default=8, help="examples of a built-in task (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-faithfulness", action="store_true", help="skip the faithfulness curve")
    p.add_argument("--cut", default="threshold", choices=CUTS,
                   help="threshold (heads scoring --threshold x the best) | faithfulness (the smallest top-k whose "
                   "faithfulness reaches 0.8 on the curve)")
    p.add_argument("--verify-edges", action="store_true",
                   help="path-patch every edge of the circuit: its exact effect next to the attribution estimate")
    p.add_argument("--refine", default=None, metavar="MODE", choices=REFINE_MODES,
                   help="also search the smallest faithful circuit by re-scoring heads under the current circuit: "
                   "grow (add heads from none) | prune (remove heads from all); stored under faithfulness.refined")
    p.add_argument("--refine-step", type=positive_int, default=1, help="heads added or removed per refinement step (default 1)")
    p.add_argument("--out", required=True, help="run directory to write the circuit into (created if needed)")
    add_shard_argument(p)
    add_ray_arguments(p)
    add_quiet_argument(p)
    p.set_defaults(func=_cmd_circuit)
