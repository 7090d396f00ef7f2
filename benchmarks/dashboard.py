"""Dashboard page-switch time on an embedded-model run (270 heads), with warm caches.

The target (issue 7): with a cached run of the embedded model (SmolLM2-135M: 30 layers × 9
query heads) a page switch takes under 1 s. Measured with Streamlit's AppTest, which runs the
dashboard script exactly as the server does (one full script run per interaction) but without
a browser: the figures are the server-side time of a switch, not the browser's drawing.

Steps:

- a runs folder holding one run of the embedded model made by the real pipeline (cached under
  ``benchmarks/out/dashboard_runs/``; ``--fresh`` rebuilds it, ``--runs DIR`` uses yours):
  `attnlab.profile` on 4 built-in prompts of 512 tokens, the sink and retrieval probes (6 needles,
  causal check at K = 5), head families, a
  budgeted policy and an IOI circuit (EAP-IG, 8 examples, cut where faithfulness reaches 0.8);
- open the dashboard, visit every page once (warms `st.cache_data` / `st.cache_resource`:
  tables, policy curves, and the inspector's model and its first prompt — timed apart as the
  cold cost), then switch to each page ``--repeat`` times in turn and time each switch;
- also time, warm, the inspector on a 2048-token prompt (pooled to blocks with a zoom).

    python benchmarks/dashboard.py              # ~2 min the first time (building the run), ~30 s after
    python benchmarks/dashboard.py --fresh
    python benchmarks/dashboard.py --runs runs  # your own runs folder (its first run is used)
    python benchmarks/dashboard.py --screenshots docs   # also the README's pictures (needs chromium)

Writes the markdown to ``benchmarks/out/dashboard.md`` and to ``--md`` (default
``/tmp/dashboard_results.md``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "app" / "dashboard.py"


def build_runs(root: Path) -> Path:
    """One embedded-model run with every table the pages read (validation and retrieval aside)."""
    from attnlab.circuits.circuit import discover, save_circuit
    from attnlab.circuits.tasks import load_task
    from attnlab.models import load_model
    from attnlab.probes.families import compute_families
    from attnlab.probes.retrieval import probe_retrieval
    from attnlab.probes.sinks import probe_sinks
    from attnlab.profile import profile
    from attnlab.prompts import builtin_prompts
    from attnlab.runs import POLICY
    from attnlab.sparsity_stats import PolicyGenerator

    shutil.rmtree(root, ignore_errors=True)
    out = root / "smollm2"
    model = load_model("smollm2-135m", verbose=False)
    t0 = time.perf_counter()
    run = profile(model, builtin_prompts(model.tokenizer, [512], n_samples=4), out, progress=False)
    probe_sinks(model, out, n_samples=2, lengths=(256,), chat=False, progress=False)
    probe_retrieval(model, out, n_samples=6, lengths=(512,), causal_ks=(5,), draws=2, progress=False)
    compute_families(run)
    PolicyGenerator(budget=0.6).fit(run).emit().save(run.file(POLICY))
    task = load_task(model, "ioi", n=8)
    circuit = discover(model, task, method="ig", cut="faithfulness")  # cut where the curve reaches 0.8
    save_circuit(circuit, model, out, {"examples": len(task)})
    print(f"built {out} in {time.perf_counter() - t0:.0f} s", flush=True)
    return root


#: The head the inspector picture shows: a local (previous-tokens) head of SmolLM2-135M.
SCREENSHOT_HEAD = (11, 1)


def screenshots(root: Path, out: Path) -> None:
    """The README's dashboard pictures from ``root`` in headless chromium (the browser test's
    DevTools client): atlas, policy studio, head inspector, retrieval, circuits."""
    import subprocess
    import tempfile

    sys.path.insert(0, str(ROOT / "tests"))
    from test_dashboard_browser import Browser, _click_nav, _free_port, _stop, _wait_http

    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("--screenshots needs Debian's chromium: `apt-get install chromium`")
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "attnlab.cli", "dashboard", str(root), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_http(url + "_stcore/health", server)
        with tempfile.TemporaryDirectory() as profile_dir:
            browser = Browser(chromium, url, Path(profile_dir))
            try:
                browser.wait("document.body.innerText.includes('query heads')")
                _click_nav(browser, "Head atlas")
                browser.wait("document.querySelectorAll('.js-plotly-plot .heatmaplayer').length >= 2")
                time.sleep(1)
                browser.screenshot(out / "atlas.png")
                layer, head = SCREENSHOT_HEAD
                x, y = browser.wait(f"""(() => {{ const gd = document.querySelector('.js-plotly-plot'), L = gd._fullLayout;
                    const r = gd.getBoundingClientRect();
                    return [r.left + L._size.l + L.xaxis.l2p({head}), r.top + L._size.t + L.yaxis.l2p({layer})]; }})()""")
                for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
                    browser.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)
                browser.wait(f"document.body.innerText.includes('Layer {layer}, head {head} (reads')")
                _click_nav(browser, "Policy studio")
                browser.wait("document.body.innerText.includes('expected density') && "
                             "document.querySelectorAll('.js-plotly-plot').length >= 3", 120)
                time.sleep(1)
                browser.screenshot(out / "policy_studio.png")
                _click_nav(browser, "Head inspector")
                browser.wait(f"document.body.innerText.includes('Layer {layer}, head {head} (reads') && "
                             "document.body.innerText.includes('the whole 128 × 128 map') && "
                             "document.querySelectorAll('.js-plotly-plot').length === 1", 120)
                time.sleep(1)
                browser.screenshot(out / "inspector.png")
                _click_nav(browser, "Retrieval")
                browser.wait("document.body.innerText.includes('Retrieval') && "
                             "document.querySelectorAll('.js-plotly-plot').length >= 2", 60)
                time.sleep(1)
                browser.screenshot(out / "retrieval.png")
                _click_nav(browser, "Circuits")
                browser.wait("document.body.innerText.includes('circuit faithfulness') && "
                             "document.querySelectorAll('.js-plotly-plot').length >= 2", 60)
                time.sleep(1)
                browser.screenshot(out / "circuits.png")
            finally:
                browser.close()
    finally:
        _stop(server)
    print(f"wrote atlas.png, policy_studio.png, inspector.png, retrieval.png, circuits.png to {out}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=Path, help="a runs folder to use instead of building one")
    ap.add_argument("--fresh", action="store_true", help="rebuild the cached embedded-model run")
    ap.add_argument("--repeat", type=int, default=5, help="switches to each page (default 5)")
    ap.add_argument("--md", type=Path, default=Path("/tmp/dashboard_results.md"), help="where to write the markdown too")
    ap.add_argument("--screenshots", type=Path, metavar="DIR", help="only write the README's pictures to DIR (chromium)")
    args = ap.parse_args(argv)

    root = args.runs
    if root is None:
        root = OUT / "dashboard_runs"
        from attnlab.runs import CIRCUIT

        if args.fresh or not (root / "smollm2" / CIRCUIT).is_file():
            build_runs(root)
    if args.screenshots:
        screenshots(root, args.screenshots)
        return 0

    os.environ["ATTNLAB_RUNS_DIR"] = str(root)
    from streamlit.testing.v1 import AppTest

    from attnlab.app import state

    files = {p.title: p.file for p in state.PAGES}
    at = AppTest.from_file(str(DASHBOARD), default_timeout=600)
    t = time.perf_counter()
    at.run()
    first = time.perf_counter() - t
    pages = list(files)
    run_name = at.selectbox(key="run").value
    cold: dict[str, float] = {}
    for page in pages:  # warm every cache once; the first visit of each page is its cold cost
        t = time.perf_counter()
        at.switch_page(files[page]).run()
        cold[page] = time.perf_counter() - t
        if at.exception:
            raise SystemExit(f"{page}: {[e.value for e in at.exception]}")
    warm: dict[str, list[float]] = {p: [] for p in pages}
    for _ in range(args.repeat):
        for page in pages:
            t = time.perf_counter()
            at.switch_page(files[page]).run()
            warm[page].append(time.perf_counter() - t)
            errors = [e.value for e in at.error]
            if at.exception or errors:
                raise SystemExit(f"{page}: {[e.value for e in at.exception]} {errors}")
    # the inspector on a long prompt: pooled to blocks, plus the zoomed token-level region
    at.switch_page(files["Head inspector"]).run()
    t = time.perf_counter()
    at.number_input(key="inspector_tokens").set_value(2048).run()
    long_cold = time.perf_counter() - t
    long_warm = []
    for _ in range(args.repeat):
        at.switch_page(files["Head atlas"]).run()
        t = time.perf_counter()
        at.switch_page(files["Head inspector"]).run()
        long_warm.append(time.perf_counter() - t)
    n_charts = len(at.get("plotly_chart"))
    if n_charts != 2 or at.exception:
        raise SystemExit(f"the long-prompt inspector drew {n_charts} charts: {[e.value for e in at.exception]}")

    import torch

    cmd = "python benchmarks/dashboard.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    lines = [
        "## Dashboard page switches (embedded model, 270 heads)",
        "",
        f"{datetime.date.today().isoformat()}, {platform.machine()} {platform.processor() or ''} with {os.cpu_count()} "
        f"cores shared with other work, torch {torch.__version__} ({torch.get_num_threads()} threads), Python "
        f"{platform.python_version()}; `{cmd.strip()}`. Run `{run_name}` in `{root}`: SmolLM2-135M profiled on built-in "
        "prompts, sink probe, families, a policy and an IOI circuit. Streamlit AppTest (the script run a switch "
        f"costs on the server, no browser); each page visited once to warm the caches, then {args.repeat} switches "
        "to each page in turn.",
        "",
        "| page | first visit (cold) s | switch, median s | switch, max s |",
        "|---|---:|---:|---:|",
    ]
    for page in pages:
        lines.append(f"| {page} | {cold[page]:.2f} | {statistics.median(warm[page]):.3f} | {max(warm[page]):.3f} |")
    lines.append(f"| Head inspector, 2048-token prompt (blocks + zoom) | {long_cold:.2f} | "
                 f"{statistics.median(long_warm):.3f} | {max(long_warm):.3f} |")
    worst = max(max(v) for v in warm.values())
    worst = max(worst, max(long_warm))
    lines += [
        "",
        f"Dashboard start (first script run): {first:.2f} s. Slowest warm switch: {worst:.3f} s "
        f"({'meets' if worst < 1 else 'misses'} the < 1 s target). The cold inspector visit includes loading the "
        "model and running it to the selected layer on the default 128-token prompt.",
        "",
    ]
    md = "\n".join(lines)
    print(md)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "dashboard.md").write_text(md)
    if args.md:
        args.md.write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
