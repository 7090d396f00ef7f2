"""What the dashboard's pages share: the page list, the typed page context, the selection that
outlives a page (the run, the head, the two runs compared) and how it is written in the URL.

The entry script (`attnlab.app.dashboard`) reads the runs folder, applies a deep link
(``?run=NAME&head=L18.H6``), draws the run picker, stores a `PageContext` for the page and runs
the page. A page script (``app/pages/*.py``) starts with `page_context`, which draws its header
and returns the context, or ``None`` (with a message on the page) when there is no readable run.

The selected run and head live in the session state (`RUN`, `SELECTED_HEAD`) and are written
back to the URL on every script run, so the address bar always holds a link that reopens the
same view.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import streamlit as st

from attnlab.app import data
from attnlab.errors import AttnlabError
from attnlab.identity import ModelIdentity
from attnlab.names import head_label, parse_head_label
from attnlab.runs import POLICY, Artifact, Run


@dataclass(frozen=True)
class PageSpec:
    """One page: its title, its script (relative to the entry script) and its URL path.

    A URL path is never its script's file name (``pages/head_atlas.py`` is ``/atlas``): Streamlit
    also knows the scripts of a ``pages/`` folder by their file names (its older multipage
    scheme), and a page requested under such a name would run without the entry script.
    """

    title: str
    file: str
    url_path: str
    icon: str
    needs_run: bool = True


RUNS = PageSpec("Runs", "pages/runs_overview.py", "runs", ":material/folder_open:", needs_run=False)
ATLAS = PageSpec("Head atlas", "pages/head_atlas.py", "atlas", ":material/grid_on:")
INSPECTOR = PageSpec("Head inspector", "pages/head_inspector.py", "inspector", ":material/search:")
POLICY_STUDIO = PageSpec("Policy studio", "pages/policy_studio.py", "policy", ":material/tune:")
VALIDATION = PageSpec("Validation", "pages/policy_validation.py", "validation", ":material/fact_check:")
RETRIEVAL = PageSpec("Retrieval", "pages/retrieval_heads.py", "retrieval", ":material/manage_search:")
FAMILIES = PageSpec("Head families", "pages/head_families.py", "families", ":material/bubble_chart:")
CIRCUITS = PageSpec("Circuits", "pages/task_circuits.py", "circuits", ":material/account_tree:")
TASKS = PageSpec("Tasks", "pages/task_suite.py", "tasks", ":material/checklist:")
#: Every page, in the navigation's order; the first is the default (``/``).
PAGES: tuple[PageSpec, ...] = (RUNS, ATLAS, INSPECTOR, POLICY_STUDIO, VALIDATION, TASKS, RETRIEVAL, FAMILIES, CIRCUITS)

#: Session-state keys: the run picker's widget, the selected ``(layer, head)``, the runs compared.
RUN = "run"
SELECTED_HEAD = "selected_head"
COMPARE = "compare_runs"
NO_COMPARISON = "(no comparison)"
#: Query parameters of a shareable view.
URL_RUN, URL_HEAD = "run", "head"
_URL_WRITTEN = "_url_written"
_CONTEXT = "_page_context"
#: Widgets whose value outlives a visit to another page (Streamlit forgets the value of a widget
#: that a script run did not draw, unless it is written back to the session state first).
KEEP_WIDGETS = ("inspector_prompt_source", "inspector_kind", "inspector_tokens", "inspector_seed", "inspector_text",
                "policy_budget", "policy_budget_kind", "policy_gqa", "policy_protect", "policy_protect_layers")


@dataclass(frozen=True)
class PageContext:
    """What a page is drawn from.

    Attributes:
        root: the runs folder.
        entries: every run folder in it (opened, or with the reason it cannot be).
        entry: the run picked in the sidebar (``None`` when the folder has none).
        identity: that run's model (`ModelIdentity`), ``None`` when the run cannot be read.
        head: the selected ``(layer, head)`` when the page started, ``None`` before any.
        compare: the two runs picked for a head-by-head comparison, or ``None``.
    """

    root: Path
    entries: tuple[data.RunEntry, ...]
    entry: data.RunEntry | None
    identity: ModelIdentity | None = None
    head: tuple[int, int] | None = None
    compare: tuple[str, str] | None = None

    @property
    def run(self) -> Run:
        """The picked run (pages that need one are drawn only when it is readable)."""
        if self.entry is None or self.entry.run is None:
            raise AttnlabError("no readable run is picked")
        return self.entry.run

    @property
    def readable(self) -> dict[str, data.RunEntry]:
        """The runs that can be read, by name."""
        return {e.name: e for e in self.entries if e.run is not None}

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(layers, query heads, KV heads)`` of the picked run's model."""
        i = self.identity
        return (0, 0, 1) if i is None else (i.n_layers, i.n_heads, i.n_kv_heads)


