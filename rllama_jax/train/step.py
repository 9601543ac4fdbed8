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
Memory (``TrainConfig.remat``, ``TrainConfig.microbatch_rows``): the loss's forward
rematerialises the LLM's layers, and an on-policy minibatch can run in micro-batches whose
gradients add up to the minibatch's (``minibatch_gradient`` inside ``_on_policy_step``).

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


def _microbatch_count(rows: int, microbatch_rows: int) -> int:
    """How many micro-batches of ``microbatch_rows`` make ``rows`` (1: no split)."""
    if microbatch_rows <= 0 or microbatch_rows >= rows:
        return 1
    if rows % microbatch_rows:
        raise ValueError(
            f"microbatch_rows={microbatch_rows} does not divide the {rows} rows of a minibatch"
        )
    return rows // microbatch_rows


def _split_rows(tree: Any, k: int) -> Any:
    """[M, ...] -> [k, M // k, ...], micro-batch i holding rows i, i + k, i + 2k, ... (strided,
    so that rows sharded over devices stay spread over them in every micro-batch)."""
    return jax.tree.map(
        lambda x: jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1), tree
    )


def _join_rows(tree: Any) -> Any:
    """The inverse of ``_split_rows``: [k, M // k, ...] -> [M, ...]."""
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:]), tree)


