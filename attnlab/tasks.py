"""An offline long-context task suite in the style of RULER (Hsieh et al., 2024).

Every sample is generated here, deterministically from ``(seed, task, length, index)``, with no
download: haystacks come from the project's own text generators (`attnlab.prompts`) or a
repeated filler, keys and values from seeded random draws. Each task is sized to a requested
prompt length in tokens of the model's own tokenizer and graded as RULER grades, by string
match: the share of the reference strings that the answer contains (``string_match_all``).

====================  ============================================================================
task                  what the model must do
====================  ============================================================================
``niah_noise``        find one number hidden in a repeated-filler haystack
``niah_essay``        find one number hidden in essay-like text
``niah_uuid``         find one UUID-like key hidden in essay-like text
``niah_multikey``     find the number of one key among 3 distractor keys with numbers
``niah_multivalue``   find all 4 numbers stored under one key
``niah_multiquery``   find the numbers of 4 keys asked at once
``variable_tracking`` name every variable a chain of 4 assignments binds to one value
``common_words``      list the 10 words repeated most often in a long word list
``frequent_words``    name the 3 most frequent coded words in a Zipf-distributed text
====================  ============================================================================

The answer to every sample appears verbatim in the decoded prompt (checked when it is built),
so a tokenizer that splits a key in a way that can't be matched is an error, not a zero.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from attnlab.errors import PromptError
from attnlab.prompts import generate_text

TASKS = (
    "niah_noise", "niah_essay", "niah_uuid", "niah_multikey", "niah_multivalue",
    "niah_multiquery", "variable_tracking", "common_words", "frequent_words",
)  # fmt: skip
NEEDLE_TASKS = TASKS[:6]

# A filler sentence of our own; repeated, it is RULER's "noise" haystack in spirit: no content
# that could be confused with a needle.
_NOISE = "The wind moves over the fields. The clocks in the town keep time. The road goes on. "
_KEY_WORDS = (
    "amber", "basil", "cedar", "delta", "ember", "fjord", "gable", "harbor", "indigo", "juniper",
    "kestrel", "lantern", "meadow", "nectar", "orchid", "pebble", "quartz", "raven", "saffron",
    "thistle", "umber", "velvet", "willow", "yarrow", "zephyr", "anchor", "bramble", "cobalt",
    "dune", "falcon", "garnet", "heron", "iris", "jasper", "kelp", "lichen", "marble", "nutmeg",
    "opal", "pine", "quill", "ripple", "sorrel", "tundra", "vessel", "walnut", "acorn", "birch",
)  # fmt: skip
_CWE_WORDS = (
    "apple", "river", "stone", "cloud", "table", "garden", "window", "pencil", "candle", "bridge",
    "mirror", "basket", "ladder", "button", "carpet", "bottle", "forest", "island", "rocket",
    "violin", "jacket", "pillow", "hammer", "wallet", "kettle", "saddle", "tunnel", "feather",
    "blanket", "compass", "diamond", "engine", "fossil", "glacier", "helmet", "iceberg", "jungle",
    "kitchen", "lemon", "magnet", "needle", "ocean", "parrot", "quilt", "ribbon", "silver",
    "tomato", "umbrella", "valley", "wagon", "yogurt", "zipper", "anchor", "bakery", "cactus",
    "dolphin", "eagle", "fabric", "guitar", "harvest", "insect", "jelly", "koala", "lizard",
    "market", "napkin", "orange", "pepper", "rabbit", "salmon", "turtle", "velvet", "walrus",
    "almond", "beacon", "cherry", "donkey", "elbow", "falcon", "goblet", "hazel", "igloo",
    "jigsaw", "kiwi", "lobster", "muffin", "nickel", "otter", "pickle", "radish", "sparrow",
    "thimble", "tulip", "vacuum", "whistle", "badger", "canyon", "dagger", "emerald", "funnel",
)  # fmt: skip

_ERR_TASK = "unknown task {task!r}: choose from {tasks} (or 'all')"
_ERR_SHORT = (
    "task {task!r} cannot be built in {length} tokens: its question, needles and template "
    "alone take {need}; use --lengths of at least {suggest}"
)
_ERR_NOT_VERBATIM = (
    "task {task!r}: the answer {answer!r} does not survive tokenization of the prompt verbatim "
    "(the tokenizer merges it with its neighbours), so it could not be graded; this tokenizer "
    "can't run this task"
)
_ERR_SAMPLES = "the number of samples per task must be positive, got {n}"
_ERR_LENGTH = "task lengths must be positive token counts, got {lengths}"


class TaskError(PromptError):
    """A task sample can't be built as asked."""


