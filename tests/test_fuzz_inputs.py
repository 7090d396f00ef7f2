"""Property-based hostile input (issue 13): policy files, run manifests and JSONL prompt files.

Each input surface gets a valid file, then Hypothesis mutates it: wrong types, NaN, infinities
and huge numbers, missing and extra fields, deep nesting, truncated text. The property is the
same everywhere: the file either loads into a valid object (that the next step can use), or
loading raises an `AttnlabError` whose message is one line naming the file; never another
exception, and nothing is written next to the file. Runs are derandomized (the same examples
on every machine) and small, so the whole file takes well under a minute.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnlab.errors import AttnlabError
from attnlab.runs import MANIFEST, Run
from attnlab.sparsity_stats import Policy

FIXTURES = Path(__file__).parent / "fixtures"

FUZZ = settings(
    max_examples=200, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- hostile values -------------------------------------------------------------------------
#: Values a hostile file puts where a field was: every JSON type, non-finite and huge numbers,
#: deep nesting (as text, see `_nest`), and the near-misses of valid values.
HOSTILE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**40, 10**400, -(10**400)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e308, -1e308, 5e-324]),
    st.text(max_size=20),
    st.sampled_from(["", "nan", "dense", "last_q", "pooled_qk", "mean", "L0.H0", "\n", "\x00"]),
    st.lists(st.integers(-5, 5), max_size=4),
    st.dictionaries(st.sampled_from(["alpha", "beta", "rule", "last_q", "pool", "x"]),
                    st.one_of(st.integers(-3, 2**33), st.floats(allow_nan=True), st.text(max_size=4)), max_size=3),
)

#: A deeply nested value is spliced in as text (Python's json would recurse building it).
DEEP = "__DEEP__"


def _nest(text: str, depth: int = 50_000) -> str:
    return text.replace(json.dumps(DEEP), "[" * depth + "]" * depth)


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path into a JSON value (dict keys and list indices)."""
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


def _parent(obj: Any, path: tuple) -> tuple[Any, Any]:
    for key in path[:-1]:
        obj = obj[key]
    return obj, path[-1]


@st.composite
def mutated(draw, base: dict[str, Any], n_max: int = 3) -> str:
    """JSON text of ``base`` after 1 to ``n_max`` hostile edits (replace, delete, add a field,
    nest deeply, or truncate the text)."""
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, n_max))):
        paths = _paths(doc)
        if not paths:
            break
        parent, key = _parent(doc, draw(st.sampled_from(paths)))
        op = draw(st.sampled_from(["replace", "replace", "replace", "delete", "add", "deep"]))
        if op == "replace":
            parent[key] = draw(HOSTILE)
        elif op == "delete":
            parent.pop(key) if isinstance(parent, dict) else parent.pop(key)
        elif op == "add" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(HOSTILE)
        elif op == "deep":
            parent[key] = DEEP
    text = _nest(json.dumps(doc))
    if draw(st.integers(0, 9)) == 0:  # a file cut short
        text = text[: draw(st.integers(0, max(0, len(text) - 1)))]
    return text


# -- the property -----------------------------------------------------------------------------
def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def loads_or_fails_cleanly(load: Callable[[], Any], folder: Path, names: str) -> Any:
    """``load()``'s result, or None when it raised an `AttnlabError` of one line that names
    ``names`` (the file); any other exception fails the test, as does a change in ``folder``."""
    before = _listing(folder)
    try:
        result = load()
    except AttnlabError as exc:
        message = str(exc)
        assert "\n" not in message, message
        assert names in message, message
        result = None
    assert _listing(folder) == before, "loading wrote or removed files"
    return result


