"""Needle-in-a-haystack samples, greedy answers and their grading.

A *needle* is one sentence that states a fact — ``The pass key is 48213. Remember it.`` — hidden
at a chosen *depth* (fraction of the way through) in a long *haystack* of unrelated text. The
model is then asked about it: the question goes in the user turn of the chat template (when the
model has one), and the assistant turn already begins with the needle's lead-in
(``The pass key is``), so the model's next tokens are the needle's *value*. Three kinds of needle
(`NEEDLE_KINDS`):

- ``passkey``: a five-digit number (the classic passkey-retrieval test);
- ``kv``: a key–value fact, ``The code word for Lisbon is purple giraffe.``;
- ``phrase``: a multi-token phrase, ``The best thing to do in Oslo is to climb the clock tower
  and feed the pigeons.`` (Wu et al.'s "best thing to do in San Francisco" needle, generated).

Haystacks come from the project's own text generators (`attnlab.prompts.generate_text`,
narrative prose by default) or from a user's UTF-8 text file, cut in token windows. Each sample
is built to the exact requested number of tokens (the whole prompt: template, haystack, needle,
question and lead-in), and records where the needle's value sits: ``needle_span = (start, end)``
token positions with ``input_ids[0, start:end] == answer_ids``. The value's tokens must appear in
the haystack exactly as the model would write them after the lead-in; otherwise the retrieval
score could never match a generated token to the needle, so building such a sample raises a
`NeedleError` that names the sample and what to change.

Grading (`grade`) is containment of the value in the generated answer (case- and
whitespace-insensitive) and ROUGE-1 recall (`rouge1_recall`): the share of the value's words
(lower-cased alphanumeric runs) that the answer contains, counted with multiplicity.

`greedy_answer` runs a sample through the model (routed attention, SDPA, KV cache) and grades
it; `ablation` zeroes, mean-ablates or flattens chosen heads while it decodes (see
`attnlab.probes.ablation`).
"""

from __future__ import annotations

import itertools
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from attnlab.attention import attend, route_attention, sdpa
from attnlab.errors import PromptError
from attnlab.models import forward_with_cache
from attnlab.prompts import KINDS as HAYSTACK_REGISTERS
from attnlab.prompts import generate_text, read_text_file

from .base import ProbeError

NEEDLE_KINDS = ("passkey", "kv", "phrase")
#: Context positions kept free for the answer: a sample may be at most ``n_ctx - ANSWER_ROOM`` long.
ANSWER_ROOM = 32

#: Words of the generated needles; none of them occurs in the built-in haystack registers.
_CITIES = ["Lisbon", "Oslo", "Nairobi", "Quito", "Hanoi", "Tbilisi", "Perth", "Montreal", "Kyoto",
           "Accra", "Bergen", "Cusco", "Dakar", "Porto", "Riga", "Seville", "Tallinn", "Valencia"]
_COLOURS = ["purple", "golden", "silver", "crimson", "emerald", "orange", "turquoise", "scarlet"]
_ANIMALS = ["giraffe", "penguin", "falcon", "otter", "tiger", "dolphin", "badger", "parrot", "walrus"]
_ACTIVITIES = ["climb the clock tower", "feed the pigeons", "eat a warm pretzel", "swim in the lake",
               "watch the trains", "visit the botanical garden", "ride the old tram",
               "buy fresh figs", "dance in the park", "read poems by the river"]

#: Words that pad a haystack by one token when the exact length is otherwise out of reach.
_FILLERS = (" then", " and", " so", " again", " still", ".", " later")

