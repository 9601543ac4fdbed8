"""Training configuration and the ``TrainState`` pytree.

``TrainState`` holds everything a run changes: the trainable parameters (full model, LoRA
adapters, or heads only; plus the latent-memory adapter whenever memory is latent, in every
``trainable`` mode), the optimizer state (of the trainable part only: frozen weights
never enter it), the frozen base / reference weights, target copies for DQN/SAC, the replay
buffer, the memory pytrees, an RNG key and counters. It is a plain pytree, so it is donated
to the one jitted ``train_step`` and checkpointed as is.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from rllama_jax.algos import Algorithm, make_algorithm
from rllama_jax.heads import calibrate_head, init_head
from rllama_jax.memory import MemoryConfig, MemoryState, init_memory, latent
from rllama_jax.models import LlamaConfig, Params
from rllama_jax.models.lora import LoraConfig, init_lora, with_lora
from rllama_jax.sampling import SamplingConfig
from rllama_jax.train.replay import ReplayBuffer, init_replay

ACTION_MODES = ("score", "generate")
TRAINABLE = ("full", "lora", "heads")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything static about training (hashable; changing a field recompiles).

    algorithm: an ``rllama_jax.algos`` object holding every hyperparameter of the algorithm
    (epochs, clip, GAE lambda, n-step, replay, targets, exploration, ...), or its name for
    the defaults (``"ppo"`` is ``algos.PPO()``).
    Score mode: the policy is a softmax over candidate scores (``score_reduction`` of the
    candidate's token log-likelihoods, divided by ``policy_temperature``). Generate mode:
    token-level policy over the generated reply, log-probs under ``sampling``.
    Off-policy (DQN, SAC): each ``train_step`` writes the trajectory's transitions to the
    replay buffer and takes the algorithm's ``updates_per_step`` gradient steps on it.
    prefix_len: P > 0 when every prompt starts with the same P tokens (the system prompt and
    the user header) laid out unpadded in columns [0, P) (``tokenization.pad_after_prefix``):
    the prefix then runs once per call (batch 1) and only the rows' own tokens per row, in
    acting and in the train step alike, in score and generate mode, with text memory spliced
    right after it (``[prefix | pad | memory + rest]``; not with latent memory). When the
    LLM trains, the train step rebuilds the prefix's keys and values once per (micro)batch
    with gradients.
    remat: the train step's loss rematerialises the LLM's layers (``jax.checkpoint`` on the
    scanned layer body, ``models.llama.forward``): the backward pass keeps each layer's
    input instead of all its intermediates, at the cost of recomputing them (about one more
    forward pass). It only acts where gradients reach the LLM (trainable lora or full, or
    a latent-memory adapter feeding the prompt); acting never rematerialises.
    microbatch_rows: run each minibatch's forward and backward on micro-batches of this
    many rows and sum their gradients (exactly the minibatch's gradient: the loss still sees
    every row, see ``train.step``); 0 runs the whole minibatch at once. Must divide the
    rows of a minibatch (turns per batch / ``minibatches``) when smaller than it. Peak
    memory scales with these rows, not with the minibatch.
    """

    algorithm: Algorithm | str = "ppo"
    action_mode: str = "score"
    trainable: str = "lora"
    lora: LoraConfig = LoraConfig()
    learning_rate: float = 1e-4
    head_learning_rate: float = 1e-3
    max_grad_norm: float = 1.0
    gamma: float = 0.99
    minibatches: int = 1
    score_reduction: str = "sum"
    policy_temperature: float = 1.0
    sampling: SamplingConfig = SamplingConfig()
    head_hidden: int = 0
    head_input_norm: bool = False
    memory: MemoryConfig = MemoryConfig()
    prefix_len: int = 0
    remat: bool = True
    microbatch_rows: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.algorithm, str):
            # make_algorithm names the registered algorithms (built-in and @register'ed)
            # when the name is unknown.
            object.__setattr__(self, "algorithm", make_algorithm(self.algorithm))
        if not isinstance(self.algorithm, Algorithm):
            raise ValueError(f"algorithm must be an rllama_jax.algos.Algorithm or a name, got "
                             f"{self.algorithm!r}")  # fmt: skip
        check = {
            "action_mode": (self.action_mode, ACTION_MODES),
            "trainable": (self.trainable, TRAINABLE),
            "score_reduction": (self.score_reduction, ("sum", "mean")),
        }
        for name, (value, allowed) in check.items():
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not one of {allowed}")
        self.algorithm.check(self.action_mode)
        if self.trainable == "heads" and self.action_mode == "generate":
            raise ValueError(
                "trainable='heads' with action_mode='generate' would leave the policy frozen; "
                "use 'lora' or 'full'"
            )
        if self.minibatches < 1:
            raise ValueError("minibatches must be >= 1")
        if self.prefix_len < 0:
            raise ValueError(f"prefix_len must be >= 0, got {self.prefix_len}")
        if self.microbatch_rows < 0:
            raise ValueError(f"microbatch_rows must be >= 0, got {self.microbatch_rows}")
        if self.head_input_norm and not self.caches_features:
            raise ValueError(
                "head_input_norm standardises the frozen LLM's features: it needs "
                "trainable='heads', action_mode='score' and no latent memory"
            )
        if self.prefix_len and self.memory.latent_enabled:
            raise ValueError(
                "prefix_len > 0 (a shared prompt prefix computed once) does not combine with "
                "latent memory (its soft prompt enters as embeddings, not tokens)"
            )

    @property
    def off_policy(self) -> bool:
        return self.algorithm.off_policy

    @property
    def caches_features(self) -> bool:
        """Whether acting stores the frozen LLM's outputs for the train step to reuse: score
        mode with only heads training and no latent memory (nothing upstream of the heads
        changes, so recomputing the LLM forward every gradient step would be wasted)."""
        return (
            self.trainable == "heads"
            and self.action_mode == "score"
            and not self.memory.latent_enabled
        )

    @property
    def head_names(self) -> tuple[str, ...]:
        """The heads this configuration trains (``Algorithm.head_names``)."""
        return self.algorithm.head_names(self.trainable)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


