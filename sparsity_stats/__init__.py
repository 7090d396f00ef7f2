"""Sparse-attention policies from attention statistics: patterns, policies, masks, exporters.

The policy stage of attnlab. From a profiled run (``attnlab.runs.Run``) it

1. evaluates candidate patterns on every head — per-head cost-recall curves (`compute_curves`);
2. chooses one per head within a global density or KV budget — an exact multiple-choice
   knapsack (`PolicyGenerator`), with baselines for comparison (`compare_policies`);
3. writes the choice as a validated JSON `Policy`;
4. compiles a policy at any length and block size into per-layer `BlockSparseLayout` masks
   (`compile_policy`), the index lists block-sparse kernels read, or FlexAttention BlockMasks;
5. exports them (npz, safetensors, FlexAttention, MInference and DuoAttention configs) and
   imports the same formats back (`export_policy`, `import_policy`).

Patterns are small composable predicates (`patterns`), attention-gym style; policy kinds are
named compositions of them (`kinds`).
"""

from attnlab.kernels import BlockSparseLayout

from .baselines import (
    BaselineResult,
    duo_attention_style,
    kv_baselines,
    minference_style,
    uniform_streaming,
)
from .compare import compare_policies, format_table, tradeoff_figure, write_tradeoff_html
from .curves import HeadCurves, ProfileEstimator, compute_curves, default_candidates
from .dynamic import published_policy
from .errors import ExtrapolationWarning, FormatError, MaskError, PolicyError, PolicyModelError
from .executors import EXECUTORS, PolicyExecutor, run_layout, run_with_policy
from .export import (
    EXPORT_FORMATS,
    IMPORT_FORMATS,
    MaskFile,
    export_policy,
    import_policy,
    load_flex_block_masks,
    load_masks,
    minference_config,
)
from .generator import PolicyGenerator, policy_from_choices
from .kinds import (
    BASELINE_KINDS,
    CANDIDATE_KINDS,
    DYNAMIC_KINDS,
    KINDS,
    STATIC_KINDS,
    BlockScores,
    Candidate,
    Elastic,
    estimate_block_scores,
    get_kind,
    prior_block_scores,
    scores_from_mass,
)
from .knapsack import MCKPSolution, solve_mckp
from .masks import (
    compile_for_input,
    compile_layer,
    compile_policy,
    estimate_layer_scores,
    head_patterns,
    layout_from_patterns,
)
from .patterns import (
    Pattern,
    and_masks,
    generate_blocks,
    generate_causal,
    generate_dense,
    generate_sink,
    generate_slash,
    generate_vertical,
    generate_window,
    named,
    on_blocks,
    or_masks,
    per_head,
    token_mask,
)
from .policy import POLICY_FORMAT, POLICY_SCHEMA, DecodeHead, HeadPolicy, Policy, uniform_policy
from .synthetic import make_synthetic_run, synthetic_attention
from .validation import ValidationReport, validate_policy

__all__ = [
    "EXECUTORS",
    "PolicyExecutor",
    "run_layout",
    "run_with_policy",
    "policy_from_choices",
    "layout_from_patterns",
    "ValidationReport",
    "validate_policy",
    "and_masks",
    "BaselineResult",
    "BlockScores",
    "BlockSparseLayout",
    "Candidate",
    "compare_policies",
    "compile_for_input",
    "compile_layer",
    "compile_policy",
    "compute_curves",
    "default_candidates",
    "duo_attention_style",
    "BASELINE_KINDS",
    "CANDIDATE_KINDS",
    "DecodeHead",
    "DYNAMIC_KINDS",
    "Elastic",
    "estimate_block_scores",
    "estimate_layer_scores",
    "EXPORT_FORMATS",
    "export_policy",
    "ExtrapolationWarning",
    "format_table",
    "FormatError",
    "generate_blocks",
    "generate_causal",
    "generate_dense",
    "generate_sink",
    "generate_slash",
    "generate_vertical",
    "generate_window",
    "get_kind",
    "head_patterns",
    "HeadCurves",
    "HeadPolicy",
    "IMPORT_FORMATS",
    "import_policy",
    "KINDS",
    "load_flex_block_masks",
    "load_masks",
    "make_synthetic_run",
    "MaskError",
    "MaskFile",
    "MCKPSolution",
    "minference_config",
    "minference_style",
    "named",
    "on_blocks",
    "or_masks",
    "Pattern",
    "per_head",
    "Policy",
    "POLICY_FORMAT",
    "POLICY_SCHEMA",
    "PolicyError",
    "PolicyGenerator",
    "PolicyModelError",
    "prior_block_scores",
    "ProfileEstimator",
    "scores_from_mass",
    "solve_mckp",
    "STATIC_KINDS",
    "synthetic_attention",
    "token_mask",
    "tradeoff_figure",
    "kv_baselines",
    "published_policy",
    "uniform_policy",
    "uniform_streaming",
    "write_tradeoff_html",
]
