"""Errors for expected mistakes: bad input, missing files, wrong model.

The CLI prints an `AttnlabError` as one line (``error: ...``) with no traceback; anything
else is a bug and keeps its traceback. Every message says what was wrong and how to fix it.
"""

from __future__ import annotations


class AttnlabError(Exception):
    """A mistake in the user's input or environment, with a message that names the fix."""


class ModelLoadError(AttnlabError):
    """The model could not be found or loaded."""


class PromptError(AttnlabError):
    """A prompt, text file or JSONL file is unusable."""


class RunError(AttnlabError):
    """A run directory is missing, incomplete, of another schema, or would be overwritten."""
