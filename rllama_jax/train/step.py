"""``make_train_step``: one jitted function that does a whole update, for any algorithm.

``train_step(state, trajectory)`` takes the ``Trajectory`` [N, T] a rollout (or the agent's
single-env loop) produced and asks the configured ``rllama_jax.algos`` object what to do:

* on-policy (``Algorithm.off_policy`` false): ``algorithm.advantages`` over the trajectory's
  turns, a frozen-reference pass when ``algorithm.needs_reference``, then
  ``algorithm.epochs`` x ``minibatches`` gradient steps of ``algorithm.loss`` in ``lax.scan``;
* off-policy: ``algorithm.transitions`` (n-step rows, a pure function of the trajectory) enter
  the replay buffer held in the state, then ``updates_per_step`` gradient steps of
  ``algorithm.q_loss`` on sampled minibatches, each followed by a target update.

Every algorithm then writes the trajectory's turns to episodic memory when it is on. The
policy's log-probs, entropies and KL use the untruncated (temperature-scaled) distribution;
in score mode the KL to the reference is exact over the candidates. With latent memory the
log-probs are recomputed from the memory read stored in each observation, through the
current memory adapter (``trainable["memory_adapter"]``), which the loss therefore trains; the
KL reference runs the reference LLM with the current adapter, without the policy head (the
base LLM's own policy over the candidates).
A non-finite loss or gradient skips that update (parameters and optimizer state unchanged)
and counts it.
Memory (``TrainConfig.remat``, ``TrainConfig.microbatch_rows``): the loss's forward
rematerialises the LLM's layers, and an on-policy minibatch can run in micro-batches whose
gradients add up to the minibatch's (``minibatch_gradient`` inside ``_on_policy_step``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from rllama_jax.algos import LossInputs, QInputs
from rllama_jax.algos.base import folded_rewards
from rllama_jax.losses import (
    discounted_returns,
    masked_softmax,
    periodic_update,
    polyak_update,
)
from rllama_jax.memory import record_experience
from rllama_jax.models import LlamaConfig, Params
from rllama_jax.train.policy import evaluate_generate, evaluate_score
from rllama_jax.train.replay import add as replay_add
from rllama_jax.train.replay import sample as replay_sample
from rllama_jax.train.state import (
    TrainConfig,
    TrainState,
    make_optimizer,
    memory_adapter,
    policy_params,
    reference_params,
)
from rllama_jax.trajectory import Observation, Trajectory

Metrics = dict[str, jax.Array]


@struct.dataclass
class Minibatch:
    """The rows an on-policy gradient step sees, leading axis [M] (flattened turns).

    obs: Observation [M, ...]; valid: [M] bool; old_logp: [M, T'] (T' = 1 in score mode,
    the reply length in generate mode); old_values, advantages, returns: [M];
    actions: [M] (score mode); response_tokens, response_mask: [M, R] (generate mode);
    ref_logp: [M, T'] the reference's log-prob of the taken action / tokens, and
    ref_log_probs: [M, A] its whole categorical over the candidates (score mode), when the
    algorithm has a KL term.
    """

    obs: Observation
    valid: jax.Array
    old_logp: jax.Array
    old_values: jax.Array
    advantages: jax.Array
    returns: jax.Array
    actions: jax.Array | None = None
    response_tokens: jax.Array | None = None
    response_mask: jax.Array | None = None
    ref_logp: jax.Array | None = None
    ref_log_probs: jax.Array | None = None


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


def remember_batch(state: TrainState, batch: Trajectory, config: TrainConfig) -> Any:
    """The state's memory with every valid turn of ``batch`` [N, T] written to episodic
    memory, with its discounted return-to-go (bootstrapped where the trajectory cuts an
    episode; the importance of a memory is |return|). Every train step does this, for every
    algorithm; call it directly to let a model that does not train (frozen, evaluation)
    remember. Memory unchanged without episodic memory."""
    if not config.memory.use_episodic or batch.memory_keys is None:
        return state.memory
    rewards, discounts = folded_rewards(batch, config.gamma)
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
    *,
    jit: bool = True,
    shard_minibatch: Callable[[Any], Any] | None = None,
) -> Callable[[TrainState, Trajectory], tuple[TrainState, Metrics]]:
    """Returns ``train_step(state, trajectory) -> (state, metrics)``, jitted with the state
    donated (its frozen weights excepted, see ``DonatingStep``).

    trajectory: a ``Trajectory`` [N, T] (with ``next_obs`` for off-policy algorithms).
    shard_minibatch: applied to every gathered minibatch (e.g. a sharding constraint keeping
    it split over the data axes of a mesh; ``rllama_jax.distributed`` passes one).
    To change a loss, subclass the algorithm (``rllama_jax.algos``) and override ``loss``.

    Equal ``(config, model_config)`` give the same jitted step (the last 16 kept), so a
    second agent, or the launcher after an agent, on the same settings reuses its compiled
    program instead of compiling it again.
    """
    if jit and shard_minibatch is None:
        return _shared_step(config, model_config)
    return _build_step(config, model_config, jit=jit, shard_minibatch=shard_minibatch)


@functools.lru_cache(maxsize=16)
def _shared_step(config: TrainConfig, model_config: LlamaConfig) -> DonatingStep:
    return _build_step(config, model_config, jit=True, shard_minibatch=None)


def _build_step(
    config: TrainConfig,
    model_config: LlamaConfig,
    *,
    jit: bool,
    shard_minibatch: Callable[[Any], Any] | None,
) -> Callable[[TrainState, Trajectory], tuple[TrainState, Metrics]]:
    optimizer = make_optimizer(config)
    constrain = shard_minibatch or (lambda tree: tree)
    build = _off_policy_step if config.off_policy else _on_policy_step
    step = build(config, model_config, optimizer, constrain)
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

    def compile(self, state: TrainState, batch: Any) -> CompiledStep:
        """The step compiled ahead of time for these shapes, called like the step itself."""
        return CompiledStep(self.lower(state, batch).compile())

    def _cache_size(self) -> int:
        return self.jitted._cache_size()


class CompiledStep:
    """``DonatingStep.compile``'s result: ``(state, batch) -> (state, metrics)`` on one
    compiled executable (``executable``: for cost and memory analysis)."""

    def __init__(self, executable: Any) -> None:
        self.executable = executable

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        new, metrics = self.executable(state.replace(frozen={}), state.frozen, batch)
        return new.replace(frozen=state.frozen), metrics


def exact_kl(log_probs: jax.Array, ref_log_probs: jax.Array, mask: jax.Array) -> jax.Array:
    """KL(pi || pi_ref) [M] of two categoricals over the candidates, log-probs [M, A]
    (invalid candidates, ``mask`` False, contribute 0); differentiable in ``log_probs``."""
    p = masked_softmax(log_probs, mask)
    terms = jnp.where(mask.astype(bool), p * (log_probs - ref_log_probs), 0.0)
    return jnp.sum(terms, axis=-1)


def _on_policy_step(
    config: TrainConfig,
    model_config: LlamaConfig,
    optimizer: optax.GradientTransformation,
    constrain: Callable[[Any], Any],
):
    algo = config.algorithm
    score = config.action_mode == "score"

    def loss_mask(mb: Minibatch) -> jax.Array:
        """[M, T']: the turns (score mode) or reply tokens (generate mode) the loss counts."""
        if score:
            return mb.valid[:, None]
        return mb.response_mask.astype(bool) & mb.valid[:, None]

    def policy_outputs(model: Params, tr: Params, mb: Minibatch, remat: bool = False):
        """(logp [M, T'], entropy [M, T'], values [M], log_probs [M, A] | None) of the
        policy running ``model`` with the heads and memory adapter of ``tr``; ``remat``: the
        LLM rematerialises its layers when differentiated (the loss's forward only)."""
        heads, adapter = tr["heads"], memory_adapter(tr)
        if score:
            ev = evaluate_score(model, heads, mb.obs, model_config, config, adapter, remat=remat)
            logp = jnp.take_along_axis(ev.log_probs, mb.actions[:, None], axis=-1)
            return logp, ev.entropy[:, None], ev.values, ev.log_probs
        ev = evaluate_generate(
            model, heads, mb.obs, mb.response_tokens, mb.response_mask,
            model_config, config, adapter, remat=remat,
        )  # fmt: skip
        return ev.token_logp, ev.entropy, ev.values, None

    def outputs(tr: Params, frozen: Params, rows: Minibatch) -> tuple[Any, Any, Any, Any]:
        """(logp, entropy, values, kl) of the current policy on ``rows``: the model outputs
        the loss differentiates (kl: [M, 1] exact over the candidates in score mode when
        the algorithm has a reference, else zeros; generate mode estimates it in the loss)."""
        model = policy_params(tr, frozen, config)
        logp, entropy, values, log_probs = policy_outputs(model, tr, rows, remat=config.remat)
        kl = jnp.zeros(logp.shape, jnp.float32)
        if score and rows.ref_log_probs is not None:
            kl = exact_kl(log_probs, rows.ref_log_probs, rows.obs.action_mask)[:, None]
        return logp, entropy, values, kl

    def loss_inputs(mb: Minibatch, logp, entropy, values, kl) -> LossInputs:
        return LossInputs(
            logp=logp, old_logp=mb.old_logp, mask=loss_mask(mb), ref_logp=mb.ref_logp,
            kl=kl if mb.ref_log_probs is not None else None, entropy=entropy,
            advantages=mb.advantages, returns=mb.returns, values=values,
            old_values=mb.old_values, valid=mb.valid,
        )  # fmt: skip

    def minibatch_gradient(trainable: Params, frozen: Params, mb: Minibatch):
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
        rows = mb.valid.shape[0]
        k = _microbatch_count(rows, config.microbatch_rows)
        if k == 1:

            def objective(tr: Params):
                return algo.loss(loss_inputs(mb, *outputs(tr, frozen, mb)))

            (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
            return loss, metrics, grads

        zeros_t = jnp.zeros_like(mb.old_logp, jnp.float32)
        stand_in = (mb.old_logp, zeros_t, mb.old_values, zeros_t)

        def micro(grads: Params, xs):
            i, part = xs

            def objective(tr: Params):
                out = outputs(tr, frozen, part)
                full = jax.tree.map(
                    lambda s, o: _put_rows(s, o.astype(s.dtype), i, k), stand_in, out
                )
                return algo.loss(loss_inputs(mb, *full))[0], out

            (_, out), g = jax.value_and_grad(objective, has_aux=True)(trainable)
            return jax.tree.map(jnp.add, grads, g), out

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        grads, outs = jax.lax.scan(micro, zeros, (jnp.arange(k), _split_rows(mb, k)))
        loss, metrics = algo.loss(loss_inputs(mb, *_join_rows(outs)))
        return loss, metrics, grads

    def reference(state: TrainState, data: Minibatch) -> Minibatch:
        """``data`` with the frozen reference's log-probs (and, in score mode, its whole
        categorical over the candidates). The reference is the base LLM's own policy: no
        LoRA and no policy head (with the current head it would be the policy itself
        whenever only heads train)."""
        ref_model = reference_params(state.frozen, config)
        ref_heads = {k: v for k, v in state.trainable["heads"].items() if k != "policy"}
        ref_tr = {**state.trainable, "heads": ref_heads}
        k = _microbatch_count(data.valid.shape[0], config.microbatch_rows)

        def rows_ref(rows: Minibatch):
            logp, _, _, log_probs = policy_outputs(ref_model, ref_tr, rows)
            return logp, log_probs

        logp, log_probs = jax.lax.map(rows_ref, _split_rows(data, k))
        logp, log_probs = jax.lax.stop_gradient(_join_rows((logp, log_probs)))
        return data.replace(ref_logp=logp, ref_log_probs=log_probs if score else None)

    def train_step(state: TrainState, traj: Trajectory) -> tuple[TrainState, Metrics]:
        n, t = traj.rewards.shape
        m = n * t
        if m % config.minibatches:
            raise ValueError(
                f"{m} turns per batch (N={n} x T={t}) is not divisible by "
                f"minibatches={config.minibatches}"
            )
        adv, ret = algo.advantages(traj, config.gamma)
        adv, ret = jax.lax.stop_gradient(adv), jax.lax.stop_gradient(ret)
        data = Minibatch(
            obs=_flat(traj.obs),
            valid=traj.valid.reshape(m).astype(bool),
            old_logp=_flat(traj.old_logp).reshape(m, -1),
            old_values=traj.old_values.reshape(m).astype(jnp.float32),
            advantages=adv.reshape(m),
            returns=ret.reshape(m),
            actions=traj.actions.reshape(m).astype(jnp.int32) if score else None,
            response_tokens=None if score else _flat(traj.response_tokens),
            response_mask=None if score else _flat(traj.response_mask),
        )
        if algo.needs_reference:
            data = reference(state, data)

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
        keys = jax.random.split(key, algo.epochs)
        (trainable, opt_state, skipped), metrics = jax.lax.scan(
            epoch, (state.trainable, state.opt_state, state.skipped), keys
        )
        metrics = jax.tree.map(jnp.mean, metrics)
        metrics["skipped_updates"] = skipped
        metrics["advantage_mean"] = jnp.sum(adv) / jnp.maximum(jnp.sum(traj.valid), 1)
        memory = remember_batch(state, traj, config)
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
    algo = config.algorithm

    def objective(trainable: Params, target: Params, frozen: Params, items, w):
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
        extra = {k: v for k, v in trainable.items() if k in algo.extra_params()}
        return algo.q_loss(
            QInputs(
                logits=ev.logits,
                mask=items.obs.action_mask,
                q=ev.q,
                next_logits=nxt.logits,
                next_mask=items.next_obs.action_mask,
                next_q=nxt.q,
                target_q=tgt.q,
                actions=items.actions,
                rewards=items.rewards,
                discounts=items.discounts,
                weights=w,
                extra=extra,
            )  # fmt: skip
        )

    def train_step(state: TrainState, traj: Trajectory) -> tuple[TrainState, Metrics]:
        batch = algo.transitions(traj, config.gamma)
        replay = replay_add(state.replay, batch, batch.valid)
        rng, key = jax.random.split(state.rng)

        def update(carry, key):
            trainable, target, opt_state, skipped, updates = carry
            items, w = constrain(replay_sample(replay, key, algo.replay_batch))
            w = w * items.valid.astype(jnp.float32)
            (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(
                trainable, target, state.frozen, items, w
            )
            metrics = {**metrics, "grad_norm": optax.tree.norm(grads)}
            trainable, opt_state, skip = _guarded_update(
                optimizer, trainable, opt_state, grads, loss
            )
            updates = updates + 1
            if algo.target_update == "polyak":
                target = polyak_update(target, trainable, algo.tau)
            else:
                target = periodic_update(target, trainable, updates, algo.target_period)
            return (trainable, target, opt_state, skipped + skip, updates), metrics

        # Gradient updates so far: every train_step takes updates_per_step of them.
        done = state.step * algo.updates_per_step
        carry = (state.trainable, state.target, state.opt_state, state.skipped, done)
        keys = jax.random.split(key, algo.updates_per_step)
        (trainable, target, opt_state, skipped, _), metrics = jax.lax.scan(update, carry, keys)
        metrics = jax.tree.map(jnp.mean, metrics)
        metrics["skipped_updates"] = skipped
        metrics["replay_size"] = jnp.sum(replay.valid)
        new_state = state.replace(
            trainable=trainable, target=target, opt_state=opt_state, skipped=skipped,
            step=state.step + 1, rng=rng, replay=replay, memory=remember_batch(state, traj, config),
        )  # fmt: skip
        return new_state, metrics

    return train_step
