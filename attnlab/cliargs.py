"""The command line's shared parts: argument types, validators and common options.

Every ``cli`` module of every stage builds its options from these, so that a list, a budget
or a ``--model`` reads and fails the same way everywhere:

- lists are comma-separated (``--lengths 512,1024``) and parsed by `int_list`, `float_list`
  or `name_list` (which also checks each name against its choices);
- numbers that must lie in a range use `positive_int`, `nonneg_int`, `unit_float`
  (``(0, 1]``), `fraction` (``[0, 1]``) or `finite_float` — ``nan`` and ``inf`` never pass;
- every enumeration uses ``choices=``;
- ``--model`` always means a model (`add_model_arguments`); a run directory is ``--run``.

A bad value stops argparse with ``attnlab CMD: error: argument --x: ...`` (exit 2) before any
work. The one error path for expected mistakes at run time is `attnlab.cli.main`: an
`AttnlabError` prints one ``error:`` line (``ATTNLAB_DEBUG=1`` shows the traceback).

This module is a leaf: it imports nothing from attnlab but the errors.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

from attnlab.errors import AttnlabError

EMBEDDED_MODEL = "smollm2-135m"


def _split(text: str) -> list[str]:
    return [v.strip() for v in str(text).split(",") if v.strip()]


def _number(text: str, kind: type, what: str) -> Any:
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer ≥ 1."""
    value = _number(text, int, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def nonneg_int(text: str) -> int:
    """An integer ≥ 0."""
    value = _number(text, int, "a non-negative integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 0, got {text!r}")
    return value


def finite_float(text: str) -> float:
    """Any finite number (``nan``/``inf`` refused)."""
    return _number(text, float, "a number")


def unit_float(text: str) -> float:
    """A number in ``(0, 1]`` (budgets, shares)."""
    value = finite_float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def fraction(text: str) -> float:
    """A number in ``[0, 1]`` (thresholds, recall floors, probabilities)."""
    value = finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def layer_list(text: str) -> list[int]:
    """``6-8,12`` → ``[6, 7, 8, 12]`` (an argparse type: layers and inclusive ranges, comma-separated)."""
    out: list[int] = []
    for item in (x.strip() for x in str(text).split(",")):
        if not item:
            continue
        first, dash, last = item.partition("-")
        try:
            lo, hi = int(first), int(last if dash else first)
        except ValueError:
            lo, hi = -1, -1
        if lo < 0 or hi < lo:
            raise argparse.ArgumentTypeError(f"expected layers as numbers or ranges A-B, comma-separated (e.g. 6-8,12), got {text!r}")
        out.extend(i for i in range(lo, hi + 1) if i not in out)
    if not out:
        raise argparse.ArgumentTypeError(f"expected layers as numbers or ranges A-B, comma-separated (e.g. 6-8,12), got {text!r}")
    return out


def layers_text(layers) -> str:
    """``[6, 7, 8, 12]`` → ``"6-8,12"``: the form `layer_list` reads (also any indices, e.g. shards)."""
    out: list[str] = []
    xs = sorted({int(x) for x in layers})
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out)


def _list_of(item: Callable[[str], Any], what: str) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        values = [item(v) for v in _split(text)]
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one {what}, comma-separated")
        return values

    parse.__name__ = f"{what.replace(' ', '_')}_list"
    return parse


#: ``512,1024`` → ``[512, 1024]`` (each a positive integer).
int_list = _list_of(positive_int, "positive integer")
#: ``0,16,64`` → ``[0, 16, 64]`` (each an integer ≥ 0).
nonneg_int_list = _list_of(nonneg_int, "integer")
#: ``0.05,0.1`` → ``[0.05, 0.1]`` (each finite).
float_list = _list_of(finite_float, "number")
#: ``0.05,0.1`` → each in ``(0, 1]``.
unit_float_list = _list_of(unit_float, "number in (0, 1]")
#: ``0,0.5,1`` → each in ``[0, 1]``.
fraction_list = _list_of(fraction, "number in [0, 1]")


def name_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """``a,b`` → ``["a", "b"]``, each one of ``choices`` (order kept, duplicates dropped)."""
    allowed = tuple(choices)

    def parse(text: str) -> list[str]:
        names = list(dict.fromkeys(_split(text)))
        if not names:
            raise argparse.ArgumentTypeError(f"expected at least one of {', '.join(allowed)}")
        bad = [n for n in names if n not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(map(repr, bad))}: choose from {', '.join(allowed)}")
        return names

    parse.__name__ = "name_list"
    return parse


_DEVICE_MAP_HELP = "auto, a JSON object or a .json file"


def device_map(text: str) -> str | dict[str, Any]:
    """``--device-map``: ``auto``, a JSON object ``{"module name": "device", ...}`` or the path
    of a ``.json`` file holding one. The modules and devices are checked when the model loads
    (`attnlab.models.check_device_map`)."""
    text = str(text).strip()
    if text == "auto":
        return text
    if text[:1] in ("{", "[", '"'):
        source, where = text, "the JSON"
    else:
        try:
            with open(text, encoding="utf-8") as f:
                source = f.read()
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"expected {_DEVICE_MAP_HELP}, got {text!r} ({exc.strerror or exc})") from None
        where = text
    try:
        value = json.loads(source)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"{where} is not valid JSON ({exc.msg}, line {exc.lineno} column {exc.colno})") from None
    if not isinstance(value, dict) or not value:
        raise argparse.ArgumentTypeError(f"{where} must hold a non-empty JSON object {{module name: device}}")
    return value