_ERR_KIND = "unknown needle kind {kind!r}: choose from {kinds}"
_ERR_REGISTER = "unknown haystack register(s) {bad} in {spec!r}: choose from {registers}, e.g. 'builtin:narrative'"
_ERR_DEPTH = "needle depths must lie in [0, 1] (a fraction of the haystack), got {depths}"
_ERR_LENGTHS = "needle context lengths must be positive token counts, got {lengths}"
_ERR_TOO_LONG = (
    "needle sample {name!r} needs a {n}-token context plus {room} tokens for the answer but {model} "
    "takes at most {n_ctx} tokens: lower --lengths to at most {max_ok}"
)
_ERR_TOO_SHORT = (
    "needle sample {name!r}: a {n}-token context leaves no room for a haystack (the template, "
    "needle and question alone take {overhead} tokens): raise --lengths to at least {minimum}"
)
_ERR_HAYSTACK_SHORT = (
    "needle sample {name!r}: haystack {source} has {have} tokens but a {n}-token context needs "
    "about {need}: give a longer haystack file or lower --lengths to at most {max_ok}"
)
_ERR_NOT_VERBATIM = (
    "needle sample {name!r}: the tokenizer does not keep the needle value {value!r} as whole "
    "tokens inside the haystack ({detail}), so the retrieval score could never match it; change "
    "the needle so the value stands alone between a space and punctuation, e.g. "
    "'{lead} {value}.'"
)
_ERR_ANSWER_TOKENS = (
    "needle sample {name!r}: the value {value!r} is tokenized as {in_haystack} in the haystack but "
    "as {in_answer} after the lead-in {lead!r}, so a generated answer could never match the "
    "needle tokens; change the needle sentence so that it starts with the lead-in, e.g. "
    "'{lead} {value}.'"
)
_ERR_NO_SAMPLES = "n_samples must be positive (or None for the whole grid), got {n}"


class NeedleError(ProbeError, PromptError):
    """A needle-in-a-haystack sample cannot be built as asked (a `ProbeError`, and a
    `PromptError` as every prompt that cannot be built is)."""


@dataclass(frozen=True)
class Needle:
    """One fact to hide: the sentence ``f"{lead} {value}{tail}"``, and how to ask for it.

    ``lead`` doubles as the start of the assistant's answer, so the model's next tokens are the
    value; ``question`` goes in the user turn after the haystack.
    """

    kind: str
    lead: str
    value: str
    tail: str
    question: str

    @property
    def sentence(self) -> str:
        return f"{self.lead} {self.value}{self.tail}"


def make_needle(kind: str, rng: random.Random) -> Needle:
    """A random needle of one of the `NEEDLE_KINDS`."""
    if kind == "passkey":
        value = str(rng.randint(10000, 99999))
        return Needle(kind, "The pass key is", value, ". Remember it.", "What is the pass key?")
    if kind == "kv":
        city = rng.choice(_CITIES)
        value = f"{rng.choice(_COLOURS)} {rng.choice(_ANIMALS)}"
        return Needle(kind, f"The code word for {city} is", value, ".", f"What is the code word for {city}?")
    if kind == "phrase":
        city = rng.choice(_CITIES)
        first, second = rng.sample(_ACTIVITIES, 2)
        return Needle(
            kind, f"The best thing to do in {city} is to", f"{first} and {second}", ".",
            f"What is the best thing to do in {city}?",
        )
    raise NeedleError(_ERR_KIND.format(kind=kind, kinds=list(NEEDLE_KINDS)))


@dataclass
class NeedleSample:
    """One needle-in-a-haystack prompt with exact ground truth.

    Attributes:
        name: unique within a suite, ``{kind}-{length}-d{depth%}-{index}``.
        input_ids: ``[1, n]`` the whole prompt, ending with the answer's lead-in.
        needle_span: ``(start, end)`` token positions of the needle *value*:
            ``input_ids[0, start:end].tolist() == answer_ids``.
        answer: the value as text (what grading looks for).
        answer_ids: the value's tokens as they appear in the haystack (and as the model writes
            them after the lead-in).
        target_ids: what a correct answer's first tokens are: any separator the tokenizer keeps
            apart (SmolLM2 writes a lone ``' '`` before digits) followed by ``answer_ids``;
            teacher forcing feeds these.
        context_length: the requested prompt length in tokens (``n`` equals it unless the
            tokenizer made it impossible to hit exactly; see `n_tokens`).
        depth: requested needle depth, a fraction of the haystack.
        kind: the needle kind (`NEEDLE_KINDS`, or ``custom``).
        question, lead: what was asked, and the answer's lead-in.
        haystack: where the haystack text came from.
    """

    name: str
    input_ids: torch.Tensor
    needle_span: tuple[int, int]
    answer: str
    answer_ids: list[int]
    target_ids: list[int]
    context_length: int
    depth: float
    kind: str
    question: str = ""
    lead: str = ""
    haystack: str = ""

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[-1])


