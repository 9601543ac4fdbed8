"""``make_train_step``: one jitted function per algorithm that does a whole update.

On-policy (PPO, A2C, REINFORCE, GRPO): returns and advantages over turns, a frozen-reference
pass for KL penalties, then ``epochs`` x ``minibatches`` gradient steps in ``lax.scan``.
Off-policy (DQN, SAC): the transitions enter the replay buffer held in the state, then
``updates_per_step`` gradient steps on sampled minibatches, each followed by a target update.
Both write the batch's experiences to episodic memory when it is on. With latent memory the
log-probs are recomputed from the memory read stored in each observation, through the current
memory adapter (``trainable["memory_adapter"]``), which the loss therefore trains; the KL
reference runs the reference LLM with the current adapter, without the policy head (the
base LLM's own policy over the candidates).
A non-finite loss or gradient skips that update (parameters and optimizer state unchanged)
and counts it.

The loss itself is a pure function of arrays (``rllama_jax.losses``); pass ``loss_fn`` to
swap in your own without touching this module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rllama_jax.losses import (
    a2c_loss,
    discounted_returns,
    discounts_from_dones,
    dqn_loss,
    fold_truncation_bootstrap,
    gae,
    group_advantages,
    grpo_loss,
    n_step_returns,
    periodic_update,
    polyak_update,
    ppo_loss,
    reinforce_loss,
    sac_loss,
)
from rllama_jax.memory import record_experience
from rllama_jax.models import LlamaConfig, Params
from rllama_jax.train.batch import Batch, Transitions
from rllama_jax.train.policy import evaluate_generate, evaluate_score
from rllama_jax.train.replay import add as replay_add
from rllama_jax.train.replay import sample as replay_sample
from rllama_jax.train.state import (
    TrainConfig,
    TrainState,
    _needs_reference,
    make_optimizer,
    memory_adapter,
    policy_params,
    reference_params,
)

Metrics = dict[str, jax.Array]


class LossInputs(NamedTuple):
    """What an on-policy loss sees for one minibatch of M turns.

    logp, old_logp, mask: [M, T'] (T' = 1 in score mode, the reply length in generate
    mode); ref_logp: [M, T'] or None; entropy: [M, T'] or None (score mode only);
    advantages, returns, values, old_values, valid: [M] per turn.
    """

    logp: jax.Array
    old_logp: jax.Array
    mask: jax.Array
    ref_logp: jax.Array | None
    entropy: jax.Array | None
    advantages: jax.Array
    returns: jax.Array
    values: jax.Array
    old_values: jax.Array
    valid: jax.Array


LossFn = Callable[[LossInputs], tuple[jax.Array, Metrics]]


def default_loss_fn(config: TrainConfig) -> LossFn:
    """The configured algorithm's loss on ``LossInputs``."""
    algo = config.algorithm
    has_value = "value" in config.head_names

    def loss_fn(x: LossInputs) -> tuple[jax.Array, Metrics]:
        values = x.values if has_value else None
        if algo == "ppo":
            return ppo_loss(
                x.logp, x.old_logp, x.advantages, x.mask,
                values=values, returns=x.returns if has_value else None,
                old_values=x.old_values if has_value else None,
                value_mask=x.valid if has_value else None,
                entropy=x.entropy, ref_logp=x.ref_logp, config=config.ppo,
            )  # fmt: skip
        if algo == "a2c":
            return a2c_loss(
                x.logp, x.advantages, x.mask, x.values, x.returns,
                entropy=x.entropy, value_mask=x.valid, config=config.a2c,
            )  # fmt: skip
        if algo == "reinforce":
            return reinforce_loss(
                x.logp, x.returns, x.mask, values=values, entropy=x.entropy,
                config=config.reinforce,
            )  # fmt: skip
        if algo == "grpo":
            return grpo_loss(
                x.logp, x.advantages, x.mask, old_logp=x.old_logp, ref_logp=x.ref_logp,
                config=config.grpo,
            )  # fmt: skip
        raise ValueError(f"{algo} is not an on-policy algorithm")

    return loss_fn


