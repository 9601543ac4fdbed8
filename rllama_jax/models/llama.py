"""A Llama decoder as pure functions of an explicit parameter pytree.

Parameter tree (layers stacked on a leading axis ``L`` so the decoder is one ``lax.scan``,
which keeps compile time flat in depth; ``unstack_layers`` derives a per-layer form that
decode loops run unrolled, see there)::

    {"embed": [V, D],
     "layers": {"attn_norm": [L, D], "wq": [L, D, H*hd], "wk": [L, D, K*hd],
                "wv": [L, D, K*hd], "wo": [L, H*hd, D], "mlp_norm": [L, D],
                "w_gate": [L, D, F], "w_up": [L, D, F], "w_down": [L, F, D]},
     "final_norm": [D],
     "lm_head": [D, V]}          # absent when the embedding is tied

Matmul weights are stored ``[in, out]`` (a Hugging Face ``nn.Linear`` weight transposed).
RoPE is the half-split ("rotate_half") form used by Hugging Face checkpoints. Padding is on
the left; every call takes explicit positions and a token mask, so a padded row computes
exactly what the unpadded row would.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from rllama_jax.models.config import LlamaConfig, as_dtype

Params = dict[str, Any]

# The one stand-in for minus infinity on masked scores, logits and Q-values, everywhere in
# the library (attention, top-p sampling, invalid actions in the losses). Finite, so a row
# whose entries are all masked gets a uniform softmax instead of NaN and ``0 * NEG_INF``
# stays 0; exp() of it underflows to exactly 0 in float32 and bfloat16; far below any
# realistic logit or Q-value. Masked entries enter only through softmax, max, argmax or a
# zero weight, never squared.
NEG_INF = -1e30


@struct.dataclass
class KVCache:
    """Pre-allocated key/value cache, filled left to right.

    k, v: [L, B, S, K, hd] rotated keys and values (compute dtype); or, in the per-layer
        form that ``unstack_cache`` makes for decode loops, tuples of L arrays [B, K, S, hd].
    mask: [B, S] bool, True where a slot holds a real (non-padding) token.
    index: [] int32, the next slot to write; shared by all rows (rows are left-aligned by
        padding, so they advance together).
    """

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]
    mask: jax.Array
    index: jax.Array

    @property
    def size(self) -> int:
        return self.mask.shape[1]

    @property
    def per_layer(self) -> bool:
        return isinstance(self.k, (list, tuple))


class ModelOutput(NamedTuple):
    """logits: [B, T, V] float32 (None when not requested); hidden: [B, T, D] final-normed
    hidden states (compute dtype); cache: the updated cache (None without one)."""

    logits: jax.Array | None
    hidden: jax.Array
    cache: KVCache | None


def init_cache(config: LlamaConfig, batch: int, size: int, dtype: Any = None) -> KVCache:
    """An empty cache of ``size`` slots for ``batch`` rows."""
    dtype = as_dtype(dtype or config.dtype)
    shape = (config.num_layers, batch, size, config.num_kv_heads, config.head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        mask=jnp.zeros((batch, size), bool),
        index=jnp.zeros((), jnp.int32),
    )


def positions_from_mask(mask: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
    """Positions ``[B, T]`` of a left-padded mask ``[B, T]``: 0, 1, ... over real tokens
    (padding slots get 0), plus ``offset`` ([] or [B]) for tokens that follow a cache."""
    mask = mask.astype(jnp.int32)
    pos = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
    return pos + jnp.asarray(offset, jnp.int32).reshape(-1, 1)


def unstack_layers(params: Params) -> Params:
    """The same parameters with the layer stacks split into a tuple of per-layer trees:
    ``params["layers"][i][name]`` (and ``params["lora"][i]``) instead of ``[name][i]``.

    ``forward`` runs such parameters layer by layer (unrolled) rather than as a scan. For a
    loop of one-token calls (decoding), split once before the loop: inside it, taking a
    layer out of the ``[L, ...]`` stacks copies that layer's weights at every step (XLA:CPU
    materialises the slice before each matmul), which roughly doubles the memory traffic of
    a memory-bound step. The split itself is one copy of the layer weights per call.
    """
    if isinstance(params["layers"], (list, tuple)):
        return params
    n = jax.tree.leaves(params["layers"])[0].shape[0]
    out = {**params, "layers": tuple(_layer_slice(params["layers"], i) for i in range(n))}
    if params.get("lora"):
        out["lora"] = tuple(_layer_slice(params["lora"], i) for i in range(n))
    return out


def unstack_cache(cache: KVCache) -> KVCache:
    """The per-layer form of a stacked cache (see ``KVCache``), for a decode loop: each
    layer's keys and values become their own ``[B, K, S, hd]`` buffer, updated in place by
    every step and laid out as the attention matmuls read them (no per-step slice or
    transpose copies). One copy of the cache per call."""
    if cache.per_layer:
        return cache

    def split(x: jax.Array) -> tuple[jax.Array, ...]:
        return tuple(jnp.swapaxes(x[i], 1, 2) for i in range(x.shape[0]))

    return cache.replace(k=split(cache.k), v=split(cache.v))


def stack_cache(cache: KVCache) -> KVCache:
    """The stacked ``[L, B, S, K, hd]`` form of a cache (inverse of ``unstack_cache``)."""
    if not cache.per_layer:
        return cache

    def join(xs: tuple[jax.Array, ...]) -> jax.Array:
        return jnp.stack([jnp.swapaxes(x, 1, 2) for x in xs])

    return cache.replace(k=join(cache.k), v=join(cache.v))


def _layer_slice(tree: Params, i: int) -> Params:
    return jax.tree.map(lambda w: w[i], tree)


# ---------------------------------------------------------------------------- building blocks
def rope_frequencies(config: LlamaConfig) -> np.ndarray:
    """Inverse frequencies ``[hd // 2]`` with the config's scaling applied (float64 numpy)."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    if config.rope_type == "linear":
        inv_freq = inv_freq / config.rope_factor
    elif config.rope_type == "llama3":
        factor = config.rope_factor
        low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
        old_len = config.rope_original_max_position
        low_freq_wavelen = old_len / low
        high_freq_wavelen = old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(config: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin ``[B, T, hd]`` (float32) for integer positions ``[B, T]``."""
    inv_freq = jnp.asarray(rope_frequencies(config), jnp.float32)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x [B, T, heads, hd]`` by the half-split RoPE; math in float32."""
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, dtype: Any) -> jax.Array:
    """RMSNorm in float32, returned in ``dtype``."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * xf).astype(dtype)


def _dense(x: jax.Array, w: jax.Array, dtype: Any) -> jax.Array:
    return jnp.einsum("...i,io->...o", x, w.astype(dtype))


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    allowed: jax.Array,
    dtype: Any,
    heads_first: bool = False,
) -> jax.Array:
    """Grouped-query attention.

    q: [B, T, H, hd]; k, v: [B, S, K, hd] (or [B, K, S, hd] with ``heads_first``) with H a
    multiple of K; allowed: [B, T, S] bool. Returns [B, T, H, hd]. Scores and softmax are
    float32.
    """
    b, t, h, hd = q.shape
    kv_heads = k.shape[1 if heads_first else 2]
    q = q.reshape(b, t, kv_heads, h // kv_heads, hd)
    kv = "bksd" if heads_first else "bskd"
    scores = jnp.einsum(f"btkgd,{kv}->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(hd)
    scores = jnp.where(allowed[:, None, None, :, :], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum(f"bkgts,{kv}->btkgd", probs, v)
    return out.reshape(b, t, h, hd)


# ---------------------------------------------------------------------------- the model
def embed(params: Params, tokens: jax.Array, config: LlamaConfig) -> jax.Array:
    """Token embeddings ``[B, T, D]`` in the compute dtype."""
    return jnp.take(params["embed"], tokens, axis=0).astype(as_dtype(config.dtype))


def lm_head(params: Params, hidden: jax.Array, config: LlamaConfig) -> jax.Array:
    """Float32 logits ``[..., V]`` from final hidden states ``[..., D]``."""
    dtype = as_dtype(config.dtype)
    w = params["embed"].T if config.tie_word_embeddings else params["lm_head"]
    return jnp.einsum(
        "...d,dv->...v", hidden.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32
    )


def forward(
    params: Params,
    config: LlamaConfig,
    tokens: jax.Array | None,
    positions: jax.Array,
    mask: jax.Array,
    cache: KVCache | None = None,
    *,
    embeds: jax.Array | None = None,
    compute_logits: bool = True,
    block_mask: jax.Array | None = None,
    scan_layers: bool | None = None,
    remat: bool = False,
) -> ModelOutput:
    """Runs the decoder over ``T`` new tokens.

    tokens: [B, T] int ids (or None when ``embeds`` [B, T, D] is given, e.g. soft prompts).
    positions: [B, T] int RoPE positions (see ``positions_from_mask``).
    mask: [B, T] bool/int, 1 for real tokens, 0 for padding.
    cache: if given, the new keys/values are written at slots ``[index, index + T)`` and the
        tokens attend to every valid earlier slot; ``index`` advances by ``T``.
    block_mask: [B, T, T] bool, which new tokens may attend to which new tokens (default:
        causal). Lets several independent continuations of one cached prompt share a call,
        e.g. candidate actions that must not see each other.
    scan_layers: run the layers as a ``lax.scan`` over the stacks (default for stacked
        parameters and cache: compiles once per layer shape, and for prompts and training
        it is as fast as unrolling) or as an unrolled Python loop (``False``; what the
        per-layer forms from ``unstack_layers`` / ``unstack_cache`` always use). Measured
        choices: BENCHMARKS.md, "Generation and scoring".
    remat: rematerialise each layer under differentiation (``jax.checkpoint`` on the scanned
        layer body): the backward pass keeps only every layer's input ``[B, T, D]`` (and its
        slice of the cache) and recomputes the layer's intermediates (attention scores, MLP
        activations) one layer at a time, for about one more forward pass of compute. The
        cache then travels as per-layer scan inputs/outputs instead of the scan carry, so
        the saved inputs hold one layer's slice, not the whole ``[L, ...]`` stack. Same
        values as ``remat=False``; for training (the train step's loss), never for acting.
        Needs the scan (stacked parameters and cache).

    ``params`` may carry low-rank adapters (see ``models.lora``): ``params["lora"] =
    {target: {"a": [L, in, r], "b": [L, r, out]}}`` and a scalar ``params["lora_scale"]``;
    each adds ``scale * (x @ a) @ b`` to that projection. They stay factored so that
    differentiating only the adapters never forms a full-size weight gradient.
    Returns logits [B, T, V] (float32; skipped with ``compute_logits=False``), the final
    hidden states [B, T, D] and the updated cache.
    """
    dtype = as_dtype(config.dtype)
    h = embed(params, tokens, config) if embeds is None else embeds.astype(dtype)
    b, t, _ = h.shape
    mask = mask.astype(bool)
    cos, sin = rope_cos_sin(config, positions)
    nh, nk, hd = config.num_heads, config.num_kv_heads, config.head_dim

    within = jnp.tril(jnp.ones((1, t, t), bool)) if block_mask is None else block_mask
    within = within & mask[:, None, :]
    if cache is None:
        allowed = within
        kv_mask, index = None, None
    else:
        index = cache.index
        kv_mask = jax.lax.dynamic_update_slice(cache.mask, mask, (0, index))
        earlier = (jnp.arange(cache.size) < index)[None, None, :] & cache.mask[:, None, :]
        # Slots [index, index + T) follow the block mask; later slots are still empty.
        padded = jnp.zeros((within.shape[0], t, cache.size), bool)
        allowed = earlier | jax.lax.dynamic_update_slice(padded, within, (0, 0, index))

    lora = params.get("lora") or {}
    lora_scale = params.get("lora_scale", 1.0)
    per_layer = isinstance(params["layers"], (list, tuple))
    per_layer_cache = cache is not None and cache.per_layer
    use_scan = not (per_layer or per_layer_cache) if scan_layers is None else scan_layers
    if use_scan and (per_layer or per_layer_cache):
        raise ValueError("scan_layers=True needs stacked layers and a stacked cache")
    if remat and not use_scan:
        raise ValueError("remat=True runs the layers as a scan: stacked layers and cache")

    def layer(x, p, lp, write_kv):
        """One decoder layer on x [B, T, D]. ``write_kv(k, v)`` (None without a cache) stores
        the new keys/values [B, T, K, hd] and returns (keys, values, heads_first, state):
        everything this layer attends to and the updated cache state, which is returned."""

        def proj(name: str, inp: jax.Array) -> jax.Array:
            out = _dense(inp, p[name], dtype)
            if name in lp:
                low = _dense(inp, lp[name]["a"], dtype)
                out = out + (lora_scale * _dense(low, lp[name]["b"], dtype)).astype(out.dtype)
            return out

        y = rms_norm(x, p["attn_norm"], config.rms_norm_eps, dtype)
        q = apply_rope(proj("wq", y).reshape(b, t, nh, hd), cos, sin)
        k = apply_rope(proj("wk", y).reshape(b, t, nk, hd), cos, sin)
        v = proj("wv", y).reshape(b, t, nk, hd)
        heads_first, state = False, None
        if write_kv is not None:
            k, v, heads_first, state = write_kv(k, v)
        attn = attention(q, k, v, allowed, dtype, heads_first).reshape(b, t, nh * hd)
        x = x + proj("wo", attn)
        y = rms_norm(x, p["mlp_norm"], config.rms_norm_eps, dtype)
        gated = jax.nn.silu(proj("w_gate", y)) * proj("w_up", y)
        x = x + proj("w_down", gated)
        return x, state

    def write_stacked(k_all, v_all, li):
        """Writes into the [L, B, S, K, hd] stacks in place; reads layer ``li`` back."""

        def write(k, v):
            at = (li, 0, index, 0, 0)
            k_all2 = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), at)
            v_all2 = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), at)
            k_l = jax.lax.dynamic_index_in_dim(k_all2, li, 0, keepdims=False).astype(dtype)
            v_l = jax.lax.dynamic_index_in_dim(v_all2, li, 0, keepdims=False).astype(dtype)
            return k_l, v_l, False, (k_all2, v_all2)

        return write

    def write_layer(k_l, v_l):
        """Writes into one layer's own [B, K, S, hd] buffers (a per-layer cache)."""

        def write(k, v):
            at = (0, 0, index, 0)
            k_l2 = jax.lax.dynamic_update_slice(k_l, jnp.swapaxes(k, 1, 2).astype(k_l.dtype), at)
            v_l2 = jax.lax.dynamic_update_slice(v_l, jnp.swapaxes(v, 1, 2).astype(v_l.dtype), at)
            return k_l2.astype(dtype), v_l2.astype(dtype), True, (k_l2, v_l2)

        return write

    def write_slice(k_l, v_l):
        """Writes into one layer's [B, S, K, hd] slice of the stacks (a scan input)."""

        def write(k, v):
            at = (0, index, 0, 0)
            k_l2 = jax.lax.dynamic_update_slice(k_l, k.astype(k_l.dtype), at)
            v_l2 = jax.lax.dynamic_update_slice(v_l, v.astype(v_l.dtype), at)
            return k_l2.astype(dtype), v_l2.astype(dtype), False, (k_l2, v_l2)

        return write

    k_all, v_all = (None, None) if cache is None else (cache.k, cache.v)
    if use_scan and remat:
        # Each layer's slice of the cache is a scan input and its updated slice an output:
        # what jax.checkpoint saves per layer is then x and that slice, not the whole stack
        # (carried, the stack would be saved once per layer: L^2 cache copies).
        def remat_step(x, xs):
            p, lp, k_l, v_l = xs
            write = None if k_l is None else write_slice(k_l, v_l)
            return layer(x, p, lp, write)

        remat_step = jax.checkpoint(remat_step, prevent_cse=False)
        xs = (params["layers"], lora, k_all, v_all)
        h, new_kv = jax.lax.scan(remat_step, h, xs)
        if cache is not None:
            k_all, v_all = new_kv
    elif use_scan:
        # Stacked weights and cache: one scan step per layer, the whole cache carried.
        def step(carry, xs):
            x, k_all, v_all = carry
            p, lp, li = xs
            write = None if k_all is None else write_stacked(k_all, v_all, li)
            x, state = layer(x, p, lp, write)
            return (x, *(state or (None, None))), None

        xs = (params["layers"], lora, jnp.arange(config.num_layers))
        (h, k_all, v_all), _ = jax.lax.scan(step, (h, k_all, v_all), xs)
    else:
        # Unrolled: each layer's weights are separate arrays (``unstack_layers``) or static
        # slices of the stacks; a per-layer cache gives each layer its own buffers.
        ks, vs = [], []
        for i in range(config.num_layers):
            p = params["layers"][i] if per_layer else _layer_slice(params["layers"], i)
            lp = (lora[i] if per_layer else _layer_slice(lora, i)) if lora else {}
            if cache is None:
                write = None
            elif per_layer_cache:
                write = write_layer(cache.k[i], cache.v[i])
            else:
                write = write_stacked(k_all, v_all, i)
            h, state = layer(h, p, lp, write)
            if per_layer_cache:
                ks.append(state[0])
                vs.append(state[1])
            elif cache is not None:
                k_all, v_all = state
        if per_layer_cache:
            k_all, v_all = tuple(ks), tuple(vs)
    h = rms_norm(h, params["final_norm"], config.rms_norm_eps, dtype)
    logits = lm_head(params, h, config) if compute_logits else None
    new_cache = None
    if cache is not None:
        new_cache = KVCache(k=k_all, v=v_all, mask=kv_mask, index=index + t)
    return ModelOutput(logits=logits, hidden=h, cache=new_cache)


# ---------------------------------------------------------------------------- parameters
def param_shapes(config: LlamaConfig) -> Params:
    """The shape of every parameter (a tree of tuples mirroring the parameter tree)."""
    d, f, hd, n_layers = (
        config.hidden_size,
        config.intermediate_size,
        config.head_dim,
        config.num_layers,
    )
    shapes: Params = {
        "embed": (config.vocab_size, d),
        "layers": {
            "attn_norm": (n_layers, d),
            "wq": (n_layers, d, config.num_heads * hd),
            "wk": (n_layers, d, config.num_kv_heads * hd),
            "wv": (n_layers, d, config.num_kv_heads * hd),
            "wo": (n_layers, config.num_heads * hd, d),
            "mlp_norm": (n_layers, d),
            "w_gate": (n_layers, d, f),
            "w_up": (n_layers, d, f),
            "w_down": (n_layers, f, d),
        },
        "final_norm": (d,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head"] = (d, config.vocab_size)
    return shapes


def init_params(config: LlamaConfig, key: jax.Array, std: float = 0.02) -> Params:
    """Random parameters (normal(0, std) matrices, unit norms) in ``config.param_dtype``."""
    dtype = as_dtype(config.param_dtype)
    shapes = param_shapes(config)
    leaves, treedef = jax.tree_util.tree_flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
    paths = [
        jax.tree_util.keystr(p)
        for p, _ in jax.tree_util.tree_flatten_with_path(
            shapes, is_leaf=lambda s: isinstance(s, tuple)
        )[0]
    ]
    keys = jax.random.split(key, len(leaves))
    out = []
    for path, shape, k in zip(paths, leaves, keys, strict=True):
        if "norm" in path:
            out.append(jnp.ones(shape, dtype))
        else:
            out.append((std * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, out)
