"""Conversion between Hugging Face Llama tensor names/layouts and our parameter tree.

The conversion is strict: every tensor the architecture needs must be present with the shape
the config implies, and every tensor in the checkpoint must be used. Anything else raises a
``CheckpointError`` subclass naming the tensor.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping

import numpy as np

from rllama_jax.models.config import LlamaConfig
from rllama_jax.models.errors import (
    CorruptCheckpointError,
    MissingTensorError,
    ShapeMismatchError,
    UnexpectedTensorError,
)
from rllama_jax.models.llama import Params

# (our layer key, HF suffix, is a Linear weight stored [out, in])
_LAYER_TENSORS = (
    ("attn_norm", "input_layernorm.weight", False),
    ("wq", "self_attn.q_proj.weight", True),
    ("wk", "self_attn.k_proj.weight", True),
    ("wv", "self_attn.v_proj.weight", True),
    ("wo", "self_attn.o_proj.weight", True),
    ("mlp_norm", "post_attention_layernorm.weight", False),
    ("w_gate", "mlp.gate_proj.weight", True),
    ("w_up", "mlp.up_proj.weight", True),
    ("w_down", "mlp.down_proj.weight", True),
)
# Non-parameter buffers some older checkpoints carry; they are recomputed, never loaded.
_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def expected_hf_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> HF shape for every tensor the config's model needs."""
    d, f, hd = config.hidden_size, config.intermediate_size, config.head_dim
    per_layer = {
        "input_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (config.num_heads * hd, d),
        "self_attn.k_proj.weight": (config.num_kv_heads * hd, d),
        "self_attn.v_proj.weight": (config.num_kv_heads * hd, d),
        "self_attn.o_proj.weight": (d, config.num_heads * hd),
        "post_attention_layernorm.weight": (d,),
        "mlp.gate_proj.weight": (f, d),
        "mlp.up_proj.weight": (f, d),
        "mlp.down_proj.weight": (d, f),
    }
    shapes = {"model.embed_tokens.weight": (config.vocab_size, d), "model.norm.weight": (d,)}
    for i in range(config.num_layers):
        for suffix, shape in per_layer.items():
            shapes[f"model.layers.{i}.{suffix}"] = shape
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, d)
    return shapes


def params_from_hf(
    get_tensor: Callable[[str], np.ndarray],
    names: list[str],
    config: LlamaConfig,
    dtype: np.dtype | type = np.float32,
    source: str = "checkpoint",
) -> Params:
    """Builds our parameter tree (numpy, ``dtype``) from HF-named tensors.

    get_tensor: reads one tensor by name (lazily, so shards are read one tensor at a time).
    names: every tensor name the checkpoint holds.
    """
    expected = expected_hf_shapes(config)
    present = set(names)
    missing = [n for n in expected if n not in present]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MissingTensorError(f"{source}: missing tensor {missing[0]!r}{more}")
    tied_head = config.tie_word_embeddings and "lm_head.weight" in present
    unexpected = [
        n
        for n in names
        if n not in expected and not _IGNORED.match(n) and not (tied_head and n == "lm_head.weight")
    ]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise UnexpectedTensorError(
            f"{source}: unexpected tensor {unexpected[0]!r}{more} for a Llama with "
            f"{config.num_layers} layers, tie_word_embeddings={config.tie_word_embeddings}"
        )

    def read(name: str) -> np.ndarray:
        arr = np.asarray(get_tensor(name))
        if tuple(arr.shape) != expected[name]:
            raise ShapeMismatchError(
                f"{source}: tensor {name!r} has shape {tuple(arr.shape)}, "
                f"expected {expected[name]} from the config"
            )
        return arr.astype(dtype, copy=False)

    layers = {}
    for key, suffix, is_linear in _LAYER_TENSORS:
        stacked = []
        for i in range(config.num_layers):
            arr = read(f"model.layers.{i}.{suffix}")
            stacked.append(arr.T if is_linear else arr)
        layers[key] = np.stack(stacked)
    params: Params = {
        "embed": read("model.embed_tokens.weight"),
        "layers": layers,
        "final_norm": read("model.norm.weight"),
    }
    if tied_head:
        head = read("lm_head.weight")
        if not np.array_equal(head, params["embed"]):
            raise UnexpectedTensorError(
                f"{source}: 'lm_head.weight' differs from the embedding although the config "
                "says tie_word_embeddings=True"
            )
    if not config.tie_word_embeddings:
        params["lm_head"] = np.ascontiguousarray(read("lm_head.weight").T)
    return params


