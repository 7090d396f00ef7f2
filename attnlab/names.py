"""The names attnlab's stages share: head labels and hook names.

A head is written ``L{layer}.H{head}`` everywhere (tables, plots, the CLI, deep links such as
``?head=L18.H6``); TransformerBridge hook points are ``blocks.{layer}.attn.{hook}``. Both are
formatted and parsed here only, as TransformerLens's ``utils.get_act_name`` does for its names.
"""

from __future__ import annotations

import re

from attnlab.errors import AttnlabError

_HEAD_LABEL = re.compile(r"^\s*L(\d+)\.H(\d+)\s*$", re.IGNORECASE)

#: Attention hook points of a TransformerBridge block, as attnlab uses them.
ATTN_HOOKS = ("hook_pattern", "hook_z", "hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k")

ERR_HEAD_LABEL = "{text!r} is not a head label: write it as L<layer>.H<head>, e.g. L18.H6"
ERR_HOOK = "unknown attention hook {hook!r}: expected one of {known}"


def head_label(layer: int, head: int) -> str:
    """``L{layer}.H{head}``, the label of one attention head."""
    return f"L{int(layer)}.H{int(head)}"


def parse_head_label(text: str) -> tuple[int, int]:
    """``(layer, head)`` from ``"L18.H6"`` (case and surrounding spaces ignored)."""
    m = _HEAD_LABEL.match(str(text))
    if not m:
        raise AttnlabError(ERR_HEAD_LABEL.format(text=text))
    return int(m.group(1)), int(m.group(2))


def attn_hook(layer: int, hook: str = "hook_pattern") -> str:
    """``blocks.{layer}.attn.{hook}``: the TransformerBridge hook point of one layer's attention."""
    if hook not in ATTN_HOOKS:
        raise AttnlabError(ERR_HOOK.format(hook=hook, known=", ".join(ATTN_HOOKS)))
    return f"blocks.{int(layer)}.attn.{hook}"
