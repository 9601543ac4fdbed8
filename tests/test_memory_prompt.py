"""Splicing memory text into left-padded prompts, and the memory-off / mode dispatch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rllama_jax.memory as memory
from rllama_jax.memory import prompt
from rllama_jax.memory.episodic import EpisodicConfig
from rllama_jax.memory.working import WorkingConfig

WORDS = (
    "<pad> SYS you play blackjack . OBS hand 14 dealer 10 Relevant past experience : "
    "Recent steps hit stick -> won lost 1 -1 20 21 ; obs action"
).split()
VOCAB = {w: i for i, w in enumerate(WORDS)}
PAD = 0


def enc(text: str) -> list[int]:
    return [VOCAB[w] for w in text.split()]


def dec(ids) -> str:
    return " ".join(WORDS[int(i)] for i in ids)


def left_pad(rows: list[list[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.full((len(rows), length), PAD, np.int32)
    mask = np.zeros((len(rows), length), bool)
    for b, row in enumerate(rows):
        tokens[b, length - len(row) :] = row
        mask[b, length - len(row) :] = True
    return tokens, mask


def entries(rows: list[list[str | None]], length: int) -> tuple[np.ndarray, np.ndarray]:
    """[B, n, length] entries; None = invalid entry; each entry right-padded (mask false)."""
    n = max(len(r) for r in rows)
    tokens = np.full((len(rows), n, length), PAD, np.int32)
    mask = np.zeros((len(rows), n, length), bool)
    for b, row in enumerate(rows):
        for i, text in enumerate(row):
            if text is not None:
                ids = enc(text)
                tokens[b, i, : len(ids)] = ids
                mask[b, i, : len(ids)] = True
            else:  # garbage under a false mask must never show up
                tokens[b, i] = VOCAB["SYS"]
    return tokens, mask


def assert_right_aligned(tokens: np.ndarray, mask: np.ndarray) -> None:
    for t, m in zip(tokens, mask, strict=True):
        n = int(m.sum())
        assert m[len(m) - n :].all() and not m[: len(m) - n].any()
        assert (t[~m] == PAD).all()


def valid_text(tokens, mask) -> str:
    return dec(np.asarray(tokens)[np.asarray(mask)])


def test_compact_left_right_match_numpy():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 9, size=(2, 3, 7)).astype(np.int32)
    mask = rng.random((2, 3, 7)) < 0.5
    left, lmask = jax.jit(prompt.compact_left)(tokens, mask)
    right, rmask = jax.jit(prompt.compact_right)(tokens, mask)
    for idx in np.ndindex(2, 3):
        kept = tokens[idx][mask[idx]]
        n = kept.size
        np.testing.assert_array_equal(np.asarray(left[idx]), np.r_[kept, [PAD] * (7 - n)])
        np.testing.assert_array_equal(np.asarray(right[idx]), np.r_[[PAD] * (7 - n), kept])
        assert np.asarray(lmask[idx]).tolist() == [True] * n + [False] * (7 - n)
        assert np.asarray(rmask[idx]).tolist() == [False] * (7 - n) + [True] * n
    flat, fmask = prompt.flatten_entries(tokens, mask)
    assert flat.shape == (2, 21) and fmask.shape == (2, 21)
    np.testing.assert_array_equal(np.asarray(flat[1, 7:14]), tokens[1, 1])


EP_HEADER = enc("Relevant past experience :")
WK_HEADER = enc("Recent steps :")
EPISODIC = [
    ["obs 14 hit -> lost -1 ;", None, "obs 20 stick -> won 1 ;"],
    [None, None, None],
    [None, None, None],
]
WORKING = [
    ["hand 14 hit ;", "hand 20 stick ;"],
    [None, "hand 21 stick ;"],
    [None, None],
]
EXPECTED_REGION = [
    "Relevant past experience : obs 14 hit -> lost -1 ; obs 20 stick -> won 1 ; "
    "Recent steps : hand 14 hit ; hand 20 stick ;",
    "Recent steps : hand 21 stick ;",
    "",
]


def _region(region_size: int):
    ep, ep_mask = entries(EPISODIC, 7)
    wk, wk_mask = entries(WORKING, 4)
    fn = jax.jit(prompt.build_memory_region, static_argnums=(6, 7))
    return fn(EP_HEADER, ep, ep_mask, WK_HEADER, wk, wk_mask, region_size, PAD)


def test_build_memory_region_layout():
    size = prompt.region_capacity(len(EP_HEADER), (3, 7), len(WK_HEADER), (2, 4))
    assert size == 4 + 21 + 3 + 8
    region, mask = _region(size + 5)
    assert region.shape == (3, size + 5) and mask.shape == (3, size + 5)
    region, mask = np.asarray(region), np.asarray(mask)
    assert_right_aligned(region, mask)
    for b in range(3):
        assert valid_text(region[b], mask[b]) == EXPECTED_REGION[b]
    # Too small a region keeps the last R valid tokens (most recent steps survive).
    small, small_mask = _region(6)
    assert valid_text(small[0], small_mask[0]) == "hit ; hand 20 stick ;"
    assert np.asarray(small_mask[0]).all()


def _reference_splice(prompt_rows, region_rows, insert_at):
    out = []
    for p, r, a in zip(prompt_rows, region_rows, insert_at, strict=True):
        a = min(max(a, 0), len(p))
        out.append(p[:a] + r + p[a:])
    return out


def test_splice_inserts_region_after_system_prompt():
    system = ["SYS you play blackjack .", "SYS you play .", "SYS ."]
    obs = ["OBS hand 14 dealer 10 .", "OBS hand 21 .", "OBS hand 20 dealer 10 ."]
    rows = [enc(s + " " + o) for s, o in zip(system, obs, strict=True)]
    tokens, mask = left_pad(rows, 14)
    region, region_mask = _region(40)
    insert_at = np.array([len(enc(s)) for s in system])
    out, out_mask = jax.jit(prompt.splice)(tokens, mask, region, region_mask, insert_at)
    assert out.shape == (3, 14 + 40) and out_mask.shape == (3, 54)
    out, out_mask = np.asarray(out), np.asarray(out_mask)
    assert_right_aligned(out, out_mask)
    for b in range(3):
        expected = " ".join(x for x in (system[b], EXPECTED_REGION[b], obs[b]) if x)
        assert valid_text(out[b], out_mask[b]) == expected
    positions = np.asarray(prompt.positions_from_mask(out_mask))
    n = int(out_mask[1].sum())
    assert positions[1, -n:].tolist() == list(range(n)) and (positions[1, :-n] == 0).all()


def test_splice_random_matches_reference():
    rng = np.random.default_rng(1)
    b, length, r = 6, 9, 5
    prompt_rows = [list(rng.integers(1, 30, size=rng.integers(0, length + 1))) for _ in range(b)]
    region_tokens = rng.integers(1, 30, size=(b, r)).astype(np.int32)
    region_mask = rng.random((b, r)) < 0.6  # arbitrary layout, not compacted
    insert_at = rng.integers(-1, length + 2, size=b)  # out-of-range values are clipped
    tokens, mask = left_pad(prompt_rows, length)
    out, out_mask = jax.jit(prompt.splice)(tokens, mask, region_tokens, region_mask, insert_at)
    out, out_mask = np.asarray(out), np.asarray(out_mask)
    assert_right_aligned(out, out_mask)
    region_rows = [list(region_tokens[i][region_mask[i]]) for i in range(b)]
    expected = _reference_splice(prompt_rows, region_rows, insert_at)
    for i in range(b):
        assert out[i][out_mask[i]].tolist() == expected[i]


# ---- MemoryConfig: mode dispatch and memory off ------------------------------------------------

EP_CFG = EpisodicConfig(capacity=6, key_dim=4, max_tokens=7, k=2)
WK_CFG = WorkingConfig(window=2, max_tokens=4, key_dim=4)


def test_memory_off_adds_nothing_to_the_graph():
    cfg = memory.MemoryConfig(mode="none")
    state = memory.init_memory(cfg, num_envs=3)
    assert jax.tree.leaves(state) == []
    tokens, mask = left_pad([enc("SYS . OBS hand 14 .")] * 3, 8)
    queries, scalars, flags, insert_at = (
        jnp.ones((3, 4)),
        jnp.ones(3),
        jnp.ones(3, bool),
        jnp.zeros(3, int),
    )
    args = (state, tokens, mask, queries, scalars, flags, insert_at)

    def act(state, tokens, mask, queries, scalars, flags, insert_at):
        state = memory.record_step(state, cfg, tokens, mask, queries, scalars, flags)
        state = memory.record_experience(state, cfg, queries, tokens, mask, scalars, flags)
        state = memory.end_episodes(state, cfg, flags)
        out = memory.augment_prompt(state, cfg, tokens, mask, insert_at, queries)
        assert memory.soft_prompt(state, cfg, None, queries) is None
        return state, out

    # Not a single operation is traced: memory off costs nothing in the compiled graph.
    assert len(jax.make_jaxpr(act)(*args).eqns) == 0
    _, (out, out_mask) = act(*args)
    assert out is tokens and out_mask is mask


def test_text_mode_end_to_end_under_jit():
    cfg = memory.MemoryConfig(
        mode="both",
        episodic=EP_CFG,
        working=WK_CFG,
        episodic_header=tuple(EP_HEADER),
        working_header=tuple(WK_HEADER),
    )
    assert cfg.text_region_size == len(EP_HEADER) + 2 * 7 + len(WK_HEADER) + 2 * 4
    state = jax.jit(memory.init_memory, static_argnums=(0, 1))(cfg, 2)
    keys = np.eye(4, dtype=np.float32)[:2]
    exp_tokens, exp_mask = entries([["obs 14 hit -> lost -1 ;"], ["obs 20 stick -> won 1 ;"]], 7)
    step_tokens, step_mask = entries([["hand 14 hit ;"], ["hand 20 stick ;"]], 4)

    @jax.jit
    def run(state, prompt_tokens, prompt_mask, insert_at):
        state = memory.record_experience(
            state,
            cfg,
            keys,
            exp_tokens[:, 0],
            exp_mask[:, 0],
            jnp.array([-1.0, 1.0]),
            jnp.array([True, True]),
        )
        state = memory.record_step(
            state,
            cfg,
            step_tokens[:, 0],
            step_mask[:, 0],
            keys,
            jnp.ones(2),
            jnp.array([True, False]),
        )
        return memory.augment_prompt(state, cfg, prompt_tokens, prompt_mask, insert_at, keys)

    tokens, mask = left_pad([enc("SYS . OBS hand 14 ."), enc("SYS . OBS hand 20 .")], 8)
    out, out_mask = run(state, tokens, mask, np.array([2, 2]))
    out, out_mask = np.asarray(out), np.asarray(out_mask)
    assert out.shape == (2, 8 + cfg.text_region_size)
    assert_right_aligned(out, out_mask)
    assert valid_text(out[0], out_mask[0]) == (
        "SYS . Relevant past experience : obs 14 hit -> lost -1 ; obs 20 stick -> won 1 ; "
        "Recent steps : hand 14 hit ; OBS hand 14 ."
    )
    # Row 1 retrieves entry 1 first (same key); its env wrote no step: no working header.
    assert valid_text(out[1], out_mask[1]) == (
        "SYS . Relevant past experience : obs 20 stick -> won 1 ; obs 14 hit -> lost -1 ; "
        "OBS hand 20 ."
    )


def test_memory_config_validation():
    with pytest.raises(ValueError):
        memory.MemoryConfig(mode="episodic")  # no EpisodicConfig
    with pytest.raises(ValueError):
        memory.MemoryConfig(mode="working", working=WK_CFG, representation="latent")
    with pytest.raises(ValueError):
        memory.MemoryConfig(mode="sometimes")
    with pytest.raises(ValueError):
        memory.MemoryConfig(mode="both", episodic=EP_CFG, working=WK_CFG.replace(key_dim=3))
    cfg = memory.MemoryConfig(mode="working", working=WK_CFG, region_size=11)
    assert cfg.text_region_size == 11 and jax.tree.leaves(cfg) == []
    state = memory.init_memory(cfg, 2)
    assert state.episodic is None and state.working.valid.shape == (2, 2)
