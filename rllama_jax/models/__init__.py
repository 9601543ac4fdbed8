"""Llama in JAX: config, forward pass with KV cache, and checkpoint loading."""

from rllama_jax.models.config import LlamaConfig, as_dtype
from rllama_jax.models.errors import (
    CheckpointError,
    CorruptCheckpointError,
    MissingTensorError,
    ModelNotInstalledError,
    ShapeMismatchError,
    UnexpectedTensorError,
    UnsupportedArchitectureError,
)
from rllama_jax.models.llama import (
    NEG_INF,
    KVCache,
    ModelOutput,
    Params,
    embed,
    forward,
    init_cache,
    init_params,
    lm_head,
    param_shapes,
    positions_from_mask,
)
from rllama_jax.models.loading import DEFAULT_MODEL, Pretrained, load_pretrained

__all__ = [
    "DEFAULT_MODEL",
    "NEG_INF",
    "CheckpointError",
    "CorruptCheckpointError",
    "KVCache",
    "LlamaConfig",
    "MissingTensorError",
    "ModelNotInstalledError",
    "ModelOutput",
    "Params",
    "Pretrained",
    "ShapeMismatchError",
    "UnexpectedTensorError",
    "UnsupportedArchitectureError",
    "as_dtype",
    "embed",
    "forward",
    "init_cache",
    "init_params",
    "lm_head",
    "load_pretrained",
    "param_shapes",
    "positions_from_mask",
]