def _put_rows(full: jax.Array, part: jax.Array, i: jax.Array, k: int) -> jax.Array:
    """``full`` [M, ...] with micro-batch ``i`` of ``_split_rows(full, k)`` replaced by
    ``part`` [M // k, ...]."""
    split = full.reshape((full.shape[0] // k, k) + full.shape[1:])
    return jax.lax.dynamic_update_index_in_dim(split, part, i, 1).reshape(full.shape)


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
    return DonatingStep(step) if jit else step


class DonatingStep:
    """A train step jitted with the state donated, except its frozen parameters.

    The frozen part (the base model under LoRA or heads, a KL reference) is what the caller
    loaded: it passes through unchanged, so it is neither donated (the caller's arrays stay
    alive, e.g. for a second agent on the same model) nor copied out of the step.
    """

    def __init__(self, step: Callable[[TrainState, Any], tuple[TrainState, Metrics]]) -> None:
        def without_frozen(state: TrainState, frozen: Params, batch: Any):
            new, metrics = step(state.replace(frozen=frozen), batch)
            return new.replace(frozen={}), metrics

        self.jitted = jax.jit(without_frozen, donate_argnums=0)

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        new, metrics = self.jitted(state.replace(frozen={}), state.frozen, batch)
        return new.replace(frozen=state.frozen), metrics

    def lower(self, state: TrainState, batch: Any) -> Any:
        """``jax.jit(...).lower`` of the step on these arguments (for AOT and cost analysis)."""
        return self.jitted.lower(state.replace(frozen={}), state.frozen, batch)

    def _cache_size(self) -> int:
        return self.jitted._cache_size()


def _on_policy_step(
    config: TrainConfig,
    model_config: LlamaConfig,
    optimizer: optax.GradientTransformation,
    loss_fn: LossFn,
    constrain: Callable[[Any], Any],
):
    score = config.action_mode == "score"

    def loss_mask(mb: dict) -> jax.Array:
        """[M, T']: the turns (score mode) or reply tokens (generate mode) the loss counts."""
        if score:
            return mb["valid"][:, None]
        return mb["response_mask"].astype(bool) & mb["valid"][:, None]

    def policy_logp(
        model: Params, tr: Params, mb: dict, remat: bool = False
    ) -> tuple[jax.Array, ...]:
        """(logp [M, T'], mask [M, T'], entropy [M, T'] | None, values [M]) of the policy
        running ``model`` with the heads and memory adapter of ``tr``; ``remat``: the LLM
        rematerialises its layers when differentiated (the loss's forward only)."""
        heads, adapter = tr["heads"], memory_adapter(tr)
        if score:
            ev = evaluate_score(model, heads, mb["obs"], model_config, config, adapter, remat=remat)
            logp = jnp.take_along_axis(ev.log_probs, mb["actions"][:, None], axis=-1)
            return logp, loss_mask(mb), ev.entropy[:, None], ev.values
        ev = evaluate_generate(
            model, heads, mb["obs"], mb["response_tokens"], mb["response_mask"],
            model_config, config, adapter, remat=remat,
        )  # fmt: skip
        return ev.token_logp, loss_mask(mb), None, ev.values

    def loss_inputs(mb: dict, logp, entropy, values) -> LossInputs:
        return LossInputs(
            logp=logp, old_logp=mb["old_logp"], mask=loss_mask(mb),
            ref_logp=mb.get("ref_logp"), entropy=entropy, advantages=mb["advantages"],
            returns=mb["returns"], values=values, old_values=mb["old_values"],
            valid=mb["valid"],
        )  # fmt: skip

    def outputs(tr: Params, frozen: Params, rows: dict) -> tuple[Any, Any, Any]:
        """(logp, entropy, values) of the current policy on ``rows``: the model outputs
        the loss differentiates."""
        model = policy_params(tr, frozen, config)
        logp, _, entropy, values = policy_logp(model, tr, rows, remat=config.remat)
        return logp, entropy, values

    def minibatch_gradient(trainable: Params, frozen: Params, mb: dict):
        """(loss, metrics, gradient) of the loss over the minibatch ``mb`` [M rows].

        With ``config.microbatch_rows`` the model runs on micro-batches of that many rows
        (a ``lax.scan``: one compiled body) and their gradients are summed. The loss itself
        always sees all M rows: the rows outside the current micro-batch enter it as
        constants (their acting-time log-probs and values), so its denominators (valid
        tokens, valid turns, sequences) and batch statistics (advantage normalisation, the
        REINFORCE mean baseline) are the whole minibatch's. For a loss that is a sum of
        per-row terms over such minibatch-wide constants (every built-in loss), the
        gradient with respect to a micro-batch's outputs does not depend on the other rows'
        values, so the summed gradient is the whole-minibatch gradient (up to rounding).
        Loss and metrics are computed once on all M rows' outputs.
        """
        rows = mb["valid"].shape[0]
        k = _microbatch_count(rows, config.microbatch_rows)
        if k == 1:

            def objective(tr: Params):
                return loss_fn(loss_inputs(mb, *outputs(tr, frozen, mb)))

            (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
            return loss, metrics, grads

        entropy0 = jnp.zeros_like(mb["old_logp"], jnp.float32) if score else None
        stand_in = (mb["old_logp"], entropy0, mb["old_values"])

        def micro(grads: Params, xs):
            i, part = xs

            def objective(tr: Params):
                out = outputs(tr, frozen, part)
                full = jax.tree.map(
                    lambda s, o: _put_rows(s, o.astype(s.dtype), i, k), stand_in, out
                )
                return loss_fn(loss_inputs(mb, *full))[0], out

            (_, out), g = jax.value_and_grad(objective, has_aux=True)(trainable)
            return jax.tree.map(jnp.add, grads, g), out

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        grads, outs = jax.lax.scan(micro, zeros, (jnp.arange(k), _split_rows(mb, k)))
        loss, metrics = loss_fn(loss_inputs(mb, *_join_rows(outs)))
        return loss, metrics, grads

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
            ref_tr = {**state.trainable, "heads": ref_heads}
            k = _microbatch_count(m, config.microbatch_rows)
            ref_logp = jax.lax.map(
                lambda rows: policy_logp(ref_model, ref_tr, rows)[0], _split_rows(data, k)
            )
            data["ref_logp"] = jax.lax.stop_gradient(_join_rows(ref_logp))

        def grad_step(carry, idx):
            trainable, opt_state, skipped = carry
            mb = constrain(jax.tree.map(lambda x: x[idx], data))
            loss, metrics, grads = minibatch_gradient(trainable, state.frozen, mb)
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
        ev = evaluate_score(
            model, trainable["heads"], items.obs, model_config, config, adapter,
            remat=config.remat,
        )  # fmt: skip
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
