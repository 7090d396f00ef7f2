"""The dashboard in a real browser: headless Debian chromium driven over the DevTools protocol.

`attnlab dashboard` serves a runs folder holding a real tiny run (`attnlab.profile` on the
two-layer GQA llama, with a policy and an induction circuit); chromium loads it, the test
picks a head by clicking its heatmap cell, clicks to the policy studio in the page navigation,
moves the budget slider with the keyboard, opens the head inspector (which shows the head
clicked in the atlas, token by token, from a live run of the model) and the circuits page, and
checks what the page shows: the figures are drawn by plotly.js, the metrics change, no
exception box appears, the address bar carries the run and the head. Then it loads every
page by its own URL, and a deep link to the inspector (``/inspector?run=tiny&head=L1.H2``). Screenshots go to the test's temporary folder,
and to ``$ATTNLAB_SCREENSHOTS`` when it is set (how the README's pictures are made).

Chromium comes from Debian (``apt-get install chromium``, about 30 s) when it is missing; the
DevTools client is ``websockets``, which Streamlit's server already depends on.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from attnlab.app import state
from attnlab.circuits.circuit import discover, save_circuit
from attnlab.circuits.tasks import induction_task_for
from attnlab.profile import profile
from attnlab.prompts import builtin_prompts
from attnlab.runs import POLICY
from attnlab.sparsity_stats import PolicyGenerator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, seconds: float = 60) -> bytes:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[0]} exited with {proc.returncode} before {url} answered")
        try:
            return urllib.request.urlopen(url, timeout=2).read()
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{url} did not answer within {seconds} s")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium, installed with apt-get when missing (as root, like CI)."""
    path = shutil.which("chromium")
    if path is None:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"]):
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            assert res.returncode == 0, f"{' '.join(cmd)} failed: {res.stderr[-2000:]}"
        path = shutil.which("chromium")
    assert path, "chromium is not on PATH after apt-get install chromium"
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama):
    """`attnlab dashboard` on a runs folder with a profiled tiny run and its policy."""
    root = tmp_path_factory.mktemp("browser_runs")
    run = profile(tiny_llama, builtin_prompts(tiny_llama.tokenizer, [256, 512], n_samples=2), root / "tiny", progress=False)
    PolicyGenerator(budget=0.6).fit(run).emit().save(run.file(POLICY))
    save_circuit(discover(tiny_llama, induction_task_for(tiny_llama, n=2, length=6)), tiny_llama, root / "tiny")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "attnlab.cli", "dashboard", str(root), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait_http(f"http://127.0.0.1:{port}/_stcore/health", proc) == b"ok"
        yield f"http://127.0.0.1:{port}/"
    finally:
        _stop(proc)


