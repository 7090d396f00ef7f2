"""Prompts for profiling: the project's own generators, a user's text file, or JSONL.

The built-in generators write synthetic text procedurally (no copied corpora) in a few
registers that exercise different heads: narrative prose with recurring names (induction and
coreference), key–value records (retrieval-like lookups), code (brackets, indentation) and
lists. Each prompt is cut to an exact token length.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from attnlab.errors import PromptError

#: Largest prompt file read (text or JSONL): far more text than any profile needs.
MAX_PROMPT_FILE_BYTES = 256 << 20

KINDS = ("narrative", "records", "code", "list")

_FIRST = ["Ada", "Bruno", "Chen", "Dalia", "Emeka", "Farah", "Goran", "Hana", "Ivo", "Jun", "Kemal",
          "Lena", "Mateo", "Nia", "Oskar", "Priya", "Quinn", "Rosa", "Sven", "Tariq", "Uma", "Viktor",
          "Wen", "Xenia", "Yusuf", "Zora"]
_PLACES = ["the harbour", "the old mill", "the library", "the market square", "the north station",
           "the orchard", "the bridge", "the museum", "the workshop", "the lighthouse", "the bakery"]
_OBJECTS = ["a brass key", "a folded map", "a red notebook", "a wooden box", "a silver coin",
            "a letter", "a lantern", "a compass", "a violin", "a jar of honey", "a broken watch"]
#: The generators' names, places and objects, public for other stages' templates (the IOI task).
FIRST_NAMES: tuple[str, ...] = tuple(_FIRST)
PLACES: tuple[str, ...] = tuple(_PLACES)
OBJECTS: tuple[str, ...] = tuple(_OBJECTS)
_VERBS = ["found", "lost", "carried", "painted", "repaired", "hid", "sold", "borrowed", "opened", "weighed"]
_TIMES = ["at dawn", "before noon", "in the evening", "late at night", "on Monday", "after the storm",
          "during the festival", "in early spring"]
_ADJ = ["quiet", "crowded", "narrow", "bright", "cold", "dusty", "enormous", "forgotten", "tidy"]
_CITIES = ["Lisbon", "Oslo", "Nairobi", "Quito", "Hanoi", "Tbilisi", "Perth", "Montreal", "Kyoto", "Accra"]
_FUNCS = ["load", "parse", "merge", "score", "filter", "render", "update", "split", "count", "rank"]
_NOUNS = ["items", "rows", "tokens", "users", "events", "blocks", "pages", "records", "nodes", "files"]


@dataclass
class Prompt:
    """One sample: a name, its token ids ``[1, n]`` and where it came from."""

    name: str
    input_ids: torch.Tensor
    source: str
    kind: str = ""

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[-1])


def _narrative(rng: random.Random) -> str:
    cast = rng.sample(_FIRST, 4)
    out = []
    for _ in range(6):
        a, b = rng.sample(cast, 2)
        out.append(
            f"{a} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} near {rng.choice(_PLACES)} {rng.choice(_TIMES)}. "
            f"The {rng.choice(_ADJ)} street was empty, so {a} asked {b} to wait. "
            f"{b} counted {rng.randint(2, 99)} steps and said nothing."
        )
    return " ".join(out) + "\n\n"


def _records(rng: random.Random) -> str:
    lines = []
    for _ in range(8):
        lines.append(
            f"Record {rng.randint(100, 9999)}: name={rng.choice(_FIRST)}, city={rng.choice(_CITIES)}, "
            f"code={rng.randint(1000, 99999)}, status={rng.choice(['open', 'closed', 'pending'])}."
        )
    return "\n".join(lines) + "\n"


def _code(rng: random.Random) -> str:
    f, noun = rng.choice(_FUNCS), rng.choice(_NOUNS)
    k = rng.randint(2, 9)
    return (
        f"def {f}_{noun}({noun}, limit={k}):\n"
        f"    result = []\n"
        f"    for i, item in enumerate({noun}):\n"
        f"        if i >= limit:\n"
        f"            break\n"
        f"        result.append(item * {rng.randint(2, 7)})\n"
        f"    return result\n\n"
    )


def _list(rng: random.Random) -> str:
    return "".join(f"{i}. {rng.choice(_ADJ)} {rng.choice(_NOUNS)} from {rng.choice(_CITIES)}\n" for i in range(1, 9)) + "\n"


_GENERATORS = {"narrative": _narrative, "records": _records, "code": _code, "list": _list}


def generate_text(kind: str, rng: random.Random, min_chars: int) -> str:
    """Synthetic text of one register, at least ``min_chars`` long."""
    gen = _GENERATORS[kind]
    parts: list[str] = []
    total = 0
    while total < min_chars:
        parts.append(gen(rng))
        total += len(parts[-1])
    return "".join(parts)


def builtin_prompts(
    tokenizer, lengths: Sequence[int], n_samples: int, *, seed: int = 0, kinds: Sequence[str] = KINDS
) -> list[Prompt]:
    """``n_samples`` generated prompts, cycling through ``kinds`` and ``lengths`` (tokens).

    Each prompt starts with the tokenizer's BOS token when it has one, as real inputs do.
    """
    _check_counts(lengths, n_samples)
    unknown = [k for k in kinds if k not in _GENERATORS]
    if unknown:
        raise PromptError(f"unknown prompt kind(s) {unknown}: choose from {list(KINDS)}")
    rng = random.Random(seed)
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    prompts = []
    for i in range(n_samples):
        kind = kinds[i % len(kinds)]
        n = int(lengths[i % len(lengths)])
        ids: list[int] = []
        chars = n * 4
        while len(bos) + len(ids) < n:
            ids = tokenizer(generate_text(kind, rng, chars), add_special_tokens=False)["input_ids"]
            chars *= 2
        ids = (bos + ids)[:n]
        prompts.append(Prompt(f"builtin-{i:03d}-{kind}-{n}", torch.tensor([ids]), "builtin", kind))
    return prompts


def read_text_file(path: str | Path) -> str:
    """A UTF-8 text file's contents, with clear errors for the usual mistakes."""
    path = Path(path)
    if path.is_dir():
        raise PromptError(f"{path} is a folder, not a text file: give the path of one file in it")
    if not path.is_file():
        raise PromptError(f"prompt file {path} does not exist: check the path")
    try:
        size = path.stat().st_size
        if size > MAX_PROMPT_FILE_BYTES:
            raise PromptError(f"{path} is {size} bytes, more than a prompt file may be ({MAX_PROMPT_FILE_BYTES} bytes): give a shorter file")
        raw = path.read_bytes()
    except OSError as exc:
        raise PromptError(f"cannot read prompt file {path} ({exc.strerror or exc}): check its permissions") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PromptError(
            f"{path} is not UTF-8 text (bad byte at offset {exc.start}): convert it, e.g. `iconv -t utf-8 {path.name}`"
        ) from exc
    if not text.strip():
        raise PromptError(f"{path} is empty: give a text file with some content")
    return text


