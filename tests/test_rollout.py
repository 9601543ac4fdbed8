"""The score-mode environment loop: batch shapes and masks, truncation vs termination,
auto-reset, and that its batches train."""

from __future__ import annotations

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rllama_jax.envs  # noqa: F401  (registers rllama/ envs)
from rllama_jax.models import LlamaConfig, init_params
from rllama_jax.models.loading import default_model_dir, load_tokenizer
from rllama_jax.models.lora import LoraConfig
from rllama_jax.rollout import RolloutConfig, ScoreRollout
from rllama_jax.train import TrainConfig, init_train_state, make_train_step

MODEL = LlamaConfig(
    vocab_size=49152, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8, tie_word_embeddings=True,
)  # fmt: skip


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(default_model_dir())


def test_tmaze_rollout_shapes_truncation_and_training(tok):
    n, t = 3, 7
    # corridor 3 -> 5 observations per episode; max_steps=4 truncates every episode at step 4.
    envs = [gym.make("rllama/TMaze-v0", corridor_length=3, max_steps=4) for _ in range(n)]
    cfg = TrainConfig(algorithm="ppo", trainable="lora", lora=LoraConfig(rank=2), epochs=1)
    state = init_train_state(cfg, MODEL, init_params(MODEL, jax.random.key(0)), jax.random.key(1))
    # A value head that is not identically zero, so bootstrap values are visible.
    heads = state.trainable["heads"]
    heads["value"]["b"] = jnp.asarray([0.5])
    rollout = ScoreRollout(
        envs,
        tok,
        MODEL,
        cfg,
        RolloutConfig(num_steps=t, prompt_len=128, max_actions=2, candidate_len=3),
    )
    batch = rollout.collect(state)
    assert batch.obs.prompt_tokens.shape == (n, t, 128)
    assert batch.obs.candidate_tokens.shape == (n, t, 2, 3)
    assert batch.actions.shape == batch.rewards.shape == batch.old_logp.shape == (n, t)
    # Every row's last prompt token is real (left padding) and the prompt ends with the
    # assistant header of the chat template.
    assert batch.obs.prompt_mask[:, :, -1].all()
    text = tok.decode(batch.obs.prompt_tokens[0, 0][batch.obs.prompt_mask[0, 0].astype(bool)])
    assert "signpost" in text and text.rstrip().endswith("assistant")
    # Corridor steps offer one candidate: the second action slot is masked there.
    assert not batch.obs.action_mask[:, 1, 1].any()
    assert (batch.actions[:, 1] == 0).all()
    # Steps 0-3 then truncation at the 4th step (index 3), reset, again at index 7 > t.
    assert batch.truncated[:, 3].all() and not batch.terminated[:, 3].any()
    assert not batch.truncated[:, [0, 1, 2, 4, 5, 6]].any()
    np.testing.assert_allclose(batch.final_values[:, 3], 0.5, atol=1e-6)
    assert (batch.final_values[:, [0, 1, 2, 4, 5, 6]] == 0).all()
    # After the reset at step 4 the signpost is seen again.
    text4 = tok.decode(batch.obs.prompt_tokens[0, 4][batch.obs.prompt_mask[0, 4].astype(bool)])
    assert "signpost" in text4
    np.testing.assert_allclose(batch.bootstrap_value, 0.5, atol=1e-6)
    assert np.all(batch.old_logp <= 0)
    step = make_train_step(cfg, MODEL)
    state, metrics = step(state, jax.tree.map(jnp.asarray, batch))
    assert int(state.skipped) == 0 and np.isfinite(float(metrics["loss"]))


def test_blackjack_rollout_records_episode_returns(tok):
    envs = [gym.make("rllama/Blackjack-v0") for _ in range(2)]
    cfg = TrainConfig(algorithm="ppo", trainable="heads", epochs=1)
    state = init_train_state(cfg, MODEL, init_params(MODEL, jax.random.key(0)), jax.random.key(1))
    rollout = ScoreRollout(envs, tok, MODEL, cfg, RolloutConfig(num_steps=6, prompt_len=256))
    batch = rollout.collect(state)
    # Blackjack rewards are -1, 0, +1 and only terminal steps pay.
    assert set(np.unique(batch.rewards)) <= {-1.0, 0.0, 1.0}
    assert (batch.rewards[~batch.terminated] == 0).all()
    assert len(rollout.finished_returns) == int(batch.terminated.sum())
    np.testing.assert_allclose(sum(rollout.finished_returns), batch.rewards.sum())