def _finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _guarded_update(
    optimizer: optax.GradientTransformation,
    trainable: Params,
    opt_state: Any,
    grads: Params,
    loss: jax.Array,
) -> tuple[Params, Any, jax.Array]:
    """Applies the update only when loss and gradients are finite; returns skipped (0/1)."""
    ok = jnp.isfinite(loss) & _finite(grads)
    grads = jax.tree.map(lambda g: jnp.where(ok, g, 0.0), grads)
    updates, new_opt = optimizer.update(grads, opt_state, trainable)
    new_trainable = optax.apply_updates(trainable, updates)
    pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
    return pick(new_trainable, trainable), pick(new_opt, opt_state), (~ok).astype(jnp.int32)


def _flat(tree: Any, lead: int = 2) -> Any:
    """Merges the first ``lead`` axes of every leaf ([N, T, ...] -> [N*T, ...])."""
    return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[lead:]), tree)


def _returns_and_advantages(batch: Batch, config: TrainConfig) -> tuple[jax.Array, jax.Array]:
    """Per-turn (advantages, returns) [N, T] for the configured algorithm."""
    valid = batch.valid.astype(jnp.float32)
    rewards = batch.rewards.astype(jnp.float32) * valid
    discounts = discounts_from_dones(batch.terminated, config.gamma) * valid
    rewards, discounts = fold_truncation_bootstrap(
        rewards, discounts, batch.truncated.astype(jnp.float32), batch.final_values
    )
    values = batch.old_values.astype(jnp.float32) * valid
    bootstrap = batch.bootstrap_value.astype(jnp.float32)
    if config.algorithm == "ppo":
        adv, ret = gae(rewards, discounts, values, bootstrap, config.gae_lambda)
    elif config.algorithm == "a2c":
        ret = n_step_returns(rewards, discounts, values, bootstrap, config.n_step)
        adv = ret - values
    elif config.algorithm == "reinforce":
        ret = discounted_returns(rewards, discounts, bootstrap)
        adv = ret
    else:  # grpo: one normalised episode return per row, spread over its turns
        episode_return = jnp.sum(rewards, axis=1)
        row_valid = jnp.any(batch.valid, axis=1)
        if batch.group_ids is None:
            raise ValueError("GRPO batches need group_ids [N]")
        row_adv = group_advantages(
            episode_return, group_ids=batch.group_ids, valid=row_valid,
            eps=1e-4, ddof=1,
        )  # fmt: skip
        adv = jnp.broadcast_to(row_adv[:, None], rewards.shape)
        ret = jnp.broadcast_to(episode_return[:, None], rewards.shape)
    adv = jax.lax.stop_gradient(adv) * valid
    ret = jax.lax.stop_gradient(ret) * valid
    return adv, ret


def remember_batch(state: TrainState, batch: Batch, config: TrainConfig) -> Any:
    """The state's memory with every valid turn of ``batch`` [N, T] written to episodic
    memory, with its discounted Monte-Carlo return-to-go (the importance of a memory is
    |return|). Every on-policy train step does this; call it directly to let a model that
    does not train (frozen, evaluation) remember. Memory unchanged without episodic memory."""
    if not config.memory.use_episodic or batch.memory_keys is None:
        return state.memory
    valid = batch.valid.astype(jnp.float32)
    rewards, discounts = fold_truncation_bootstrap(
        batch.rewards.astype(jnp.float32) * valid,
        discounts_from_dones(batch.terminated, config.gamma) * valid,
        batch.truncated.astype(jnp.float32),
        batch.final_values,
    )
    returns = discounted_returns(rewards, discounts, batch.bootstrap_value.astype(jnp.float32))
    flat = lambda x: x.reshape((-1,) + x.shape[2:])  # noqa: E731
    return record_experience(
        state.memory,
        config.memory,
        flat(batch.memory_keys),
        flat(batch.memory_tokens),
        flat(batch.memory_mask),
        flat(returns),
        flat(batch.valid),
        None if batch.memory_actions is None else flat(batch.memory_actions),
    )


