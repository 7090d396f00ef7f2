"""attnlab: find what each attention head does, and give every head its own sparse pattern.

The whole pipeline is importable from here, lazily (nothing heavy loads until it is used)::

    import attnlab

    model = attnlab.load_model("smollm2-135m")                  # or tiny_model("llama")
    run = attnlab.profile(model, attnlab.builtin_prompts(model.tokenizer, [512], 4), "runs/r1")
    attnlab.probe_sinks(model, run.path)                        # detections into the run
    policy = attnlab.PolicyGenerator(budget=0.2).fit(run).policy_
    report = attnlab.validate_policy(model, policy, executor="flex")
    circuit = attnlab.discover(model, attnlab.ioi_task(model.tokenizer))

Stages, each also a package of its own: `attnlab.probes` (head detectors),
`attnlab.circuits` (circuit discovery), `attnlab.sparsity_stats` (policies, exports,
executors, validation), `attnlab.kernels` (block layout, Triton kernel, Flex, reference),
`attnlab.app` (the dashboard). Every stage reads and writes one run store (`Run`).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

#: Public name → the module that defines it (imported on first use).
_LAZY = {
    # models and identity
    "load_model": "attnlab.models",
    "tiny_model": "attnlab.models",
    "LoadedModel": "attnlab.models",
    "EMBEDDED_NAME": "attnlab.models",
    "ModelIdentity": "attnlab.identity",
    # capture and statistics
    "CaptureResult": "attnlab.capture",
    "StatConfig": "attnlab.stats",
    "summarize": "attnlab.profile",
    "head_means": "attnlab.profile",
    "load_prompts": "attnlab.prompts",
    "builtin_prompts": "attnlab.prompts",
    "Prompt": "attnlab.prompts",
    "route_attention": "attnlab.attention",
    # the run store and shared names
    "Run": "attnlab.runs",
    "BlockMaps": "attnlab.runs",
    "ARTIFACTS": "attnlab.runs",
    "head_label": "attnlab.names",
    "parse_head_label": "attnlab.names",
    "attn_hook": "attnlab.names",
    "AttnlabError": "attnlab.errors",
    # probes
    "probe_retrieval": "attnlab.probes",
    "probe_sinks": "attnlab.probes",
    "probe_repeated": "attnlab.probes",
    "probe_local": "attnlab.probes",
    "compute_families": "attnlab.probes",
    "fit_linear_probes": "attnlab.probes",
    "needle_samples": "attnlab.probes",
    "top_heads": "attnlab.probes",
    # policies, exports, executors, validation
    "PolicyGenerator": "attnlab.sparsity_stats",
    "Policy": "attnlab.sparsity_stats",
    "compile_policy": "attnlab.sparsity_stats",
    "compare_policies": "attnlab.sparsity_stats",
    "export_policy": "attnlab.sparsity_stats",
    "import_policy": "attnlab.sparsity_stats",
    "validate_policy": "attnlab.sparsity_stats",
    "run_with_policy": "attnlab.sparsity_stats",
    # the task suite
    "TASKS": "attnlab.tasks",
    "task_suite": "attnlab.tasks",
    "evaluate": "attnlab.sparsity_stats.evaluate",
    # circuits
    "discover": "attnlab.circuits",
    "load_circuit": "attnlab.circuits",
    "ioi_task": "attnlab.circuits",
    "load_task": "attnlab.circuits",
    "faithfulness_curve": "attnlab.circuits",
}

#: Names that are both a function here and a submodule (``attnlab.capture`` the module holds
#: ``capture`` the function). Importing the submodule must not replace the function.
_SHADOWED = {"capture": "attnlab.capture", "profile": "attnlab.profile"}
_LAZY.update(_SHADOWED)


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return  # the import system binding the submodule: keep serving the function
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'attnlab' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