@dataclass
class TaskSample:
    """One task prompt with its references.

    ``input_ids`` ``[1, n]`` is the whole prompt, ending where the answer starts (after the
    lead-in ``lead``). ``answers`` are the reference strings; `score` grades a reply against them.
    ``context_length`` is the requested length; ``n_tokens`` the actual (never more).
    """

    name: str
    task: str
    input_ids: torch.Tensor
    answers: list[str]
    context_length: int
    question: str
    lead: str
    max_new_tokens: int
    seed: int
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[-1])

    def score(self, reply: str) -> float:
        return string_match_all(self.answers, reply)


def string_match_all(references: Sequence[str], reply: str) -> float:
    """RULER's grade: the share of ``references`` contained in ``reply`` (case-insensitive)."""
    if not references:
        return 0.0
    low = reply.lower()
    return sum(ref.lower() in low for ref in references) / len(references)


# ---------------------------------------------------------------------------------------
# the content of each task: (haystack units, needles, question, lead, answers)
# ---------------------------------------------------------------------------------------
@dataclass
class _Content:
    units: Callable[[int], list[str]]  # n -> the first n haystack units (a deterministic stream)
    needles: list[str]  # sentences spread evenly through the haystack (in order)
    question: str
    lead: str
    answers: list[str]
    max_new_tokens: int
    details: dict[str, Any] = field(default_factory=dict)
    min_units: int = 1


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _uuid(rng: random.Random) -> str:
    hexdigits = "0123456789abcdef"
    parts = [8, 4, 4, 4, 12]
    return "-".join("".join(rng.choice(hexdigits) for _ in range(n)) for n in parts)


def _keys(rng: random.Random, n: int) -> list[str]:
    # a list, not a set: a set's order depends on PYTHONHASHSEED, and samples must be the same
    # in every process (shards, Ray workers)
    pairs: list[str] = []
    while len(pairs) < n:
        pair = f"{rng.choice(_KEY_WORDS)}-{rng.choice(_KEY_WORDS)}"
        if pair not in pairs:
            pairs.append(pair)
    return pairs


def _noise_units(n: int) -> list[str]:
    return [_NOISE] * n


def _essay_units(rng_seed: str) -> Callable[[int], list[str]]:
    cache: list[str] = []

    def units(n: int) -> list[str]:
        while len(cache) < n:
            # one sentence per unit: fine enough for the length search
            rng = random.Random(f"{rng_seed}:essay:{len(cache)}")
            text = " ".join(generate_text("narrative", rng, 1).split())
            cache.extend(s + " " for s in re.split(r"(?<=\.) ", text) if s)
        return cache[:n]

    return units


def _needle(key: str, value: str) -> str:
    return f"The secret number for {key} is {value}. "


