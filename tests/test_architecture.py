"""The seams hold: packages import downward only, run artifacts are spelled once, one layout type.

These are static checks over the source (the AST), so they see imports inside functions too —
the kind a cycle hides behind.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from attnlab.runs import ARTIFACTS

ROOT = Path(__file__).resolve().parents[1]

#: Folder → installed package, and its layer (higher may import lower, never the reverse).
#: ``circuits`` and ``sparsity_stats`` share a layer: neither may import the other.
PACKAGES = {
    "attnlab": ("attnlab", 0),
    "kernels": ("attnlab.kernels", 1),
    "probes": ("attnlab.probes", 2),
    "circuits": ("attnlab.circuits", 3),
    "sparsity_stats": ("attnlab.sparsity_stats", 3),
    "app": ("attnlab.app", 4),
}
#: The façade on top of everything: the CLI dispatcher, the lazy public API, and the Ray engine
#: (it runs whole CLI commands in its workers).
FACADE = {"attnlab/cli.py", "attnlab/__init__.py", "attnlab/ray_engine.py"}


def _package_of(module: str) -> str | None:
    """Folder name of the attnlab package that ``module`` belongs to (longest match)."""
    best = None
    for folder, (pkg, _) in PACKAGES.items():
        if (module == pkg or module.startswith(pkg + ".")) and (best is None or len(pkg) > len(PACKAGES[best][0])):
            best = folder
    return best


def _imports(path: Path, package: str) -> list[tuple[int, str]]:
    """Every module ``path`` imports (absolute, relative resolved), with its line."""
    tree = ast.parse(path.read_text(), filename=str(path))
    rel_parts = path.relative_to(ROOT / package).with_suffix("").parts
    here = PACKAGES[package][0].split(".") + list(rel_parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
            out += [(node.lineno, f"{mod}.{a.name}") for a in node.names if _package_of(f"{mod}.{a.name}") != _package_of(mod)]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                out.append((node.lineno, node.args[0].value))
    return out


def _sources(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py"))


def test_packages_import_downward_only():
    """`attnlab` core ← kernels ← probes ← circuits, sparsity_stats ← app: no upward import, no
    import between circuits and sparsity_stats, anywhere (module level or inside a function)."""
    problems = []
    for folder, (_, layer) in PACKAGES.items():
        for path in _sources(folder):
            rel = str(path.relative_to(ROOT))
            if rel in FACADE:
                continue
            for line, mod in _imports(path, folder):
                if mod == "attnlab.cli" or mod.startswith("attnlab.cli."):
                    problems.append(f"{rel}:{line} imports {mod} (the CLI façade is the top; shared CLI parts are in attnlab.cliargs)")
                    continue
                target = _package_of(mod)
                if target is None or target == folder:
                    continue
                if PACKAGES[target][1] >= layer:
                    problems.append(f"{rel}:{line} imports {mod} ({folder} may not import {target})")
    assert not problems, "upward or sideways imports:\n" + "\n".join(problems)


def test_the_import_check_sees_imports_inside_functions(tmp_path):
    """The checker itself: an import buried in a function is found, relative imports resolve."""
    pkg = ROOT / "kernels"
    src = "def f():\n    from attnlab.sparsity_stats.masks import compile_policy\n    from ..probes import x\n"
    probe = pkg / "_import_probe_for_test.py"
    probe.write_text(src)
    try:
        found = [m for _, m in _imports(probe, "kernels")]
    finally:
        probe.unlink()
    assert "attnlab.sparsity_stats.masks" in found
    assert "attnlab.probes" in found or "attnlab.probes.x" in found


def test_core_never_imports_a_stage():
    """The bottom layer knows no stage above it (the façade aside)."""
    for path in _sources("attnlab"):
        rel = str(path.relative_to(ROOT))
        if rel in FACADE:
            continue
        for line, mod in _imports(path, "attnlab"):
            assert _package_of(mod) in (None, "attnlab"), f"{rel}:{line} imports {mod}"


@pytest.mark.parametrize("art", [a for a in ARTIFACTS.values()], ids=lambda a: a.key)
def test_artifact_file_names_are_spelled_once(art):
    """No source file but attnlab/runs.py spells a run artifact's file name."""
    pattern = re.compile(r"""["'/]""" + re.escape(art.filename) + r"""["']""")
    hits = []
    for folder in PACKAGES:
        for path in _sources(folder):
            rel = str(path.relative_to(ROOT))
            if rel == "attnlab/runs.py":
                continue
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    hits.append(f"{rel}:{i}: {line.strip()}")
    assert not hits, f"{art.filename} is spelled outside attnlab/runs.py:\n" + "\n".join(hits)


