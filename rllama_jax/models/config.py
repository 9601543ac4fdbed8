"""Llama architecture hyper-parameters, read from Hugging Face ``config.json`` files.

Both layouts of the rope settings are understood: transformers 4 writes ``rope_theta`` and
``rope_scaling`` at the top level, transformers 5 nests them in ``rope_parameters``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

from rllama_jax.models.errors import UnsupportedArchitectureError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")

_DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}


def as_dtype(name: str | Any) -> Any:
    """Maps ``"float32"`` / ``"bfloat16"`` / ``"float16"`` (or a dtype) to a jnp dtype."""
    if isinstance(name, str):
        if name not in _DTYPES:
            raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}")
        return _DTYPES[name]
    return jnp.dtype(name).type


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Static shape and numerics of a Llama model (hashable: usable as a jit static arg).

    ``param_dtype`` is the storage dtype of the weights, ``dtype`` the compute dtype of
    matmuls; RMSNorm, RoPE, softmax and the final logits are always float32.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    param_dtype: str = "float32"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedArchitectureError(
                f"rope scaling type {self.rope_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        as_dtype(self.param_dtype)
        as_dtype(self.dtype)

    @property
    def groups(self) -> int:
        """Query heads per key/value head (1 for multi-head attention)."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes: Any) -> LlamaConfig:
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Number of weights, counting a tied embedding once."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
        layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.num_layers * layer + d + head

    def flops_per_token(self, context: int = 0) -> float:
        """Forward matmul FLOPs per token (2 per multiply-add), attending to ``context`` keys.

        Counts the projections, the MLP, the LM head and the two attention matmuls; the
        embedding lookup and the norms are not matmuls.
        """
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        proj = d * hd * (self.num_heads * 2 + self.num_kv_heads * 2) + 3 * d * f
        attn = 2 * self.num_heads * hd * context
        return 2.0 * (self.num_layers * (proj + attn) + d * self.vocab_size)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], **overrides: Any) -> LlamaConfig:
        """Builds a config from the dict of a Hugging Face Llama ``config.json``."""
        archs = cfg.get("architectures") or ["LlamaForCausalLM"]
        model_type = cfg.get("model_type", "llama")
        if model_type != "llama" or not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise UnsupportedArchitectureError(
                f"unsupported architecture: model_type={model_type!r}, architectures={archs}; "
                f"rllama_jax loads {', '.join(SUPPORTED_ARCHITECTURES)} (model_type 'llama')"
            )
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                raise UnsupportedArchitectureError(
                    f"Llama variant with {flag}=True is not supported"
                )
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedArchitectureError(f"hidden_act={act!r} is not supported (only 'silu')")

        rope = dict(cfg.get("rope_parameters") or {})
        if not rope:
            rope = dict(cfg.get("rope_scaling") or {})
            if "rope_theta" in cfg:
                rope["rope_theta"] = cfg["rope_theta"]
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        num_heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        head_dim = cfg.get("head_dim") or hidden // num_heads
        kwargs: dict[str, Any] = dict(
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            rope_type=rope_type,
            rope_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_position=int(
                rope.get(
                    "original_max_position_embeddings", cfg.get("max_position_embeddings", 2048)
                )
            ),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=_as_hashable(cfg.get("eos_token_id")),
            pad_token_id=cfg.get("pad_token_id"),
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | os.PathLike, **overrides: Any) -> LlamaConfig:
        """Reads ``config.json`` (a file, or a directory holding one)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path, encoding="utf-8") as f:
            return cls.from_hf_dict(json.load(f), **overrides)

    def to_hf_dict(self) -> dict[str, Any]:
        """The transformers-5 ``config.json`` dict describing this architecture."""
        rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type == "llama3":
            rope.update(
                factor=self.rope_factor,
                low_freq_factor=self.rope_low_freq_factor,
                high_freq_factor=self.rope_high_freq_factor,
                original_max_position_embeddings=self.rope_original_max_position,
            )
        elif self.rope_type == "linear":
            rope.update(factor=self.rope_factor)
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": "float32",
        }


def _as_hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value