def _niah(task: str, rng: random.Random, seed_text: str) -> _Content:
    essay = _essay_units(seed_text)
    if task in ("niah_noise", "niah_essay", "niah_uuid"):
        (key,) = _keys(rng, 1)
        value = _uuid(rng) if task == "niah_uuid" else _number(rng)
        units = _noise_units if task == "niah_noise" else essay
        what = "secret key" if task == "niah_uuid" else "secret number"
        needle = f"The {what} for {key} is {value}. "
        return _Content(units, [needle], f"What is the {what} for {key} in the text above?",
                        f"The {what} for {key} is", [value], 40 if task == "niah_uuid" else 16,
                        {"key": key})
    if task == "niah_multikey":
        keys = _keys(rng, 4)
        values = [_number(rng) for _ in keys]
        target = rng.randrange(len(keys))
        needles = [_needle(k, v) for k, v in zip(keys, values, strict=True)]
        return _Content(essay, needles, f"What is the secret number for {keys[target]} in the text above?",
                        f"The secret number for {keys[target]} is", [values[target]], 16,
                        {"key": keys[target], "distractors": [v for i, v in enumerate(values) if i != target]})
    if task == "niah_multivalue":
        (key,) = _keys(rng, 1)
        values = [_number(rng) for _ in range(4)]
        needles = [_needle(key, v) for v in values]
        return _Content(essay, needles, f"What are all the secret numbers for {key} in the text above?",
                        f"The secret numbers for {key} are", values, 64, {"key": key})
    if task == "niah_multiquery":
        keys = _keys(rng, 4)
        values = [_number(rng) for _ in keys]
        needles = [_needle(k, v) for k, v in zip(keys, values, strict=True)]
        asked = ", ".join(keys[:-1]) + f" and {keys[-1]}"
        return _Content(essay, needles, f"What are the secret numbers for {asked} in the text above?",
                        f"The secret numbers for {asked} are", values, 64, {"keys": keys})
    raise AssertionError(task)


def _variable_tracking(rng: random.Random) -> _Content:
    chain: list[str] = []  # a list, not a set (see _keys)
    while len(chain) < 5:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in chain:
            chain.append(name)
    value = str(rng.randint(10000, 99999))
    needles = [f"VAR {chain[0]} = {value}. "] + [
        f"VAR {chain[i]} = VAR {chain[i - 1]}. " for i in range(1, len(chain))
    ]
    return _Content(_noise_units, needles,
                    f"Which variables are assigned the value {value}, directly or through other variables, in the text above?",
                    f"The variables assigned the value {value} are:", chain, 48, {"value": value})


