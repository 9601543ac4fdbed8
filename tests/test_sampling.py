"""Jitted acting on tiny random checkpoints: greedy generation against transformers'
``generate``, sampled log-probs against a full forward pass, logits processing against
transformers' warpers, candidate scoring against brute force, the shared-prefix cache against
no cache, and compile counts.

Tolerances: 1e-5 between two of our own float32 computations of the same quantity (cached
vs full forward: same math, different summation order, ~1e-7 apart on these tiny models).
Greedy tokens are compared exactly; each comparison first checks that the top-2 logit margin
along the reference path is far above float32 noise, so an exact match is meaningful and
not a coin flip.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from rllama_jax.models import forward, load_pretrained, positions_from_mask
from rllama_jax.models.llama import unstack_layers
from rllama_jax.sampling import (
    SamplingConfig,
    build_prefix,
    generate,
    prefill,
    process_logits,
    sample_categorical,
    score_candidates,
    sequence_logprobs,
)
from rllama_jax.tokenization import left_pad
from tests.conftest import build_tiny_torch_llama

TOL = 1e-5
PAD = 0
# Most tests share these shapes and configs so that the jitted functions compile a handful
# of times for the whole module (each compile takes seconds on a 2-core machine).
B, W, N = 4, 12, 8
SUFFIX_W = 6  # prefix tests: 6 shared tokens + a 6-wide suffix == the W-wide full prompt
STOPS = (5, 6, 7)
SAMPLED = {
    "temp_top_p": SamplingConfig(
        max_new_tokens=N, temperature=0.7, top_p=0.8, stop_token_ids=STOPS, pad_token_id=PAD
    ),
    "temp_top_k_top_p": SamplingConfig(
        max_new_tokens=N,
        temperature=1.5,
        top_p=0.9,
        top_k=10,
        stop_token_ids=STOPS,
        pad_token_id=PAD,
    ),
}

jit_forward = jax.jit(forward, static_argnums=1)
jit_prefill = jax.jit(prefill, static_argnums=(1, 4))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config, params, torch_model) of one tiny random checkpoint, shared by the module."""
    model = build_tiny_torch_llama(seed=3)
    path = tmp_path_factory.mktemp("tiny_sampling")
    model.save_pretrained(path)
    config, params, _ = load_pretrained(str(path), tokenizer=False)
    return config, params, model


def greedy(n: int, stop: tuple[int, ...] = ()) -> SamplingConfig:
    return SamplingConfig(
        max_new_tokens=n, temperature=0.0, top_p=1.0, stop_token_ids=stop, pad_token_id=PAD
    )


def hf_greedy(model, tokens, mask, n, eos=None):
    """transformers' greedy generation: (new tokens [B, <=n], scores [B, <=n, V])."""
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=PAD,
            output_scores=True,
            return_dict_in_generate=True,
        )
    new = out.sequences[:, tokens.shape[1] :].numpy()
    return new, torch.stack(out.scores, 1).numpy()


def min_margin(scores: np.ndarray) -> float:
    top2 = np.sort(scores, axis=-1)[..., -2:]
    return float((top2[..., 1] - top2[..., 0]).min())


def batch(seed: int, lengths: list[int], width: int = W) -> tuple[np.ndarray, np.ndarray]:
    """Random left-padded prompts [len(lengths), width]."""
    rng = np.random.default_rng(seed)
    return left_pad([rng.integers(3, 97, n).tolist() for n in lengths], width)