# ---------------------------------------------------------------------------------------
# grading
# ---------------------------------------------------------------------------------------
_WORD = re.compile(r"[a-z0-9]+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def rouge1_recall(reference: str, prediction: str) -> float:
    """ROUGE-1 recall: the share of ``reference``'s words that ``prediction`` contains.

    Words are lower-cased alphanumeric runs (the ``rouge_score`` tokenizer without stemming);
    overlap is counted with multiplicity (``min`` of the two counts per word). An empty
    reference scores 0.
    """
    ref = Counter(_words(reference))
    if not ref:
        return 0.0
    pred = Counter(_words(prediction))
    return sum(min(count, pred[w]) for w, count in ref.items()) / sum(ref.values())


def contains_answer(answer: str, generated: str) -> bool:
    """Whether ``generated`` contains ``answer``, ignoring case and runs of whitespace."""

    def norm(s: str) -> str:
        return " ".join(s.lower().split())

    return bool(norm(answer)) and norm(answer) in norm(generated)


def grade(sample: NeedleSample, generated: str) -> dict[str, Any]:
    """``{"contains": bool, "rouge1": float}`` for one answer to ``sample``."""
    return {"contains": contains_answer(sample.answer, generated), "rouge1": rouge1_recall(sample.answer, generated)}


# ---------------------------------------------------------------------------------------
# building samples
# ---------------------------------------------------------------------------------------
@dataclass
class _Haystack:
    """A token stream to cut haystack windows from."""

    label: str
    tokens: list[int] | None  # a user file: one stream; None: generate per sample
    registers: tuple[str, ...] = ("narrative",)


def _haystack_source(tokenizer, haystack: str | Path | None) -> _Haystack:
    if haystack is None:
        return _Haystack("builtin:narrative", None, ("narrative",))
    spec = str(haystack)
    if spec == "builtin" or spec.startswith("builtin:"):
        registers = tuple(spec.split(":", 1)[1].split(",")) if ":" in spec else ("narrative",)
        bad = [r for r in registers if r not in HAYSTACK_REGISTERS]
        if bad or not registers:
            raise NeedleError(_ERR_REGISTER.format(bad=bad, spec=spec, registers=list(HAYSTACK_REGISTERS)))
        return _Haystack(spec, None, registers)
    text = read_text_file(spec)
    return _Haystack(str(spec), tokenizer(text, add_special_tokens=False)["input_ids"])


def _render(tokenizer, chat: bool, context: str, needle: Needle) -> tuple[str, bool]:
    """The prompt text (ending with the lead-in) and whether special tokens must be added."""
    if chat:
        user = f"{context}\n\n{needle.question}"
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False
        )
        return text + needle.lead, False
    return f"{context}\n\nQuestion: {needle.question}\nAnswer: {needle.lead}", True


def _trim(text: str) -> str:
    """A token window's text without trailing whitespace, which would merge unpredictably with
    the newline that follows the haystack."""
    return text.rstrip()


def _insert(hay: str, needle: Needle, depth: float) -> str:
    """Insert the needle sentence at the sentence boundary nearest ``depth``."""
    target = depth * len(hay)
    bounds = [0, len(hay)] + [m.end() for m in re.finditer(r"(?<=[.!?])\s+|\n+", hay)]
    pos = min(bounds, key=lambda b: (abs(b - target), b))
    before, after = hay[:pos], hay[pos:]
    sep_before = "" if not before or before[-1].isspace() else " "
    sep_after = "" if not after or after[0].isspace() else " "
    return f"{before}{sep_before}{needle.sentence}{sep_after}{after}"


