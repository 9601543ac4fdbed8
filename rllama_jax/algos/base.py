"""What every algorithm answers, and the name -> class registry.

An algorithm is a frozen dataclass holding all its hyperparameters (hashable: it sits in
the static ``TrainConfig``, and changing a field recompiles). The train step, the rollout,
the state initialisation and the launcher never ask an algorithm's name; they ask it:

* ``head_names(trainable)``: the heads it trains on top of the LLM (value, Q, policy);
* ``extra_params()``: other fresh parameters (SAC's temperature);
* ``needs_reference``: whether the state keeps a frozen KL reference;
* ``off_policy`` / ``needs_next_obs``: whether it learns from a replay buffer of n-step
  transitions (it then has a target network) or from the trajectory itself;
* ``whole_episodes`` / ``group_size``: how the rollout lays out rows (one episode per row,
  rows in groups starting from one seed);
* ``acting_logits``: how it acts in score mode given the policy logits and Q-values;
* on-policy: ``epochs``, ``advantages(traj, gamma)`` and ``loss(LossInputs)``;
* off-policy: ``transitions(traj, gamma)``, the replay and target settings, and
  ``q_loss(...)``.

Every algorithm writes its trajectories to episodic memory (the train step does it for all).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from rllama_jax.losses import discounts_from_dones, fold_truncation_bootstrap
from rllama_jax.trajectory import Trajectory, Transitions, n_step_transitions

Metrics = dict[str, jax.Array]


class LossInputs(NamedTuple):
    """What an on-policy loss sees for one minibatch of M turns.

    logp, old_logp, mask: [M, T'] (T' = 1 in score mode, the reply length in generate
    mode); ref_logp: [M, T'] or None (no KL reference); kl: [M, T'] the per-position
    KL(pi || pi_ref) when it is known exactly (score mode: the full categorical over the
    candidates), else None (estimate it from ``ref_logp``); entropy: [M, T'] the entropy of
    the (untruncated) distribution at each position; advantages, returns, values,
    old_values, valid: [M] per turn.
    """

    logp: jax.Array
    old_logp: jax.Array
    mask: jax.Array
    ref_logp: jax.Array | None
    kl: jax.Array | None
    entropy: jax.Array | None
    advantages: jax.Array
    returns: jax.Array
    values: jax.Array
    old_values: jax.Array
    valid: jax.Array


LossFn = Callable[[LossInputs], tuple[jax.Array, Metrics]]


class QInputs(NamedTuple):
    """What an off-policy loss sees for a replay minibatch of B transitions.

    logits: [B, A] policy logits at s (masked); mask, next_mask: [B, A] valid candidates at
    s and s'; q: head -> [B, A] online Q-values at s (differentiable); next_logits: [B, A]
    and next_q: head -> [B, A] the online network at s' (no gradient); target_q: head ->
    [B, A] the target network at s'; actions: [B]; rewards: [B] n-step discounted sums;
    discounts: [B] bootstrap discounts; weights: [B] sample weights (0 for empty slots);
    extra: the algorithm's other trainable parameters (``extra_params``).
    """

    logits: jax.Array
    mask: jax.Array
    q: dict[str, jax.Array]
    next_logits: jax.Array
    next_mask: jax.Array
    next_q: dict[str, jax.Array]
    target_q: dict[str, jax.Array]
    actions: jax.Array
    rewards: jax.Array
    discounts: jax.Array
    weights: jax.Array
    extra: dict[str, jax.Array]


def folded_rewards(traj: Trajectory, gamma: float) -> tuple[jax.Array, jax.Array]:
    """(rewards, discounts) [N, T] of a trajectory with invalid turns zeroed and each
    truncated episode's bootstrap V(final observation) folded into its last reward."""
    valid = traj.valid.astype(jnp.float32)
    return fold_truncation_bootstrap(
        traj.rewards.astype(jnp.float32) * valid,
        discounts_from_dones(traj.terminated, gamma) * valid,
        traj.truncated.astype(jnp.float32),
        traj.final_values,
    )


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """The base every algorithm extends (see the module docstring)."""

    name: ClassVar[str] = ""
    off_policy: ClassVar[bool] = False
    whole_episodes: ClassVar[bool] = False  # one episode per row of a trajectory
    uses_policy_head: ClassVar[bool] = True  # a frozen LLM gets a trained policy head
    critic_heads: ClassVar[tuple[str, ...]] = ()
    critic_init_scale: ClassVar[float] = 0.0  # critic output weights' init std (0: zeros)
    modes: ClassVar[tuple[str, ...]] = ("score", "generate")

    # ------------------------------------------------------------------ structure
    @property
    def epochs(self) -> int:
        """Passes of gradient steps over each trajectory (on-policy)."""
        return 1

    @property
    def group_size(self) -> int:
        """Rows per group of a trajectory (0: no groups)."""
        return 0

    @property
    def needs_reference(self) -> bool:
        """Whether the loss has a KL term to a frozen reference policy."""
        return False

    @property
    def needs_next_obs(self) -> bool:
        """Whether trajectories must carry ``next_obs`` (off-policy algorithms do)."""
        return self.off_policy

    def head_names(self, trainable: str) -> tuple[str, ...]:
        """The heads trained for this algorithm when ``trainable`` ("full" | "lora" |
        "heads") is what trains: its critic heads, plus a zero-initialised policy head on
        the candidates' hidden states when the LLM is frozen."""
        policy = ("policy",) if trainable == "heads" and self.uses_policy_head else ()
        return self.critic_heads + policy

    def extra_params(self) -> dict[str, jax.Array]:
        """Trainable parameters beyond the model and heads (optimised at the heads' rate)."""
        return {}

    def check(self, action_mode: str) -> None:
        """Raises ``ValueError`` when the algorithm cannot run in ``action_mode``."""
        if action_mode not in self.modes:
            raise ValueError(
                f"{self.name} needs action_mode in {self.modes} (Q-values over candidate "
                f"actions), got {action_mode!r}"
            )

    # ------------------------------------------------------------------ acting
    def acting_logits(
        self, logits: jax.Array, q: dict[str, jax.Array], mask: jax.Array, update: jax.Array
    ) -> jax.Array:
        """The score-mode logits [B, A] the agent samples from, given the policy's logits
        [B, A], the Q-heads' values and the number of train steps taken so far."""
        return logits

    # ------------------------------------------------------------------ on-policy
    def advantages(self, traj: Trajectory, gamma: float) -> tuple[jax.Array, jax.Array]:
        """(advantages, returns) [N, T] of every turn of ``traj``."""
        raise NotImplementedError(f"{type(self).__name__} has no on-policy advantages")

    def loss(self, x: LossInputs) -> tuple[jax.Array, Metrics]:
        """The on-policy loss of one minibatch."""
        raise NotImplementedError(f"{type(self).__name__} has no on-policy loss")

    # ------------------------------------------------------------------ off-policy
    def transitions(self, traj: Trajectory, gamma: float) -> Transitions:
        """The replay rows of a trajectory (one-step unless the algorithm says otherwise)."""
        return n_step_transitions(traj, gamma, 1)

    def q_loss(self, x: QInputs) -> tuple[jax.Array, Metrics]:
        """The off-policy loss of one replay minibatch."""
        raise NotImplementedError(f"{type(self).__name__} has no off-policy loss")


@dataclasses.dataclass(frozen=True)
class OffPolicy(Algorithm):
    """Replay and target-network settings shared by the off-policy algorithms.

    replay_capacity: transitions kept; replay_batch: transitions per gradient step;
    updates_per_step: gradient steps per collected trajectory; target_update: "polyak"
    (``tau`` per gradient step) or "periodic" (copy every ``target_period`` steps).
    """

    off_policy: ClassVar[bool] = True
    modes: ClassVar[tuple[str, ...]] = ("score",)

    replay_capacity: int = 4096
    replay_batch: int = 32
    updates_per_step: int = 1
    target_update: str = "polyak"
    tau: float = 0.05
    target_period: int = 100

    def __post_init__(self) -> None:
        if self.target_update not in ("polyak", "periodic"):
            raise ValueError(f"target_update={self.target_update!r} is not polyak or periodic")
        if self.replay_batch > self.replay_capacity:
            raise ValueError(
                f"replay_batch={self.replay_batch} exceeds replay_capacity={self.replay_capacity}"
            )
        if min(self.replay_batch, self.updates_per_step, self.target_period) < 1:
            raise ValueError("replay_batch, updates_per_step and target_period must be >= 1")


REGISTRY: dict[str, type[Algorithm]] = {}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: makes ``cls`` available by ``cls.name`` (``make_algorithm``)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a name")
    REGISTRY[cls.name] = cls
    return cls


def option_names(name: str) -> frozenset[str]:
    """The hyperparameters (dataclass fields) algorithm ``name`` takes."""
    return frozenset(f.name for f in dataclasses.fields(algorithm_class(name)))


def algorithm_class(name: str) -> type[Algorithm]:
    if name not in REGISTRY:
        raise ValueError(f"algorithm {name!r} is not one of {tuple(REGISTRY)}")
    return REGISTRY[name]


def make_algorithm(name: str, **options: Any) -> Algorithm:
    """The algorithm ``name`` with the given hyperparameters; options it does not have are
    ignored (``option_names`` says which it takes), so one set of launcher flags serves all."""
    cls = algorithm_class(name)
    fields = option_names(name)
    return cls(**{k: v for k, v in options.items() if k in fields})
