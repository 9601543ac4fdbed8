"""Batched, jitted acting: text generation with log-probs, candidate-action scoring, and a
shared-prefix KV cache.

Every function here is one compiled call for all environments at once. Sampling settings are
static (a hashable ``SamplingConfig``): they are fixed for a run, and being static lets the
compiler drop whatever a setting switches off (no top-k search when top-k and top-p are off,
no random numbers when greedy).

Shapes: ``B`` rows (environments), ``L`` prompt tokens (left-padded), ``N`` new tokens,
``A`` candidate actions of at most ``C`` tokens (right-padded), ``P`` shared-prefix tokens,
``D`` hidden size, ``V`` vocabulary.

Every entry point takes an optional ``prompt_embeds`` [B, L, D]: input embeddings that replace
the prompt tokens' own (e.g. with latent-memory soft prompts in some slots; the token ids are
then ignored for the prompt, the mask still applies). Generated and candidate tokens are always
embedded as tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from rllama_jax.models import (
    NEG_INF,
    KVCache,
    LlamaConfig,
    Params,
    embed,
    forward,
    init_cache,
    lm_head,
)
from rllama_jax.models.llama import positions_from_mask, unstack_cache, unstack_layers
from rllama_jax.tokenization import bucket_length

__all__ = [
    "Generation",
    "PrefixCache",
    "SamplingConfig",
    "Scores",
    "bucket_length",
    "build_prefix",
    "generate",
    "prefill",
    "process_logits",
    "sample_categorical",
    "score_candidates",
    "sequence_logprobs",
    "token_logprobs",
]

# Top-p without top-k looks for the nucleus among this many highest logits (lax.top_k: ~9 ms
# for 32 x 49k logits on a 2-core CPU) and, when some row's nucleus is larger, bisects for
# the cutoff over the whole vocabulary (32 masked sums). A full sort, the textbook way, takes
# ~500 ms for 32 x 49k on the same CPU.
_TOP_P_CANDIDATES = 128
# Sampling draws a block of this many vocabulary entries, then a token inside it (exact, and
# needs two small sets of random numbers instead of one per vocabulary entry).
_SAMPLE_BLOCK = 256
# ``generate`` copies stacked layer weights into per-layer buffers for its decode loop from
# this many new tokens on (the copy costs about as much as 3-8 decode steps save on a
# 2-core CPU; BENCHMARKS.md, "Generation and scoring").
_SPLIT_MIN_NEW_TOKENS = 8


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How tokens are drawn. ``temperature == 0`` is greedy (argmax; top-k and top-p then
    play no part); ``top_k == 0`` and ``top_p == 1`` switch those filters off. Defaults are
    LlamaGym's (32 new tokens, top-p 0.6, temperature 0.9)."""

    max_new_tokens: int = 32
    temperature: float = 0.9
    top_p: float = 0.6
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _nucleus_cutoff(top: jax.Array, log_norm: jax.Array, top_p: float) -> jax.Array:
    """Smallest logit ``[..., 1]`` of the nucleus, from the highest logits ``top [..., K]``
    (descending) and the log normaliser ``[..., 1]`` of the distribution they belong to.

    A token is kept when the probability mass strictly before it is below ``top_p`` (the top
    token always is): the smallest set of top tokens whose mass reaches ``top_p``.
    """
    probs = jnp.exp(top - log_norm)
    before = jnp.cumsum(probs, axis=-1) - probs
    last_kept = jnp.sum(before < top_p, axis=-1, keepdims=True) - 1
    return jnp.take_along_axis(top, last_kept, axis=-1)


