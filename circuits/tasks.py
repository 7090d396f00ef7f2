"""Circuit tasks: clean and corrupted prompts whose difference a circuit has to explain.

A `Task` holds examples of equal-length clean and corrupted token ids with a correct and a wrong
answer token each. Its metric is the logit difference ``logit[correct] - logit[wrong]`` at the
last position, averaged over the examples. Examples of different lengths are kept apart and
batched by length (`Task.groups`).

Built-in tasks (`ioi_task`, `induction_task`, `greater_than_task`, `needle_task` — passkey
retrieval from the probe suite) and user tasks from JSONL
(`jsonl_task`: one ``{"clean", "corrupted", "correct", "wrong"}`` object per line). `load_task`
picks one from a name or a path, and `check_task` refuses a task with nothing to explain (clean
metric equal to corrupted metric).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from attnlab.errors import AttnlabError
from attnlab.prompts import FIRST_NAMES, OBJECTS, PLACES

BUILTIN_TASKS = ("ioi", "induction", "greater_than", "needle")


class TaskError(AttnlabError):
    """A task cannot be built: bad file, multi-token answers, unequal lengths, nothing to explain."""


@dataclass
class Example:
    clean: torch.Tensor  # [n] int64
    corrupted: torch.Tensor  # [n] int64
    correct: int
    wrong: int
    label: str = ""


@dataclass
class Task:
    """Clean/corrupted examples with answer tokens; the metric is the mean logit difference."""

    name: str
    examples: list[Example]
    description: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.examples:
            raise TaskError(f"task {self.name!r} has no examples")
        for ex in self.examples:
            if ex.clean.shape != ex.corrupted.shape:
                raise TaskError(
                    f"task {self.name!r}, {ex.label or 'an example'}: clean has {ex.clean.numel()} tokens and "
                    f"corrupted {ex.corrupted.numel()}; they must have the same length"
                )

    def __len__(self) -> int:
        return len(self.examples)

    def groups(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(clean [B, n], corrupted [B, n], correct [B], wrong [B])`` per token length."""
        by_len: dict[int, list[Example]] = {}
        for ex in self.examples:
            by_len.setdefault(int(ex.clean.numel()), []).append(ex)
        return [
            (
                torch.stack([e.clean for e in exs]),
                torch.stack([e.corrupted for e in exs]),
                torch.tensor([e.correct for e in exs]),
                torch.tensor([e.wrong for e in exs]),
            )
            for _, exs in sorted(by_len.items())
        ]

    def describe(self) -> dict:
        return {"name": self.name, "n_examples": len(self), "description": self.description, **self.extra}


def logit_diff(logits: torch.Tensor, correct: torch.Tensor, wrong: torch.Tensor, *, reduce: bool = True) -> torch.Tensor:
    """``logits [B, n, vocab]`` → mean (or per-example) ``logit[correct] - logit[wrong]`` at the last position."""
    last = logits[:, -1, :]
    rows = torch.arange(last.shape[0], device=last.device)
    diff = last[rows, correct.to(last.device)] - last[rows, wrong.to(last.device)]
    return diff.mean() if reduce else diff


