"""Hand the import name ``kernels`` to Hugging Face's kernel-hub package.

transformers >= 5.25 requires that package and imports it as ``kernels``. Two attnlab files can
be found under that name first: the ``kernels/`` folder, when a process starts in the repository
root, and ``benchmarks/kernels.py``, when a benchmark script runs (its folder is ``sys.path[0]``).
Each calls `hand_over` when it is imported as top-level ``kernels``. Standard library only: this
runs in the middle of transformers' own import.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def hand_over(shadowing_dir: str) -> bool:
    """Load the ``kernels`` package found on ``sys.path`` outside ``shadowing_dir`` (the folder
    whose entry shadows it) into ``sys.modules["kernels"]``. False where there is none."""
    skip = os.path.realpath(shadowing_dir)
    elsewhere = [p for p in sys.path if os.path.realpath(p or os.curdir) != skip]
    spec = importlib.machinery.PathFinder.find_spec("kernels", elsewhere)
    if spec is None or spec.loader is None:
        return False
    hub = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = hub
    spec.loader.exec_module(hub)
    return True