def _ordered_keys(x: jax.Array) -> jax.Array:
    """int32 keys ordered like the float32 values ``x`` (no NaN): the float's bits, with the
    31 value bits of negative numbers flipped so that they order in reverse."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _nucleus_cutoff_bisect(logits: jax.Array, log_norm: jax.Array, top_p: float) -> jax.Array:
    """The same cutoff as ``_nucleus_cutoff`` over all of ``logits [..., V]``, without a sort.

    A token is kept when the mass S of tokens with larger logits is below ``top_p``. S only
    decreases as the threshold rises, so a bisection over thresholds keeps
    S(lo) >= top_p > S(hi). It runs over the 2^32 ordered keys of float32 values, so 32
    halvings make lo and hi adjacent: every logit above lo is kept, every other one is not.
    """
    probs = jnp.exp(logits - log_norm)
    keys = _ordered_keys(logits)
    lo = jnp.min(keys, axis=-1, keepdims=True) - 1  # S(lo) = 1 >= top_p
    hi = jnp.max(keys, axis=-1, keepdims=True)  # S(hi) = 0 < top_p

    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
        below = jnp.sum(jnp.where(keys > mid, probs, 0.0), axis=-1, keepdims=True) < top_p
        return jnp.where(below, lo, mid), jnp.where(below, mid, hi)

    lo, _ = jax.lax.fori_loop(0, 32, halve, (lo, hi))
    return jnp.min(jnp.where(keys > lo, logits, jnp.inf), axis=-1, keepdims=True)


def _filter_cutoff(logits: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """The top-k-then-top-p cutoff ``[..., 1]``: tokens with logits >= it are kept.

    logits: temperature-scaled ``[..., V]``. Top-p acts on the distribution renormalised
    after top-k (as transformers' warpers do). No full sort: ``lax.top_k`` finds the
    candidates; top-p alone bisects over the whole vocabulary when some row's nucleus is
    larger than ``_TOP_P_CANDIDATES`` tokens. Both ways give the same set up to float32
    rounding of the mass at the boundary.
    """
    # XLA:CPU turns lax.top_k into its fast TopK kernel only when the whole [..., k] result
    # is used: taking just its last column (or a shorter slice) falls back to sorting the
    # full vocabulary (~300 ms for 32 x 49k). Hence min() rather than top[..., -1].
    v = logits.shape[-1]
    if sampling.top_k > 0:
        top = jax.lax.top_k(logits, min(sampling.top_k, v))[0]
        if sampling.top_p >= 1.0:
            return jnp.min(top, axis=-1, keepdims=True)
        return _nucleus_cutoff(top, jax.nn.logsumexp(top, -1, keepdims=True), sampling.top_p)
    log_norm = jax.nn.logsumexp(logits, -1, keepdims=True)
    k = min(_TOP_P_CANDIDATES, v)
    top = jax.lax.top_k(logits, k)[0]
    if k == v:
        return _nucleus_cutoff(top, log_norm, sampling.top_p)
    # The nucleus lies inside the top k when the k - 1 best already reach top_p.
    probs = jnp.exp(top - log_norm)
    best = jnp.sum(probs, axis=-1) - jnp.min(probs, axis=-1)
    return jax.lax.cond(
        jnp.all(best >= sampling.top_p),
        lambda: _nucleus_cutoff(top, log_norm, sampling.top_p),
        lambda: _nucleus_cutoff_bisect(logits, log_norm, sampling.top_p),
    )


def process_logits(logits: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Log-probabilities ``[..., V]`` of the distribution tokens are actually drawn from:
    logits / temperature, then top-k, then top-p (nucleus) filtering, renormalised; filtered
    tokens get about -1e30.

    The same function turns a training forward pass's logits into the log-probs the losses
    use, so acting and learning agree on the policy. Greedy (temperature 0) returns the
    model's own log-softmax: argmax ignores the filters, and its log-probs are the limit
    policy's. Gradients flow through the kept logits; the cutoff is treated as a constant.
    """
    logits = logits.astype(jnp.float32)
    if sampling.greedy:
        return jax.nn.log_softmax(logits, axis=-1)
    logits = logits / sampling.temperature
    if sampling.top_k > 0 or sampling.top_p < 1.0:
        cutoff = _filter_cutoff(jax.lax.stop_gradient(logits), sampling)
        logits = jnp.where(logits >= cutoff, logits, NEG_INF)
    return jax.nn.log_softmax(logits, axis=-1)


def policy_log_softmax(logits: jax.Array, sampling: SamplingConfig | None = None) -> jax.Array:
    """Log-probabilities ``[..., V]`` of the policy a reply is learned under: the model's
    distribution at the sampling temperature, WITHOUT the top-k / top-p filters.

    Acting samples from the filtered distribution (``process_logits``), but the ratio, the
    KL to a reference and the entropy use this one, as TRL does: a token outside the
    current or the reference policy's nucleus would otherwise get probability ~0 (a KL of
    ~1e30, an infinite ratio). Greedy decoding (temperature 0) and ``sampling=None`` use
    the model's own softmax (temperature 1).
    """
    logits = logits.astype(jnp.float32)
    if sampling is not None and not sampling.greedy:
        logits = logits / sampling.temperature
    return jax.nn.log_softmax(logits, axis=-1)


def token_logprobs(
    logits: jax.Array, targets: jax.Array, sampling: SamplingConfig | None = None
) -> jax.Array:
    """Log-prob ``[...]`` of ``targets [...]`` under ``policy_log_softmax(logits [..., V])``."""
    logp = policy_log_softmax(logits, sampling)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def sample_categorical(key: jax.Array, logp: jax.Array) -> jax.Array:
    """One token id ``[B]`` per row of log-probabilities ``logp [B, V]``.

    Exact two-stage draw: a block of ``_SAMPLE_BLOCK`` ids with probability its total mass,
    then an id inside it with its renormalised probability. ``jax.random.categorical`` over
    the whole vocabulary would need V Gumbel samples per row (~90 ms for 32 x 49k on CPU);
    this needs V / 256 + 256.
    """
    b, v = logp.shape
    block = min(_SAMPLE_BLOCK, v)
    n_blocks = -(-v // block)
    if n_blocks * block != v:
        logp = jnp.pad(logp, ((0, 0), (0, n_blocks * block - v)), constant_values=-jnp.inf)
    blocks = logp.reshape(b, n_blocks, block)
    k_block, k_inner = jax.random.split(key)
    chosen = jax.random.categorical(k_block, jax.nn.logsumexp(blocks, axis=-1), axis=-1)
    inner = jnp.take_along_axis(blocks, chosen[:, None, None], axis=1)[:, 0]
    return (chosen * block + jax.random.categorical(k_inner, inner, axis=-1)).astype(jnp.int32)


# ---------------------------------------------------------------------------- shared prefix
@struct.dataclass
class PrefixCache:
    """Keys/values of a prompt prefix shared by every row (e.g. the system prompt).

    k, v: [L_layers, 1, P, K, hd]. Rows that start from it put their own tokens at
    positions P, P + 1, ...
    """

    k: jax.Array
    v: jax.Array

    @property
    def length(self) -> int:
        return self.k.shape[2]


@functools.partial(jax.jit, static_argnames=("config", "remat"))
def build_prefix(
    params: Params, config: LlamaConfig, prefix_tokens: jax.Array, remat: bool = False
) -> PrefixCache:
    """Runs the shared prefix ``[P]`` once; recompute after each parameter update.
    remat: rematerialise layers when differentiated (``models.llama.forward``)."""
    p = prefix_tokens.shape[0]
    cache = init_cache(config, 1, p)
    mask = jnp.ones((1, p), bool)
    out = forward(
        params,
        config,
        prefix_tokens[None],
        positions_from_mask(mask),
        mask,
        cache,
        compute_logits=False,
        remat=remat,
    )
    return PrefixCache(k=out.cache.k, v=out.cache.v)


def _start_cache(
    config: LlamaConfig, batch: int, size: int, prefix: PrefixCache | None
) -> tuple[KVCache, int]:
    """An empty cache of ``size`` slots after the prefix, with the prefix filled in."""
    if prefix is None:
        return init_cache(config, batch, size), 0
    p = prefix.length
    cache = init_cache(config, batch, p + size)

    def fill(buf: jax.Array, pre: jax.Array) -> jax.Array:
        pre = jnp.broadcast_to(pre, pre.shape[:1] + (batch,) + pre.shape[2:]).astype(buf.dtype)
        return jax.lax.dynamic_update_slice(buf, pre, (0, 0, 0, 0, 0))

    k, v = fill(cache.k, prefix.k), fill(cache.v, prefix.v)
    mask = cache.mask.at[:, :p].set(True)
    return KVCache(k=k, v=v, mask=mask, index=jnp.asarray(p, jnp.int32)), p


def prefill(
    params: Params,
    config: LlamaConfig,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    extra_slots: int,
    prefix: PrefixCache | None = None,
    prompt_embeds: jax.Array | None = None,
    remat: bool = False,
) -> tuple[jax.Array, jax.Array, KVCache, jax.Array]:
    """Runs the prompt into a fresh cache with ``extra_slots`` free slots after it.

    prompt_embeds: optional [B, L, D] input embeddings used instead of the tokens'.
    remat: rematerialise layers when differentiated (``models.llama.forward``).
    Returns (last_hidden [B, D], last_logits [B, V] float32, cache, next_positions [B]).
    Only the last position's logits are computed (a full [B, L, V] would dominate on small
    models with large vocabularies).
    """
    b, length = prompt_tokens.shape
    cache, p = _start_cache(config, b, length + extra_slots, prefix)
    if isinstance(params["layers"], (list, tuple)):  # unrolled layers: per-layer buffers
        cache = unstack_cache(cache)
    mask = prompt_mask.astype(bool)
    positions = positions_from_mask(mask, p)
    out = forward(
        params,
        config,
        prompt_tokens if prompt_embeds is None else None,
        positions,
        mask,
        cache,
        embeds=prompt_embeds,
        compute_logits=False,
        remat=remat,
    )
    last_hidden = out.hidden[:, -1]
    last_logits = lm_head(params, last_hidden, config)
    next_pos = p + jnp.sum(mask, axis=-1).astype(jnp.int32)
    return last_hidden, last_logits, out.cache, next_pos


# ---------------------------------------------------------------------------- generation
class Generation(NamedTuple):
    """tokens: [B, N] new token ids (pad after a row stops); logprobs: [B, N] log-prob of each
    under the sampling distribution (0 on padding); mask: [B, N] True for tokens that belong
    to the reply (up to and including the stop token); lengths: [B]; last_hidden: [B, D]
    hidden state at the last prompt token; steps: [] token positions actually generated
    (< N when every row stopped early)."""

    tokens: jax.Array
    logprobs: jax.Array
    mask: jax.Array
    lengths: jax.Array
    last_hidden: jax.Array
    steps: jax.Array


def _sample(
    key: jax.Array, logits: jax.Array, sampling: SamplingConfig
) -> tuple[jax.Array, jax.Array]:
    """Draws one token per row from logits [B, V] (filtered by top-k / top-p): (token [B]
    int32, its log-prob [B] under the unfiltered policy, ``policy_log_softmax``)."""
    if sampling.greedy:
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
        token = sample_categorical(key, process_logits(logits, sampling))
    return token, token_logprobs(logits, token, sampling)


@functools.partial(jax.jit, static_argnames=("config", "sampling"))
def generate(
    params: Params,
    config: LlamaConfig,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    key: jax.Array,
    sampling: SamplingConfig,
    prefix: PrefixCache | None = None,
    prompt_embeds: jax.Array | None = None,
) -> Generation:
    """Samples up to ``sampling.max_new_tokens`` tokens for a left-padded batch.

    prompt_tokens, prompt_mask: [B, L]; key: a PRNG key; prefix: the shared-prefix cache
    the rows continue (their tokens then follow it); prompt_embeds: optional [B, L, D] input
    embeddings of the prompt (see the module docstring). The first token comes from the prefill;
    a ``lax.while_loop`` then feeds each token back through the cache (allocated once inside
    the compiled call, so XLA updates it in place): N - 1 single-token forward passes, and
    the loop exits as soon as every row has emitted a stop token. ``params`` may also be in
    the per-layer form of ``models.llama.unstack_layers`` (split once per parameter update):
    the decode loop then needs no copy of the weights at all.
    """
    n = sampling.max_new_tokens
    if n < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {n}")
    b = prompt_tokens.shape[0]
    last_hidden, logits, cache, pos = prefill(
        params, config, prompt_tokens, prompt_mask, n - 1, prefix, prompt_embeds
    )
    stop_ids = jnp.asarray(sampling.stop_token_ids or (-1,), jnp.int32)
    keys = jax.random.split(key, n)

    def record(i, token, logp, done, tokens, logprobs, mask):
        token = jnp.where(done, sampling.pad_token_id, token)
        tokens = tokens.at[:, i].set(token)
        logprobs = logprobs.at[:, i].set(jnp.where(done, 0.0, logp))
        mask = mask.at[:, i].set(~done)
        done = done | jnp.any(token[:, None] == stop_ids[None, :], axis=-1)
        return token, done, tokens, logprobs, mask

    def cond(carry):
        i, _, _, done, *_ = carry
        return (i < n) & ~jnp.all(done)

    # One-token steps are fastest on per-layer weights and cache buffers (no per-step copy
    # of each layer's slice of the [L, ...] stacks; models.llama.unstack_layers). Callers
    # can pass params already split (once per update); stacked ones are split here when the
    # loop is long enough to repay the copy.
    step_params = params
    split = isinstance(params["layers"], (list, tuple)) or n >= _SPLIT_MIN_NEW_TOKENS
    if n > 1 and split:
        step_params, cache = unstack_layers(params), unstack_cache(cache)

    def body(carry):
        i, cache, token, done, tokens, logprobs, mask = carry
        # Token i - 1 sits at position pos + i - 1 and predicts token i.
        out = forward(
            step_params,
            config,
            token[:, None],
            (pos + i - 1)[:, None],
            jnp.ones((b, 1), bool),
            cache,
            compute_logits=False,
        )
        logits = lm_head(params, out.hidden[:, -1], config)
        token, logp = _sample(keys[i], logits, sampling)
        token, done, tokens, logprobs, mask = record(i, token, logp, done, tokens, logprobs, mask)
        return i + 1, out.cache, token, done, tokens, logprobs, mask

    token, logp = _sample(keys[0], logits, sampling)
    token, done, tokens, logprobs, mask = record(
        0,
        token,
        logp,
        jnp.zeros((b,), bool),
        jnp.full((b, n), sampling.pad_token_id, jnp.int32),
        jnp.zeros((b, n), jnp.float32),
        jnp.zeros((b, n), bool),
    )
    init = (jnp.asarray(1, jnp.int32), cache, token, done, tokens, logprobs, mask)
    steps, _, _, _, tokens, logprobs, mask = jax.lax.while_loop(cond, body, init)
    return Generation(
        tokens=tokens,
        logprobs=logprobs,
        mask=mask,
        lengths=jnp.sum(mask, axis=-1),
        last_hidden=last_hidden,
        steps=steps,
    )


@functools.partial(jax.jit, static_argnames=("config", "sampling", "remat", "with_entropy"))
def sequence_logprobs(
    params: Params,
    config: LlamaConfig,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    response_tokens: jax.Array,
    response_mask: jax.Array,
    sampling: SamplingConfig | None = None,
    prompt_embeds: jax.Array | None = None,
    remat: bool = False,
    with_entropy: bool = False,
    prefix: PrefixCache | None = None,
) -> tuple[jax.Array, ...]:
    """Recomputes response log-probs with one full forward pass (what a loss differentiates).

    prompt_*: [B, L] left-padded; response_*: [B, N]; prompt_embeds: optional [B, L, D]
    input embeddings of the prompt; prefix: the shared-prefix cache the rows continue (their
    prompt then holds only what follows it; ``build_prefix`` inside the differentiated
    function gives the gradient through the prefix, once for all rows); remat: rematerialise
    layers when differentiated
    (``models.llama.forward``). The LM head runs at the N positions that predict the reply
    only, never over the prompt. Returns (logprobs [B, N] under the policy of ``sampling``
    (``policy_log_softmax``: temperature-scaled, not top-p filtered), zero where
    ``response_mask`` is False; last prompt hidden state [B, D]), and with ``with_entropy``
    a third entry: the entropy [B, N] of that distribution at each reply position (zero
    where masked). Jitted (config and sampling static); inside another jit it is inlined.
    """
    tokens = jnp.concatenate([prompt_tokens, response_tokens], axis=1)
    mask = jnp.concatenate([prompt_mask.astype(bool), response_mask.astype(bool)], axis=1)
    positions = positions_from_mask(mask)
    if prefix is not None:
        if prompt_embeds is not None:
            raise ValueError("sequence_logprobs: prompt_embeds with a shared prefix")
        cache, p = _start_cache(config, tokens.shape[0], tokens.shape[1], prefix)
        out = forward(
            params, config, tokens, positions_from_mask(mask, p), mask, cache,
            compute_logits=False, remat=remat,
        )  # fmt: skip
    elif prompt_embeds is None:
        out = forward(params, config, tokens, positions, mask, compute_logits=False, remat=remat)
    else:
        response_embeds = embed(params, response_tokens, config)
        embeds = jnp.concatenate([prompt_embeds.astype(response_embeds.dtype), response_embeds], 1)
        out = forward(
            params, config, None, positions, mask, embeds=embeds, compute_logits=False,
            remat=remat,
        )  # fmt: skip
    length = prompt_tokens.shape[1]
    # Hidden state at position t predicts token t + 1.
    hidden = out.hidden[:, length - 1 : -1]
    all_logp = policy_log_softmax(lm_head(params, hidden, config), sampling)
    logp = jnp.take_along_axis(all_logp, response_tokens[..., None], axis=-1)[..., 0]
    logp = jnp.where(response_mask, logp, 0.0)
    if not with_entropy:
        return logp, out.hidden[:, length - 1]
    entropy = -jnp.sum(jnp.exp(all_logp) * all_logp, axis=-1)
    return logp, out.hidden[:, length - 1], jnp.where(response_mask, entropy, 0.0)


# ---------------------------------------------------------------------------- scoring
class Scores(NamedTuple):
    """logp_sum, logp_mean: [B, A] log-likelihood of each candidate (sum and per-token mean
    over its tokens); token_logp: [B, A, C]; prompt_hidden: [B, D] at the last prompt token;
    candidate_hidden: [B, A, D] at each candidate's last token."""

    logp_sum: jax.Array
    logp_mean: jax.Array
    token_logp: jax.Array
    prompt_hidden: jax.Array
    candidate_hidden: jax.Array


@functools.partial(jax.jit, static_argnames=("config", "remat"))
def score_candidates(
    params: Params,
    config: LlamaConfig,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    candidate_tokens: jax.Array,
    candidate_mask: jax.Array,
    prefix: PrefixCache | None = None,
    prompt_embeds: jax.Array | None = None,
    remat: bool = False,
) -> Scores:
    """Log-likelihood of each candidate action string given its row's prompt.

    prompt_embeds: optional [B, L, D] input embeddings of the prompt (module docstring).
    remat: rematerialise layers when differentiated (``models.llama.forward``).

    The prompt is run once into the cache; all A candidates of a row then go through ONE
    forward call as a single block of A*C tokens whose attention mask lets each candidate
    see the prompt and its own earlier tokens only, so the prompt is never re-run A times
    and its cache never copied. Candidates are right-padded: candidate_mask [B, A, C]; a
    candidate with no token scores 0 (mask it out with the action mask).
    """
    b, a, c = candidate_tokens.shape
    cmask = candidate_mask.astype(bool)
    prompt_hidden, first_logits, cache, pos = prefill(
        params, config, prompt_tokens, prompt_mask, a * c, prefix, prompt_embeds, remat
    )
    flat_tokens = candidate_tokens.reshape(b, a * c)
    flat_mask = cmask.reshape(b, a * c)
    # Token j of every candidate sits at position pos + j.
    positions = jnp.broadcast_to(pos[:, None, None] + jnp.arange(c), (b, a, c)).reshape(b, a * c)
    # block[(a1, c1), (a2, c2)] = (a1 == a2) & (c1 >= c2)
    same = jnp.arange(a)[:, None, None, None] == jnp.arange(a)[None, None, :, None]
    causal = jnp.arange(c)[None, :, None, None] >= jnp.arange(c)[None, None, None, :]
    block = jnp.broadcast_to((same & causal).reshape(a * c, a * c), (b, a * c, a * c))
    out = forward(
        params,
        config,
        flat_tokens,
        positions,
        flat_mask,
        cache,
        compute_logits=False,
        block_mask=block,
        remat=remat,
    )
    hidden = out.hidden.reshape(b, a, c, -1)
    # Token j of a candidate is predicted by the prompt's last state (j = 0) or by the
    # candidate's token j - 1 (so no logits are needed at a candidate's last slot).
    first = jnp.take_along_axis(
        jax.nn.log_softmax(first_logits, axis=-1), candidate_tokens[:, :, 0], axis=-1
    )
    rest = token_logprobs(lm_head(params, hidden[:, :, :-1], config), candidate_tokens[:, :, 1:])
    token_logp = jnp.where(cmask, jnp.concatenate([first[..., None], rest], axis=-1), 0.0)
    count = jnp.maximum(jnp.sum(cmask, axis=-1), 1)
    last = jnp.maximum(jnp.sum(cmask, axis=-1) - 1, 0)
    cand_hidden = jnp.take_along_axis(hidden, last[:, :, None, None], axis=2)[:, :, 0]
    logp_sum = jnp.sum(token_logp, axis=-1)
    return Scores(
        logp_sum=logp_sum,
        logp_mean=logp_sum / count,
        token_logp=token_logp,
        prompt_hidden=prompt_hidden,
        candidate_hidden=cand_hidden,
    )