def _value_span(name: str, text: str, offsets: list[tuple[int, int]], needle: Needle, sentence_at: int) -> tuple[int, int]:
    """Token positions covering the needle value, checked to be whole tokens."""
    vs = sentence_at + len(needle.lead) + 1
    ve = vs + len(needle.value)
    assert text[vs:ve] == needle.value
    inside = [i for i, (a, b) in enumerate(offsets) if b > a and a < ve and b > vs]
    if not inside:
        raise NeedleError(_ERR_NOT_VERBATIM.format(name=name, value=needle.value, detail="no token covers it", lead=needle.lead))
    start, end = inside[0], inside[-1] + 1
    first_a, last_b = offsets[start][0], offsets[end - 1][1]
    if text[first_a:vs].strip() or last_b != ve:
        merged = text[first_a:last_b]
        raise NeedleError(
            _ERR_NOT_VERBATIM.format(
                name=name, value=needle.value, lead=needle.lead,
                detail=f"its tokens cover {merged!r}, merged with the text around it",
            )
        )
    return start, end


def _target_ids(tokenizer, name: str, text: str, needle: Needle, answer_ids: list[int]) -> list[int]:
    """The tokens a correct answer starts with after the prompt ``text``: any separator the
    tokenizer keeps apart (a lone space before digits) and then exactly ``answer_ids``."""
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    full = tokenizer(f"{text} {needle.value}", add_special_tokens=False)["input_ids"]
    target = full[len(prompt):]
    if full[: len(prompt)] != prompt or target[-len(answer_ids):] != answer_ids:
        raise NeedleError(
            _ERR_ANSWER_TOKENS.format(
                name=name, value=needle.value, lead=needle.lead,
                in_haystack=[tokenizer.decode([t]) for t in answer_ids],
                in_answer=[tokenizer.decode([t]) for t in full[len(prompt) - 1:]],
            )
        )
    return target


def build_sample(
    tokenizer,
    needle: Needle,
    *,
    name: str,
    context_length: int,
    depth: float,
    haystack_text: Callable[[int], tuple[list[int], str]],
    chat: bool,
) -> NeedleSample:
    """Build one sample of exactly ``context_length`` tokens (or the closest below it).

    ``haystack_text(n_tokens)`` returns ``n_tokens`` haystack tokens and the source's label;
    the builder decodes them, inserts the needle at ``depth`` and
    adjusts the haystack length until the rendered prompt has ``context_length`` tokens. Words
    of several tokens (numbers are one token per digit) can make the exact length unreachable;
    the sample is then the closest below it (``n_tokens < context_length``, by a few tokens).
    """
    overhead = len(_encode(tokenizer, *_render(tokenizer, chat, needle.sentence, needle))["input_ids"])
    if context_length - overhead < 1:
        raise NeedleError(
            _ERR_TOO_SHORT.format(name=name, n=context_length, overhead=overhead, minimum=overhead + 16)
        )
    n_hay = context_length - overhead
    best: tuple[int, str, Any, str, str] | None = None  # (n, text, encoding, label, haystack)
    tried: dict[int, int] = {}

    def attempt(hay: str, label: str) -> int:
        nonlocal best
        text, special = _render(tokenizer, chat, _insert(hay, needle, depth), needle)
        enc = _encode(tokenizer, text, special)
        n = len(enc["input_ids"])
        if n <= context_length and (best is None or n > best[0]):
            best = (n, text, enc, label, hay)
        return n

    def window(n_hay: int) -> int:
        tokens, label = haystack_text(n_hay)
        tried[n_hay] = attempt(_trim(tokenizer.decode(tokens)), label)
        return tried[n_hay]

    # Newton steps on the haystack size, then a small search around it: one more haystack
    # token can add two prompt tokens where merges change at the cut.
    for _ in range(8):
        n = window(n_hay)
        if n == context_length or n_hay + context_length - n in tried or n_hay + context_length - n < 1:
            break
        n_hay += context_length - n
    for delta in sorted(range(-16, 17), key=lambda d: (abs(d), d)):
        if best is not None and best[0] == context_length:
            break
        if n_hay + delta >= 1 and n_hay + delta not in tried:
            try:
                window(n_hay + delta)
            except NeedleError:  # a haystack file just long enough: keep the closest fit
                continue
    # Still short (digits split one token each): pad the haystack one filler word at a time.
    while best is not None and best[0] < context_length:
        n, label, hay = best[0], best[3], best[4]
        if not any(attempt(hay + filler, label) == n + 1 for filler in _FILLERS):
            break
    if best is None:
        raise NeedleError(
            _ERR_TOO_SHORT.format(name=name, n=context_length, overhead=overhead, minimum=overhead + 16)
        )
    _, text, enc, label, _ = best
    sentence_at = text.find(needle.sentence)
    if sentence_at < 0:
        raise NeedleError(f"needle sample {name!r}: the chat template altered the needle sentence; pass chat=False")
    ids = list(enc["input_ids"])
    start, end = _value_span(name, text, list(enc["offset_mapping"]), needle, sentence_at)
    answer_ids = ids[start:end]
    target_ids = _target_ids(tokenizer, name, text, needle, answer_ids)
    return NeedleSample(
        name=name,
        input_ids=torch.tensor([ids], dtype=torch.long),
        needle_span=(start, end),
        answer=needle.value,
        answer_ids=answer_ids,
        target_ids=target_ids,
        context_length=int(context_length),
        depth=float(depth),
        kind=needle.kind,
        question=needle.question,
        lead=needle.lead,
        haystack=label,
    )