def device_map_argv(value: str | dict[str, Any] | None) -> list[str]:
    """``["--device-map", "auto" | compact JSON]`` (``[]`` for None): the option as a command
    that re-runs a stage (a shard, a Ray task) must pass it on."""
    if value is None:
        return []
    return ["--device-map", value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))]


def add_model_arguments(parser: argparse.ArgumentParser, *, default: str | None = EMBEDDED_MODEL, required: bool = False) -> None:
    """``--model`` (a model: embedded name, .gguf, HF directory or Hub id), ``--device``,
    ``--device-map`` (a model spread over several devices; not with a ``--device`` other than
    cpu) and ``--trust-remote-code`` (off by default)."""
    help_default = f" (default: {default})" if default else ""
    parser.add_argument("--model", default=None if required else default, required=required,
                        help=f"embedded name, .gguf path, HF directory or Hub id{help_default}")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code (off by default)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--device-map", type=device_map, default=None, metavar="MAP",
                        help=f"spread the model over devices: {_DEVICE_MAP_HELP} {{module: device}} "
                             "(accelerate's device_map; see docs/devices.md). Not with --device")


def local_path(text: str) -> str:
    """``text`` as an absolute path when it names an existing file or folder, else unchanged (a
    Hub id, an embedded name): what a command re-run in another folder (a Ray worker) needs."""
    from pathlib import Path

    return str(Path(text).resolve()) if text and Path(text).exists() else text


def model_argv(args: argparse.Namespace, *, resolve: Callable[[str], str] = local_path) -> list[str]:
    """The options of `add_model_arguments` as a command line, for a stage that re-runs itself
    (a shard, a Ray task): ``--model`` (through ``resolve``: an absolute path when it is one),
    ``--device``, ``--device-map`` when given and ``--trust-remote-code`` when set."""
    placement = getattr(args, "device_map", None)
    if isinstance(placement, dict):
        gpus = {str(d) for d in placement.values() if isinstance(d, int) or str(d).startswith("cuda")}
        if len(gpus) > 1:
            raise AttnlabError(f"--ray gives each worker one GPU, but --device-map spreads the model over {len(gpus)} "
                               "GPUs: run without --ray (launch --shard I/N yourself, one multi-GPU job per shard)")
    argv = ["--model", resolve(args.model), "--device", str(args.device), *device_map_argv(placement)]
    if getattr(args, "trust_remote_code", False):
        argv.append("--trust-remote-code")
    return argv


def add_quiet_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def load_model_from_args(args: argparse.Namespace, **kwargs: Any):
    """`attnlab.models.load_model` with the options of `add_model_arguments`."""
    from attnlab.models import load_model

    if getattr(args, "device_map", None) is not None:  # with a --device other than cpu: one error line
        kwargs["device_map"] = args.device_map
    return load_model(args.model, device=args.device, trust_remote_code=args.trust_remote_code, **kwargs)


class DeprecatedAlias(argparse.Action):
    """An old spelling of an option: stores into the new option's ``dest`` and prints one
    deprecation note naming the new spelling."""

    def __init__(self, option_strings: Sequence[str], dest: str, *, new: str, **kwargs: Any):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string: str | None = None) -> None:
        print(f"note: {option_string} is deprecated here; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


class _AnyWord:
    """The ``choices`` argparse checks for `add_subcommands` with a default: every sub-command's
    name (for help and iteration), and any other word that is not an option, so that an unknown
    first word can go to the default sub-command."""

    def __init__(self, names: dict[str, argparse.ArgumentParser]):
        self._names = names

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and not name.startswith("-")

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class _SubcommandsWithDefault(argparse._SubParsersAction):
    """Sub-commands where a first word that names none of them runs ``default`` with that word
    as its first argument: ``attnlab policy RUN`` is ``attnlab policy make RUN``."""

    def __init__(self, *args: Any, default_command: str, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.default_command = default_command
        self.choices = _AnyWord(self._name_parser_map)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string: str | None = None) -> None:
        if values and values[0] not in self._name_parser_map:
            values = [self.default_command, *values]
        super().__call__(parser, namespace, values, option_string)


def add_subcommands(parser: argparse.ArgumentParser, *, dest: str, default: str | None = None, **kwargs: Any):
    """Real sub-commands under ``parser`` (``attnlab policy compare``). With ``default``, a first
    word that is no sub-command's name is the default sub-command's first argument, so
    ``attnlab policy RUN --budget 0.1`` keeps meaning ``attnlab policy make RUN --budget 0.1``."""
    if default is None:
        return parser.add_subparsers(dest=dest, metavar="COMMAND", **kwargs)
    parser.register("action", "parsers_with_default", _SubcommandsWithDefault)
    return parser.add_subparsers(dest=dest, metavar="COMMAND", action="parsers_with_default", default_command=default, **kwargs)