def _check_counts(lengths: Sequence[int], n_samples: int) -> None:
    if n_samples <= 0:
        raise PromptError(f"--samples must be positive, got {n_samples}")
    if not lengths or any(n <= 1 for n in lengths):
        raise PromptError(f"--lengths must be token counts above 1, got {list(lengths)}")


def _with_bos(tokenizer, ids: list[int]) -> list[int]:
    """Prefix the tokenizer's BOS token when it has one and ``ids`` lack it, as real inputs do."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return ids if bos is None or (ids and ids[0] == bos) else [bos, *ids]


def text_file_prompts(tokenizer, path: str | Path, lengths: Sequence[int], n_samples: int) -> list[Prompt]:
    """Consecutive windows of a user's text file, of the requested token lengths."""
    _check_counts(lengths, n_samples)
    text = read_text_file(path)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    prompts, pos = [], 0
    for i in range(n_samples):
        n = int(lengths[i % len(lengths)])
        body = n - len(bos)
        if pos + body > len(ids):
            if not prompts:
                raise PromptError(
                    f"{path} has {len(ids)} tokens, fewer than the {n} one sample needs: lower --lengths or give a longer file"
                )
            break
        prompts.append(Prompt(f"{Path(path).stem}-{i:03d}-{n}", torch.tensor([bos + ids[pos : pos + body]]), str(path), "text"))
        pos += body
    if len(prompts) < n_samples:
        raise PromptError(
            f"{path} has {len(ids)} tokens: enough for {len(prompts)} of the {n_samples} samples asked for "
            f"at lengths {','.join(map(str, lengths))}; pass --samples {len(prompts)}, lower --lengths, or give a longer file"
        )
    return prompts


