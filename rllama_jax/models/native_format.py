"""Our own on-disk layout: the parameter tree as it is in memory, in one safetensors file.

Tensor names are the tree paths (``layers/wq``); nothing is transposed or stacked at load
time, and the file is memory-mapped, so loading costs one copy of the weights.
"""

from __future__ import annotations

import json
import os
import struct

import jax
import numpy as np

from rllama_jax.models.config import LlamaConfig
from rllama_jax.models.errors import (
    CorruptCheckpointError,
    MissingTensorError,
    ShapeMismatchError,
    UnexpectedTensorError,
)
from rllama_jax.models.llama import Params, param_shapes

NATIVE_FILE = "rllama_jax_params.safetensors"
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "I32": np.int32}


def _flat_names(tree: Params) -> dict[str, object]:
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, tuple))[0]
    return {"/".join(str(k.key) for k in path): leaf for path, leaf in flat}


def save_native(path: str, params: Params, config: LlamaConfig) -> None:
    """Writes ``config.json`` and the parameter tree (as stored) into directory ``path``."""
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config.to_hf_dict(), f, indent=2)
    tensors = {k: np.ascontiguousarray(np.asarray(v)) for k, v in _flat_names(params).items()}
    save_file(tensors, os.path.join(path, NATIVE_FILE))


def _mmap_safetensors(file: str) -> dict[str, np.ndarray]:
    """Memory-maps every tensor of a safetensors file (read-only numpy views)."""
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError("header length beyond end of file")
            header = json.loads(f.read(header_len))
        data = np.memmap(file, dtype=np.uint8, mode="r", offset=8 + header_len)
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] == "BF16":
                import ml_dtypes

                dt = np.dtype(ml_dtypes.bfloat16)
            else:
                dt = np.dtype(_ST_DTYPES[info["dtype"]])
            start, end = info["data_offsets"]
            if end > data.size or end - start != dt.itemsize * int(np.prod(info["shape"])):
                raise ValueError(f"tensor {name!r} extends past the end of the file")
            out[name] = data[start:end].view(dt).reshape(info["shape"])
        return out
    except (OSError, ValueError, KeyError, struct.error, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"{file}: unreadable safetensors file ({e})") from e


def load_native(path: str, config: LlamaConfig, dtype=np.float32) -> Params:
    """Reads a directory written by ``save_native`` (strict: names and shapes checked)."""
    file = os.path.join(path, NATIVE_FILE)
    tensors = _mmap_safetensors(file)
    expected = _flat_names(param_shapes(config))
    for name, shape in expected.items():
        if name not in tensors:
            raise MissingTensorError(f"{file}: missing tensor {name!r}")
        if tuple(tensors[name].shape) != tuple(shape):
            raise ShapeMismatchError(
                f"{file}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                f"expected {tuple(shape)} from the config"
            )
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise UnexpectedTensorError(f"{file}: unexpected tensor {extra[0]!r}")
    flat = {k: (v if v.dtype == dtype else v.astype(dtype)) for k, v in tensors.items()}
    tree: Params = {}
    for name, arr in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = arr
    return tree