# ---------------------------------------------------------------------------- greedy vs HF
def test_greedy_matches_transformers_generate(tiny):
    config, params, model = tiny
    tokens, mask = batch(0, [11, 4, 8, 12])
    ref, scores = hf_greedy(model, tokens, mask, N)
    assert ref.shape == (B, N)  # no early stop on the HF side
    assert min_margin(scores) > 1e-4
    out = generate(params, config, tokens, mask, jax.random.key(0), greedy(N))
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
    assert np.asarray(out.mask).all() and int(out.steps) == N
    np.testing.assert_array_equal(np.asarray(out.lengths), [N] * B)
    # Greedy log-probs are the model's own (no filtering): log_softmax of HF's raw scores.
    ref_logp = torch.log_softmax(torch.tensor(scores), -1).numpy()
    ref_logp = np.take_along_axis(ref_logp, ref[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(out.logprobs), ref_logp, atol=1e-4)
    # The decode loop on weights split by the caller, and (few new tokens) on the stacks.
    split = generate(unstack_layers(params), config, tokens, mask, jax.random.key(0), greedy(N))
    np.testing.assert_array_equal(np.asarray(split.tokens), ref)
    np.testing.assert_allclose(split.logprobs, out.logprobs, atol=TOL)
    short = generate(params, config, tokens, mask, jax.random.key(0), greedy(3))
    np.testing.assert_array_equal(np.asarray(short.tokens), ref[:, :3])


def test_stop_tokens_and_early_exit_match_transformers(tiny):
    """Rows stop at different steps; once all have stopped the loop exits early."""
    config, params, model = tiny
    tokens, mask = batch(1, [9, 12, 6, 10])
    free, scores = hf_greedy(model, tokens, mask, N)
    assert min_margin(scores) > 1e-4
    # One stop id from each row's free run, so that every row stops, at different steps.
    stop = tuple(int(free[r, s]) for r, s in enumerate([1, 4, 2, 5]))
    hits = np.isin(free, stop)
    assert hits.any(1).all()
    stop_step = hits.argmax(1)
    assert len(set(stop_step.tolist())) >= 3, stop_step
    ref, _ = hf_greedy(model, tokens, mask, N, eos=list(stop))
    expected = np.full((B, N), PAD)
    expected[:, : ref.shape[1]] = ref
    out = generate(params, config, tokens, mask, jax.random.key(0), greedy(N, stop))
    np.testing.assert_array_equal(np.asarray(out.tokens), expected)
    lengths = stop_step + 1
    np.testing.assert_array_equal(np.asarray(out.lengths), lengths)
    np.testing.assert_array_equal(np.asarray(out.mask), np.arange(N)[None] < lengths[:, None])
    assert int(out.steps) == lengths.max() < N
    assert np.all(np.asarray(out.logprobs)[~np.asarray(out.mask)] == 0.0)
    assert np.all(np.asarray(out.logprobs)[np.asarray(out.mask)] < 0.0)


# ---------------------------------------------------------------------------- logits processing
def hf_processed_logprobs(logits: np.ndarray, s: SamplingConfig) -> np.ndarray:
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = LogitsProcessorList([TemperatureLogitsWarper(s.temperature)])
    if s.top_k:
        warpers.append(TopKLogitsWarper(s.top_k))
    if s.top_p < 1.0:
        warpers.append(TopPLogitsWarper(s.top_p))
    out = warpers(None, torch.tensor(logits))
    return torch.log_softmax(out, -1).numpy()


jit_process_logits = jax.jit(process_logits, static_argnums=1)


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(0.7, 0, 0.8), (1.3, 5, 1.0), (0.7, 20, 0.5), (1.0, 0, 1.0), (0.5, 3, 0.9)],
)
def test_process_logits_matches_transformers_warpers(temperature, top_k, top_p):
    rng = np.random.default_rng(0)
    logits = (2.0 * rng.standard_normal((6, 97))).astype(np.float32)
    s = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    ours = np.asarray(jit_process_logits(jnp.asarray(logits), s))
    ref = hf_processed_logprobs(logits, s)
    kept = np.isfinite(ref)
    np.testing.assert_array_equal(ours > -1e20, kept)
    np.testing.assert_allclose(ours[kept], ref[kept], atol=1e-5)
    if top_k or top_p < 1.0:
        assert (~kept).any()  # the filters actually removed something


@pytest.mark.parametrize("flat_rows", [0, 1])
def test_top_p_on_large_vocabulary(flat_rows):
    """Top-p alone on V > the candidate count: peaked rows keep a small nucleus (found among
    the top candidates); a flat row's nucleus is larger, which must switch the whole batch to
    the exact full-sort path."""
    rng = np.random.default_rng(1)
    v = 2000
    scale = np.full((4, 1), 6.0)
    scale[:flat_rows] = 0.3
    logits = (scale * rng.standard_normal((4, v))).astype(np.float32)
    s = SamplingConfig(temperature=0.9, top_p=0.6)
    ours = np.asarray(jit_process_logits(jnp.asarray(logits), s))
    ref = hf_processed_logprobs(logits, s)
    kept = np.isfinite(ref)
    sizes = kept.sum(-1)
    assert np.all(sizes[flat_rows:] < 100) and np.all(sizes[:flat_rows] > 500), sizes
    np.testing.assert_array_equal(ours > -1e20, kept)
    np.testing.assert_allclose(ours[kept], ref[kept], atol=1e-5)