# -- policy files -----------------------------------------------------------------------------
MODEL = {"name": "fuzz-llm", "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "head_dim": 8, "n_ctx": 512}
HEADS = [
    ("dense", {}),
    ("streaming", {"sink": 4, "window": {"alpha": 16, "beta": 0.125}}),
    ("a_shape", {"sink": 16, "window": 32}),
    ("vertical_slash", {"vertical": 32, "slash": 16, "estimate": {"rule": "last_q", "last_q": 8}}),
]
POLICY = {
    "format": "attnlab-policy", "schema": 1, "model": MODEL, "block_size": 16,
    "budget": {"kind": "density", "value": 0.5, "expected": 0.41},
    "profiled_lengths": [128, 256], "eval_lengths": [256],
    "summary": {"expected_recall": 0.9, "optimality_gap": 0.0}, "generator": {"budget": 0.5},
    "source_run": {"path": "runs/r1", "name": "r1", "created": "2026-01-01"}, "created": "2026-01-01T00:00:00",
    "heads": [
        {"layer": layer, "head": head, "kv_head": 0, "kind": HEADS[2 * layer + head][0], "params": HEADS[2 * layer + head][1],
         "expected_recall": 0.9, "expected_density": 0.5, "density_is": "exact", "reason": "fuzz"}
        for layer in range(2) for head in range(2)
    ],
}
POLICY["heads"][3]["params"] = {"topk": 64, "estimate": {"rule": "pooled_qk", "pool": "mean"}}
POLICY["heads"][3]["kind"] = "block_topk"


def test_the_base_policy_is_valid():
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "policy.json"
        path.write_text(json.dumps(POLICY))
        policy = Policy.load(path)
        assert [e.kind for e in policy.heads] == ["dense", "streaming", "a_shape", "block_topk"]
        assert policy.compile(64)  # what a loaded policy is for


@FUZZ
@given(text=mutated(POLICY))
def test_a_mutated_policy_loads_valid_or_fails_in_one_line(text):
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        path = folder / "policy.json"
        path.write_text(text)
        policy = loads_or_fails_cleanly(lambda: Policy.load(path), folder, "policy.json")
        if policy is None:
            return
        # valid means usable: it compiles, and saving it again writes strict JSON
        loads_or_fails_cleanly(lambda: policy.compile(64), folder, "")
        out = folder / "again" / "p.json"
        out.parent.mkdir()
        policy.save(out)
        json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"a bare {c} was written"))
        assert len(Policy.load(out).heads) == len(policy.heads)


#: Schema 2: the same policy with a decode section (issue 15), one entry per (layer, kv_head).
POLICY_DECODE = {
    **copy.deepcopy(POLICY), "schema": 2,
    "decode": {"heads": [
        {"layer": 0, "kv_head": 0, "kind": "streaming", "params": {"sink": 4, "recent": 32}},
        {"layer": 1, "kv_head": 0, "kind": "snapkv", "params": {"budget": {"alpha": 24, "beta": 0.25}, "window": 8, "kernel": 5, "sink": 4},
         "reason": "fuzz"},
    ]},
}


def test_the_base_decode_policy_is_valid():
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "policy.json"
        path.write_text(json.dumps(POLICY_DECODE))
        policy = Policy.load(path)
        assert [e.kind for e in policy.decode_heads()] == ["streaming", "snapkv"]
        assert policy.predicted_kv_tokens(100, 5) == 36 + (24 + 25 + 5)


@FUZZ
@given(text=mutated(POLICY_DECODE))
def test_a_mutated_decode_policy_loads_valid_or_fails_in_one_line(text):
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        path = folder / "policy.json"
        path.write_text(text)
        policy = loads_or_fails_cleanly(lambda: Policy.load(path), folder, "policy.json")
        if policy is None:
            return
        # valid means usable: it predicts its KV cache, and saving it again writes strict JSON that loads
        for n in (1, 64, 500):
            assert 0 < policy.predicted_kv_fraction(n, 3) <= 1
        out = folder / "again" / "p.json"
        out.parent.mkdir()
        policy.save(out)
        json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"a bare {c} was written"))
        assert Policy.load(out).decode_heads() == policy.decode_heads()


@FUZZ
@given(value=HOSTILE, field=st.sampled_from(["sink", "recent", "budget", "window", "kernel", "x"]),
       kind=st.sampled_from(["full", "streaming", "snapkv"]))
def test_hostile_decode_parameters_load_valid_or_fail_in_one_line(value, field, kind):
    doc = copy.deepcopy(POLICY_DECODE)
    entry = doc["decode"]["heads"][0]
    entry["kind"] = kind
    entry["params"] = {"full": {}, "streaming": {"sink": 4, "recent": 32},
                       "snapkv": {"budget": 64, "window": 8, "kernel": 5, "sink": 4}}[kind]
    entry["params"][field] = value
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        path = folder / "policy.json"
        path.write_text(json.dumps(doc))
        policy = loads_or_fails_cleanly(lambda: Policy.load(path), folder, "policy.json")
        if policy is not None:
            for n in (1, 64, 500):
                assert 0 < policy.predicted_kv_fraction(n, 2) <= 1


@FUZZ
@given(value=HOSTILE, field=st.sampled_from(["sink", "window", "vertical", "slash", "topk", "gamma", "estimate"]),
       kind=st.sampled_from(["streaming", "a_shape", "vertical_slash", "block_topk"]))
def test_hostile_head_parameters_load_valid_or_fail_in_one_line(value, field, kind):
    doc = copy.deepcopy(POLICY)
    params = dict(next(p for k, p in HEADS if k == kind) if kind != "block_topk" else POLICY["heads"][3]["params"])
    params[field] = value
    doc["heads"][1].update(kind=kind, params=params)
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        path = folder / "policy.json"
        path.write_text(json.dumps(doc))
        policy = loads_or_fails_cleanly(lambda: Policy.load(path), folder, "policy.json")
        if policy is not None:
            for n in (64, 500):
                policy.compile(n)


