"""The dashboard on a run of the embedded model (SmolLM2-135M: 30 layers × 9 query heads over 3
KV heads), made by the real pipeline and kept cheap: `attnlab.profile` on two 256-token
prompts, the sink probe on one 128-token prompt, head families and a budgeted policy. Every
page renders without an exception and shows what it should; the head inspector runs the model
live and matches the bridge's own ``hook_pattern``; a long prompt is pooled to blocks.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from attnlab.app import figures, inspector, state
from attnlab.profile import head_means, profile
from attnlab.prompts import builtin_prompts
from attnlab.runs import POLICY, Run
from attnlab.sparsity_stats import PolicyGenerator

DASHBOARD = str(Path(state.__file__).with_name("dashboard.py"))
PAGE_FILES = {p.title: p.file for p in state.PAGES}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedded_root(tmp_path_factory, embedded) -> Path:
    from attnlab.probes.families import compute_families
    from attnlab.probes.sinks import probe_sinks

    root = tmp_path_factory.mktemp("embedded_runs")
    out = root / "smol"
    run = profile(embedded, builtin_prompts(embedded.tokenizer, [256], n_samples=2), out, progress=False)
    probe_sinks(embedded, out, n_samples=1, lengths=(128,), chat=False, progress=False)
    compute_families(run)
    PolicyGenerator(budget=0.8).fit(Run.open(out)).emit().save(run.file(POLICY))
    return root


def _app(monkeypatch, root: Path) -> AppTest:
    monkeypatch.setenv("ATTNLAB_RUNS_DIR", str(root))
    at = AppTest.from_file(DASHBOARD, default_timeout=120)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _goto(at: AppTest, page: str) -> AppTest:
    at.switch_page(PAGE_FILES[page]).run()
    assert not at.exception, (page, [e.value for e in at.exception])
    assert at.header[0].value == page
    return at


def _figures(at: AppTest) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def _z(fig: dict, trace: int = 0) -> np.ndarray:
    """A figure's ``z``: plotly writes numpy arrays as base64 typed arrays."""
    value = fig["data"][trace]["z"]
    if isinstance(value, dict) and "bdata" in value:
        out = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        return out.reshape([int(x) for x in str(value["shape"]).split(",")]) if value.get("shape") else out
    return np.array(value, dtype=float)


def _texts(elements) -> str:
    return "\n".join(e.value for e in elements)


def _metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def test_every_page_renders_on_an_embedded_model_run(monkeypatch, embedded_root, embedded):
    run = Run.open(embedded_root / "smol")
    at = _app(monkeypatch, embedded_root)
    assert _metrics(at) == {"layers": "30", "query heads": "9", "KV heads": "3", "samples": "2"}
    assert "attnlab circuit --task ioi --model smollm2-135m" in _texts(at.info)

    _goto(at, "Head atlas")
    assert not at.error
    heat = _figures(at)[0]
    means = head_means(run).pivot(index="layer", columns="head", values="sink_mass_1").to_numpy()
    np.testing.assert_allclose(_z(heat), means, rtol=1e-9)
    assert heat["layout"]["xaxis"]["ticktext"][3] == "H3·KV1"
    at.selectbox(key="atlas_layer").set_value(14)
    at.selectbox(key="atlas_head").set_value(5).run()
    assert "Layer 14, head 5 (reads KV head 1)" in _texts(at.subheader)

    # the inspector: the atlas's head on a 128-token built-in prompt, token by token
    _goto(at, "Head inspector")
    assert not at.error
    assert "Layer 14, head 5 (reads KV head 1)" in _texts(at.subheader)
    ids = builtin_prompts(embedded.tokenizer, [128], 1, kinds=["narrative"])[0].input_ids
    got = {}
    embedded.bridge.run_with_hooks(ids, fwd_hooks=[("blocks.14.attn.hook_pattern", lambda p, hook=None: got.update(p=p[0, 5].detach().clone()))],
                                   stop_at_layer=15)
    (fig,) = _figures(at)
    np.testing.assert_allclose(np.nan_to_num(_z(fig)), got["p"].numpy(), atol=1e-4)
    assert any("**family**" in m.value for m in at.markdown)
    assert next(d.value for d in at.dataframe if "evidence" in d.value.columns)["head_type"].str.contains("sink").any()
    # a 1024-token prompt: pooled to the run's 64-token blocks, zoom at token level, nothing over the cap
    at.number_input(key="inspector_tokens").set_value(1024).run()
    assert not at.exception and not at.error
    block_fig, zoom_fig = _figures(at)
    assert _z(block_fig).shape == (16, 16) and _z(zoom_fig).shape == (256, 256)
    np.testing.assert_allclose(np.nansum(_z(block_fig), axis=1), 1.0, atol=1e-4)
    assert all(figures.figure_cells(f) <= inspector.MAX_CELLS for f in _figures(at))

    # the policy studio refits when the budget moves
    _goto(at, "Policy studio")  # 256-token prompts: the default budget 0.5 is below what the constraints allow
    assert "Move the budget slider up" in _texts(at.error)
    at.slider(key="policy_budget").set_value(0.8).run()
    assert not at.exception and not at.error
    before = _metrics(at)
    at.slider(key="policy_budget").set_value(1.0).run()
    assert not at.exception and not at.error
    after = _metrics(at)
    assert float(after["expected density"]) > float(before["expected density"])
    assert _z(_figures(at)[0]).shape == (30, 9)

    for page, expect in (("Validation", "attnlab validate"), ("Retrieval", "attnlab probe"), ("Circuits", "attnlab circuit")):
        _goto(at, page)
        assert not at.error, page
        assert expect in _texts(at.info) and "smollm2-135m" in _texts(at.info), page
    _goto(at, "Head families")
    assert not at.error and len(_figures(at)) == 1
    assert sum(len(t["x"]["bdata"]) if isinstance(t["x"], dict) else len(t["x"]) for t in _figures(at)[0]["data"]) > 0
