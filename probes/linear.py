"""Linear probes on head outputs: which heads' outputs linearly encode a labelled property.

A head's output at position ``i`` is ``z[i] = Σ_j A[i, j] v_j`` (``blocks.{l}.attn.hook_z``,
``[batch, pos, heads, d_head]`` on the bridge — one vector per *query* head, also under GQA).
If a property of position ``i`` (e.g. "this token is inside the needle") can be read off
``z[i]`` by a logistic regression that generalises to held-out samples, the head carries that
information. Each (layer, head) gets its own probe: standardised ``z`` → scikit-learn
``LogisticRegression``; the table reports train and held-out accuracy next to the majority-class
baseline of the held-out set, so an accuracy means something only well above ``baseline_acc``.

**Split and balance.** Positions of one prompt are correlated, so the held-out set is made of
whole samples (``test_fraction`` of them, at least one) whenever there are at least two samples
and both sides get both classes; otherwise positions are split at random, stratified by label,
and the ``split`` column says ``positions``. Within each side the majority class is subsampled
to the minority's size (``balance=True``), at most ``max_per_class`` positions per class, so the
baseline is ≈ 0.5 and accuracy is not inflated by imbalance. Position 0 (the BOS / sink token,
identical in every sample) is never used.

**Control task.** A head output that encodes *which token* sits at a position makes every
property that correlates with token identity decodable (the digits of a passkey needle are
recognisable as digits anywhere). Following Hewitt & Liang (2019), each probe is refitted on a
*control task* over the same positions and split: every distinct token id gets a random 0/1
label, and ``control_acc`` is the held-out *balanced* accuracy on those labels (token-level
labels cannot be balanced by subsampling positions, so chance is kept at 0.5 this way). ``selectivity =
test_acc - control_acc`` is what the head knows about the property beyond the identity of the
token; a lexical property (label = f(token)) has selectivity near 0 by construction.

**Labelled samples.** `fit_linear_probes` takes ``(input_ids [n] or [1, n], labels [n])``
pairs with 0/1 labels. Two sources build them:

- needle samples (`needle_label_samples`; anything with ``.input_ids`` and ``.needle_span``
  ``(start, end)``, e.g. `attnlab.probes.needle.NeedleSample`): label 1 on ``start ≤ i < end``;
- a user's JSONL file (`read_label_file`): one object per line,
  ``{"text": "...", "labels": [[start_char, end_char], ...]}`` with half-open *character*
  offsets into ``text``; a token is labelled 1 when its characters overlap a span. BOS is
  prepended (label 0) as the other prompt sources do. Character offsets survive a change of
  tokenizer, which token positions would not; mistakes are reported with the line number and
  what to change.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from attnlab.capture import check_length
from attnlab.errors import PromptError
from attnlab.models import LoadedModel
from attnlab.names import attn_hook
from attnlab.prompts import read_text_file
from attnlab.runs import LINEAR_PROBES, ensure_run, preflight_run

from .base import ProbeError, ProbeResult

LINEAR_COLUMNS = (
    "property", "layer", "head", "kv_head", "train_acc", "test_acc", "baseline_acc",
    "control_acc", "selectivity", "n_train", "n_test", "split",
)

LabelledSample = tuple[torch.Tensor, torch.Tensor]

_ERR_LINE_JSON = '{path}:{line}: not valid JSON ({msg}); each line must be one object like {{"text": "...", "labels": [[0, 5]]}}'
_ERR_LINE_TEXT = '{path}:{line}: needs a non-empty "text" string, e.g. {{"text": "The code is 4711.", "labels": [[12, 16]]}}'
_ERR_LINE_LABELS = (
    '{path}:{line}: "labels" must be a list of [start_char, end_char] pairs of integers (half-open character '
    'offsets into "text"), got {got!r}'
)
_ERR_LINE_SPAN = (
    '{path}:{line}: label span [{start}, {end}] does not fit the text ({n} characters): spans are '
    "[start_char, end_char) with 0 <= start_char < end_char <= {n}; fix the offsets"
)
_ERR_LINE_EMPTY_SPAN = (
    '{path}:{line}: label span [{start}, {end}] ({text!r}) covers no token; widen it to cover at least one '
    "non-space character"
)
_ERR_NO_OFFSETS = "the tokenizer of {model} cannot map tokens to characters (it is not a 'fast' tokenizer); label files need one"
_ERR_ONE_CLASS = (
    "the labels mark {what} position (of {n}, BOS excluded): a probe needs both labelled and unlabelled "
    "positions; {fix}"
)
_ERR_LABEL_SHAPE = "sample {index}: {n_labels} labels for {n_tokens} tokens; give one 0/1 label per token position"
_ERR_LABEL_VALUES = "sample {index}: labels must be 0 or 1, got values {values}"
_ERR_LAYERS = "layers must lie in 0..{last} for {model}, got {layers}"
_ERR_FRACTION = "test_fraction must lie in (0, 1), got {value}"
_ERR_NO_SOURCE = "give either a label file (JSONL with text and character spans) or labelled samples, not both"
_ERR_NO_NEEDLE = "needle sample {index} has needle_span {span}, outside its {n} tokens; regenerate the needle samples"


# ---------------------------------------------------------------------------------------
# labelled samples
# ---------------------------------------------------------------------------------------
def needle_label_samples(samples: Sequence[Any]) -> list[LabelledSample]:
    """``(input_ids [n], labels [n])`` with label 1 inside each sample's ``needle_span``
    ``(start, end)`` (half-open token positions)."""
    out = []
    for i, s in enumerate(samples):
        ids = torch.as_tensor(s.input_ids).reshape(-1)
        start, end = (int(v) for v in s.needle_span)
        if not 0 <= start < end <= ids.numel():
            raise ProbeError(_ERR_NO_NEEDLE.format(index=i, span=(start, end), n=ids.numel()))
        labels = torch.zeros(ids.numel(), dtype=torch.long)
        labels[start:end] = 1
        out.append((ids, labels))
    return out


def read_label_file(path: str | Path, tokenizer: Any) -> list[LabelledSample]:
    """Labelled samples from a JSONL file of ``{"text", "labels": [[start_char, end_char], ...]}``.

    Raises `PromptError` naming the line and the fix for invalid JSON, a missing text, malformed
    or out-of-range spans, and spans that cover no token.
    """
    content = read_text_file(path)
    bos = getattr(tokenizer, "bos_token_id", None)
    out = []
    for lineno, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptError(_ERR_LINE_JSON.format(path=path, line=lineno, msg=exc.msg)) from exc
        except RecursionError:
            raise PromptError(_ERR_LINE_JSON.format(path=path, line=lineno, msg="nested too deeply")) from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not obj["text"].strip():
            raise PromptError(_ERR_LINE_TEXT.format(path=path, line=lineno))
        text, spans = obj["text"], obj.get("labels")
        if not isinstance(spans, list) or not all(
            isinstance(s, list | tuple) and len(s) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in s) for s in spans
        ):
            raise PromptError(_ERR_LINE_LABELS.format(path=path, line=lineno, got=spans))
        try:
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError as exc:
            raise PromptError(_ERR_NO_OFFSETS.format(model=getattr(tokenizer, "name_or_path", "this model"))) from exc
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        labels = [0] * len(ids)
        for start, end in spans:
            if not 0 <= start < end <= len(text):
                raise PromptError(_ERR_LINE_SPAN.format(path=path, line=lineno, start=start, end=end, n=len(text)))
            hit = [t for t, (a, b) in enumerate(offsets) if a < end and b > start and text[max(a, start):min(b, end)].strip()]
            if not hit:
                raise PromptError(_ERR_LINE_EMPTY_SPAN.format(path=path, line=lineno, start=start, end=end, text=text[start:end]))
            for t in hit:
                labels[t] = 1
        if bos is not None and (not ids or ids[0] != bos):
            ids, labels = [bos, *ids], [0, *labels]
        out.append((torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)))
    if not out:
        raise PromptError(f'{path} has no samples: add lines like {{"text": "...", "labels": [[0, 5]]}}')
    return out


# ---------------------------------------------------------------------------------------
# fitting
# ---------------------------------------------------------------------------------------
def _check_samples(samples: Sequence[LabelledSample]) -> list[tuple[torch.Tensor, np.ndarray]]:
    checked = []
    for i, (ids, labels) in enumerate(samples):
        ids = torch.as_tensor(ids).reshape(-1).to(torch.long)
        lab = np.asarray(torch.as_tensor(labels).reshape(-1).cpu(), dtype=np.int64)
        if lab.size != ids.numel():
            raise ProbeError(_ERR_LABEL_SHAPE.format(index=i, n_labels=lab.size, n_tokens=ids.numel()))
        bad = sorted(set(np.unique(lab).tolist()) - {0, 1})
        if bad:
            raise ProbeError(_ERR_LABEL_VALUES.format(index=i, values=bad[:5]))
        checked.append((ids, lab))
    usable = np.concatenate([lab[1:] for _, lab in checked]) if checked else np.zeros(0)
    if usable.size == 0 or usable.min() == usable.max():
        what = "every" if usable.size and usable.min() == 1 else "no"
        fix = "label fewer positions" if what == "every" else "label at least one span per file"
        raise ProbeError(_ERR_ONE_CLASS.format(what=what, n=usable.size, fix=fix))
    return checked


def _split(checked: list[tuple[torch.Tensor, np.ndarray]], test_fraction: float, rng: np.random.Generator) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]], str]:
    """(sample, position, label) triples for train and test, and the split kind."""
    triples = [(s, p, int(lab[p])) for s, (_, lab) in enumerate(checked) for p in range(1, lab.size)]
    n_samples = len(checked)
    if n_samples >= 2:
        order = rng.permutation(n_samples)
        n_test = min(n_samples - 1, max(1, int(round(test_fraction * n_samples))))
        test_ids = set(order[:n_test].tolist())
        train = [t for t in triples if t[0] not in test_ids]
        test = [t for t in triples if t[0] in test_ids]
        if {t[2] for t in train} == {0, 1} and {t[2] for t in test} == {0, 1}:
            return train, test, "samples"
    train, test = [], []
    for cls in (0, 1):
        members = [t for t in triples if t[2] == cls]
        perm = rng.permutation(len(members))
        n_test = max(1, int(round(test_fraction * len(members))))
        if len(members) < 2:
            raise ProbeError(_ERR_ONE_CLASS.format(what="only one" if cls else "all but one", n=len(triples), fix="label more positions of each kind"))
        test += [members[i] for i in perm[:n_test]]
        train += [members[i] for i in perm[n_test:]]
    return train, test, "positions"


def _balance(triples: list[tuple[int, int, int]], balance: bool, max_per_class: int, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    by_class = {c: [t for t in triples if t[2] == c] for c in (0, 1)}
    size = min(len(by_class[0]), len(by_class[1])) if balance else None
    out = []
    for members in by_class.values():
        k = min(len(members), max_per_class, size if size is not None else len(members))
        out += [members[i] for i in sorted(rng.choice(len(members), size=k, replace=False).tolist())]
    return out


def _grab_z(layer: int, pos: torch.Tensor, grabbed: dict[int, torch.Tensor]):
    """A ``hook_z`` hook keeping ``z[0, pos]`` ``[p, heads, d_head]`` of one layer."""

    def hook(z: torch.Tensor, hook=None):
        grabbed[layer] = z[0, pos.to(z.device)].detach().to(torch.float32).cpu()
        return None

    return hook


def _control_labels(checked: list[tuple[torch.Tensor, np.ndarray]], train: list[tuple[int, int, int]], test: list[tuple[int, int, int]], seed: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Hewitt & Liang's control task: a random 0/1 label per distinct token id, read at the
    selected positions. ``(None, None)`` when a side gets only one class."""
    token = [int(checked[s][0][p]) for s, p, _ in train + test]
    distinct = sorted(set(token))
    rng = np.random.default_rng(seed + 1)
    label_of = dict(zip(distinct, rng.permutation(np.arange(len(distinct)) % 2).tolist(), strict=True))
    labels = np.array([label_of[t] for t in token])
    c_train, c_test = labels[: len(train)], labels[len(train) :]
    if len(set(c_train.tolist())) < 2 or len(set(c_test.tolist())) < 2:
        return None, None
    return c_train, c_test


