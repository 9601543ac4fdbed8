"""Mixed precision for accelerators: bfloat16 compute, float32 master weights and optimizer.

``precision="bf16"`` changes two things and nothing else:

* the model runs with compute dtype bfloat16 (``compute_config``): every matmul casts its
  weight to bfloat16 where it is used, so the forward and backward passes run on a bfloat16
  copy while the trainable parameters the optimizer updates stay float32 (their gradients
  come back through the cast as float32). RMSNorm, RoPE, softmax, logits, log-probs, heads
  and losses stay float32 as always;
* ``apply_precision`` stores the frozen weights (a LoRA base, the KL reference) in bfloat16
  (they never update, so they need no float32 master) and makes sure the trainable
  parameters, their DQN/SAC target copies and the optimizer state are float32.

``precision="fp32"`` leaves both untouched.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from rllama_jax.models import LlamaConfig
from rllama_jax.train import TrainState

PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> str:
    """Returns ``precision`` if it is one of ``PRECISIONS``, else raises ``ValueError``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}")
    return precision


def compute_config(model_config: LlamaConfig, precision: str) -> LlamaConfig:
    """The model config to compile with: bfloat16 matmuls for ``"bf16"``, as is for ``"fp32"``."""
    if check_precision(precision) == "bf16":
        return model_config.replace(dtype="bfloat16")
    return model_config


def _cast_floats(tree: Any, dtype: Any) -> Any:
    def cast(x: Any) -> Any:
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype:
            return x.astype(dtype)
        return x

    return jax.tree.map(cast, tree)


def apply_precision(state: TrainState, precision: str) -> TrainState:
    """``state`` with the storage dtypes ``precision`` asks for (see the module docstring):
    for ``"bf16"``, frozen weights bfloat16; trainable, target and optimizer state float32."""
    if check_precision(precision) == "fp32":
        return state
    return state.replace(
        frozen=_cast_floats(state.frozen, jnp.bfloat16),
        trainable=_cast_floats(state.trainable, jnp.float32),
        target=_cast_floats(state.target, jnp.float32),
        opt_state=_cast_floats(state.opt_state, jnp.float32),
    )
