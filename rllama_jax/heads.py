"""Small trainable heads on LLM hidden states: state values V(s), action values Q(s, a).

A head is a plain parameter dict; ``hidden=0`` gives a linear head, otherwise a one-hidden-
layer MLP. Heads run in float32 whatever the model's compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Params = dict[str, jax.Array]


def init_head(key: jax.Array, in_dim: int, out_dim: int = 1, hidden: int = 0) -> Params:
    """Parameters of a head mapping ``[..., in_dim]`` to ``[..., out_dim]``.

    The output layer starts at zero so a fresh value/Q head predicts 0 and does not perturb
    early learning.
    """
    if hidden <= 0:
        return {"w": jnp.zeros((in_dim, out_dim), jnp.float32), "b": jnp.zeros((out_dim,))}
    k1, _ = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (in_dim, hidden), jnp.float32) / jnp.sqrt(in_dim),
        "b1": jnp.zeros((hidden,), jnp.float32),
        "w": jnp.zeros((hidden, out_dim), jnp.float32),
        "b": jnp.zeros((out_dim,), jnp.float32),
    }


def apply_head(params: Params, x: jax.Array) -> jax.Array:
    """``[..., in_dim] -> [..., out_dim]`` (float32)."""
    x = x.astype(jnp.float32)
    if "w1" in params:
        x = jax.nn.gelu(x @ params["w1"] + params["b1"])
    return x @ params["w"] + params["b"]
