"""``attnlab circuit``: head-level circuit discovery from the command line."""

from __future__ import annotations

import argparse
from pathlib import Path

from attnlab.cliargs import add_model_arguments, load_model_from_args, positive_int, unit_float
from attnlab.errors import AttnlabError
from attnlab.names import head_label
from attnlab.runs import preflight_run

from .circuit import CUTS, node_label
from .faithfulness import REFINE_MODES
from .patching import DIRECTIONS, METHODS
from .tasks import BUILTIN_TASKS


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
    out = Path(args.out)
    if out.exists() and not out.is_dir():  # before the slow model load
        raise AttnlabError(f"--out {out} is a file, not a run directory: give a new folder or an existing run of this model")
    model = load_model_from_args(args)
    preflight_run(out, model)
    task = load_task(model, args.task, n=args.examples, seed=args.seed)
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
    p.set_defaults(func=_cmd_circuit)