# -- run manifests ----------------------------------------------------------------------------
MANIFEST_BASE = json.loads((FIXTURES / "run_v0_1_0" / "manifest.json").read_text())


@FUZZ
@given(text=mutated(MANIFEST_BASE))
def test_a_mutated_manifest_opens_valid_or_fails_in_one_line(text):
    from attnlab.app.data import RunEntry, runs_overview

    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        run_dir = folder / "r1"
        run_dir.mkdir()
        (run_dir / MANIFEST).write_text(text)
        run = loads_or_fails_cleanly(lambda: Run.open(run_dir), folder, "r1")
        if run is None:
            return
        # an opened run is one every reader can use: its identity, its recorded lengths, and
        # the dashboard's runs table (one broken run must not take the page down)
        assert run.identity.n_layers >= 1 and run.identity.n_heads >= 1
        assert isinstance(run.manifest.get("stages", {}), dict)
        lengths = (run.manifest.get("parameters") or {}).get("lengths") or []
        assert all(isinstance(n, int) and n > 0 for n in lengths)
        runs_overview([RunEntry(run_dir, run, None)])


MANIFEST_FIELDS = [("schema",), ("kind",), ("status",), ("created",), ("model",), ("model", "name"), ("model", "n_layers"),
                   ("model", "n_heads"), ("model", "n_kv_heads"), ("model", "head_dim"), ("model", "n_ctx"),
                   ("model", "fingerprint"), ("parameters",), ("parameters", "lengths"), ("parameters", "prompts"),
                   ("parameters", "path"), ("parameters", "stat_config"), ("stages",), ("stages", "probe")]


@FUZZ
@given(field=st.sampled_from(MANIFEST_FIELDS), value=HOSTILE)
def test_a_hostile_manifest_field_opens_valid_or_fails_in_one_line(field, value):
    doc = copy.deepcopy(MANIFEST_BASE)
    doc.setdefault("stages", {})
    parent = doc
    for key in field[:-1]:
        parent = parent[key]
    parent[field[-1]] = value
    test_a_mutated_manifest_opens_valid_or_fails_in_one_line.hypothesis.inner_test(text=json.dumps(doc))


def test_the_base_manifest_opens():
    with tempfile.TemporaryDirectory() as d:
        shutil.copytree(FIXTURES / "run_v0_1_0", Path(d) / "r")
        assert Run.open(Path(d) / "r").identity.n_heads == 4


# -- JSONL prompt files -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from attnlab.models import EMBEDDED_MODELS, EMBEDDED_NAME, _embedded_cache

    return AutoTokenizer.from_pretrained(_embedded_cache(EMBEDDED_MODELS[EMBEDDED_NAME], verbose=False))


LINE = st.one_of(
    st.builds(lambda t: json.dumps({"text": t}), st.text(max_size=30)),
    st.builds(lambda t, n: json.dumps({"text": t, "name": n}), st.text(min_size=1, max_size=10), HOSTILE),
    st.builds(lambda v: json.dumps({"text": v}), HOSTILE),
    st.builds(lambda v: json.dumps(v), HOSTILE),
    mutated({"text": "Once upon a time", "name": "p1"}, n_max=2),
    st.text(max_size=30),
    st.just(""),
)


@settings(max_examples=80, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(lines=st.lists(LINE, min_size=0, max_size=5), raw=st.one_of(st.none(), st.binary(min_size=1, max_size=8)))
def test_a_hostile_jsonl_file_loads_prompts_or_fails_in_one_line(tok, lines, raw):
    from attnlab.prompts import jsonl_prompts

    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        path = folder / "prompts.jsonl"
        data = "\n".join(lines).encode("utf-8", "surrogatepass")
        path.write_bytes(data + raw if raw is not None else data)
        prompts = loads_or_fails_cleanly(lambda: jsonl_prompts(tok, path), folder, "prompts.jsonl")
        if prompts is not None:
            assert prompts and all(p.input_ids.ndim == 2 and p.input_ids.shape[1] >= 1 for p in prompts)
            assert all(isinstance(p.name, str) and math.isfinite(p.input_ids.float().sum()) for p in prompts)


def test_the_property_itself_rejects_a_traceback_and_a_write(tmp_path):
    """`loads_or_fails_cleanly` is not vacuous: another exception, a message without the file,
    and a load that writes all fail it."""
    with pytest.raises(ZeroDivisionError):
        loads_or_fails_cleanly(lambda: 1 / 0, tmp_path, "x")
    with pytest.raises(AssertionError):
        loads_or_fails_cleanly(lambda: (_ for _ in ()).throw(AttnlabError("no name here")), tmp_path, "policy.json")
    with pytest.raises(AssertionError, match="wrote"):
        loads_or_fails_cleanly(lambda: (tmp_path / "new").write_text("x"), tmp_path, "")
    assert os.path.exists(tmp_path / "new")
