"""Loading from each source kind, the GQA mapping, the cache, and load errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_ids

from attnlab.errors import ModelLoadError
from attnlab.models import EMBEDDED_MODELS, EMBEDDED_NAME, _embedded_dir, cache_dir, load_model


def save_tiny_llama(directory: Path, seed: int = 0) -> torch.nn.Module:
    """A fresh tiny Llama (GQA) saved as a plain HF directory; returns the HF model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from attnlab.models import _embedded_cache

    tok_dir = _embedded_cache(EMBEDDED_MODELS[EMBEDDED_NAME], verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=8, max_position_embeddings=256)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model


def test_local_directory(tmp_path):
    hf = save_tiny_llama(tmp_path / "tiny")
    m = load_model(tmp_path / "tiny")
    assert m.source == "local"
    assert (m.n_layers, m.n_heads, m.n_kv_heads, m.head_dim, m.n_ctx) == (2, 4, 1, 8, 256)
    assert m.kv_heads().tolist() == [0, 0, 0, 0]
    ids = random_ids(20)
    with torch.no_grad():
        torch.testing.assert_close(m.bridge(ids), hf.eval()(ids).logits, atol=1e-5, rtol=1e-5)


def test_hub_id_resolves_through_a_local_hub_cache(tmp_path):
    """The Hub code path, served by a hub-layout cache folder in offline mode."""
    snapshot = tmp_path / "hub" / "models--attnlab-test--tiny-llama" / "snapshots" / ("0" * 40)
    save_tiny_llama(snapshot)
    refs = snapshot.parent.parent / "refs"
    refs.mkdir()
    (refs / "main").write_text("0" * 40)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    code = "from attnlab.models import load_model; m = load_model('attnlab-test/tiny-llama'); print(m.source, m.n_heads, m.n_kv_heads)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-3:] == ["hub", "4", "1"]


def test_unknown_name_names_the_alternatives():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    code = (
        "from attnlab.models import load_model\n"
        "try:\n    load_model('no-such-org/no-such-model')\n"
        "except Exception as e:\n    print(type(e).__name__, '|', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    line = out.stdout.strip().splitlines()[-1]
    assert line.startswith("ModelLoadError |")
    assert "smollm2-135m" in line and "local Hugging Face directory" in line and ".gguf" in line


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ModelLoadError, match="no such .gguf file"):
        load_model(tmp_path / "missing.gguf")


def test_gguf_of_unsupported_architecture(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "weird.gguf"
    writer = gguf.GGUFWriter(str(path), "frobnicator")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="'frobnicator' is not one transformers can dequantize"):
        load_model(path)
    # nothing half-written in the cache for it
    assert not any("weird" in p.name for p in (cache_dir() / "models").glob("*"))


@pytest.mark.slow
def test_embedded_model_shapes_cache_and_gqa(embedded):
    m = embedded
    assert (m.n_layers, m.n_heads, m.n_kv_heads, m.head_dim, m.n_ctx) == (30, 9, 3, 64, 8192)
    assert [m.kv_head(h) for h in range(9)] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert m.source == "embedded" and m.has_chat_template
    cached = cache_dir() / "models" / EMBEDDED_NAME
    assert (cached / "model.safetensors").is_file()
    config = json.loads((cached / "config.json").read_text())
    assert "quantization_config" not in config
    with pytest.raises(IndexError):
        m.kv_head(9)
    # the model really is SmolLM2: it continues a simple pattern
    ids = m.encode("1, 2, 3, 4, 5,")
    with torch.no_grad():
        for _ in range(3):
            ids = torch.cat([ids, m.bridge(ids)[:, -1:].argmax(-1)], dim=1)
    assert m.tokenizer.decode(ids[0, -3:]).strip().startswith("6")


@pytest.mark.slow
def test_gguf_file_source(embedded):
    gguf_path = _embedded_dir(EMBEDDED_MODELS[EMBEDDED_NAME]) / EMBEDDED_MODELS[EMBEDDED_NAME].gguf_file
    m = load_model(gguf_path, verbose=False)
    assert m.source == "gguf" and m.n_heads == 9
    ids = random_ids(16)
    with torch.no_grad():
        torch.testing.assert_close(m.bridge(ids), embedded.bridge(ids))


def test_forward_with_cache_uses_the_keyword_this_transformers_takes(tiny_llama):
    """One cached step equals the full forward's last row, with no deprecation warning; an
    older forward without ``cache`` gets ``past_key_values``."""
    import warnings

    from transformers import DynamicCache

    from attnlab.attention import route_attention
    from attnlab.models import cache_keyword, forward_with_cache

    ids = random_ids(24)
    with torch.no_grad(), route_attention(tiny_llama):
        full = tiny_llama.hf_model(input_ids=ids, use_cache=False).logits[0, -1]
        cache = DynamicCache(config=tiny_llama.hf_model.config)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            forward_with_cache(tiny_llama.hf_model, ids[:, :-1], cache)
            step = forward_with_cache(tiny_llama.hf_model, ids[:, -1:], cache).logits[0, -1]
    assert cache.get_seq_length() == 24  # the cache was read and extended, not ignored
    assert torch.allclose(step, full, atol=1e-4)

    class OlderForward:  # the signature of a transformers release before the rename
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            return {"past_key_values": past_key_values, "use_cache": use_cache}

        __call__ = forward

    assert cache_keyword(OlderForward()) == "past_key_values"
    assert forward_with_cache(OlderForward(), ids, "C") == {"past_key_values": "C", "use_cache": True}
