"""A budgeted policy with a published dynamic method on some layers: the multi-key experiment.

At 2k (seed 4) FlexPrefill γ 0.9 answers `niah_multikey` 12 points better than the budgeted
pick, and the last-row diagnosis (`task_suite_multikey.py`; RESULTS.md, "Multi-key at 2k")
located the difference in layers 21–23: there FlexPrefill's rows read the asked needle more
selectively. This script tests that diagnosis: it keeps the pick's heads everywhere except on
``--layers``, whose sparse heads all run the published method (FlexPrefill or XAttention, chosen per
input as `attnlab eval --baseline` runs it), and writes the result as an ordinary policy file
that `attnlab eval --policy` runs:

    python benchmarks/hybrid_policy.py benchmarks/data/eval-2k-seed4/policies/p68n2k.json \\
        --layers 17-24 --method flexprefill:gamma=0.9 \\
        --out benchmarks/data/eval-2k-seed4/policies/p68n2k-fp17-24.json

The hybrid's density is measured per input by `eval` (the replaced heads' cost is not known in
advance); the file records where it came from under ``generator.hybrid``.

``--estimate antidiagonal`` changes the rule, not the method: the policy's own ``block_topk``
heads on ``--layers`` keep their top-k and rank key blocks by XAttention's antidiagonal scores
instead of mean-pooled q . k (the 4k essay experiment; recorded under ``generator.estimate``):

    python benchmarks/hybrid_policy.py benchmarks/data/eval-4k-seed4/policies/p68n4k.json \
        --layers 0-29 --estimate antidiagonal --out p68n4k-ad.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from attnlab.cliargs import layer_list, layers_text
from attnlab.errors import AttnlabError
from attnlab.sparsity_stats.dynamic import parse_baselines
from attnlab.sparsity_stats.kinds import BASELINE_KINDS, get_kind
from attnlab.sparsity_stats.policy import Policy

#: Per-head estimates the generator wrote that no longer hold for a replaced head (the policy
#: writes them back as null, and ``density_is`` as its default: no estimate to qualify).
_ESTIMATES = ("expected_recall", "expected_density", "expected_kv", "density_is")


def _where(layers: list[int]) -> str:
    """"layer 21" or "layers 17-24": the layers a rewrite touched, for reasons and messages."""
    return f"layer{'s' if len(layers) > 1 else ''} {layers_text(layers)}"


def hybrid_policy(policy: Policy, layers: list[int], kind: str, params: dict) -> Policy:
    """``policy`` with every sparse head of ``layers`` running published method ``kind``
    (``params`` validated as `eval --baseline` validates them); dense heads and every other
    layer unchanged."""
    if kind not in BASELINE_KINDS:
        raise AttnlabError(f"--method {kind!r} is not a published dynamic method: choose {', '.join(BASELINE_KINDS)}")
    params = get_kind(kind).validate(params, f"--method {kind}")
    d = policy.to_dict()
    n_layers = int(d["model"]["n_layers"])
    outside = [x for x in layers if not 0 <= x < n_layers]
    if not layers or outside:
        raise AttnlabError(f"--layers {layers_text(layers) or '(none)'}: give layers the model has (0-{n_layers - 1})")
    # dense heads (protected layers, heads the budget kept whole) stay dense: the swap is of
    # one sparse rule for another
    swapped = [h for h in d["heads"] if h["layer"] in layers and h["kind"] != "dense"]
    if not swapped:
        raise AttnlabError(f"--layers {layers_text(layers)}: every head there is dense in the policy; "
                           "choose layers it makes sparse")
    where = _where(layers)
    why = f"hybrid: {kind} ({', '.join(f'{k} {v:g}' for k, v in params.items())}) on {where}"
    for h in swapped:
        h["kind"], h["params"], h["reason"] = kind, dict(params), why
        for key in _ESTIMATES:
            h.pop(key, None)
    # the generator's totals no longer describe the file: the replaced heads' cost and recall
    # are only known per input (eval measures the density), so they are not claimed
    kinds: dict[str, int] = {}
    for h in d["heads"]:
        kinds[h["kind"]] = kinds.get(h["kind"], 0) + 1
    d["summary"] = {"objective": d.get("summary", {}).get("objective"), "kinds": kinds,
                    "dense_heads": kinds.get("dense", 0), "note": why + "; expected recall and density not "
                    "known in advance (measured per input by eval)"}
    d["budget"] = {k: v for k, v in d.get("budget", {}).items() if k != "expected"}
    d["generator"] = {**d.get("generator", {}), "hybrid": {"layers": sorted(set(layers)), "kind": kind,
                                                           "params": dict(params)}}
    return Policy.from_dict(d, path="hybrid policy")


def estimate_policy(policy: Policy, layers: list[int], stride: int) -> Policy:
    """``policy`` with every ``block_topk`` head of ``layers`` ranking its blocks by XAttention's
    antidiagonal scores (``params.estimate = {"rule": "antidiagonal", "stride": stride}``) instead
    of mean-pooled q . k: the same number of blocks per row, so the same density on every input
    up to which blocks the rule picks; every other head unchanged."""
    d = policy.to_dict()
    n_layers = int(d["model"]["n_layers"])
    if not layers or any(not 0 <= x < n_layers for x in layers):
        raise AttnlabError(f"--layers {layers_text(layers) or '(none)'}: give layers the model has (0-{n_layers - 1})")
    changed = [h for h in d["heads"] if h["layer"] in layers and h["kind"] == "block_topk"]
    if not changed:
        raise AttnlabError(f"--layers {layers_text(layers)}: no block_topk head there; choose layers the policy runs as block_topk")
    where = _where(layers)
    for h in changed:
        h["params"] = {**h["params"], "estimate": {"rule": "antidiagonal", "stride": int(stride)}}
        h["reason"] = f"{h.get('reason', '')} [estimate: antidiagonal, stride {stride}, on {where}]".strip()
    d["generator"] = {**d.get("generator", {}), "estimate": {"layers": sorted(set(layers)), "rule": "antidiagonal",
                                                             "stride": int(stride), "heads": len(changed)}}
    return Policy.from_dict(d, path="policy with antidiagonal estimates")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("policy", type=Path, help="the budgeted policy (a policy .json)")
    p.add_argument("--layers", type=layer_list, required=True, help="layers whose sparse heads run --method, e.g. 17-24")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--method", metavar="METHOD[:K=V,...]",
                     help="a published dynamic method as `eval --baseline` takes it, e.g. flexprefill:gamma=0.9")
    how.add_argument("--estimate", choices=["antidiagonal"],
                     help="instead of --method: keep every head, and let the block_topk heads of --layers rank "
                          "their blocks by XAttention's antidiagonal scores (same top-k)")
    p.add_argument("--stride", type=int, default=8, help="--estimate antidiagonal: the antidiagonal stride (default 8)")
    p.add_argument("--out", type=Path, required=True, help="where the hybrid policy is written (.json)")
    args = p.parse_args(argv)
    where = _where(args.layers)
    try:
        if args.out.exists():
            raise AttnlabError(f"{args.out} exists; remove it or choose another --out")
        if args.estimate:
            made = estimate_policy(Policy.load(args.policy), args.layers, args.stride)
            what = "block_topk heads rank blocks by antidiagonal scores"
            changed = made.to_dict()["generator"]["estimate"]["heads"]
        else:
            runs = parse_baselines(args.method)
            if len(runs) != 1:
                raise AttnlabError(f"--method {args.method!r} is a sweep; give one value per parameter")
            kind, params = runs[0]
            made = hybrid_policy(Policy.load(args.policy), args.layers, kind, params)
            what = f"heads run {kind}"
            changed = sum(h.kind == kind for h in made.heads)
        made.save(args.out)
    except AttnlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {changed} {what} on {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