# -- the entry script's part ---------------------------------------------------------------------
def keep_widgets() -> None:
    for k in KEEP_WIDGETS:
        if k in st.session_state:
            st.session_state[k] = st.session_state[k]


def apply_url(entries: list[data.RunEntry]) -> list[str]:
    """Take the run and head a link names (``?run=...&head=L18.H6``) when they are not what this
    session last wrote there; returns what was wrong with the link (an unknown run, a bad label)."""
    written = st.session_state.get(_URL_WRITTEN, {})
    notes = []
    run = st.query_params.get(URL_RUN)
    if run is not None and run != written.get(URL_RUN):
        if run in [e.name for e in entries]:
            st.session_state[RUN] = run
        else:
            notes.append(f"the link names run {run!r}, which is not in this runs folder")
    head = st.query_params.get(URL_HEAD)
    if head is not None and head != written.get(URL_HEAD):
        try:
            st.session_state[SELECTED_HEAD] = parse_head_label(head)
        except AttnlabError as exc:
            notes.append(str(exc))
    return notes


def write_url(entry: data.RunEntry | None) -> None:
    """The selected run and head in the address bar."""
    want = {}
    if entry is not None:
        want[URL_RUN] = entry.name
    sel = st.session_state.get(SELECTED_HEAD)
    if sel is not None:
        want[URL_HEAD] = head_label(*sel)
    for k, v in want.items():
        if st.query_params.get(k) != v:
            st.query_params[k] = v
    st.session_state[_URL_WRITTEN] = want


def make_context(root: Path, entries: list[data.RunEntry], entry: data.RunEntry | None) -> PageContext:
    identity = None
    if entry is not None and entry.run is not None:
        try:
            identity = entry.run.identity
        except AttnlabError:
            identity = None  # `page_context` reports it on the pages that need the model
    sel = st.session_state.get(SELECTED_HEAD)
    ctx = PageContext(root=Path(root), entries=tuple(entries), entry=entry, identity=identity,
                      head=None if sel is None else (int(sel[0]), int(sel[1])), compare=st.session_state.get(COMPARE))
    st.session_state[_CONTEXT] = ctx
    return ctx


# -- a page's part -------------------------------------------------------------------------------
def page_context(page: PageSpec) -> PageContext | None:
    """Draw the page's header; the context, or ``None`` when the page needs a readable run and
    there is none (the page then shows why, and what to do)."""
    st.header(page.title)
    ctx: PageContext | None = st.session_state.get(_CONTEXT)
    if ctx is None:  # a page script run on its own: the entry script makes the context
        st.error("open the dashboard through its entry script: `attnlab dashboard RUNS_DIR`")
        return None
    if not page.needs_run:
        return ctx
    if ctx.entry is None:
        st.info(data.no_runs_message(ctx.root))
        return None
    if ctx.entry.run is None:
        st.error(f"run {ctx.entry.name} cannot be read: {ctx.entry.problem}")
        return None
    if ctx.identity is None:
        try:
            ctx.entry.run.identity  # noqa: B018 - raises the reason
        except AttnlabError as exc:
            st.error(f"run {ctx.entry.name}'s manifest gives no usable model: {exc}; re-create it with `attnlab profile`")
        return None
    return ctx


