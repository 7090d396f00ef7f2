"""The attnlab dashboard: explore heads, design a sparse-attention policy, read its validation.

Start it with ``attnlab dashboard RUNS_DIR`` (or ``streamlit run app/dashboard.py -- RUNS_DIR``,
or with ``$ATTNLAB_RUNS_DIR`` set). It reads the run directories the CLI wrote and never
recomputes what they store; the only computations are the policy studio's budgeted policy, fitted
from the run's stored statistics at the budget the slider picks, and the head inspector's one
head on one prompt.

This is the entry script of a multipage app (`st.navigation`); each page is one script under
``pages/`` with its own URL (`attnlab.app.state.PAGES`):

- **Runs** (``/``) — which runs are there, of which model, with which parameters, and what is missing?
  Two runs can be picked for a head-by-head comparison.
- **Head atlas** (``/atlas``) — how does a statistic or a detection score vary over layers and
  heads, and what does one head look like? With two runs picked: how do they differ?
- **Head inspector** (``/inspector``) — what does this head attend to on this prompt, token by
  token (or block by block for a long prompt), and what do its statistics, detections and family say?
- **Policy studio** (``/policy``) — what does a policy at this budget keep, cost and lose, against baselines?
- **Validation** (``/validation``) — how do the validated policies of this runs folder trade
  density for error, perplexity and needle accuracy, and how far is each head's sparse output from dense?
- **Retrieval** (``/retrieval``) — which heads retrieve, and does ablating them hurt?
- **Head families** (``/families``) — which heads behave alike?
- **Circuits** (``/circuits``) — which heads carry a task, with which effects, and how faithful is the circuit?

The run picked in the sidebar and the head selected on one page (atlas, inspector, circuits)
are those of every page, and the URL carries them: ``/inspector?run=NAME&head=L18.H6`` opens
the inspector on that run and head. The model is loaded only by the head inspector, only when
it draws a live prompt (`st.cache_resource`). Every page reports bad input (no runs, a missing
table, an old schema, a damaged file) as a message on the page; the other pages keep working.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import streamlit as st

from attnlab.app import data, state


def runs_root() -> Path:
    # Streamlit passes the arguments after `--` as sys.argv[1:]; elsewhere (tests) argv is not ours.
    try:
        ours = Path(sys.argv[0]).resolve() == Path(__file__).resolve()
    except (OSError, NameError):
        ours = False
    return data.runs_dir_from(sys.argv[1:] if ours else [], os.environ)


def main() -> None:
    st.set_page_config(page_title="attnlab", layout="wide")
    state.keep_widgets()
    root = runs_root()
    entries = data.list_runs(root)
    navigation = st.navigation([
        st.Page(p.file, title=p.title, url_path=p.url_path, icon=p.icon, default=(p is state.PAGES[0]))
        for p in state.PAGES
    ])
    notes = state.apply_url(entries)
    with st.sidebar:
        st.title("attnlab")
        entry = None
        if entries:
            names = [e.name for e in entries]
            if st.session_state.get(state.RUN) not in names:
                st.session_state.pop(state.RUN, None)
            entry = entries[names.index(st.selectbox("run", names, key=state.RUN))]
        else:
            st.caption(f"no runs in `{root}`")
        for note in notes:
            st.warning(note)
    state.write_url(entry)
    state.make_context(root, entries, entry)
    navigation.run()


main()