def _encode(tokenizer, text: str, special: bool) -> dict[str, Any]:
    return tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)


def needle_grid(
    lengths: Sequence[int], depths: Sequence[float], kinds: Sequence[str], n_samples: int | None, seed: int = 0
) -> list[tuple[int, float, str]]:
    """The (length, depth, kind) of each sample: the whole grid when ``n_samples`` is None,
    else ``n_samples`` cells drawn without repetition from a seeded shuffle of the grid
    (cycling through fresh shuffles when more samples than cells are asked)."""
    grid = list(itertools.product(lengths, depths, kinds))
    if n_samples is None:
        return grid
    if n_samples <= 0:
        raise NeedleError(_ERR_NO_SAMPLES.format(n=n_samples))
    rng = random.Random(seed)
    cells: list[tuple[int, float, str]] = []
    while len(cells) < n_samples:
        block = grid[:]
        rng.shuffle(block)
        cells.extend(block)
    return cells[:n_samples]


def needle_samples(
    model,
    *,
    lengths: Sequence[int] = (512, 1024),
    depths: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
    kinds: Sequence[str] = NEEDLE_KINDS,
    n_samples: int | None = None,
    haystack: str | Path | None = None,
    needles: Sequence[Needle] | None = None,
    chat: bool | None = None,
    seed: int = 0,
) -> list[NeedleSample]:
    """Build a needle-in-a-haystack suite for ``model`` (a `LoadedModel`).

    Args:
        lengths: prompt lengths in tokens (each at most ``model.n_ctx - ANSWER_ROOM``).
        depths: needle depths, fractions of the haystack in [0, 1].
        kinds: needle kinds (`NEEDLE_KINDS`); ignored when ``needles`` is given.
        n_samples: how many samples; None = one per (length, depth, kind) cell.
        haystack: None (built-in narrative text), ``"builtin:<register>[,<register>]"``, or a
            UTF-8 text file cut in token windows.
        needles: your own needles (cycled over the samples) instead of generated ones.
        chat: ask through the chat template; None = when the model has one.
        seed: seeds the needles, the haystack text and the window positions.

    Every sample is validated while it is built (context fits the model, haystack long
    enough, value kept verbatim); the first problem raises a `NeedleError` naming the sample.
    """
    tokenizer = model.tokenizer
    if not lengths or any(int(n) <= 0 for n in lengths):
        raise NeedleError(_ERR_LENGTHS.format(lengths=list(lengths)))
    if any(not 0.0 <= float(d) <= 1.0 for d in depths) or not depths:
        raise NeedleError(_ERR_DEPTH.format(depths=list(depths)))
    for kind in kinds:
        if kind not in NEEDLE_KINDS:
            raise NeedleError(_ERR_KIND.format(kind=kind, kinds=list(NEEDLE_KINDS)))
    chat = model.has_chat_template if chat is None else bool(chat)
    if chat and not model.has_chat_template:
        raise NeedleError(f"chat=True but {model.name} has no chat template: pass chat=False")
    source = _haystack_source(tokenizer, haystack)
    kinds_for_grid = [n.kind for n in needles] if needles else list(kinds)
    cells = needle_grid(lengths, depths, range(len(kinds_for_grid)), n_samples, seed)
    rng = random.Random(seed)
    samples = []
    for i, (length, depth, k) in enumerate(cells):
        kind = kinds_for_grid[k]
        needle = needles[k] if needles else make_needle(kind, rng)
        name = f"{kind}-{length}-d{round(float(depth) * 100):02d}-{i:03d}"
        if int(length) + ANSWER_ROOM > model.n_ctx:
            raise NeedleError(
                _ERR_TOO_LONG.format(
                    name=name, n=length, room=ANSWER_ROOM, model=model.name, n_ctx=model.n_ctx,
                    max_ok=model.n_ctx - ANSWER_ROOM,
                )
            )
        sample_rng = random.Random(rng.getrandbits(64))
        samples.append(
            build_sample(
                tokenizer, needle, name=name, context_length=int(length), depth=float(depth),
                haystack_text=_haystack_fn(tokenizer, source, sample_rng, name, int(length)), chat=chat,
            )
        )
    return samples


