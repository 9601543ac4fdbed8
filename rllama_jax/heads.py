"""Small trainable heads on LLM hidden states: state values V(s), action values Q(s, a).

A head is a plain parameter dict; ``hidden=0`` gives a linear head, otherwise a one-hidden-
layer MLP. Heads run in float32 whatever the model's compute dtype.

Input standardisation (``normalize=True``): an LLM's hidden states for prompts that differ in
a few tokens (two Blackjack hands) share most of their vector, so a head on raw features sees
the state only through small differences and policy-gradient learning settles on one action
for every state. A normalising head keeps a per-dimension mean and scale (``in_mean``,
``in_scale``; identity until ``calibrate_head`` sets them from a batch of features) and reads
``(x - in_mean) * in_scale``. Both are constants to the optimiser: gradients never reach them
(Adam's update of a parameter whose gradient is always 0 is exactly 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Params = dict[str, jax.Array]


def init_head(
    key: jax.Array,
    in_dim: int,
    out_dim: int = 1,
    hidden: int = 0,
    normalize: bool = False,
    out_scale: float = 0.0,
) -> Params:
    """Parameters of a head mapping ``[..., in_dim]`` to ``[..., out_dim]``.

    The output layer starts at zero so a fresh value/Q head predicts 0 and does not perturb
    early learning. out_scale > 0 draws it instead from N(0, out_scale^2 / fan_in): heads
    that must differ from the start (SAC's twin critics, whose minimum is only pessimistic
    if they disagree) get independent, still small, outputs. normalize: add the input
    standardisation (see the module docstring).
    """
    k1, k2 = jax.random.split(key)
    fan_in = in_dim if hidden <= 0 else hidden
    w = out_scale * jax.random.normal(k2, (fan_in, out_dim), jnp.float32) / jnp.sqrt(fan_in)
    if hidden <= 0:
        params = {"w": w, "b": jnp.zeros((out_dim,))}
    else:
        params = {
            "w1": jax.random.normal(k1, (in_dim, hidden), jnp.float32) / jnp.sqrt(in_dim),
            "b1": jnp.zeros((hidden,), jnp.float32),
            "w": w,
            "b": jnp.zeros((out_dim,), jnp.float32),
        }
    if normalize:
        params["in_mean"] = jnp.zeros((in_dim,), jnp.float32)
        params["in_scale"] = jnp.ones((in_dim,), jnp.float32)
    return params


def calibrate_head(params: Params, x: jax.Array, mask: jax.Array, rel_eps: float = 1e-2) -> Params:
    """Sets a normalising head's ``in_mean`` / ``in_scale`` from features ``x`` [..., in_dim]
    where ``mask`` [...] is true: the per-dimension mean, and ``1 / sqrt(var + rel_eps *
    mean(var))`` (the floor keeps dimensions that barely vary in the batch from being blown
    up). Raises if the head does not normalise or the mask selects no row."""
    if "in_mean" not in params:
        raise ValueError("calibrate_head needs a head made with init_head(..., normalize=True)")
    x = jnp.asarray(x, jnp.float32).reshape(-1, x.shape[-1])
    w = jnp.asarray(mask, jnp.float32).reshape(-1, 1)
    n = float(w.sum())
    if n < 2:
        raise ValueError(f"calibrate_head needs at least 2 valid rows, got {n:g}")
    mean = (x * w).sum(0) / n
    var = (((x - mean) ** 2) * w).sum(0) / n
    scale = 1.0 / jnp.sqrt(var + rel_eps * var.mean() + 1e-12)
    return {**params, "in_mean": mean, "in_scale": scale}


def apply_head(params: Params, x: jax.Array) -> jax.Array:
    """``[..., in_dim] -> [..., out_dim]`` (float32)."""
    x = x.astype(jnp.float32)
    if "in_mean" in params:
        mean = jax.lax.stop_gradient(params["in_mean"])
        x = (x - mean) * jax.lax.stop_gradient(params["in_scale"])
    if "w1" in params:
        x = jax.nn.gelu(x @ params["w1"] + params["b1"])
    return x @ params["w"] + params["b"]
