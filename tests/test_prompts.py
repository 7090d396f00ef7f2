"""`attnlab.prompts` with the embedded model's real tokenizer (no model forward pass)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from attnlab.errors import PromptError
from attnlab.models import EMBEDDED_MODELS, EMBEDDED_NAME, _embedded_cache
from attnlab.prompts import (
    KINDS,
    builtin_prompts,
    jsonl_prompts,
    load_prompts,
    read_text_file,
    text_file_prompts,
)

TEXT = (
    "The lighthouse keeper wrote every evening in a red notebook. "
    "Some nights the storm was loud, and the keeper counted the waves instead of sleeping. "
) * 30


@pytest.fixture(scope="module")
def tok():
    # the first call dequantizes the embedded model into the cache (~20 s), later ones are quick
    return AutoTokenizer.from_pretrained(_embedded_cache(EMBEDDED_MODELS[EMBEDDED_NAME], verbose=False))


@pytest.fixture
def stub(tok):
    """The slice of `LoadedModel` that `load_prompts` uses."""
    return SimpleNamespace(
        tokenizer=tok,
        name="stub",
        n_ctx=8192,
        has_chat_template=False,
        encode=lambda text, chat=False: tok(text, return_tensors="pt")["input_ids"],
    )


def _ids(p) -> list[int]:
    return p.input_ids[0].tolist()


# --------------------------------------------------------------------------- builtin


def test_tokenizer_has_bos(tok):
    assert tok.bos_token_id is not None  # the BOS assertions below are not vacuous


def test_builtin_exact_lengths_and_bos(tok):
    lengths = [17, 64, 300]
    prompts = builtin_prompts(tok, lengths, 7, seed=0)
    assert len(prompts) == 7
    for i, p in enumerate(prompts):
        assert p.input_ids.shape == (1, lengths[i % 3])
        assert p.input_ids.dtype == torch.long
        assert p.n_tokens == lengths[i % 3]
        assert _ids(p)[0] == tok.bos_token_id
        assert tok.bos_token_id not in _ids(p)[1:]  # BOS only at the start
        assert p.source == "builtin"


def test_builtin_cycles_kinds_and_lengths(tok):
    prompts = builtin_prompts(tok, [20, 40], 9, seed=1)
    assert [p.kind for p in prompts] == [KINDS[i % len(KINDS)] for i in range(9)]
    assert [p.n_tokens for p in prompts] == [20, 40] * 4 + [20]
    assert [p.name for p in prompts[:3]] == ["builtin-000-narrative-20", "builtin-001-records-40", "builtin-002-code-20"]
    assert len({p.name for p in prompts}) == 9


def test_builtin_kinds_write_their_register(tok):
    markers = {"narrative": "street was empty", "records": "Record ", "code": "def ", "list": "1. "}
    prompts = builtin_prompts(tok, [120], 4, seed=2)
    for p in prompts:
        text = tok.decode(p.input_ids[0], skip_special_tokens=True)
        assert markers[p.kind] in text, (p.kind, text[:80])
    only_code = builtin_prompts(tok, [50], 3, seed=2, kinds=["code"])
    assert [p.kind for p in only_code] == ["code"] * 3
    assert all("def " in tok.decode(p.input_ids[0]) for p in only_code)


def test_builtin_deterministic_per_seed_and_differs_across_seeds(tok):
    a = builtin_prompts(tok, [48, 96], 4, seed=5)
    b = builtin_prompts(tok, [48, 96], 4, seed=5)
    c = builtin_prompts(tok, [48, 96], 4, seed=6)
    assert [_ids(p) for p in a] == [_ids(p) for p in b]
    assert [p.name for p in a] == [p.name for p in c]  # names do not carry the seed
    for pa, pc in zip(a, c, strict=True):
        assert _ids(pa) != _ids(pc)
    # different samples of one kind are different texts too
    same_kind = builtin_prompts(tok, [48], 2, seed=5, kinds=["records"])
    assert _ids(same_kind[0]) != _ids(same_kind[1])


def test_builtin_long_prompt_is_exact(tok):
    (p,) = builtin_prompts(tok, [2048], 1, seed=0, kinds=["list"])
    assert p.n_tokens == 2048 and _ids(p)[0] == tok.bos_token_id


@pytest.mark.parametrize("n_samples", [0, -1])
def test_builtin_invalid_samples(tok, n_samples):
    with pytest.raises(PromptError, match=f"--samples must be positive, got {n_samples}"):
        builtin_prompts(tok, [32], n_samples)


@pytest.mark.parametrize("lengths", [[], [1], [0], [64, -5], [32, 1]])
def test_builtin_invalid_lengths(tok, lengths):
    with pytest.raises(PromptError, match=r"--lengths must be token counts above 1"):
        builtin_prompts(tok, lengths, 2)


@pytest.mark.parametrize("kinds", [["poem"], ["code", "essay"], [""]])
def test_builtin_unknown_kinds(tok, kinds):
    with pytest.raises(PromptError, match=r"unknown prompt kind\(s\).*choose from \['narrative', 'records', 'code', 'list'\]"):
        builtin_prompts(tok, [32], 2, kinds=kinds)


def test_load_prompts_builtin_specs(stub):
    prompts = load_prompts(stub, "builtin:code,list", lengths=[30], n_samples=4, seed=3)
    assert [p.kind for p in prompts] == ["code", "list", "code", "list"]
    assert all(p.n_tokens == 30 for p in prompts)
    default = load_prompts(stub, "builtin", lengths=[30], n_samples=4, seed=3)
    assert [p.kind for p in default] == list(KINDS)
    with pytest.raises(PromptError, match=r"unknown prompt kind\(s\) \['poem'\]"):
        load_prompts(stub, "builtin:code,poem", lengths=[30], n_samples=2)


def test_load_prompts_chat_without_template(stub):
    with pytest.raises(PromptError, match="--chat was given but stub has no chat template: drop --chat"):
        load_prompts(stub, "builtin", lengths=[30], n_samples=1, chat=True)


# --------------------------------------------------------------------------- text files


def test_text_file_windows(tok, tmp_path):
    path = tmp_path / "story.txt"
    path.write_text(TEXT, encoding="utf-8")
    all_ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    lengths = [32, 100]
    prompts = text_file_prompts(tok, path, lengths, 5)
    assert len(prompts) == 5
    body = []
    for i, p in enumerate(prompts):
        n = lengths[i % 2]
        assert p.n_tokens == n
        assert _ids(p)[0] == tok.bos_token_id
        assert p.name == f"story-{i:03d}-{n}"
        assert p.kind == "text" and p.source == str(path)
        body += _ids(p)[1:]
    # consecutive, non-overlapping windows of the file's tokens
    assert body == all_ids[: len(body)]


def test_text_file_that_runs_out_names_how_many_samples_fit(tok, tmp_path):
    """Fewer samples than asked is an error that names how many fit (it used to return two of ten silently)."""
    path = tmp_path / "short.txt"
    path.write_text(TEXT, encoding="utf-8")
    n_ids = len(tok(TEXT, add_special_tokens=False)["input_ids"])
    n = n_ids // 3 + 2  # bodies of n - 1 tokens: room for two windows but not three
    with pytest.raises(PromptError, match="enough for 2 of the 10 samples asked for.*pass --samples 2"):
        text_file_prompts(tok, path, [n], 10)
    prompts = text_file_prompts(tok, path, [n], 2)
    assert [p.n_tokens for p in prompts] == [n, n]


def test_text_file_too_short(tok, tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("Just a few words.", encoding="utf-8")
    n_ids = len(tok("Just a few words.", add_special_tokens=False)["input_ids"])
    with pytest.raises(PromptError, match=rf"tiny.txt has {n_ids} tokens, fewer than the 64 one sample needs: lower --lengths or give a longer file"):
        text_file_prompts(tok, path, [64], 2)


@pytest.mark.parametrize("content", ["", "   \n\t\n"])
def test_text_file_empty(tok, tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(PromptError, match="empty.txt is empty: give a text file with some content"):
        text_file_prompts(tok, path, [32], 1)


def test_text_file_not_utf8(tok, tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("Caf\u00e9 au lait, na\u00efve r\u00e9sum\u00e9. ".encode("latin-1") * 20)
    with pytest.raises(PromptError, match=r"latin1.txt is not UTF-8 text \(bad byte at offset 3\): convert it, e.g. `iconv -t utf-8 latin1.txt`"):
        text_file_prompts(tok, path, [32], 1)


def test_text_file_missing(tok, tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(PromptError, match="prompt file .*nope.txt does not exist: check the path"):
        text_file_prompts(tok, path, [32], 1)
    with pytest.raises(PromptError):
        read_text_file(tmp_path)  # a directory is not a prompt file either


def test_read_text_file_returns_utf8_text(tmp_path):
    path = tmp_path / "u.txt"
    path.write_text("na\u00efve \u2713\n", encoding="utf-8")
    assert read_text_file(path) == "na\u00efve \u2713\n"


def test_load_prompts_text_file(stub, tmp_path):
    path = tmp_path / "story.txt"
    path.write_text(TEXT, encoding="utf-8")
    prompts = load_prompts(stub, str(path), lengths=[40], n_samples=2)
    assert [p.n_tokens for p in prompts] == [40, 40] and all(p.kind == "text" for p in prompts)


def test_a_short_text_file_is_an_error_not_fewer_samples(stub, tmp_path):
    path = tmp_path / "story.txt"
    path.write_text(TEXT, encoding="utf-8")
    with pytest.raises(PromptError, match=r"enough for \d+ of the 500 samples asked for.*pass --samples \d+"):
        load_prompts(stub, str(path), lengths=[40], n_samples=500)


def test_lengths_beyond_the_context_fail_before_any_prompt_is_built(stub):
    with pytest.raises(PromptError, match=f"a prompt of 99999999999 tokens is longer than .* context \\(at most {stub.n_ctx} tokens\\)"):
        load_prompts(stub, "builtin", lengths=[99999999999], n_samples=1)


@pytest.mark.parametrize(
    "lengths,n_samples", [([32], 0), ([0], 2), ([1], 3), ([], 2)], ids=["samples0", "length0", "length1", "no-lengths"]
)
def test_text_file_invalid_samples_and_lengths(tok, tmp_path, lengths, n_samples):
    path = tmp_path / "story.txt"
    path.write_text(TEXT, encoding="utf-8")
    with pytest.raises(PromptError, match="--samples|--lengths"):
        text_file_prompts(tok, path, lengths, n_samples)


# --------------------------------------------------------------------------- JSONL


def _write_jsonl(path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_jsonl_valid_lines(tok, tmp_path):
    path = tmp_path / "set.jsonl"
    _write_jsonl(
        path,
        [
            json.dumps({"text": "Once upon a time"}),
            "",
            json.dumps({"text": "def f(x):\n    return x", "name": "code-one"}),
            "   ",
            json.dumps({"text": "caf\u00e9 \u2713", "extra": 1}),
        ],
    )
    prompts = jsonl_prompts(tok, path)
    assert [p.name for p in prompts] == ["set-1", "code-one", "set-5"]
    assert [p.source for p in prompts] == [f"{path}:1", f"{path}:3", f"{path}:5"]
    assert all(p.kind == "jsonl" for p in prompts)
    for p, text in zip(prompts, ["Once upon a time", "def f(x):\n    return x", "caf\u00e9 \u2713"], strict=True):
        assert p.input_ids.dtype == torch.long and p.input_ids.dim() == 2
        assert tok.decode(p.input_ids[0], skip_special_tokens=True) == text


def test_jsonl_via_load_prompts_and_chat(stub, tmp_path):
    path = tmp_path / "set.jsonl"
    _write_jsonl(path, [json.dumps({"text": "Hello there"})])
    (p,) = load_prompts(stub, str(path), lengths=None, n_samples=None)
    assert p.name == "set-1"
    with pytest.raises(PromptError, match="JSONL file: its lines are the prompts, whole; drop --lengths/--samples"):
        load_prompts(stub, str(path), lengths=[32], n_samples=None)
    calls = []
    stub.encode = lambda text, chat=False: calls.append((text, chat)) or torch.tensor([[7, 8, 9]], dtype=torch.int32)
    (p,) = load_prompts(stub, str(path), lengths=None, n_samples=None, chat=True)
    assert calls == [("Hello there", True)]
    assert _ids(p) == [7, 8, 9] and p.input_ids.dtype == torch.long


def test_jsonl_bad_json_names_the_line(tok, tmp_path):
    path = tmp_path / "bad.jsonl"
    _write_jsonl(path, [json.dumps({"text": "fine"}), "", '{"text": "unterminated'])
    with pytest.raises(PromptError, match=r"bad.jsonl:3: not valid JSON \(.+\); each line must be one JSON object"):
        jsonl_prompts(tok, path)


@pytest.mark.parametrize(
    "line",
    [json.dumps({"prompt": "no text key"}), json.dumps({"text": ""}), json.dumps({"text": "  "}), json.dumps({"text": 5}), json.dumps(["text"]), '"just a string"'],
    ids=["no-text", "empty", "blank", "number", "list", "string"],
)
def test_jsonl_line_without_text_names_the_line(tok, tmp_path, line):
    path = tmp_path / "nt.jsonl"
    _write_jsonl(path, [json.dumps({"text": "fine"}), line])
    with pytest.raises(PromptError, match=r'nt.jsonl:2: needs a non-empty "text" field, e\.g\. \{"text": "Once upon a time"\}'):
        jsonl_prompts(tok, path)


def test_jsonl_file_problems(tok, tmp_path):
    with pytest.raises(PromptError, match="does not exist"):
        jsonl_prompts(tok, tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(PromptError, match="empty.jsonl is empty"):
        jsonl_prompts(tok, empty)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(PromptError, match="latin.jsonl is not UTF-8 text"):
        jsonl_prompts(tok, latin)


def test_jsonl_prompts_start_with_bos_like_the_others(tok, tmp_path):
    path = tmp_path / "set.jsonl"
    _write_jsonl(path, [json.dumps({"text": "Once upon a time"})])
    (p,) = jsonl_prompts(tok, path)
    assert _ids(p)[0] == tok.bos_token_id


# --------------------------------------------------------------------------- hostile files (issue 13)


def test_a_prompt_folder_is_called_a_folder_not_missing(stub, tmp_path):
    (tmp_path / "texts").mkdir()
    with pytest.raises(PromptError, match=r"--prompts .*texts is a folder, not a prompt file: give one text or .jsonl file.*or --prompts builtin") as exc:
        load_prompts(stub, str(tmp_path / "texts"), lengths=[64], n_samples=1)
    assert "does not exist" not in str(exc.value)


def test_a_jsonl_line_beyond_the_parsers_limits_names_the_line(tok, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"text": "fine"}\n{"text": "x", "n": ' + "9" * 5000 + "}\n")
    with pytest.raises(PromptError, match=r"p.jsonl:2: not a usable JSON line"):
        jsonl_prompts(tok, f)


def test_a_huge_prompt_file_is_refused_before_reading(tmp_path, monkeypatch):
    import attnlab.prompts as prompts

    monkeypatch.setattr(prompts, "MAX_PROMPT_FILE_BYTES", 100)
    f = tmp_path / "big.txt"
    f.write_text("word " * 100)
    with pytest.raises(PromptError, match=r"big.txt is 500 bytes, more than a prompt file may be \(100 bytes\)"):
        read_text_file(f)


def test_a_folder_given_as_any_text_file_is_called_a_folder(tmp_path):
    with pytest.raises(PromptError, match=r"is a folder, not a text file: give the path of one file in it") as exc:
        read_text_file(tmp_path)
    assert "--prompts" not in str(exc.value)  # the caller may be --labels, --haystack, ...