def _haystack_fn(tokenizer, source: _Haystack, rng: random.Random, name: str, length: int) -> Callable[[int], tuple[list[int], str]]:
    if source.tokens is None:
        register = rng.choice(source.registers)
        text_rng_seed = rng.getrandbits(64)
        cache: dict[str, list[int]] = {}

        def generated(n: int) -> tuple[list[int], str]:
            if len(cache.get("ids", [])) < n:
                chars = max(4 * n, 400)
                while True:
                    ids = tokenizer(generate_text(register, random.Random(text_rng_seed), chars), add_special_tokens=False)["input_ids"]
                    if len(ids) >= n:
                        break
                    chars *= 2
                cache["ids"] = ids
            return cache["ids"][:n], f"builtin:{register}"

        return generated

    stream = source.tokens
    offset_frac = rng.random()

    def windowed(n: int) -> tuple[list[int], str]:
        if n > len(stream):
            max_ok = max(len(stream) + length - n, 0)
            raise NeedleError(
                _ERR_HAYSTACK_SHORT.format(name=name, source=source.label, have=len(stream), n=length, need=n, max_ok=max_ok)
            )
        start = int(offset_frac * (len(stream) - n))
        return stream[start : start + n], source.label

    return windowed


# ---------------------------------------------------------------------------------------
# answering
# ---------------------------------------------------------------------------------------
def attention_output(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scaling: float,
                     variant=None) -> torch.Tensor:
    """Causal SDPA, ``[b, heads, n_q, d]`` in, ``[b, n_q, heads, d]`` out; a decode step (one
    query over the whole cache) needs no mask, so it skips building one. A layer with its own
    attention ``variant`` (window, soft-cap, sinks) runs the model's own attention."""
    if variant is not None and not variant.plain:
        return attend(query, key, value, scaling=scaling, variant=variant)
    if query.shape[-2] != 1:
        return sdpa(query, key, value, scaling=scaling)
    group = query.shape[1] // key.shape[1]
    if group > 1:
        key = key.repeat_interleave(group, dim=1)
        value = value.repeat_interleave(group, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=scaling).transpose(1, 2)