_WHICH_KERNELS = """
import kernels
import attnlab.kernels as ours
print(getattr(kernels, "MARK", None), kernels.__file__, ours.__file__, hasattr(ours, "BlockSparseLayout"))
"""


def test_the_kernels_folder_hands_its_top_level_name_to_the_hub_package(tmp_path):
    """Run in the repository root, `import kernels` finds our folder first; transformers >= 5.25
    imports Hugging Face's `kernels` by that name, so the folder must hand it the installed one."""
    import os
    import subprocess
    import sys

    hub = tmp_path / "site" / "kernels"
    hub.mkdir(parents=True)
    (hub / "__init__.py").write_text("MARK = 'hub'\n")
    (hub / "layer.py").write_text("WHERE = 'hub submodule'\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    out = subprocess.run([sys.executable, "-c", _WHICH_KERNELS + "from kernels.layer import WHERE; print(WHERE)"],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout.split("\n")
    mark, hub_file, ours_file, has_layout = out[0].split()
    assert (mark, Path(hub_file)) == ("hub", hub / "__init__.py")
    assert Path(ours_file) == ROOT / "kernels" / "__init__.py" and has_layout == "True"
    assert out[1] == "hub submodule"


def test_a_benchmark_script_hands_the_kernels_name_to_the_hub_package(tmp_path):
    """`python benchmarks/<script>.py` puts benchmarks/ first on sys.path, where kernels.py (the
    kernel benchmark) would shadow the hub package transformers >= 5.25 imports: it hands the
    name over too, to a stand-in hub here and to the installed one in transformers' own import."""
    import os
    import subprocess
    import sys

    hub = tmp_path / "site" / "kernels"
    hub.mkdir(parents=True)
    (hub / "__init__.py").write_text("MARK = 'hub'\n")
    first = f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    out = subprocess.run([sys.executable, "-c", first + "import kernels; print(kernels.MARK, kernels.__file__)"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out == ["hub", str(hub / "__init__.py")]
    real = subprocess.run([sys.executable, "-c", first + "import transformers.integrations.hub_kernels, kernels; "
                           "print(kernels.__file__)"], cwd=tmp_path, capture_output=True, text=True)
    assert real.returncode == 0, real.stderr.strip().splitlines()[-1]
    assert Path(real.stdout.strip()).parent != ROOT / "benchmarks" and Path(real.stdout.strip()).name == "__init__.py"


def test_without_the_hub_package_top_level_kernels_is_empty_not_ours():
    """Whatever is installed, `import kernels` from the root never yields attnlab's names; with
    no hub package it is an empty module without a version (transformers < 5.25 reads that as
    "not available"), and one line says what to import instead."""
    import subprocess
    import sys

    code = _WHICH_KERNELS + "print(getattr(kernels, '__version__', 'unversioned'))\nkernels.BlockSparseLayout\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    mark, hub_file, ours_file, has_layout, version = proc.stdout.split()
    assert Path(ours_file) == ROOT / "kernels" / "__init__.py" and has_layout == "True"
    if Path(hub_file).parent == ROOT / "kernels":  # no hub installed: the empty stand-in
        assert version == "unversioned" and proc.returncode == 1
        assert "import it as `attnlab.kernels`" in proc.stderr.strip().splitlines()[-1]
    else:  # the hub is installed: it has the name, and not our layout type
        assert "no attribute 'BlockSparseLayout'" in proc.stderr