def test_bisection_cutoff_equals_sorted_cutoff():
    """The sort-free nucleus cutoff (used when the nucleus is larger than the top-k
    candidates) is exactly the sorted one: flat, peaked and very peaked rows, ties, rows
    holding -1e30 / -inf entries (already filtered tokens), and logits one ulp apart. The
    top-p values keep the boundary away from an exact multiple of the flat rows' masses."""
    from rllama_jax.sampling import _nucleus_cutoff, _nucleus_cutoff_bisect

    rng = np.random.default_rng(2)
    v = 500
    rows = [s * rng.standard_normal(v) for s in (0.1, 1.0, 5.0, 50.0)]
    rows.append(np.round(2 * rng.standard_normal(v)))  # many ties
    rows.append(np.where(rng.random(v) < 0.5, -1e30, rng.standard_normal(v)))
    rows.append(np.where(rng.random(v) < 0.5, -np.inf, 3 * rng.standard_normal(v)))
    # Neighbouring float32 values plus one far away (a wide range of float keys): only a
    # bisection run all the way to adjacent floats finds the cutoff.
    rows.append(1.0 + np.arange(v) * np.spacing(np.float32(1.0)))
    rows[-1][0] = -1e30
    logits = jnp.asarray(np.stack(rows), jnp.float32)
    log_norm = jax.nn.logsumexp(logits, -1, keepdims=True)
    ordered = -jnp.sort(-logits, axis=-1)
    bisect = jax.jit(_nucleus_cutoff_bisect)
    for top_p in (0.0505, 0.4991, 0.9005, 0.999):
        ref = _nucleus_cutoff(ordered, log_norm, top_p)
        ours = bisect(logits, log_norm, top_p)
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref), err_msg=f"{top_p}")
        kept = np.asarray(logits >= ours).sum(-1)
        assert kept.min() >= 1 and (top_p < 0.9 or kept.max() > 50)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks XLA:CPU's lowering")
@pytest.mark.parametrize("top_k,top_p", [(10, 1.0), (10, 0.8), (0, 0.8)])
def test_filters_compile_without_a_full_sort(top_k, top_p):
    """XLA:CPU sorts the whole vocabulary (~300 ms for 32 x 49k) unless lax.top_k keeps its
    fast kernel, which it does only when the whole top-k result is used. Guards that the
    filters keep it, for sampling and for training-shaped [B, T, V] logits."""
    s = SamplingConfig(temperature=0.9, top_k=top_k, top_p=top_p)
    for shape in [(2, 4096), (2, 3, 4096)]:
        hlo = jax.jit(process_logits, static_argnums=1).lower(jnp.zeros(shape), s)
        text = hlo.compile().as_text()
        assert " sort(" not in text
        assert "TopK" in text


def test_greedy_logprobs_ignore_filters():
    """temperature 0 means argmax: its log-probs are the model's, whatever top-k/top-p say."""
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((2, 30)), jnp.float32)
    s = SamplingConfig(temperature=0.0, top_k=3, top_p=0.5)
    np.testing.assert_allclose(process_logits(logits, s), jax.nn.log_softmax(logits), atol=1e-6)