def stop_token_ids(model) -> set[int]:
    """Token ids that end an answer: the tokenizer's and the generation config's EOS ids."""
    ids: set[int] = set()
    for value in (getattr(model.tokenizer, "eos_token_id", None), getattr(model.hf_model.generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def default_max_new_tokens(sample: NeedleSample) -> int:
    """Room for the value plus a few tokens of punctuation and end-of-turn."""
    return len(sample.target_ids) + 6


def continue_greedy(
    model,
    cache,
    next_token: int,
    *,
    max_new_tokens: int,
    generated: list[int],
    stop: Callable[[list[int]], bool],
    on_step: Callable[[int], None] | None = None,
) -> list[int]:
    """Greedy decoding from a filled KV cache, one token at a time, until ``stop``.

    ``next_token`` is the token already chosen (appended to ``generated``, then fed back);
    ``on_step(token)`` is called after each forward with the token it produced. Must run
    inside ``route_attention`` (or with a model whose attention is the plain HF one).
    """
    generated.append(int(next_token))
    while len(generated) < max_new_tokens and not stop(generated):
        feed = torch.tensor([[generated[-1]]], device=model.device)
        logits = forward_with_cache(model.hf_model, feed, cache, logits_to_keep=1).logits
        token = int(logits[0, -1].argmax())
        if on_step is not None:
            on_step(token)
        generated.append(token)
    return generated


def make_stop(model, sample: NeedleSample, *, stop_on_answer: bool = False) -> Callable[[list[int]], bool]:
    """Stop at an end-of-turn token, at a newline after some text (as Wu et al. do), or — with
    ``stop_on_answer`` — as soon as the answer is contained (enough for accuracy)."""
    eos = stop_token_ids(model)

    def stop(generated: list[int]) -> bool:
        if generated[-1] in eos:
            return True
        text = model.tokenizer.decode(generated, skip_special_tokens=True)
        if "\n" in text and text.strip():
            return True
        return stop_on_answer and contains_answer(sample.answer, text)

    return stop


@dataclass
class NeedleAnswer:
    """One greedy answer: its tokens, its text and its grade."""

    sample: str
    generated_ids: list[int]
    text: str
    contains: bool
    rouge1: float


@torch.inference_mode()
def greedy_answer(
    model,
    sample: NeedleSample,
    *,
    ablation=None,
    max_new_tokens: int | None = None,
    stop_on_answer: bool = True,
    attention=None,
) -> NeedleAnswer:
    """Prefill with SDPA, decode greedily with a KV cache, grade.

    ``ablation`` is an `attnlab.probes.ablation.HeadAblation` applied inside the routed
    attention (prefill and every decode step), or None for the dense model. ``attention`` is an
    attention function (`attnlab.attention.route_attention`'s signature) used for the prefill,
    e.g. a sparse policy's executor; decode steps stay dense.
    """
    from transformers import DynamicCache

    prefill_fn = attention

    def attention(layer: int, query, key, value, *, scaling: float, attention_mask=None, variant=None) -> torch.Tensor:
        if prefill_fn is not None and query.shape[-2] == key.shape[-2]:
            extra = {} if variant is None or variant.plain else {"variant": variant}
            out = prefill_fn(layer, query, key, value, scaling=scaling, attention_mask=attention_mask, **extra)
        else:
            out = attention_output(query, key, value, scaling=scaling, variant=variant)
        return out if ablation is None else ablation.apply(layer, out, value)

    limit = max_new_tokens or default_max_new_tokens(sample)
    with route_attention(model, attention):
        cache = DynamicCache(config=model.hf_model.config)
        ids = sample.input_ids.to(model.device)
        logits = forward_with_cache(model.hf_model, ids, cache, logits_to_keep=1).logits
        generated = continue_greedy(
            model, cache, int(logits[0, -1].argmax()), max_new_tokens=limit, generated=[],
            stop=make_stop(model, sample, stop_on_answer=stop_on_answer),
        )
    text = model.tokenizer.decode(generated, skip_special_tokens=True)
    g = grade(sample, text)
    return NeedleAnswer(sample.name, generated, text, g["contains"], g["rouge1"])