@struct.dataclass
class TrainState:
    """trainable: {"model"? full params, "lora"? adapters, "heads": {...}, "log_alpha"? [],
    "memory_adapter"? latent-memory adapter (``latent.init_adapter``)};
    frozen: {"model"? base params (lora/heads), "ref_model"? reference copy (full + KL)};
    target: copy of ``trainable`` for DQN/SAC ({} otherwise); step, skipped: [] int32."""

    trainable: Params
    frozen: Params
    target: Params
    opt_state: Any
    replay: ReplayBuffer | None
    memory: MemoryState
    rng: jax.Array
    step: jax.Array
    skipped: jax.Array


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """AdamW on the model part, Adam with its own rate on heads and on the other freshly
    initialised parts (latent-memory adapter, SAC temperature); global-norm clipping."""

    def labels(tree: Params) -> Params:
        return {
            group: jax.tree.map(
                lambda _, g=group: "model" if g in ("model", "lora") else "head", sub
            )
            for group, sub in tree.items()
        }

    return optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm),
        optax.multi_transform(
            {
                "model": optax.adamw(config.learning_rate, weight_decay=0.0),
                "head": optax.adam(config.head_learning_rate),
            },
            labels,
        ),
    )


def policy_params(trainable: Params, frozen: Params, config: TrainConfig) -> Params:
    """The model parameters the current policy runs with (adapters attached for LoRA)."""
    if config.trainable == "full":
        return trainable["model"]
    if config.trainable == "lora":
        return with_lora(frozen["model"], trainable["lora"], config.lora)
    return frozen["model"]


def memory_adapter(trainable: Params) -> latent.AdapterParams | None:
    """The latent-memory adapter parameters (None when memory is not latent)."""
    return trainable.get("memory_adapter")


def reference_params(frozen: Params, config: TrainConfig) -> Params:
    """The frozen reference policy for KL penalties: the base model (free for LoRA/heads),
    or a copy kept at initialisation for full fine-tuning."""
    return frozen["ref_model"] if config.trainable == "full" else frozen["model"]