# ---------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("name", sorted(SAMPLED))
def test_sampled_logprobs_match_full_forward(tiny, name):
    """Acting-time log-probs are the policy's: the model's distribution at the sampling
    temperature, NOT top-p / top-k filtered (the filters only shape the draw), exactly what
    ``sequence_logprobs`` recomputes; sampled tokens still come from the filtered support."""
    config, params, _ = tiny
    s = SAMPLED[name]
    tokens, mask = batch(3, [10, 3, 7, 12])
    out = generate(params, config, tokens, mask, jax.random.key(4), s)
    gen_mask = np.asarray(out.mask)
    assert gen_mask.sum() > 8
    ref, ref_hidden, entropy = sequence_logprobs(
        params, config, tokens, mask, out.tokens, out.mask, sampling=s, with_entropy=True
    )
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref), atol=TOL)
    np.testing.assert_allclose(out.last_hidden, ref_hidden, atol=TOL)
    # The reply's logits from one full forward pass (position t predicts token t + 1).
    seq = np.concatenate([tokens, np.asarray(out.tokens)], 1)
    seq_mask = np.concatenate([mask, gen_mask.astype(mask.dtype)], 1)
    full = jit_forward(params, config, seq, positions_from_mask(seq_mask), seq_mask)
    logits = np.asarray(full.logits, np.float32)[:, W - 1 : -1]
    picked = lambda logp: np.take_along_axis(logp, np.asarray(out.tokens)[..., None], -1)[..., 0]  # noqa: E731
    # Every sampled token came from inside the filtered support.
    filtered = np.asarray(jit_process_logits(jnp.asarray(logits), s))
    assert np.all(picked(filtered)[gen_mask] > -1e3)
    # The log-probs are the unfiltered temperature-scaled ones, and so is the entropy.
    policy = np.asarray(jax.nn.log_softmax(jnp.asarray(logits) / s.temperature, -1))
    np.testing.assert_allclose(np.asarray(ref)[gen_mask], picked(policy)[gen_mask], atol=TOL)
    want_entropy = -(np.exp(policy) * policy).sum(-1)
    np.testing.assert_allclose(np.asarray(entropy)[gen_mask], want_entropy[gen_mask], atol=1e-4)
    assert np.all(np.asarray(entropy)[~gen_mask] == 0.0)
    # The filters do not enter the log-probs: the same temperature without them agrees ...
    unfiltered = SamplingConfig(
        max_new_tokens=N, temperature=s.temperature, top_p=1.0, top_k=0,
        stop_token_ids=STOPS, pad_token_id=PAD,
    )  # fmt: skip
    same, _ = sequence_logprobs(
        params, config, tokens, mask, out.tokens, out.mask, sampling=unfiltered
    )
    np.testing.assert_allclose(np.asarray(same), np.asarray(ref), atol=TOL)
    # ... while the temperature does: the model's own softmax (temperature 1) differs.
    plain, _ = sequence_logprobs(params, config, tokens, mask, out.tokens, out.mask)
    assert np.abs(np.asarray(plain) - np.asarray(ref))[gen_mask].max() > 1e-2


@pytest.mark.parametrize(
    "vocab,temperature,top_k,top_p",
    [(600, 1.0, 0, 1.0), (600, 2.0, 0, 0.5), (1024, 1.5, 30, 1.0)],
)
def test_sample_categorical_draws_from_processed_distribution(vocab, temperature, top_k, top_p):
    """Empirical frequencies of many draws from one row match exp(process_logits); nothing
    outside the filtered support is ever drawn. Vocabularies that are and are not a
    multiple of the sampling block."""
    rows = 20000
    logits = jnp.asarray(np.random.default_rng(vocab).standard_normal((1, vocab)), jnp.float32)
    s = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    logp = jit_process_logits(logits, s)
    draws = jax.jit(sample_categorical)(jax.random.key(0), jnp.repeat(logp, rows, 0))
    probs = np.exp(np.asarray(logp[0], np.float64))
    support = probs > 0
    if top_k or top_p < 1.0:
        assert support.sum() < vocab
    counts = np.bincount(np.asarray(draws), minlength=vocab)
    assert counts.shape == (vocab,)  # no id out of range
    assert counts[~support].sum() == 0
    # 5 binomial standard errors per token: fails for a wrong block or in-block draw.
    se = np.sqrt(probs * (1 - probs) / rows)
    assert np.all(np.abs(counts / rows - probs) <= 5 * se + 1e-4)


def test_fixed_key_is_deterministic_and_top_k_1_is_greedy(tiny):
    config, params, _ = tiny
    tokens, mask = batch(5, [6, 9, 2, 12])
    s = SAMPLED["temp_top_p"]
    a = generate(params, config, tokens, mask, jax.random.key(7), s)
    b = generate(params, config, tokens, mask, jax.random.key(7), s)
    c = generate(params, config, tokens, mask, jax.random.key(8), s)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_array_equal(np.asarray(a.logprobs), np.asarray(b.logprobs))
    assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()
    top1 = SamplingConfig(max_new_tokens=N, temperature=1.0, top_p=1.0, top_k=1)
    g = generate(params, config, tokens, mask, jax.random.key(0), greedy(N))
    t1 = generate(params, config, tokens, mask, jax.random.key(9), top1)
    np.testing.assert_array_equal(np.asarray(t1.tokens), np.asarray(g.tokens))
    # top-k 1 only shapes the draw: the log-probs are those of the unfiltered policy (at
    # temperature 1, the model's own softmax, as greedy decoding reports), not 0.
    np.testing.assert_allclose(np.asarray(t1.logprobs), np.asarray(g.logprobs), atol=TOL)
    assert np.all(np.asarray(t1.logprobs)[np.asarray(t1.mask)] < 0.0)