def make_train_step(
    config: TrainConfig,
    model_config: LlamaConfig,
    loss_fn: LossFn | None = None,
    *,
    jit: bool = True,
    shard_minibatch: Callable[[Any], Any] | None = None,
) -> Callable[[TrainState, Any], tuple[TrainState, Metrics]]:
    """Returns ``train_step(state, batch) -> (state, metrics)``, jitted with the state donated.

    batch: a ``Batch`` [N, T] for PPO/A2C/REINFORCE/GRPO, ``Transitions`` [M] for DQN/SAC.
    loss_fn: optional replacement of the on-policy loss, ``LossInputs -> (loss, metrics)``.
    shard_minibatch: applied to every gathered minibatch (e.g. a sharding constraint keeping
    it split over the data axes of a mesh; ``rllama_jax.distributed`` passes one).
    """
    optimizer = make_optimizer(config)
    constrain = shard_minibatch or (lambda tree: tree)
    if config.off_policy:
        if loss_fn is not None:
            raise ValueError("loss_fn replaces on-policy losses only")
        step = _off_policy_step(config, model_config, optimizer, constrain)
    else:
        step = _on_policy_step(
            config, model_config, optimizer, loss_fn or default_loss_fn(config), constrain
        )
    return jax.jit(step, donate_argnums=0) if jit else step


