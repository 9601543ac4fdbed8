"""Low-rank adapters (LoRA, Hu et al. 2021) on the attention and MLP projections.

Adapters are a separate pytree ``{target: {"a": [L, in, r], "b": [L, r, out]}}``; the base
weights stay frozen and outside the optimizer. ``with_lora`` attaches them to the base tree
so every model call (forward, generate, scoring) runs the adapted model. ``b`` starts at zero so a fresh adapter leaves
the model unchanged; the update is scaled by ``alpha / rank``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from rllama_jax.models.config import LlamaConfig
from rllama_jax.models.llama import Params, param_shapes

LORA_TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha (scale = alpha / r) and which projections get adapters."""

    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = ("wq", "wk", "wv", "wo")

    def __post_init__(self) -> None:
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown:
            raise ValueError(f"unknown LoRA targets {unknown}; choose from {LORA_TARGETS}")
        if self.rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {self.rank}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def init_lora(key: jax.Array, config: LlamaConfig, lora: LoraConfig) -> Params:
    """Fresh adapters: ``a`` ~ N(0, 1/in) (Kaiming-like), ``b`` = 0."""
    shapes = param_shapes(config)["layers"]
    out = {}
    for target, k in zip(lora.targets, jax.random.split(key, len(lora.targets)), strict=True):
        n_layers, d_in, d_out = shapes[target]
        a = jax.random.normal(k, (n_layers, d_in, lora.rank), jnp.float32) / jnp.sqrt(d_in)
        out[target] = {"a": a, "b": jnp.zeros((n_layers, lora.rank, d_out), jnp.float32)}
    return out


def with_lora(params: Params, adapters: Params, lora: LoraConfig) -> Params:
    """Base parameters carrying adapters, as ``forward`` (and everything built on it) reads
    them: the adapters stay factored and differentiable."""
    return {**params, "lora": adapters, "lora_scale": jnp.asarray(lora.scale, jnp.float32)}


def merge_lora(params: Params, adapters: Params, lora: LoraConfig) -> Params:
    """Base parameters with each adapter folded in: ``W + scale * a @ b`` (for export or
    faster acting; training keeps them factored)."""
    layers = dict(params["layers"])
    for target, ab in adapters.items():
        w = layers[target]
        delta = jnp.einsum("lir,lro->lio", ab["a"], ab["b"]) * lora.scale
        layers[target] = (w.astype(jnp.float32) + delta).astype(w.dtype)
    return {**params, "layers": layers}
