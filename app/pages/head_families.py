"""Head families: which heads behave alike (PCA + k-means over their statistics and detections)?"""

from __future__ import annotations

import streamlit as st

from attnlab.app import data, figures, state
from attnlab.errors import AttnlabError
from attnlab.names import head_label
from attnlab.runs import FAMILIES


def render(ctx: state.PageContext) -> None:
    run = ctx.run
    if not run.has(FAMILIES):
        state.missing(run, FAMILIES, "Head families")
        return
    try:
        fam = data.cached_artifact(run, FAMILIES)
    except AttnlabError as exc:
        state.show_problem(exc)
        return
    fam = fam.assign(family=fam["family"].astype(str), label=[head_label(r.layer, r.head) for r in fam.itertuples()])
    state.plot(figures.families_figure(fam), "families_scatter")
    counts = fam.groupby("family", as_index=False).size().rename(columns={"size": "heads"})
    st.dataframe(counts, hide_index=True, key="families_counts")


ctx = state.page_context(state.FAMILIES)
if ctx is not None:
    render(ctx)