def jsonl_prompts(tokenizer, path: str | Path, *, chat: bool = False, apply_chat=None) -> list[Prompt]:
    """One prompt per JSONL line ``{"text": ..., "name": optional}``, starting with BOS like
    the other sources (or as the chat template starts it, with ``chat=True``)."""
    text = read_text_file(path)
    prompts = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptError(f"{path}:{lineno}: not valid JSON ({exc.msg}); each line must be one JSON object") from exc
        except RecursionError:
            raise PromptError(f"{path}:{lineno}: nested too deeply to be a prompt line; each line must be one JSON object") from None
        except ValueError as exc:  # e.g. an integer beyond Python's digit limit
            raise PromptError(f"{path}:{lineno}: not a usable JSON line ({str(exc).splitlines()[0]}); each line must be one JSON object") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not obj["text"].strip():
            raise PromptError(f'{path}:{lineno}: needs a non-empty "text" field, e.g. {{"text": "Once upon a time"}}')
        name = str(obj.get("name", f"{Path(path).stem}-{lineno}"))
        if chat and apply_chat is not None:
            ids = apply_chat(obj["text"])
        else:
            ids = torch.tensor([_with_bos(tokenizer, tokenizer(obj["text"])["input_ids"])])
        prompts.append(Prompt(name, ids.to(torch.long), f"{path}:{lineno}", "jsonl"))
    if not prompts:
        raise PromptError(f"{path} has no prompts: add lines like {{\"text\": \"...\"}}")
    return prompts


def load_prompts(model, spec: str, *, lengths: Sequence[int] | None, n_samples: int | None, chat: bool = False, seed: int = 0) -> list[Prompt]:
    """Prompts from a spec: ``builtin`` (or ``builtin:narrative,code``), a ``.jsonl`` file, or a text file.

    ``lengths`` and ``n_samples`` shape built-in and text-file prompts (``None``: 512,1024 and
    8); a JSONL file holds its prompts whole, so giving either for one is an error. Every
    length is checked against the model's context before any prompt is built."""
    if not spec.startswith("builtin") and Path(spec).is_dir():
        raise PromptError(f"--prompts {spec} is a folder, not a prompt file: give one text or .jsonl file (e.g. {spec}/prompts.jsonl), or --prompts builtin")
    if spec.endswith(".jsonl"):
        if lengths is not None or n_samples is not None:
            raise PromptError(f"{spec} is a JSONL file: its lines are the prompts, whole; drop --lengths/--samples")
    else:
        lengths = list(lengths) if lengths is not None else [512, 1024]
        n_samples = n_samples if n_samples is not None else 8
        for n in lengths:
            if int(n) > model.n_ctx:
                raise PromptError(f"--lengths {n}: a prompt of {n} tokens is longer than {model.name}'s context (at most {model.n_ctx} tokens); choose --lengths <= {model.n_ctx}")
    if spec == "builtin" or spec.startswith("builtin:"):
        kinds = spec.split(":", 1)[1].split(",") if ":" in spec else list(KINDS)
        prompts = builtin_prompts(model.tokenizer, lengths, n_samples, seed=seed, kinds=kinds)
    elif spec.endswith(".jsonl"):
        prompts = jsonl_prompts(model.tokenizer, spec, chat=chat, apply_chat=lambda t: model.encode(t, chat=True))
    else:
        prompts = text_file_prompts(model.tokenizer, spec, lengths, n_samples)
    if chat and not spec.endswith(".jsonl"):
        if not model.has_chat_template:
            raise PromptError(f"--chat was given but {model.name} has no chat template: drop --chat")
        for p in prompts:
            text = model.tokenizer.decode(p.input_ids[0], skip_special_tokens=True)
            p.input_ids = model.encode(text, chat=True)
    return prompts