# ---------------------------------------------------------------------------------------
# tokenization helpers
# ---------------------------------------------------------------------------------------
def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def _single_token(tokenizer, text: str, where: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise TaskError(
            f"{where}: answer {text!r} is {len(ids)} tokens for this tokenizer, not one; "
            "choose answers that are single tokens (mind the leading space)"
        )
    return int(ids[0])


# ---------------------------------------------------------------------------------------
# IOI
# ---------------------------------------------------------------------------------------
#: The project's own indirect-object templates: {A} and {B} are introduced, {S} (= {B}) acts,
#: and the next token should be the other name {A}.
IOI_TEMPLATES = (
    "When {A} and {B} reached {place}, {S} handed {obj} to",
    "After {A} and {B} left {place}, {S} passed {obj} to",
    "While {A} and {B} waited at {place}, {S} showed {obj} to",
)
#: Names from the project's prompt generators; by default `ioi_task` uses those that are single
#: tokens (with a leading space) for the model's tokenizer, and refuses names a user gives that
#: are not.
IOI_NAMES = FIRST_NAMES


def ioi_task(
    tokenizer, *, n: int = 8, seed: int = 0, names=None, templates=None,
) -> Task:
    """Indirect-object identification. Corrupted = the acting name ``S`` replaced by a third
    name ``C`` (Wang et al.'s ABC distribution); correct = `` A`` (IO), wrong = `` B`` (S).

    ``names``: default `IOI_NAMES` filtered to single tokens; names given explicitly must all be
    single tokens. Raises `TaskError` naming the template or name that breaks single-token
    answers or equal lengths.
    """
    templates = list(templates or IOI_TEMPLATES)
    if names is None:  # the project's list, less the names this tokenizer splits
        names = [nm for nm in IOI_NAMES if len(tokenizer(" " + nm, add_special_tokens=False)["input_ids"]) == 1]
    else:
        names = list(names)
        for name in names:
            _single_token(tokenizer, " " + name, f"IOI name {name!r}")
    if len(names) < 3:
        raise TaskError(f"IOI needs at least three single-token names (A, B and the corrupting C), got {names}")
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        template = templates[i % len(templates)]
        a, b, c = rng.sample(names, 3)
        place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
        clean = template.format(A=a, B=b, S=b, place=place, obj=obj)
        corrupted = template.format(A=a, B=b, S=c, place=place, obj=obj)
        ci, xi = _encode(tokenizer, clean), _encode(tokenizer, corrupted)
        if len(ci) != len(xi):
            raise TaskError(f"IOI template {template!r} with names {b!r}/{c!r}: clean and corrupted differ in length")
        where = f"IOI template {template!r}"
        examples.append(
            Example(torch.tensor(ci), torch.tensor(xi), _single_token(tokenizer, " " + a, where),
                    _single_token(tokenizer, " " + b, where), label=f"example {i}")
        )
    return Task("ioi", examples, "indirect object identification; corrupted: S replaced by a third name (ABC)")


# ---------------------------------------------------------------------------------------
# induction
# ---------------------------------------------------------------------------------------
def induction_task(
    *, vocab: tuple[int, int], n: int = 8, length: int = 8, seed: int = 0, bos: int | None = None,
) -> Task:
    """Repeated random tokens: ``[bos] s_1..s_L s_1..s_{L-1}``, correct = ``s_L``.

    Corrupted: the first copy's ``s_{L-1}`` is replaced by another token, so the token after it
    (``s_L``) no longer follows an earlier ``s_{L-1}`` and an induction head finds nothing to
    copy. Wrong = a random token that is absent from the sequence. ``vocab = (low, high)`` is
    the token-id range to draw from (exclusive high).
    """
    low, high = vocab
    if high - low < length + 2:
        raise TaskError(f"induction needs at least {length + 2} distinct tokens, got the range {vocab}")
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        perm = low + torch.randperm(high - low, generator=g)
        seg, spare = perm[:length], perm[length:]
        prefix = [bos] if bos is not None else []
        clean = torch.tensor(prefix + seg.tolist() + seg[:-1].tolist())
        corrupted = clean.clone()
        corrupted[len(prefix) + length - 2] = int(spare[0])
        examples.append(Example(clean, corrupted, int(seg[-1]), int(spare[1]), label=f"example {i}"))
    return Task("induction", examples, "repeated random tokens; corrupted: the earlier copy of the last token replaced")


def induction_task_for(model, *, n: int = 8, length: int = 8, seed: int = 0) -> Task:
    """`induction_task` over ordinary tokens of ``model``'s tokenizer (ids 1000..5000 when the
    vocabulary is large, else all but id 0), with its BOS token first when it has one."""
    vocab_size = len(model.tokenizer)
    bos = getattr(model.tokenizer, "bos_token_id", None)
    span = (1000, 5000) if vocab_size > 6000 else (1, vocab_size)
    return induction_task(vocab=span, n=n, length=length, seed=seed, bos=bos)


# ---------------------------------------------------------------------------------------
# greater-than
# ---------------------------------------------------------------------------------------
GREATER_THAN_TEMPLATES = (
    "The siege lasted from the year 17{YY} to the year 17",
    "The bridge was built from the year 18{YY} to the year 18",
)


def greater_than_task(tokenizer, *, n: int = 8, seed: int = 0, templates=None) -> Task:
    """Years: "... from the year 17YY to the year 17" should continue with a later decade.

    For tokenizers that split numbers into digits the answer is the tens digit: correct = the
    digit after YY's tens digit, wrong = the one before. Corrupted: YY = 01 (Hanna et al.), so
    no later decade is implied. Raises `TaskError` naming the template when the tokens do not
    line up (e.g. a tokenizer that merges digits).
    """
    templates = list(templates or GREATER_THAN_TEMPLATES)
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        template = templates[i % len(templates)]
        tens = rng.randint(2, 8)
        yy = f"{tens}{rng.randint(0, 9)}"
        clean, corrupted = template.replace("{YY}", yy), template.replace("{YY}", "01")
        ci, xi = _encode(tokenizer, clean), _encode(tokenizer, corrupted)
        where = f"greater-than template {template!r} (YY={yy})"
        if len(ci) != len(xi):
            raise TaskError(f"{where}: clean and corrupted differ in length for this tokenizer")
        correct = _single_token(tokenizer, str(tens + 1), where)
        wrong = _single_token(tokenizer, str(tens - 1), where)
        examples.append(Example(torch.tensor(ci), torch.tensor(xi), correct, wrong, label=f"example {i}"))
    return Task("greater_than", examples, "years: a later decade; corrupted: the start year ends in 01")


# ---------------------------------------------------------------------------------------
# JSONL
# ---------------------------------------------------------------------------------------
_FIELDS = ("clean", "corrupted", "correct", "wrong")


# ---------------------------------------------------------------------------------------
# needle retrieval (the probe suite's passkey samples)
# ---------------------------------------------------------------------------------------
def needle_task(model, *, n: int = 8, length: int | None = None, seed: int = 0) -> Task:
    """Passkey retrieval: the probe suite's passkey samples (`attnlab.probes.needle`) of ``length``
    tokens (default 512, or half the model's context when that is shorter).

    Clean: the haystack with the passkey, the question and the answer's lead-in (plus any
    separator the tokenizer writes before digits, so the next token is the passkey's first).
    Corrupted: the same prompt with every digit of the passkey *in the haystack* replaced by
    another digit (same token count), so the context no longer supports the clean answer.
    Correct = the passkey's first token; wrong = the corrupted passkey's first token.
    """
    from attnlab.probes.needle import needle_samples

    tokenizer = model.tokenizer
    length = int(length or min(512, model.n_ctx // 2))
    g = random.Random(seed)
    digits = {}
    for d in "0123456789":
        ids = list(tokenizer(d, add_special_tokens=False)["input_ids"])
        if len(ids) != 1:
            raise TaskError(f"the needle task needs single-token digits, but {type(tokenizer).__name__} encodes {d!r} as "
                            f"{ids}: write the prompts as a JSONL task (clean, corrupted, correct, wrong) instead")
        digits[d] = ids[0]
    by_id = {v: k for k, v in digits.items()}
    examples = []
    for i, sample in enumerate(needle_samples(model, lengths=[length], kinds=("passkey",), n_samples=n, seed=seed)):
        start, end = sample.needle_span
        if any(t not in by_id for t in sample.answer_ids):
            raise TaskError(f"needle task, {sample.name}: the passkey {sample.answer!r} is not written as one token per digit "
                            "by this tokenizer; use a JSONL task with your own clean/corrupted prompts")
        sep = sample.target_ids[: len(sample.target_ids) - len(sample.answer_ids)]
        clean = torch.cat([sample.input_ids[0], torch.tensor(sep, dtype=torch.long)])
        corrupted = clean.clone()
        for pos in range(start, end):
            old = by_id[int(clean[pos])]
            corrupted[pos] = digits[g.choice([d for d in "0123456789" if d != old])]
        examples.append(Example(clean, corrupted, int(clean[start]), int(corrupted[start]), label=f"example {i} ({sample.name})"))
    return Task("needle", examples, f"passkey retrieval at {length} tokens; corrupted: the passkey's digits replaced in the haystack",
                extra={"length": length})


def jsonl_task(tokenizer, path: str | Path) -> Task:
    """One ``{"clean", "corrupted", "correct", "wrong"}`` object per line (texts; the answers
    single tokens, usually with a leading space). Errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"task file {path} does not exist; give a .jsonl file or one of {list(BUILTIN_TASKS)}")
    examples = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskError(f"{where}: not valid JSON ({exc.msg})") from None
        except RecursionError:
            raise TaskError(f"{where}: nested too deeply to be a task line") from None
        if not isinstance(obj, dict):
            raise TaskError(f"{where}: expected an object with fields {list(_FIELDS)}")
        missing = [f for f in _FIELDS if not isinstance(obj.get(f), str)]
        if missing:
            raise TaskError(f"{where}: missing or non-string field(s) {missing}; each line needs {list(_FIELDS)}")
        ci, xi = _encode(tokenizer, obj["clean"]), _encode(tokenizer, obj["corrupted"])
        if len(ci) != len(xi):
            raise TaskError(
                f"{where}: clean is {len(ci)} tokens and corrupted {len(xi)}; they must tokenize to the same length"
            )
        examples.append(
            Example(torch.tensor(ci), torch.tensor(xi), _single_token(tokenizer, obj["correct"], where),
                    _single_token(tokenizer, obj["wrong"], where), label=f"line {lineno}")
        )
    if not examples:
        raise TaskError(f"{path}: no examples (one JSON object per line)")
    return Task(path.stem, examples, f"user task from {path.name}", {"file": str(path)})


def load_task(model, spec: str, *, n: int = 8, seed: int = 0, check: bool = True) -> Task:
    """A built-in task by name (``ioi``, ``induction``, ``greater_than``, ``needle``) or a JSONL file."""
    if spec == "ioi":
        task = ioi_task(model.tokenizer, n=n, seed=seed)
    elif spec == "induction":
        task = induction_task_for(model, n=n, seed=seed)
    elif spec == "greater_than":
        task = greater_than_task(model.tokenizer, n=n, seed=seed)
    elif spec == "needle":
        task = needle_task(model, n=n, seed=seed)
    elif spec.endswith(".jsonl") or Path(spec).exists():
        task = jsonl_task(model.tokenizer, spec)
    else:
        raise TaskError(f"unknown task {spec!r}: use one of {list(BUILTIN_TASKS)} or a .jsonl file")
    if check:
        check_task(model, task)
    return task


@torch.no_grad()
def example_metrics(model, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example clean and corrupted logit differences, in ``task.examples`` order."""
    clean_m, corr_m = [], []
    for ex in task.examples:
        for ids, out in ((ex.clean, clean_m), (ex.corrupted, corr_m)):
            logits = model.hf_model(ids[None].to(model.device)).logits
            out.append(float(logit_diff(logits, torch.tensor([ex.correct]), torch.tensor([ex.wrong]))))
    return torch.tensor(clean_m), torch.tensor(corr_m)


def check_task(model, task: Task, *, atol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Refuse examples whose clean and corrupted metrics are equal: there is nothing to explain."""
    clean_m, corr_m = example_metrics(model, task)
    for ex, c, x in zip(task.examples, clean_m, corr_m, strict=False):
        if abs(float(c) - float(x)) <= atol:
            raise TaskError(
                f"task {task.name!r}, {ex.label}: the clean and corrupted logit differences are equal "
                f"({float(c):.4g}); nothing to explain — the corruption must change the answer"
            )
    return clean_m, corr_m