@torch.no_grad()
def _head_outputs(model: LoadedModel, checked: list[tuple[torch.Tensor, np.ndarray]], wanted: dict[int, list[int]], layers: list[int], progress: bool) -> dict[tuple[int, int], np.ndarray]:
    """``{(sample, position): z [layers, heads, d_head]}`` for the wanted positions."""
    out: dict[tuple[int, int], np.ndarray] = {}
    stop = max(layers) + 1
    for s in tqdm(sorted(wanted), desc=f"head outputs {model.name}", unit="sample", disable=not progress):
        ids, _ = checked[s]
        pos = torch.tensor(wanted[s])
        grabbed: dict[int, torch.Tensor] = {}
        hooks = [(attn_hook(layer, "hook_z"), _grab_z(layer, pos, grabbed)) for layer in layers]
        model.bridge.run_with_hooks(ids[None].to(model.device), fwd_hooks=hooks, stop_at_layer=stop)
        stacked = torch.stack([grabbed[layer] for layer in layers], 1).numpy()  # [p, L, H, d]
        for i, p in enumerate(wanted[s]):
            out[(s, p)] = stacked[i]
    return out


def fit_linear_probes(
    model: LoadedModel,
    samples: Sequence[LabelledSample],
    layers: Sequence[int] | None = None,
    *,
    test_fraction: float = 0.25,
    balance: bool = True,
    max_per_class: int = 2000,
    C: float = 1.0,
    control: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """Fit one logistic-regression probe per (layer, head) on ``hook_z`` and score it held out.

    Args:
        model: a `LoadedModel`.
        samples: ``(input_ids [n] or [1, n], labels [n])`` pairs, labels 0/1.
        layers: layers to probe (all by default).
        test_fraction: share of samples (or positions, see the module docstring) held out.
        balance: subsample the majority class on each side to the minority's size.
        max_per_class: at most this many positions per class on each side.
        C: inverse L2 regularisation strength of the logistic regression.
        control: also fit the control task (random label per token id; see the module docstring).
        seed: random state of the split, the subsampling and the solver.
        progress: show progress bars.
    Returns:
        DataFrame ``layer, head, kv_head, train_acc, test_acc, baseline_acc, control_acc,
        selectivity, n_train, n_test, split`` — one row per probed head (``control_acc`` and
        ``selectivity`` are NaN with ``control=False``, or when the control labels of the
        selected positions come out all one class on a side).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if not 0 < test_fraction < 1:
        raise ProbeError(_ERR_FRACTION.format(value=test_fraction))
    layers = list(range(model.n_layers)) if layers is None else sorted({int(v) for v in layers})
    if not layers or layers[0] < 0 or layers[-1] >= model.n_layers:
        raise ProbeError(_ERR_LAYERS.format(last=model.n_layers - 1, model=model.name, layers=list(layers)))
    checked = _check_samples(samples)
    for i, (ids, _) in enumerate(checked):
        check_length(model, ids.numel(), f"labelled sample {i}")
    rng = np.random.default_rng(seed)
    train, test, split = _split(checked, test_fraction, rng)
    train, test = _balance(train, balance, max_per_class, rng), _balance(test, balance, max_per_class, rng)
    wanted: dict[int, list[int]] = {}
    for s, p, _ in train + test:
        wanted.setdefault(s, []).append(p)
    z = _head_outputs(model, checked, {s: sorted(set(v)) for s, v in wanted.items()}, layers, progress)
    x_train = np.stack([z[(s, p)] for s, p, _ in train])  # [N, L, H, d]
    x_test = np.stack([z[(s, p)] for s, p, _ in test])
    y_train = np.array([c for *_, c in train])
    y_test = np.array([c for *_, c in test])
    baseline = float(max(y_test.mean(), 1 - y_test.mean()))
    c_train, c_test = _control_labels(checked, train, test, seed) if control else (None, None)

    def fit(x_tr: np.ndarray, y_tr: np.ndarray):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=500, random_state=seed))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return clf.fit(x_tr, y_tr)

    kv = model.kv_heads()
    rows = []
    bar = tqdm(total=len(layers) * model.n_heads, desc="linear probes", unit="head", disable=not progress)
    for li, layer in enumerate(layers):
        for head in range(model.n_heads):
            x_tr, x_te = x_train[:, li, head], x_test[:, li, head]
            clf = fit(x_tr, y_train)
            test_acc = float(clf.score(x_te, y_test))
            control_acc = (
                float(balanced_accuracy_score(c_test, fit(x_tr, c_train).predict(x_te))) if c_train is not None else float("nan")
            )
            rows.append({
                "layer": layer, "head": head, "kv_head": int(kv[head]),
                "train_acc": float(clf.score(x_tr, y_train)), "test_acc": test_acc, "baseline_acc": baseline,
                "control_acc": control_acc, "selectivity": test_acc - control_acc,
                "n_train": len(y_train), "n_test": len(y_test), "split": split,
            })
            bar.update(1)
    bar.close()
    return pd.DataFrame.from_records(rows, columns=[c for c in LINEAR_COLUMNS if c != "property"])


# ---------------------------------------------------------------------------------------
# the probe: write into a run
# ---------------------------------------------------------------------------------------
def run_linear_probe(
    model: LoadedModel,
    out: str | Path,
    *,
    label_file: str | Path | None = None,
    samples: Sequence[Any] | None = None,
    property_name: str | None = None,
    needle_lengths: Sequence[int] = (256,),
    n_needles: int = 16,
    layers: Sequence[int] | None = None,
    test_fraction: float = 0.25,
    balance: bool = True,
    max_per_class: int = 2000,
    control: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> ProbeResult:
    """Fit linear probes for one labelled property and store them in ``out``'s linear-probe table
    (`attnlab.runs.LINEAR_PROBES`).

    Args:
        model: a `LoadedModel`.
        out: run directory (created if missing; an existing run must be of the same model).
        label_file: a JSONL label file (see the module docstring); property name = file stem.
        samples: instead, labelled samples: needle samples (objects with ``needle_span``;
            property ``inside_needle``) or ``(input_ids, labels)`` pairs (property ``custom``).
            With neither, ``n_needles`` needle samples of ``needle_lengths`` tokens are built
            (`attnlab.probes.needle.needle_samples`) and the property is ``inside_needle``.
        property_name: overrides the property name.
        layers, test_fraction, balance, max_per_class, control, seed, progress: see
            `fit_linear_probes`.

    Rows of other properties already in the table are kept; this property's are replaced.
    Returns a `ProbeResult` whose ``tables["linear_probes"]`` holds this property's rows.
    """
    if label_file is not None and samples is not None:
        raise ProbeError(_ERR_NO_SOURCE)
    preflight_run(out, model)
    if label_file is None and samples is None:
        from .needle import needle_samples

        samples = needle_samples(model, lengths=tuple(needle_lengths), n_samples=n_needles, seed=seed)
    if label_file is not None:
        labelled = read_label_file(label_file, model.tokenizer)
        prop = property_name or Path(label_file).stem
        source = str(label_file)
    else:
        samples = list(samples)  # type: ignore[arg-type]
        if samples and hasattr(samples[0], "needle_span"):
            labelled, prop, source = needle_label_samples(samples), property_name or "inside_needle", "needle samples"
        else:
            labelled, prop, source = list(samples), property_name or "custom", "labelled samples"
    table = fit_linear_probes(
        model, labelled, layers, test_fraction=test_fraction, balance=balance, max_per_class=max_per_class,
        control=control, seed=seed, progress=progress,
    )
    table.insert(0, "property", prop)
    margin = table["test_acc"] - table["baseline_acc"]
    summary = {
        "property": prop,
        "source": source,
        "n_samples": len(labelled),
        "split": str(table["split"].iloc[0]),
        "baseline_acc": round(float(table["baseline_acc"].iloc[0]), 4),
        "best_head": _best(table, "test_acc"),
        "heads_above_baseline_by_0.1": int((margin > 0.1).sum()),
        "heads_selective_by_0.1": int((table["selectivity"] > 0.1).sum()),
        "best_selective_head": _best(table, "selectivity"),
    }
    params = {
        "property": prop, "source": source, "control": control, "layers": None if layers is None else [int(v) for v in layers],
        "test_fraction": test_fraction, "balance": balance, "max_per_class": max_per_class, "seed": seed,
    }
    stage = f"probe:linear:{prop}"
    run = ensure_run(out, model.identity(), stage, params)
    old = run.read_optional(LINEAR_PROBES)
    if old is not None:
        table = pd.concat([old[old["property"] != prop], table], ignore_index=True)
    table = table[list(LINEAR_COLUMNS)]
    run.write(LINEAR_PROBES, table)
    run.record_stage(stage, summary={**summary, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return ProbeResult(run, summary=summary, tables={LINEAR_PROBES.key: table[table["property"] == prop].reset_index(drop=True)})


def _best(table: pd.DataFrame, column: str) -> dict[str, Any] | None:
    """The head with the highest ``column`` (None when it is all NaN)."""
    if table[column].isna().all():
        return None
    row = table.loc[table[column].idxmax()]
    return {"layer": int(row["layer"]), "head": int(row["head"]), column: round(float(row[column]), 4), "test_acc": round(float(row["test_acc"]), 4)}