def select_head(layer: int, head: int) -> None:
    """Make ``(layer, head)`` the selected head, here and in the URL."""
    st.session_state[SELECTED_HEAD] = (int(layer), int(head))
    label = head_label(layer, head)
    if st.query_params.get(URL_HEAD) != label:
        st.query_params[URL_HEAD] = label
    st.session_state[_URL_WRITTEN] = {**st.session_state.get(_URL_WRITTEN, {}), URL_HEAD: label}


def open_in_inspector(layer: int, head: int) -> None:
    """Select ``(layer, head)`` and switch to the head inspector (stops this page's script run)."""
    select_head(layer, head)
    st.switch_page(INSPECTOR.file)


def _picked(prefix: str) -> None:
    """on_change of a head picker: its layer and head become the selected head."""
    layer, head = st.session_state.get(f"{prefix}_layer"), st.session_state.get(f"{prefix}_head")
    if layer is not None and head is not None:
        st.session_state[SELECTED_HEAD] = (int(layer), int(head))


def head_pickers(prefix: str, n_layers: int, n_heads: int, n_kv: int) -> tuple[int, int]:
    """Layer and head selectboxes (keys ``{prefix}_layer``, ``{prefix}_head``) that show the
    selected head (picked on any page, or by a link) and make theirs the selected head."""
    lk, hk = f"{prefix}_layer", f"{prefix}_head"
    sel = st.session_state.get(SELECTED_HEAD)
    if sel is not None and (st.session_state.get(lk), st.session_state.get(hk)) != tuple(sel):
        st.session_state[lk], st.session_state[hk] = int(sel[0]), int(sel[1])
    for k, n in ((lk, n_layers), (hk, n_heads)):  # another run may have fewer layers or heads
        v = st.session_state.get(k)
        if v is not None and not (isinstance(v, int) and 0 <= v < n):
            st.session_state[k] = max(0, min(int(v) if isinstance(v, int) else 0, n - 1))
    group = max(1, n_heads // max(1, n_kv))
    layer = st.selectbox("layer", list(range(n_layers)), key=lk, on_change=_picked, args=(prefix,))
    head = st.selectbox("head", list(range(n_heads)), key=hk, on_change=_picked, args=(prefix,),
                        format_func=lambda h: f"{h} (KV head {h // group})")
    select_head(int(layer), int(head))
    return int(layer), int(head)


def show_problem(exc: AttnlabError) -> None:
    """A bad input's one-line message (never a stack trace)."""
    st.error(str(exc))


def missing(run: Run, art: Artifact, what: str) -> None:
    """``what`` needs ``art``, which the run lacks: the command that makes it."""
    st.info(f"{what} needs `{art.filename}`, which this run does not have yet. Create it with:\n\n"
            f"`{run.command_for(art)}`")


def show_stored_policy(run: Run, layer: int, head: int) -> None:
    """One line: the kind the run's stored policy gives this head, and why (nothing without one)."""
    if not run.has(POLICY):
        return
    try:
        pol = data.cached_stored_policy(run)
    except AttnlabError as exc:
        show_problem(exc)
        return
    e = next((h for h in pol["heads"] if h["layer"] == layer and h["head"] == head), None)
    if e is not None:
        st.markdown(f"**stored policy**: `{e['kind']}` — {e.get('reason', '')}")


def plot(fig: go.Figure, key: str) -> None:
    st.plotly_chart(fig, width="stretch", key=key)


def default(key: str, value: Any) -> dict[str, Any]:
    """``value=`` for a kept widget (`KEEP_WIDGETS`) only on its first drawing: Streamlit warns
    about a default given to a widget whose value the session state already holds."""
    return {} if key in st.session_state else {"value": value}


def fmt(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None else (f"{v:.{digits}f}" if isinstance(v, (int, float)) else str(v))