# ---------------------------------------------------------------------------- scoring
def brute_force_scores(params, config, rows_prompt, rows_cands):
    """Each candidate appended to its row's prompt and run through a full forward pass.

    rows_prompt: B lists of ids; rows_cands: B lists of candidate id lists.
    Returns sums [B][A], means, candidate hidden [B][A][D], prompt hidden [B][D].
    """
    seqs = [p + c for p, cands in zip(rows_prompt, rows_cands, strict=True) for c in cands]
    tokens, mask = left_pad(seqs, 24)
    out = jit_forward(params, config, tokens, positions_from_mask(mask), mask)
    logp = np.asarray(jax.nn.log_softmax(out.logits, -1))
    hidden = np.asarray(out.hidden)
    width = tokens.shape[1]
    sums, means, cand_h, prompt_h, k = [], [], [], [], 0
    for cands in rows_cands:
        s_row, m_row, h_row = [], [], []
        for c in cands:
            start = width - len(c)  # first candidate token's column
            lp = [logp[k, start + j - 1, tok] for j, tok in enumerate(c)]
            s_row.append(sum(lp))
            m_row.append(sum(lp) / len(c))
            h_row.append(hidden[k, -1])
            last_prompt = hidden[k, start - 1]
            k += 1
        sums.append(s_row)
        means.append(m_row)
        cand_h.append(h_row)
        prompt_h.append(last_prompt)
    return sums, means, cand_h, prompt_h


def candidate_arrays(cands, a=4, c=4):
    """Right-padded [B, a, c] candidate tokens and mask from lists of id lists."""
    tokens = np.full((len(cands), a, c), PAD, np.int32)
    mask = np.zeros_like(tokens)
    for i, row in enumerate(cands):
        for j, x in enumerate(row):
            tokens[i, j, : len(x)] = x
            mask[i, j, : len(x)] = 1
    return tokens, mask


# Candidates of 1 to 4 tokens, 1 to 4 per row.
CANDS = [
    [[11], [12, 13, 14], [15, 16]],
    [[20, 21, 22, 23], [24]],
    [[30, 31], [32, 33], [34], [35, 36, 37, 38]],
    [[40, 41, 42]],
]


def prefix_setup(seed: int, lengths: list[int]):
    """A 6-token shared prefix, suffix rows [B, SUFFIX_W] and the full rows [B, W]."""
    rng = np.random.default_rng(seed)
    prefix = rng.integers(3, 97, 6).astype(np.int32)
    suffixes = [rng.integers(3, 97, n).tolist() for n in lengths]
    s_tokens, s_mask = left_pad(suffixes, SUFFIX_W)
    f_tokens, f_mask = left_pad([prefix.tolist() + s for s in suffixes], W)
    return prefix, (s_tokens, s_mask), (f_tokens, f_mask)


@pytest.mark.parametrize("with_prefix", [False, True])
def test_score_candidates_matches_brute_force(tiny, with_prefix):
    config, params, _ = tiny
    ctoks, cmask = candidate_arrays(CANDS)
    if with_prefix:
        prefix, (ptoks, pmask), _ = prefix_setup(6, [5, 1, 6, 3])
        kwargs = {"prefix": build_prefix(params, config, jnp.asarray(prefix))}
        prefix = prefix.tolist()
    else:
        ptoks, pmask = batch(6, [7, 1, 12, 5])
        prefix, kwargs = [], {}
    out = score_candidates(params, config, ptoks, pmask, ctoks, cmask, **kwargs)
    prompts = [prefix + t[m.astype(bool)].tolist() for t, m in zip(ptoks, pmask, strict=True)]
    sums, means, cand_h, prompt_h = brute_force_scores(params, config, prompts, CANDS)
    for i, row in enumerate(CANDS):
        n = len(row)
        np.testing.assert_allclose(np.asarray(out.logp_sum)[i, :n], sums[i], atol=TOL)
        np.testing.assert_allclose(np.asarray(out.logp_mean)[i, :n], means[i], atol=TOL)
        np.testing.assert_allclose(np.asarray(out.candidate_hidden)[i, :n], cand_h[i], atol=TOL)
        np.testing.assert_allclose(np.asarray(out.prompt_hidden)[i], prompt_h[i], atol=TOL)
        np.testing.assert_array_equal(np.asarray(out.token_logp)[i][~cmask[i].astype(bool)], 0)
    # Scores differ between candidates (the comparison above is not trivially satisfied).
    assert np.ptp(np.asarray(out.logp_sum)[2]) > 0.1