def params_to_hf(params: Params, config: LlamaConfig) -> dict[str, np.ndarray]:
    """The inverse of ``params_from_hf``: HF-named float32 numpy tensors."""
    out = {
        "model.embed_tokens.weight": np.asarray(params["embed"], np.float32),
        "model.norm.weight": np.asarray(params["final_norm"], np.float32),
    }
    for key, suffix, is_linear in _LAYER_TENSORS:
        stacked = np.asarray(params["layers"][key], np.float32)
        for i in range(config.num_layers):
            arr = stacked[i].T if is_linear else stacked[i]
            out[f"model.layers.{i}.{suffix}"] = np.ascontiguousarray(arr)
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = np.ascontiguousarray(np.asarray(params["lm_head"], np.float32).T)
    return out


# ---------------------------------------------------------------------------- safetensors
def read_safetensors_dir(path: str, config: LlamaConfig, dtype=np.float32) -> Params:
    """Loads ``model.safetensors`` or the shards of ``model.safetensors.index.json``."""
    from safetensors import SafetensorError, safe_open

    index_path = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map: Mapping[str, str] = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CorruptCheckpointError(
                f"{index_path}: not a valid safetensors index ({e})"
            ) from e
        files = sorted(set(weight_map.values()))
        for shard in files:
            if not os.path.exists(os.path.join(path, shard)):
                raise CorruptCheckpointError(f"{index_path}: shard file {shard!r} does not exist")
        name_to_file = dict(weight_map)
    elif os.path.exists(single):
        files = ["model.safetensors"]
        name_to_file = None
    else:
        raise CorruptCheckpointError(
            f"{path}: no model.safetensors or model.safetensors.index.json found"
        )

    handles = {}
    try:
        for fname in files:
            full = os.path.join(path, fname)
            try:
                handles[fname] = safe_open(full, framework="numpy")
            except (SafetensorError, OSError, ValueError) as e:
                raise CorruptCheckpointError(f"{full}: unreadable safetensors file ({e})") from e
        if name_to_file is None:
            name_to_file = {n: files[0] for n in handles[files[0]].keys()}
        else:
            for fname, h in handles.items():
                listed = {n for n, f in name_to_file.items() if f == fname}
                actual = set(h.keys())
                if listed - actual:
                    raise CorruptCheckpointError(
                        f"{os.path.join(path, fname)}: index lists tensor "
                        f"{sorted(listed - actual)[0]!r} which the shard does not hold"
                    )
                for n in actual - listed:
                    name_to_file[n] = fname

        def get(name: str) -> np.ndarray:
            fname = name_to_file[name]
            try:
                return handles[fname].get_tensor(name)
            except (SafetensorError, OSError, ValueError) as e:
                full = os.path.join(path, fname)
                raise CorruptCheckpointError(f"{full}: cannot read tensor {name!r} ({e})") from e

        return params_from_hf(get, list(name_to_file), config, dtype=dtype, source=path)
    finally:
        handles.clear()


def write_safetensors_dir(path: str, params: Params, config: LlamaConfig) -> None:
    """Writes ``config.json`` and ``model.safetensors`` in Hugging Face layout."""
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config.to_hf_dict(), f, indent=2)
    save_file(params_to_hf(params, config), os.path.join(path, "model.safetensors"))
