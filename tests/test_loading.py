"""Checkpoint loading: HF directories (single and sharded), the hub cache, GGUF, the embedded
default, and a documented error for each kind of bad input."""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from rllama_jax.models import (
    CorruptCheckpointError,
    MissingTensorError,
    ShapeMismatchError,
    UnexpectedTensorError,
    UnsupportedArchitectureError,
    forward,
    load_pretrained,
    positions_from_mask,
)
from rllama_jax.models.gguf_format import unpermute_rows


def _logits(config, params, tokens):
    mask = np.ones_like(tokens)
    return np.asarray(forward(params, config, tokens, positions_from_mask(mask), mask).logits)


TOKENS = np.arange(3, 23, dtype=np.int32)[None]


def _rewrite(path, fn):
    """Loads model.safetensors, applies fn(dict) -> dict, writes it back."""
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    save_file(fn(dict(tensors)), file)


def test_sharded_index_loads_same_as_single_file(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint()
    config, params, _ = load_pretrained(path, tokenizer=False)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    names = sorted(tensors)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(os.path.join(path, "config.json"), sharded / "config.json")
    weight_map = {}
    for i, chunk in enumerate((names[::2], names[1::2])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in chunk}, str(sharded / fname))
        weight_map.update({n: fname for n in chunk})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config2, params2, _ = load_pretrained(str(sharded), tokenizer=False)
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_hub_id_through_prefilled_offline_cache(tiny_checkpoint, tmp_path, monkeypatch):
    """A hub id resolves through huggingface_hub's cache layout with HF_HUB_OFFLINE=1."""
    path, _ = tiny_checkpoint()
    hub = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = hub / "models--tiny-org--tiny-llama" / "snapshots" / commit
    shutil.copytree(path, snap)
    refs = hub / "models--tiny-org--tiny-llama" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    config, params, _ = load_pretrained("tiny-org/tiny-llama", tokenizer=False)
    ref_config, ref_params, _ = load_pretrained(path, tokenizer=False)
    assert config == ref_config
    np.testing.assert_array_equal(
        _logits(config, params, TOKENS), _logits(ref_config, ref_params, TOKENS)
    )
    with pytest.raises(FileNotFoundError, match="not-there/missing"):
        load_pretrained("not-there/missing", tokenizer=False)


def test_unpermute_inverts_llama_cpp_permutation():
    rng = np.random.default_rng(0)
    n_heads, hd, d_in = 3, 8, 5
    w = rng.normal(size=(n_heads * hd, d_in))
    # llama.cpp's converter: per head, rows (half, pair) are reordered to (pair, half).
    permuted = w.reshape(n_heads, 2, hd // 2, d_in).swapaxes(1, 2).reshape(w.shape)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(unpermute_rows(permuted, n_heads), w)


# ---------------------------------------------------------------------------- bad input
def test_missing_tensor(tiny_checkpoint):
    path, _ = tiny_checkpoint()
    _rewrite(
        path, lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"}
    )
    with pytest.raises(MissingTensorError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_pretrained(path, tokenizer=False)


def test_unexpected_tensor(tiny_checkpoint):
    path, _ = tiny_checkpoint()
    _rewrite(
        path,
        lambda t: {
            **t,
            "model.layers.2.mlp.up_proj.weight": t["model.layers.1.mlp.up_proj.weight"],
        },
    )
    with pytest.raises(UnexpectedTensorError, match=r"model\.layers\.2\.mlp\.up_proj\.weight"):
        load_pretrained(path, tokenizer=False)


def test_shape_mismatch_names_tensor_and_both_shapes(tiny_checkpoint):
    path, _ = tiny_checkpoint()
    name = "model.layers.0.self_attn.k_proj.weight"
    _rewrite(path, lambda t: {**t, name: np.zeros((16, 64), np.float32)})
    with pytest.raises(ShapeMismatchError, match=r"k_proj\.weight.*\(16, 64\).*\(32, 64\)"):
        load_pretrained(path, tokenizer=False)


def test_unsupported_architecture(tiny_checkpoint):
    path, _ = tiny_checkpoint()
    cfg_file = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_file))
    cfg.update(model_type="mistral", architectures=["MistralForCausalLM"])
    json.dump(cfg, open(cfg_file, "w"))
    with pytest.raises(UnsupportedArchitectureError, match="MistralForCausalLM"):
        load_pretrained(path, tokenizer=False)


def test_corrupt_safetensors(tiny_checkpoint):
    path, _ = tiny_checkpoint()
    file = os.path.join(path, "model.safetensors")
    data = open(file, "rb").read()
    open(file, "wb").write(data[: len(data) // 2])  # truncated download
    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
        load_pretrained(path, tokenizer=False)


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"NOTAGGUF" + bytes(100))
    with pytest.raises(CorruptCheckpointError, match="broken.gguf"):
        load_pretrained(str(bad), tokenizer=False)


def test_missing_shard(tiny_checkpoint):
    path, _ = tiny_checkpoint()
    names = list(load_file(os.path.join(path, "model.safetensors")))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {n: "model-00002-of-00002.safetensors" for n in names}}, f)
    with pytest.raises(CorruptCheckpointError, match="model-00002-of-00002"):
        load_pretrained(path, tokenizer=False)


def test_not_a_path_nor_hub_id():
    with pytest.raises(FileNotFoundError, match="not an existing directory"):
        load_pretrained("/definitely/not/here", tokenizer=False)