class Browser:
    """A headless chromium page, driven over the Chrome DevTools protocol."""

    def __init__(self, chromium: str, url: str, profile_dir: Path):
        from contextlib import ExitStack

        from websockets.sync.client import connect

        port = _free_port()
        self.proc = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000",
             f"--remote-debugging-port={port}", f"--user-data-dir={profile_dir}", url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.stack = ExitStack()
        try:
            pages = json.loads(_wait_http(f"http://127.0.0.1:{port}/json/list", self.proc, 30))
            ws_url = next(p["webSocketDebuggerUrl"] for p in pages if p["type"] == "page")
            self.ws = self.stack.enter_context(connect(ws_url, max_size=64_000_000))
        except BaseException:
            _stop(self.proc)
            raise
        self.ids = itertools.count(1)

    def call(self, method: str, **params):
        i = next(self.ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == i:
                assert "error" not in msg, msg["error"]
                return msg["result"]

    def js(self, expression: str):
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in res, res["exceptionDetails"]
        return res["result"].get("value")

    def wait(self, expression: str, seconds: float = 60):
        deadline = time.time() + seconds
        while time.time() < deadline:
            res = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
            value = None if "exceptionDetails" in res else res["result"].get("value")  # mid-rerun: retry
            if value:
                return value
            time.sleep(0.3)
        raise AssertionError(f"timed out waiting for {expression}; page text: {self.js('document.body.innerText')[:1500]}")

    def key(self, key: str, code: int, times: int = 1) -> None:
        for _ in range(times):
            for kind in ("keyDown", "keyUp"):
                self.call("Input.dispatchKeyEvent", type=kind, key=key, code=key, windowsVirtualKeyCode=code)

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        return path

    def close(self) -> None:
        self.stack.close()
        _stop(self.proc)


METRICS_JS = """Object.fromEntries([...document.querySelectorAll('[data-testid="stMetric"]')].map(m => {
  const label = m.querySelector('[data-testid="stMetricLabel"]').innerText.trim();
  const value = m.querySelector('[data-testid="stMetricValue"]').innerText.trim();
  return [label, value]; }))"""
EXCEPTIONS_JS = 'document.querySelectorAll(\'[data-testid="stException"]\').length'


def _click_nav(browser: Browser, title: str) -> None:
    """Click the page ``title`` in the sidebar's page navigation (`st.navigation`)."""
    assert browser.wait(f"""(() => {{ const a = [...document.querySelectorAll('[data-testid="stSidebarNav"] a')]
        .find(a => a.innerText.trim().split('\\n').pop().trim() === {json.dumps(title)});  // after the icon's name
        if (!a) return false; a.click(); return true; }})()"""), f"no page {title!r} in the navigation"


def _open(browser: Browser, url: str) -> None:
    """Load ``url`` in the page (a new dashboard session)."""
    browser.call("Page.navigate", url=url)


def _wait_query(browser: Browser, want: dict[str, str]) -> None:
    """Wait until the address bar's query parameters are ``want``."""
    browser.wait(f"(() => {{ const q = {QUERY_JS}; return JSON.stringify(Object.keys(q).sort().map(k => [k, q[k]])) === "
                 f"{json.dumps(json.dumps(sorted(want.items()), separators=(',', ':')))}; }})()", 30)


HEADER_JS = """[...document.querySelectorAll('[data-testid="stHeading"] h2')].map(h => h.innerText.trim())"""
QUERY_JS = "Object.fromEntries(new URLSearchParams(location.search))"
#: What each page shows on the browser test's run (profile, policy and circuit; no probes, no validation).
PAGE_SHOWS = {
    "Runs": "query heads",
    "Head atlas": "(reads KV head",
    "Head inspector": "the whole 128 × 128 map",
    "Policy studio": "expected density",
    "Validation": "Validation needs validation_heads.parquet",
    "Retrieval": "The leaderboard needs detections.parquet",
    "Head families": "Head families needs families.parquet",
    "Circuits": "circuit faithfulness",
    "Tasks": "The task suite needs eval_summary.csv",
}


def test_dashboard_in_chromium(chromium, server, tmp_path):
    shots = [tmp_path]
    if os.environ.get("ATTNLAB_SCREENSHOTS"):
        shots.append(Path(os.environ["ATTNLAB_SCREENSHOTS"]))
        shots[-1].mkdir(parents=True, exist_ok=True)
    browser = Browser(chromium, server, tmp_path / "profile")
    try:
        # the runs page, rendered by the browser from the server's websocket messages
        browser.wait("document.body.innerText.includes('query heads')")
        assert browser.js(METRICS_JS) == {"layers": "2", "query heads": "4", "KV heads": "2", "samples": "2"}
        for d in shots:
            browser.screenshot(d / "dashboard_runs.png")

        # head atlas: plotly.js draws the layer x head heatmap and the head's block map
        _click_nav(browser, "Head atlas")
        browser.wait("document.querySelectorAll('.js-plotly-plot .heatmaplayer').length >= 2")
        assert "Layer 0, head 0 (reads KV head 0)" in browser.js("document.body.innerText")
        # a click on the cell of layer 1, head 3 picks that head
        x, y = browser.wait("""(() => { const gd = document.querySelector('.js-plotly-plot'), L = gd._fullLayout;
            const r = gd.getBoundingClientRect();
            return [r.left + L._size.l + L.xaxis.l2p(3), r.top + L._size.t + L.yaxis.l2p(1)]; })()""")
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            browser.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)
        browser.wait("document.body.innerText.includes('Layer 1, head 3 (reads KV head 1)')")
        browser.wait("document.body.innerText.includes('where L1.H3 looks')")
        _wait_query(browser, {"run": "tiny", "head": "L1.H3"})  # the address bar holds the view's link
        assert browser.js("location.pathname") == "/atlas"
        for d in shots:
            browser.screenshot(d / "dashboard_head_atlas.png")

        # policy studio: moving the budget slider with the keyboard refits the policy
        _click_nav(browser, "Policy studio")
        browser.wait("document.body.innerText.includes('expected density') && document.querySelectorAll('.js-plotly-plot').length >= 3")
        before = browser.js(METRICS_JS)
        slider = "document.querySelector('.st-key-policy_budget input[type=range]')"
        assert browser.wait(f"{slider} && {slider}.value") == "0.5"
        browser.wait(f"({slider}.focus(), document.activeElement === {slider})")
        browser.key("ArrowRight", 39, times=10)  # 0.5 -> 1.0 in steps of 0.05
        browser.wait(f"{slider}.value === '1'")
        browser.wait("document.body.innerText.includes('budget 1.00')")
        browser.wait(f"JSON.stringify({METRICS_JS}) !== {json.dumps(json.dumps(before, separators=(',', ':')))}", 60)
        after = browser.js(METRICS_JS)
        assert float(after["expected density"]) > float(before["expected density"])
        assert float(after["expected recall"]) >= float(before["expected recall"])
        assert browser.js(EXCEPTIONS_JS) == 0
        for d in shots:
            browser.screenshot(d / "dashboard_policy_studio.png")

        # head inspector: the head clicked in the atlas, on a live 128-token prompt, token by token
        _click_nav(browser, "Head inspector")
        browser.wait("document.body.innerText.includes('128 tokens: the whole 128 × 128 map') && "
                     "document.querySelectorAll('.js-plotly-plot').length === 1", 120)
        text = browser.js("document.body.innerText")
        assert "Layer 1, head 3 (reads KV head 1)" in text and "128 tokens: the whole 128 × 128 map" in text
        shape = browser.js("""(() => { const t = document.querySelector('.js-plotly-plot').data[0];
            return [t.y.length, t.x.length]; })()""")
        assert shape == [128, 128]
        assert browser.js(EXCEPTIONS_JS) == 0
        for d in shots:
            browser.screenshot(d / "dashboard_inspector.png")

        # circuits: the circuit graph and its faithfulness curve
        _click_nav(browser, "Circuits")
        browser.wait("document.body.innerText.includes('circuit faithfulness') && "
                     "document.querySelectorAll('.js-plotly-plot').length >= 2", 60)
        assert browser.js(METRICS_JS)["task"] == "induction"
        assert browser.js(EXCEPTIONS_JS) == 0
        for d in shots:
            browser.screenshot(d / "dashboard_circuits.png")
        assert browser.js("location.pathname") == "/circuits" and browser.js(QUERY_JS) == {"run": "tiny", "head": "L1.H3"}

        # every page by its own URL, in a new session each
        for page in state.PAGES:
            url = server + ("" if page is state.PAGES[0] else page.url_path) + "?run=tiny"
            _open(browser, url)
            browser.wait(f"{HEADER_JS}.includes({json.dumps(page.title)}) && "
                         f"document.body.innerText.includes({json.dumps(PAGE_SHOWS[page.title])})", 120)
            assert browser.js(EXCEPTIONS_JS) == 0, page.title
            assert browser.js(QUERY_JS)["run"] == "tiny", page.title

        # a deep link opens the inspector on that run and head; the atlas then shows the same head
        _open(browser, server + "inspector?run=tiny&head=L1.H2")
        browser.wait("document.body.innerText.includes('Layer 1, head 2 (reads KV head 1)') && "
                     "document.body.innerText.includes('128 tokens: the whole 128 × 128 map') && "
                     "document.querySelectorAll('.js-plotly-plot').length === 1", 120)
        assert browser.js(HEADER_JS)[0] == "Head inspector" and browser.js(EXCEPTIONS_JS) == 0
        assert browser.js(QUERY_JS) == {"run": "tiny", "head": "L1.H2"}
        _click_nav(browser, "Head atlas")
        browser.wait("document.body.innerText.includes('Layer 1, head 2 (reads KV head 1)') && "
                     "document.body.innerText.includes('where L1.H2 looks')", 60)
        _wait_query(browser, {"run": "tiny", "head": "L1.H2"})
        assert browser.js("location.pathname") == "/atlas"
    finally:
        browser.close()