def init_train_state(
    config: TrainConfig,
    model_config: LlamaConfig,
    params: Params,
    key: jax.Array,
    *,
    num_envs: int = 1,
    replay_example: Any = None,
) -> TrainState:
    """A fresh state around pretrained ``params``.

    ``params`` stay the caller's: frozen weights (the base under LoRA or heads) are shared,
    never donated by ``train_step``; weights that train (``trainable="full"``) are copied, so
    one loaded model can back several states (e.g. two agents compared side by side).

    replay_example: one ``Transitions`` batch (any leading size) fixing the replay buffer's
    item shapes; required for DQN/SAC.
    """
    k_lora, k_heads, k_rng = jax.random.split(key, 3)
    trainable: Params = {}
    frozen: Params = {}
    if config.trainable == "full":
        trainable["model"] = jax.tree.map(jnp.copy, params)  # donated by every train step
        if config.algorithm.needs_reference:
            frozen["ref_model"] = jax.tree.map(jnp.copy, params)
    else:
        frozen["model"] = params
        if config.trainable == "lora":
            trainable["lora"] = init_lora(k_lora, model_config, config.lora)
    d = model_config.hidden_size
    head_keys = jax.random.split(k_heads, max(1, len(config.head_names)))
    # Critics the algorithm wants to start apart (SAC's twins) get small random output
    # weights; every other head starts at zero.
    scale = config.algorithm.critic_init_scale
    critics = set(config.algorithm.critic_heads)
    trainable["heads"] = {
        name: init_head(
            k, d, 1, config.head_hidden, config.head_input_norm, scale if name in critics else 0.0
        )
        for name, k in zip(config.head_names, head_keys, strict=False)
    }
    trainable.update(config.algorithm.extra_params())
    if config.memory.latent_enabled:
        lcfg = config.memory.latent
        if lcfg.hidden_size != model_config.hidden_size:
            raise ValueError(
                f"LatentConfig.hidden_size={lcfg.hidden_size} must equal the model's "
                f"hidden_size={model_config.hidden_size} (soft prompts are input embeddings)"
            )
        # fold_in, not a 4th split: keys of the other parts stay what they were.
        trainable["memory_adapter"] = latent.init_adapter(jax.random.fold_in(key, 3), lcfg)
    target = jax.tree.map(jnp.copy, trainable) if config.off_policy else {}
    replay = None
    if config.off_policy:
        if replay_example is None:
            raise ValueError(
                f"{config.algorithm.name} needs replay_example to size its replay buffer"
            )
        replay = init_replay(replay_example, config.algorithm.replay_capacity)
    opt_state = make_optimizer(config).init(trainable)
    # Every leaf must be its own buffer: the state is donated, and XLA refuses to donate one
    # buffer twice.
    opt_state = jax.tree.map(jnp.copy, opt_state)
    return TrainState(
        trainable=trainable,
        frozen=frozen,
        target=target,
        opt_state=opt_state,
        replay=replay,
        memory=init_memory(config.memory, num_envs),
        rng=k_rng,
        step=jnp.zeros((), jnp.int32),
        skipped=jnp.zeros((), jnp.int32),
    )


def calibrate_heads(state: TrainState, obs: Any, valid: Any) -> TrainState:
    """Sets the input standardisation of every head (``TrainConfig.head_input_norm``) from
    the frozen-LLM features of a collected batch, and copies it into the target heads.

    obs: an ``Observation`` with ``features`` (leading dims [N, T] of a ``Batch`` or [N*T] of
    ``Transitions``); valid: bool of those leading dims. Policy and Q heads read candidate
    hidden states (valid candidates only), the value head the prompt's. Call it once, on the
    first batch, before the first ``train_step`` (the launcher does); the statistics are then
    part of the parameters and checkpointed with them.
    """
    f = obs.features
    if f is None:
        raise ValueError("calibrate_heads needs observations with frozen-LLM features")
    valid = jnp.asarray(valid, bool)
    heads = dict(state.trainable["heads"])
    for name, head in heads.items():
        if name == "value":
            heads[name] = calibrate_head(head, f.prompt_hidden, valid)
        else:
            mask = valid[..., None] & jnp.asarray(obs.action_mask, bool)
            heads[name] = calibrate_head(head, f.candidate_hidden, mask)
    trainable = {**state.trainable, "heads": heads}
    target = state.target
    if target:
        stats = ("in_mean", "in_scale")
        target = {
            **target,
            "heads": {
                n: {**h, **{k: jnp.copy(heads[n][k]) for k in stats}}
                for n, h in target["heads"].items()
            },
        }
    return state.replace(trainable=trainable, target=target)