def _common_words(rng: random.Random) -> _Content:
    words = list(dict.fromkeys(_CWE_WORDS))
    rng.shuffle(words)
    common, rare = words[:10], words[10:]

    # a word list where each of the 10 common words is repeated often, every other word rarely
    def units(n: int) -> list[str]:
        local = random.Random(f"cwe:{common[0]}:{n}")
        bag = [w for w in common for _ in range(max(4, n // 25))]
        while len(bag) < n:
            bag.extend(rare[(len(bag) // 3) % len(rare)] for _ in range(3))
        bag = bag[:n] if len(bag) > n else bag
        local.shuffle(bag)
        return [f"{i + 1}. {w}\n" for i, w in enumerate(bag)]

    return _Content(units, [], "What are the 10 most common words in the list above?",
                    "The 10 most common words in the list are:", common, 80, {}, min_units=60)


def _frequent_words(rng: random.Random) -> _Content:
    vocab: list[str] = []
    while len(vocab) < 60:
        word = "".join(rng.choice("bcdfghjklmnpqrstvwz") + rng.choice("aeiou") for _ in range(3))
        if word not in vocab:
            vocab.append(word)

    # Zipf-like counts: the i-th word appears about (n / 3) / (i + 1) times
    def units(n: int) -> list[str]:
        local = random.Random(f"fwe:{vocab[0]}:{n}")
        bag: list[str] = []
        for i, word in enumerate(vocab):
            bag.extend([word] * max(1, round(n / 3 / (i + 1))))
        bag = bag[:n]
        local.shuffle(bag)
        return [f"{w} " for w in bag]

    # the top 3 are fixed by construction (counts n/3, n/6, n/9 before the cut keeps them)
    return _Content(units, [], "What are the three most frequent coded words in the text above?",
                    "The three most frequent coded words are:", vocab[:3], 32, {}, min_units=60)


def _content(task: str, seed_text: str) -> _Content:
    rng = random.Random(seed_text)
    if task in NEEDLE_TASKS:
        return _niah(task, rng, seed_text)
    if task == "variable_tracking":
        return _variable_tracking(rng)
    if task == "common_words":
        return _common_words(rng)
    if task == "frequent_words":
        return _frequent_words(rng)
    raise TaskError(_ERR_TASK.format(task=task, tasks=", ".join(TASKS)))


# ---------------------------------------------------------------------------------------
# rendering and sizing
# ---------------------------------------------------------------------------------------
def _weave(units: list[str], needles: list[str], rng: random.Random) -> str:
    """The haystack with ``needles`` (in order) at evenly spread, jittered unit boundaries."""
    if not needles:
        return "".join(units)
    n = len(units)
    slots = sorted(
        min(n, max(0, round((i + 0.5) * n / len(needles) + rng.uniform(-0.3, 0.3) * n / len(needles))))
        for i in range(len(needles))
    )
    out: list[str] = []
    cursor = 0
    for slot, needle in zip(slots, needles, strict=True):
        out.extend(units[cursor:slot])
        out.append(needle)
        cursor = slot
    out.extend(units[cursor:])
    return "".join(out)


def _render(tokenizer, chat: bool, context: str, question: str, lead: str) -> list[int]:
    if chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{context}\n\n{question}"}], add_generation_prompt=True, tokenize=False
        )
        return list(tokenizer(text + lead, add_special_tokens=False)["input_ids"])
    text = f"{context}\n\nQuestion: {question}\nAnswer: {lead}"
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def build_task_sample(tokenizer, task: str, length: int, index: int = 0, *, seed: int = 0,
                      chat: bool | None = None) -> TaskSample:
    """One sample of ``task`` with at most ``length`` prompt tokens (as many as fit).

    ``chat=None`` uses the tokenizer's chat template when it has one.
    """
    if task not in TASKS:
        raise TaskError(_ERR_TASK.format(task=task, tasks=", ".join(TASKS)))
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    seed_text = f"{seed}:{task}:{length}:{index}"
    content = _content(task, seed_text)
    place = random.Random(seed_text + ":place")
    place_state = place.getstate()

    def ids_for(n_units: int) -> list[int]:
        place.setstate(place_state)  # the same placement for every candidate size
        context = _weave(content.units(n_units), content.needles, place)
        return _render(tokenizer, chat, context.strip(), content.question, content.lead)

    smallest = ids_for(content.min_units)
    if len(smallest) > length:
        raise TaskError(_ERR_SHORT.format(task=task, length=length, need=len(smallest),
                                          suggest=len(smallest) + 64))
    # the largest haystack that fits: grow by doubling, then bisect
    lo, hi = content.min_units, content.min_units * 2
    while len(ids_for(hi)) <= length:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if len(ids_for(mid)) <= length:
            lo = mid
        else:
            hi = mid
    ids = ids_for(lo)
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    for answer in content.answers:
        if answer not in decoded:
            raise TaskError(_ERR_NOT_VERBATIM.format(task=task, answer=answer))
    details = dict(content.details, haystack_units=lo)
    return TaskSample(
        name=f"{task}-{length}-{index}", task=task, input_ids=torch.tensor([ids], dtype=torch.long),
        answers=list(content.answers), context_length=length, question=content.question,
        lead=content.lead, max_new_tokens=content.max_new_tokens, seed=seed, details=details,
    )


def resolve_tasks(spec: str | Sequence[str]) -> list[str]:
    """``"all"``, a comma-separated string or a list of task names → validated names."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        return list(TASKS)
    bad = [n for n in names if n not in TASKS]
    if bad or not names:
        raise TaskError(_ERR_TASK.format(task=bad[0] if bad else spec, tasks=", ".join(TASKS)))
    return list(dict.fromkeys(names))


def task_suite(tokenizer, tasks: str | Sequence[str], lengths: Sequence[int], n_samples: int, *,
               seed: int = 0, chat: bool | None = None) -> list[TaskSample]:
    """``n_samples`` samples of every task at every length, in (task, length, index) order."""
    if n_samples < 1:
        raise TaskError(_ERR_SAMPLES.format(n=n_samples))
    if not lengths or any(int(n) < 1 for n in lengths):
        raise TaskError(_ERR_LENGTH.format(lengths=list(lengths)))
    return [
        build_task_sample(tokenizer, task, int(length), i, seed=seed, chat=chat)
        for task in resolve_tasks(tasks) for length in lengths for i in range(n_samples)
    ]
