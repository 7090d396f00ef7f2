"""The head inspector's live computation behind Streamlit's caches: the run's model (loaded once
per server, `st.cache_resource`), the prompt's token ids and labels, one layer's queries and
keys, and the patterns recomputed from them (`attnlab.app.inspector`)."""

from __future__ import annotations

import json

import numpy as np
import streamlit as st
import torch

from attnlab.app import inspector
from attnlab.identity import ModelIdentity


def identity_key(identity: ModelIdentity) -> str:
    """A run's `ModelIdentity` as the cache key of its model (JSON)."""
    return json.dumps(identity.to_dict(), sort_keys=True, default=str)


@st.cache_resource(show_spinner=False, max_entries=2)
def model(identity: str):
    """The run's model (``identity``: `identity_key`); loaded and checked once."""
    return inspector.load_run_model(ModelIdentity.from_dict(json.loads(identity)))


@st.cache_data(show_spinner=False, max_entries=32)
def prompt_ids(identity: str, source: str, kind: str, n_tokens: int, seed: int, text: str) -> tuple[int, ...]:
    m = model(identity)
    if source == "built-in":
        ids = inspector.builtin_prompt_ids(m, kind, int(n_tokens), int(seed))
    else:
        ids = inspector.text_prompt_ids(m, text)
    return tuple(int(i) for i in ids.reshape(-1).tolist())


@st.cache_data(show_spinner=False, max_entries=32)
def token_labels(identity: str, ids: tuple[int, ...]) -> list[str]:
    return inspector.token_labels(model(identity).tokenizer, list(ids))


@st.cache_data(show_spinner=False, max_entries=8)
def layer_qk(identity: str, ids: tuple[int, ...], layer: int) -> inspector.LayerQK:
    return inspector.capture_layer_qk(model(identity), torch.tensor([ids]), layer)


@st.cache_data(show_spinner=False, max_entries=64)
def token_pattern(identity: str, ids: tuple[int, ...], layer: int, head: int, q_range, k_range) -> np.ndarray:
    return inspector.token_pattern(layer_qk(identity, ids, layer), head, q_range, k_range)


@st.cache_data(show_spinner=False, max_entries=64)
def block_pattern(identity: str, ids: tuple[int, ...], layer: int, head: int, block: int) -> np.ndarray:
    return inspector.block_pattern(layer_qk(identity, ids, layer), head, block)