def test_candidates_do_not_see_each_other(tiny):
    """A row's scores do not depend on which other candidates share the call."""
    config, params, _ = tiny
    ptoks, pmask = batch(10, [4, 7, 12, 2])
    other = [row[:1] + [[50, 51, 52]] + row[2:] for row in CANDS]
    s1 = score_candidates(params, config, ptoks, pmask, *candidate_arrays(CANDS))
    s2 = score_candidates(params, config, ptoks, pmask, *candidate_arrays(other))
    np.testing.assert_allclose(s1.logp_sum[:, 0], s2.logp_sum[:, 0], atol=1e-6)
    np.testing.assert_allclose(s1.logp_sum[:3, 2:], s2.logp_sum[:3, 2:], atol=1e-6)
    assert np.abs(np.asarray(s1.logp_sum[:3, 1] - s2.logp_sum[:3, 1])).min() > 1e-3


# ---------------------------------------------------------------------------- shared prefix
def test_prefix_prefill_matches_uncached(tiny):
    config, params, _ = tiny
    prefix, (st, sm), (ft, fm) = prefix_setup(7, [5, 2, 6, 1])
    cache = build_prefix(params, config, jnp.asarray(prefix))
    assert cache.length == 6
    h1, l1, _, pos1 = jit_prefill(params, config, st, sm, 4, prefix=cache)
    h2, l2, _, pos2 = jit_prefill(params, config, ft, fm, 4)
    np.testing.assert_allclose(h1, h2, atol=TOL)
    np.testing.assert_allclose(l1, l2, atol=TOL)
    np.testing.assert_array_equal(pos1, pos2)
    np.testing.assert_array_equal(pos1, [11, 8, 12, 7])
    # The prefix matters: a different one changes the result.
    other = build_prefix(params, config, jnp.asarray(prefix[::-1].copy()))
    h3, _, _, _ = jit_prefill(params, config, st, sm, 4, prefix=other)
    assert np.abs(np.asarray(h3) - np.asarray(h1)).max() > 1e-3


def test_generate_and_score_with_prefix_match_unprefixed(tiny):
    config, params, _ = tiny
    prefix, (st, sm), (ft, fm) = prefix_setup(8, [5, 2, 6, 4])
    cache = build_prefix(params, config, jnp.asarray(prefix))
    g1 = generate(params, config, st, sm, jax.random.key(0), greedy(N), prefix=cache)
    g2 = generate(params, config, ft, fm, jax.random.key(0), greedy(N))
    np.testing.assert_array_equal(np.asarray(g1.tokens), np.asarray(g2.tokens))
    np.testing.assert_allclose(g1.logprobs, g2.logprobs, atol=TOL)
    np.testing.assert_allclose(g1.last_hidden, g2.last_hidden, atol=TOL)
    ct, cm = candidate_arrays(CANDS)
    s1 = score_candidates(params, config, st, sm, ct, cm, prefix=cache)
    s2 = score_candidates(params, config, ft, fm, ct, cm)
    for a, b in zip(s1, s2, strict=True):
        np.testing.assert_allclose(a, b, atol=TOL)


# ---------------------------------------------------------------------------- compile counts
def test_one_trace_per_bucket(tiny):
    """Steps of a run with varying prompt lengths inside one bucket reuse one compiled
    ``generate`` and ``score_candidates``; a prompt in the next bucket compiles once more."""
    config, params, _ = tiny
    ct, cm = candidate_arrays(CANDS)
    s = SAMPLED["temp_top_p"]

    def step(seed, lengths, width=W):
        tokens, mask = batch(seed, lengths, width)
        generate(params, config, tokens, mask, jax.random.key(seed), s).tokens.block_until_ready()
        score_candidates(params, config, tokens, mask, ct, cm).logp_sum.block_until_ready()
        return generate._cache_size(), score_candidates._cache_size()

    # Counts are taken after a first step (which may or may not compile, depending on which
    # tests ran before), so the assertions hold whatever the test order.
    first = step(0, [3, 9, 5, 12])
    for seed, lengths in enumerate([[12, 1, 2, 2], [7, 7, 7, 7], [11, 4, 12, 6]], start=1):
        assert step(seed, lengths) == first
    # No other test uses a 2 * W wide prompt.
    assert step(9, [20, 3, 24, 1], width=2 * W) == (first[0] + 1, first[1] + 1)
