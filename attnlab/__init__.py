"""attnlab: find what each attention head does, and give every head its own sparse pattern.

The core package holds model loading (`load_model`), hook-based capture (`capture`,
`StatConfig`), profiling into run directories (`profile`, `Run`) and the CLI. The pipeline's
later stages live beside it: `attnlab.probes`, `attnlab.circuits`, `attnlab.sparsity_stats`,
`attnlab.kernels`, `attnlab.app`.

Most names are imported lazily.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_model": "attnlab.models",
    "tiny_model": "attnlab.models",
    "LoadedModel": "attnlab.models",
    "EMBEDDED_NAME": "attnlab.models",
    "CaptureResult": "attnlab.capture",
    "StatConfig": "attnlab.stats",
    "HeadStatAccumulator": "attnlab.stats",
    "summarize": "attnlab.profile",
    "head_means": "attnlab.profile",
    "Run": "attnlab.runs",
    "BlockMaps": "attnlab.runs",
    "load_prompts": "attnlab.prompts",
    "builtin_prompts": "attnlab.prompts",
    "Prompt": "attnlab.prompts",
    "route_attention": "attnlab.attention",
    "AttnlabError": "attnlab.errors",
}

# These two names are also submodules: importing ``attnlab.capture`` would otherwise replace
# the lazy function with the module, so they are bound eagerly (after their submodule loads).
from attnlab.capture import capture as capture  # noqa: E402
from attnlab.profile import profile as profile  # noqa: E402

__all__ = sorted([*_LAZY, "capture", "profile"]) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'attnlab' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