def _on_policy_step(
    config: TrainConfig,
    model_config: LlamaConfig,
    optimizer: optax.GradientTransformation,
    loss_fn: LossFn,
    constrain: Callable[[Any], Any],
):
    score = config.action_mode == "score"

    def policy_logp(model: Params, tr: Params, mb: dict) -> tuple[jax.Array, ...]:
        """(logp [M, T'], mask [M, T'], entropy [M, T'] | None, values [M]) of the policy
        running ``model`` with the heads and memory adapter of ``tr``."""
        valid = mb["valid"]
        heads, adapter = tr["heads"], memory_adapter(tr)
        if score:
            ev = evaluate_score(model, heads, mb["obs"], model_config, config, adapter)
            logp = jnp.take_along_axis(ev.log_probs, mb["actions"][:, None], axis=-1)
            mask = valid[:, None]
            return logp, mask, ev.entropy[:, None], ev.values
        ev = evaluate_generate(
            model, heads, mb["obs"], mb["response_tokens"], mb["response_mask"],
            model_config, config, adapter,
        )  # fmt: skip
        mask = mb["response_mask"].astype(bool) & valid[:, None]
        return ev.token_logp, mask, None, ev.values

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        n, t = batch.rewards.shape
        m = n * t
        if m % config.minibatches:
            raise ValueError(
                f"{m} turns per batch (N={n} x T={t}) is not divisible by "
                f"minibatches={config.minibatches}"
            )
        adv, ret = _returns_and_advantages(batch, config)
        data = {
            "obs": _flat(batch.obs),
            "valid": batch.valid.reshape(m).astype(bool),
            "old_logp": _flat(batch.old_logp),
            "old_values": batch.old_values.reshape(m).astype(jnp.float32),
            "advantages": adv.reshape(m),
            "returns": ret.reshape(m),
        }
        if score:
            data["actions"] = batch.actions.reshape(m).astype(jnp.int32)
            data["old_logp"] = data["old_logp"].reshape(m, 1)
        else:
            data["response_tokens"] = _flat(batch.response_tokens)
            data["response_mask"] = _flat(batch.response_mask)
        if _needs_reference(config):
            # The reference is the base LLM's own policy: no LoRA and no policy head (with
            # the current head it would be the policy itself whenever only heads train).
            ref_model = reference_params(state.frozen, config)
            ref_heads = {k: v for k, v in state.trainable["heads"].items() if k != "policy"}
            data["ref_logp"] = jax.lax.stop_gradient(
                policy_logp(ref_model, {**state.trainable, "heads": ref_heads}, data)[0]
            )

        def grad_step(carry, idx):
            trainable, opt_state, skipped = carry
            mb = constrain(jax.tree.map(lambda x: x[idx], data))

            def objective(tr: Params):
                model = policy_params(tr, state.frozen, config)
                logp, mask, entropy, values = policy_logp(model, tr, mb)
                inputs = LossInputs(
                    logp=logp, old_logp=mb["old_logp"], mask=mask,
                    ref_logp=mb.get("ref_logp"), entropy=entropy,
                    advantages=mb["advantages"], returns=mb["returns"], values=values,
                    old_values=mb["old_values"], valid=mb["valid"],
                )  # fmt: skip
                return loss_fn(inputs)

            (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
            metrics = {**metrics, "grad_norm": optax.tree.norm(grads)}
            trainable, opt_state, skip = _guarded_update(
                optimizer, trainable, opt_state, grads, loss
            )
            return (trainable, opt_state, skipped + skip), metrics

        def epoch(carry, key):
            perm = jax.random.permutation(key, m).reshape(config.minibatches, -1)
            return jax.lax.scan(grad_step, carry, perm)

        rng, key = jax.random.split(state.rng)
        keys = jax.random.split(key, config.epochs)
        (trainable, opt_state, skipped), metrics = jax.lax.scan(
            epoch, (state.trainable, state.opt_state, state.skipped), keys
        )
        metrics = jax.tree.map(jnp.mean, metrics)
        metrics["skipped_updates"] = skipped
        metrics["advantage_mean"] = jnp.sum(adv) / jnp.maximum(jnp.sum(batch.valid), 1)
        memory = remember_batch(state, batch, config)
        new_state = state.replace(
            trainable=trainable, opt_state=opt_state, skipped=skipped, rng=rng,
            step=state.step + 1, memory=memory,
        )  # fmt: skip
        return new_state, metrics

    return train_step


def _off_policy_step(
    config: TrainConfig,
    model_config: LlamaConfig,
    optimizer: optax.GradientTransformation,
    constrain: Callable[[Any], Any],
):
    def objective(trainable: Params, target: Params, frozen: Params, items: Transitions, w):
        model = policy_params(trainable, frozen, config)
        adapter = memory_adapter(trainable)
        ev = evaluate_score(model, trainable["heads"], items.obs, model_config, config, adapter)
        nxt = evaluate_score(
            model, trainable["heads"], items.next_obs, model_config, config, adapter
        )
        nxt = jax.lax.stop_gradient(nxt)
        target_model = policy_params(target, frozen, config)
        tgt = evaluate_score(
            target_model, target["heads"], items.next_obs, model_config, config,
            memory_adapter(target),
        )  # fmt: skip
        tgt = jax.lax.stop_gradient(tgt)
        if config.algorithm == "dqn":
            return dqn_loss(
                ev.q["q"], items.actions, items.rewards, items.discounts,
                next_q_target=tgt.q["q"], next_mask=items.next_obs.action_mask,
                next_q_online=nxt.q["q"], weights=w, config=config.dqn,
            )  # fmt: skip
        return sac_loss(
            ev.logits, items.obs.action_mask, ev.q["q1"], ev.q["q2"], items.actions,
            items.rewards, items.discounts, nxt.logits, items.next_obs.action_mask,
            tgt.q["q1"], tgt.q["q2"], trainable["log_alpha"], weights=w, config=config.sac,
        )  # fmt: skip

    def train_step(state: TrainState, batch: Transitions) -> tuple[TrainState, Metrics]:
        replay = replay_add(state.replay, batch, batch.valid)
        rng, key = jax.random.split(state.rng)

        def update(carry, key):
            trainable, target, opt_state, skipped, updates = carry
            items, w = constrain(replay_sample(replay, key, config.replay_batch))
            w = w * items.valid.astype(jnp.float32)
            (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(
                trainable, target, state.frozen, items, w
            )
            metrics = {**metrics, "grad_norm": optax.tree.norm(grads)}
            trainable, opt_state, skip = _guarded_update(
                optimizer, trainable, opt_state, grads, loss
            )
            updates = updates + 1
            if config.target_update == "polyak":
                target = polyak_update(target, trainable, config.tau)
            else:
                target = periodic_update(target, trainable, updates, config.target_period)
            return (trainable, target, opt_state, skipped + skip, updates), metrics

        # Gradient updates so far: every train_step takes updates_per_step of them.
        done = state.step * config.updates_per_step
        carry = (state.trainable, state.target, state.opt_state, state.skipped, done)
        keys = jax.random.split(key, config.updates_per_step)
        (trainable, target, opt_state, skipped, _), metrics = jax.lax.scan(update, carry, keys)
        metrics = jax.tree.map(jnp.mean, metrics)
        metrics["skipped_updates"] = skipped
        metrics["replay_size"] = jnp.sum(replay.valid)
        new_state = state.replace(
            trainable=trainable, target=target, opt_state=opt_state, skipped=skipped,
            step=state.step + 1, rng=rng, replay=replay,
        )  # fmt: skip
        return new_state, metrics

    return train_step
