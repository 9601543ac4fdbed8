"""``ExperimentConfig``: every setting of a training run, one flat dataclass.

The launcher defines one absl flag per field (``experiments/train.py``), the ablation runner
overrides fields per grid cell, and the run's workdir keeps the config as JSON so a resumed
run can check that it continues the same experiment. ``validate`` catches invalid
combinations before any model is loaded or compiled, with a one-line explanation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

from rllama_jax.algos import ALGORITHMS, REGISTRY, algorithm_class, option_names
from rllama_jax.distributed.mesh import check_mesh_spec
from rllama_jax.envs.blackjack import blackjack_extract_action
from rllama_jax.train.state import ACTION_MODES, TRAINABLE

MEMORY_SETTINGS = ("none", "working", "episodic", "both")
MEMORY_MODES = ("text", "latent")


def textworld_command(reply: str) -> str:
    """TextWorld's generate-mode parser: the text after "command:" (the format its system
    prompt asks for), else the reply's first line; the env matches it against the
    admissible commands, and a mismatch is a counted parse failure."""
    match = re.search(r"command:\s*(.+?)\s*(?:\n|$)", reply, re.IGNORECASE)
    text = match.group(1) if match else reply.strip().split("\n", 1)[0]
    return re.sub(r"[\s.!\"'`]+$", "", text).strip()


@dataclasses.dataclass(frozen=True)
class EnvPreset:
    """How the launcher runs one environment: its gymnasium id and keyword arguments, the
    fixed prompt width (tokens before memory), candidate layout, how a generated reply
    becomes an action (None: the reply's first line, matched against the candidates), and
    reference returns drawn on the learning curve (``(name, mean episode return)`` pairs).

    The widths must hold every prompt and candidate list the env can produce (a longer one
    stops the run): they are checked against long random-play runs of each preset.
    """

    env_id: str
    kwargs: tuple[tuple[str, Any], ...] = ()
    prompt_len: int = 192
    max_actions: int = 2
    candidate_len: int = 4
    extract_action: Any = None
    references: tuple[tuple[str, float], ...] = ()


# Mean return per hand by dynamic programming for gymnasium Blackjack-v1's default rules
# (infinite deck, no natural bonus); experiments/RESULTS.md quotes them.
BLACKJACK_REFERENCES = (
    ("optimal", -0.047), ("stick at 17+", -0.079), ("always stick", -0.186), ("random", -0.40),
)  # fmt: skip
# T-maze: +1 for the cued turn, -1 for the other; without memory the junction is a coin flip.
TMAZE_REFERENCES = (("remembers the cue", 1.0), ("chance", 0.0))
# Keyed bandit (2 levers, 1 for the paying one): chance is 1/2, recall of every situation 1.
BANDIT_REFERENCES = (("recalls every situation", 1.0), ("chance", 0.5))

ENV_PRESETS: dict[str, EnvPreset] = {
    "blackjack": EnvPreset(
        "rllama/Blackjack-v0", prompt_len=160, candidate_len=2,
        extract_action=blackjack_extract_action, references=BLACKJACK_REFERENCES,
    ),
    "tmaze": EnvPreset(
        "rllama/TMaze-v0", (("corridor_length", 2),), prompt_len=128, candidate_len=3,
        references=TMAZE_REFERENCES,
    ),
    # The cue must survive 8 corridor steps: working memory needs a window of 10 (signpost,
    # 8 corridor steps, the junction's own step is the query).
    "tmaze-long": EnvPreset(
        "rllama/TMaze-v0", (("corridor_length", 8),), prompt_len=128, candidate_len=3,
        references=TMAZE_REFERENCES,
    ),
    "bandit": EnvPreset(
        "rllama/KeyedBandit-v0", prompt_len=160, max_actions=4, references=BANDIT_REFERENCES
    ),
    # The mapping is redrawn every 32 episodes of each env (8 updates of 4 turns): only
    # recent experience (memory) can beat chance.
    "bandit-shifting": EnvPreset(
        "rllama/KeyedBandit-v0", (("remap_every", 32),), prompt_len=192, max_actions=4,
        references=BANDIT_REFERENCES,
    ),
    # A full 7x7 view (goal, 3 walls, 9 objects, a carried one) is about 360 tokens.
    "babyai-goto": EnvPreset(
        "rllama/BabyAI-GoToLocal-v0", (("max_steps", 32),), prompt_len=384, max_actions=6
    ),
    "babyai-mixed": EnvPreset(
        "rllama/BabyAI-MixedTrainLocal-v0", (("max_steps", 32),), prompt_len=384, max_actions=6
    ),
    # Commands such as "unlock non-euclidean box with non-euclidean key" are 13 tokens, and
    # random play over the 10 easy games meets up to 15 admissible commands.
    "textworld-easy": EnvPreset(
        "rllama/TextWorld-easy-v0", (("max_steps", 20),), prompt_len=512, max_actions=24,
        candidate_len=16, extract_action=textworld_command,
    ),
}  # fmt: skip


def _field(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """One training run. Field help strings double as the launcher's flag help."""

    # What to train.
    env: str = _field("blackjack", f"Env preset ({', '.join(ENV_PRESETS)}) or a gymnasium id.")
    algo: str = _field("ppo", "RL algorithm.", ALGORITHMS)
    model: str = _field(
        "smollm2-135m-instruct",
        "Embedded default, 'tiny' (random 2-layer Llama), a hub id or a local directory.",
    )
    action_mode: str = _field("score", "Rank candidate actions or generate a reply.", ACTION_MODES)
    trainable: str = _field(
        "heads", "What the optimizer updates (heads: the LLM stays frozen).", TRAINABLE
    )
    lora_rank: int = _field(8, "LoRA rank (trainable=lora).")
    lora_alpha: float = _field(16.0, "LoRA alpha (trainable=lora).")
    # Memory.
    memory: str = _field("none", "Which memories the agent has.", MEMORY_SETTINGS)
    memory_mode: str = _field("text", "How memory reaches the LLM.", MEMORY_MODES)
    episodic_capacity: int = _field(256, "Episodic memory entries per agent.")
    episodic_k: int = _field(2, "Episodic entries retrieved per step.")
    episodic_control: float = _field(
        0.0,
        "Episodic control (score mode): add this times the memory's value of each candidate "
        "(kernel-weighted returns of the nearest past steps that took it) to the policy's "
        "logits; 0: off.",
    )
    episodic_decay: float = _field(
        1.0,
        "Recency of episodic retrieval: stored importances are multiplied by this at every "
        "memory write (once per train step), so among equally similar entries the newest rank "
        "first; 1: no decay.",
    )
    episodic_recency: float = _field(
        0.0,
        "Weight of recency in episodic retrieval (1 for the newest entry, 0 for the oldest), "
        "added to 0.7 cosine + 0.3 importance.",
    )
    episodic_center: bool = _field(
        False,
        "Episodic retrieval compares mean-centred keys: an LLM's hidden states of different "
        "observations share most of their direction (raw cosine ~0.99).",
    )
    working_window: int = _field(3, "Recent steps kept in working memory.")
    memory_tokens: int = _field(16, "Tokens per memory entry (text mode).")
    latent_slots: int = _field(4, "Soft-prompt vectors (memory_mode=latent).")
    # The loop.
    num_envs: int = _field(128, "Environments stepped together (one act call for all).")
    steps_per_update: int = _field(4, "Turns per environment collected per update (T).")
    total_steps: int = _field(131072, "Environment steps to train for (rounded up to updates).")
    prompt_len: int = _field(0, "Prompt width in tokens before memory; 0: the env preset's.")
    max_actions: int = _field(0, "Candidate slots (score mode); 0: the env preset's.")
    candidate_len: int = _field(0, "Tokens per candidate (score mode); 0: the env preset's.")
    history: int = _field(
        0,
        "Full-history baseline: the last H turns of the episode in the prompt as chat "
        "messages (observation, action, reward), as LlamaGym and BALROG agents do; raise "
        "--prompt_len to hold them. 0: the current observation alone.",
    )
    share_prefix: bool = _field(
        True,
        "Run the shared system prompt once per call (acting and training, score and "
        "generate mode, text memory spliced after it; not with latent memory).",
    )
    feature_cache: int = _field(
        65536,
        "Frozen LLM (trainable=heads, score mode, memory none): remember the LLM's features "
        "of up to this many prompts and skip the LLM when a step's prompts were all seen "
        "(exact); 0: off. Ignored in other settings.",
    )
    # Optimisation.
    learning_rate: float = _field(3e-4, "Learning rate of the LLM part (full/lora).")
    head_learning_rate: float = _field(1e-3, "Learning rate of value/Q/policy heads.")
    head_hidden: int = _field(256, "Hidden width of the value/Q/policy heads; 0: linear heads.")
    head_norm: bool = _field(
        True,
        "Frozen LLM (trainable=heads, score mode): standardise each head's input features per "
        "dimension with statistics of the first batch (without it, heads on near-identical "
        "hidden states tend to learn one action for every state). Ignored otherwise.",
    )
    policy_temperature: float = _field(
        1.0, "Score mode: candidate log-likelihoods are divided by this before the softmax."
    )
    max_grad_norm: float = _field(1.0, "Global gradient-norm clip.")
    gamma: float = _field(1.0, "Discount.")
    gae_lambda: float = _field(0.95, "GAE lambda (PPO).")
    n_step: int = _field(5, "Bootstrapping horizon of A2C returns and DQN targets.")
    epochs: int = _field(2, "Passes over each batch (PPO, GRPO).")
    minibatches: int = _field(2, "Minibatches per pass; must divide num_envs x steps_per_update.")
    microbatch_rows: int = _field(
        0,
        "PPO/A2C/REINFORCE/GRPO: run each minibatch's forward and backward on micro-batches of "
        "this many rows and sum their gradients (the same gradient as the whole minibatch; "
        "peak memory scales with these rows); must divide the rows of a minibatch; 0: the "
        "whole minibatch at once. Ignored by DQN/SAC.",
    )
    remat: bool = _field(
        True,
        "Rematerialise the LLM's layers in the train step's backward pass (jax.checkpoint): "
        "keeps each layer's input instead of all its activations, for about one more forward "
        "pass of compute. Only matters when gradients reach the LLM (--trainable=lora/full, "
        "or latent memory); acting never rematerialises.",
    )
    clip_eps: float = _field(0.2, "PPO/GRPO ratio clip.")
    ent_coef: float = _field(
        0.03,
        "Entropy bonus (PPO, A2C, REINFORCE, GRPO); generate mode: the token-level entropy of the "
        "untruncated distribution.",
    )
    normalize_advantages: bool = _field(
        False,
        "Standardise advantages over each batch (PPO, A2C; REINFORCE: its baselined returns).",
    )
    vf_coef: float = _field(0.5, "Value loss weight (PPO, A2C, REINFORCE with a value baseline).")
    kl_coef: float = _field(
        0.0,
        "KL penalty to the reference model (PPO; GRPO's beta): exact over the candidates in "
        "score mode, the k3 estimate per reply token in generate mode.",
    )
    baseline: str = _field("mean", "REINFORCE's baseline.", tuple(("mean", "value", "none")))
    group_size: int = _field(8, "GRPO: environments per seed group.")
    replay_capacity: int = _field(4096, "Replay buffer size (DQN, SAC).")
    replay_batch: int = _field(64, "Replay minibatch (DQN, SAC).")
    updates_per_step: int = _field(2, "Gradient steps per collected batch (DQN, SAC).")
    epsilon_start: float = _field(0.3, "DQN: epsilon-greedy exploration at the first update.")
    epsilon_end: float = _field(0.05, "DQN: exploration after --epsilon_decay updates.")
    epsilon_decay: int = _field(
        100, "DQN: updates over which epsilon decays linearly from start to end."
    )
    tau: float = _field(0.05, "Polyak rate of target networks (DQN, SAC).")
    parse_penalty: float = _field(
        -0.5,
        "Generate mode: reward added to a turn whose reply did not parse into an action "
        "(the env then takes --fallback_action).",
    )
    fallback_action: int = _field(
        0, "Generate mode: the env action taken when a reply does not parse."
    )
    # Generation (generate mode).
    max_new_tokens: int = _field(8, "Reply length cap.")
    temperature: float = _field(0.9, "Sampling temperature.")
    top_p: float = _field(0.6, "Nucleus sampling mass.")
    # Bookkeeping.
    seed: int = _field(0, "Seed of parameters, envs and sampling.")
    precision: str = _field(
        "fp32",
        "fp32, or bf16: bfloat16 matmuls (forward and backward) with float32 master weights, "
        "optimizer state, norms, softmax and losses; frozen weights stored in bfloat16. For "
        "GPUs and TPUs; on CPU float32 is the fast dtype.",
        ("fp32", "bf16"),
    )
    mesh: str = _field(
        "",
        "Run on a device mesh, e.g. 'data:2,fsdp:2' ('-1' for one axis: the devices the "
        "others leave; axes data, fsdp, tensor): parameters and optimizer state placed by "
        "the partition rules, acting and the train step split by rows over data x fsdp. "
        "'': the default device. Resuming may change it.",
    )
    distributed: bool = _field(
        False,
        "Multi-host: jax.distributed.initialize() before any device is touched (coordinator "
        "found on Cloud TPU, SLURM, Open MPI, Kubernetes, else from JAX_COORDINATOR_ADDRESS, "
        "JAX_NUM_PROCESSES, JAX_PROCESS_ID); every process runs the same command and steps "
        "its share of --num_envs; --mesh spans all processes' devices.",
    )
    max_minutes: float = _field(
        0.0,
        "Stop after the update during which this much wall time has passed (then evaluate, "
        "checkpoint and summarise as at --total_steps); resuming continues with a fresh "
        "budget. 0: no limit.",
    )
    workdir: str = _field("", "Run directory (metrics, checkpoints, plots); resumed if present.")
    eval_every: int = _field(64, "Greedy evaluation every this many updates (0: only at the end).")
    eval_episodes: int = _field(256, "Episodes per evaluation.")
    eval_envs: int = _field(64, "Environments stepped together during evaluation.")
    checkpoint_every: int = _field(4, "Checkpoint every this many updates (0: only at the end).")
    keep_checkpoints: int = _field(2, "Checkpoints kept on disk.")
    wandb_project: str = _field("", "Also log to this Weights & Biases project (needs wandb).")

    # ------------------------------------------------------------------ derived values
    @property
    def preset(self) -> EnvPreset:
        """The env preset, or a plain one for a gymnasium id."""
        return ENV_PRESETS.get(self.env, EnvPreset(self.env))

    @property
    def effective_prompt_len(self) -> int:
        return self.prompt_len or self.preset.prompt_len

    @property
    def effective_max_actions(self) -> int:
        return self.max_actions or self.preset.max_actions

    @property
    def effective_candidate_len(self) -> int:
        return self.candidate_len or self.preset.candidate_len

    def algorithm_options(self) -> dict[str, Any]:
        """The flags that are hyperparameters of ``--algo`` (``algos.option_names``)."""
        return {
            name: getattr(self, name) for name in option_names(self.algo) if hasattr(self, name)
        }

    @property
    def steps_per_batch(self) -> int:
        return self.num_envs * self.steps_per_update

    @property
    def num_updates(self) -> int:
        return -(-self.total_steps // self.steps_per_batch)

    def replace(self, **changes: Any) -> ExperimentConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raises ``ValueError`` with a one-line reason for an invalid combination."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"--{f.name}={getattr(self, f.name)!r} is not one of {choices}")
        algo = algorithm_class(self.algo)
        if self.action_mode not in algo.modes:
            raise ValueError(
                f"--algo={self.algo} needs --action_mode=score: its Q-values are over "
                "candidate actions, a generated reply has none"
            )
        for name in sorted(_ALGORITHM_FLAGS - option_names(self.algo)):
            if getattr(self, name) != _default(name):
                raise ValueError(
                    f"--{name}={getattr(self, name)} does not apply to --algo={self.algo} "
                    f"(its options: {', '.join(sorted(_ALGORITHM_FLAGS & option_names(self.algo)))})"
                )
        if self.trainable == "heads" and self.action_mode == "generate":
            raise ValueError(
                "--trainable=heads with --action_mode=generate would leave the policy frozen "
                "(heads do not write text); use lora or full"
            )
        if self.memory_mode == "latent" and self.memory == "none":
            raise ValueError("--memory_mode=latent needs a memory: set --memory to working/"
                             "episodic/both")  # fmt: skip
        if not 0 < self.episodic_decay <= 1:
            raise ValueError(f"--episodic_decay must be in (0, 1], got {self.episodic_decay}")
        if self.episodic_recency < 0:
            raise ValueError(f"--episodic_recency must be >= 0, got {self.episodic_recency}")
        if self.episodic_control < 0:
            raise ValueError(f"--episodic_control must be >= 0, got {self.episodic_control}")
        if self.episodic_control and (
            self.memory not in ("episodic", "both") or self.action_mode != "score"
            or not algo.uses_policy_head
        ):  # fmt: skip
            raise ValueError(
                "--episodic_control needs --memory=episodic or both, --action_mode=score and "
                "a policy with logits (DQN acts on its Q head)"
            )
        positive = ("num_envs", "steps_per_update", "total_steps", "epochs", "minibatches",
                    "eval_episodes", "eval_envs", "keep_checkpoints")  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.head_hidden < 0 or self.feature_cache < 0:
            raise ValueError("--head_hidden and --feature_cache must be >= 0")
        for name in ("epsilon_start", "epsilon_end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name} must be in [0, 1], got {getattr(self, name)}")
        if not self.policy_temperature > 0:
            raise ValueError(f"--policy_temperature must be > 0, got {self.policy_temperature}")
        if not algo.off_policy and self.steps_per_batch % self.minibatches:
            raise ValueError(
                f"a batch of --num_envs x --steps_per_update = {self.steps_per_batch} turns is "
                f"not divisible by --minibatches={self.minibatches}"
            )
        if self.microbatch_rows < 0:
            raise ValueError(f"--microbatch_rows must be >= 0, got {self.microbatch_rows}")
        if self.history < 0:
            raise ValueError(f"--history must be >= 0, got {self.history}")
        if self.mesh:
            try:
                check_mesh_spec(self.mesh)
            except ValueError as err:
                raise ValueError(f"--mesh: {err}") from None
        if self.distributed and not self.mesh:
            raise ValueError("--distributed needs --mesh (e.g. --mesh=data:-1: every device of "
                             "every process on the data axis)")  # fmt: skip
        if self.max_minutes < 0:
            raise ValueError(f"--max_minutes must be >= 0, got {self.max_minutes}")
        rows = self.steps_per_batch // self.minibatches
        if (
            not algo.off_policy
            and 0 < self.microbatch_rows < rows
            and (rows % self.microbatch_rows)
        ):
            raise ValueError(
                f"--microbatch_rows={self.microbatch_rows} does not divide the {rows} rows of a "
                "minibatch (--num_envs x --steps_per_update / --minibatches)"
            )
        try:  # the algorithm's own checks (ranges, group sizes, replay sizes)
            built = algo(**self.algorithm_options())
        except ValueError as err:
            raise ValueError(f"--algo={self.algo}: {err}") from None
        if built.group_size and self.num_envs % built.group_size:
            raise ValueError(
                f"--algo={self.algo} needs --group_size dividing --num_envs={self.num_envs}, "
                f"got {built.group_size}"
            )
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"--gamma must be in (0, 1], got {self.gamma}")
        if self.temperature < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError("--temperature must be >= 0 and --top_p in (0, 1]")
        if self.env not in ENV_PRESETS and "/" not in self.env and "-v" not in self.env:
            raise ValueError(
                f"--env={self.env!r} is neither a preset ({', '.join(ENV_PRESETS)}) nor a "
                "gymnasium id"
            )

    # ------------------------------------------------------------------ persistence
    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExperimentConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown experiment settings {unknown}")
        return cls(**data)

    def save(self, workdir: str) -> None:
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(self.to_json(), f, indent=2, sort_keys=True)

    @classmethod
    def load(cls, workdir: str) -> ExperimentConfig:
        with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
            return cls.from_json(json.load(f))


# Settings a resumed run may change without breaking the experiment it continues.
RESUMABLE_CHANGES = frozenset(
    {"total_steps", "workdir", "eval_every", "eval_episodes", "eval_envs", "checkpoint_every",
     "keep_checkpoints", "wandb_project", "feature_cache", "remat", "microbatch_rows",
     "max_minutes", "mesh", "distributed"}
)  # fmt: skip


def incompatible_changes(saved: ExperimentConfig, new: ExperimentConfig) -> list[str]:
    """Fields whose change would make a resumed run a different experiment."""
    return [
        f.name
        for f in dataclasses.fields(ExperimentConfig)
        if f.name not in RESUMABLE_CHANGES and getattr(saved, f.name) != getattr(new, f.name)
    ]


def _default(name: str) -> Any:
    return {f.name: f.default for f in dataclasses.fields(ExperimentConfig)}[name]


# Flags that are some algorithm's hyperparameter: one set to a non-default value for an
# algorithm without it is refused (it would silently do nothing).
_ALGORITHM_FLAGS = frozenset(
    name
    for cls in REGISTRY.values()
    for name in (f.name for f in dataclasses.fields(cls))
    if name in {f.name for f in dataclasses.fields(ExperimentConfig)}
)
