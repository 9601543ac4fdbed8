"""Memory configuration and the mode-dispatching entry points used by the agent and train step.

``MemoryConfig.mode`` selects which memories exist (``"none" | "working" | "episodic" |
"both"``) and ``representation`` how they reach the policy (``"text"``: a fixed-size token region
spliced into the prompt; ``"latent"``: ``M`` soft-prompt vectors from a trainable adapter, put
in ``M`` slots spliced where the text region would go, i.e. before the observation). The
decision is static: with mode ``"none"`` the state is ``MemoryState(None, None)`` (a pytree
without leaves) and every function below returns its inputs untouched, so it adds nothing to
the compiled graph. Disabled sections behave the same way individually.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from rllama_jax.memory import episodic, latent, prompt, working

_MODES = ("none", "working", "episodic", "both")
_REPRESENTATIONS = ("text", "latent")


@struct.dataclass
class MemoryConfig:
    """Static memory configuration (hashable; a pytree with no leaves).

    Attributes:
      mode: ``"none" | "working" | "episodic" | "both"``.
      representation: ``"text" | "latent"``.
      episodic: episodic-memory config, required when the mode uses it.
      working: working-memory config, required when the mode uses it.
      latent: adapter config, required for the latent representation.
      region_size: ``R`` of the text region; None = ``prompt.region_capacity`` (never truncates).
      episodic_header: token ids of e.g. "Relevant past experience:".
      working_header: token ids of e.g. "Recent steps:".
      pad_id: padding token id.
    """

    mode: str = struct.field(pytree_node=False, default="none")
    representation: str = struct.field(pytree_node=False, default="text")
    episodic: episodic.EpisodicConfig | None = struct.field(pytree_node=False, default=None)
    working: working.WorkingConfig | None = struct.field(pytree_node=False, default=None)
    latent: latent.LatentConfig | None = struct.field(pytree_node=False, default=None)
    region_size: int | None = struct.field(pytree_node=False, default=None)
    episodic_header: tuple[int, ...] = struct.field(pytree_node=False, default=())
    working_header: tuple[int, ...] = struct.field(pytree_node=False, default=())
    pad_id: int = struct.field(pytree_node=False, default=0)

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {self.mode!r}")
        if self.representation not in _REPRESENTATIONS:
            raise ValueError(f"representation must be one of {_REPRESENTATIONS}")
        if self.use_episodic and self.episodic is None:
            raise ValueError(f"mode {self.mode!r} needs an EpisodicConfig")
        if self.use_working and self.working is None:
            raise ValueError(f"mode {self.mode!r} needs a WorkingConfig")
        if self.representation == "latent":
            if not self.enabled:
                raise ValueError(
                    "representation 'latent' needs a memory to read: mode is 'none', use "
                    "'working', 'episodic' or 'both' (or representation 'text')"
                )
            if self.latent is None:
                raise ValueError("representation 'latent' needs a LatentConfig")
            for name in ("episodic", "working"):
                sub = getattr(self, name) if getattr(self, f"use_{name}") else None
                if sub is not None and sub.key_dim != self.latent.key_dim:
                    raise ValueError(
                        f"LatentConfig.key_dim={self.latent.key_dim} must equal the {name} "
                        f"memory's key_dim={sub.key_dim} (the adapter reads those keys)"
                    )
        if self.use_episodic and self.use_working:
            if self.episodic.key_dim != self.working.key_dim:
                raise ValueError("episodic and working key_dim must match (queries are shared)")

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def use_episodic(self) -> bool:
        return self.mode in ("episodic", "both")

    @property
    def use_working(self) -> bool:
        return self.mode in ("working", "both")

    @property
    def latent_enabled(self) -> bool:
        """Memory reaches the policy as soft-prompt vectors."""
        return self.enabled and self.representation == "latent"

    @property
    def num_soft_slots(self) -> int:
        """``M`` prompt slots of the latent representation (0 when it is off)."""
        return self.latent.num_slots if self.latent_enabled else 0

    @property
    def text_region_size(self) -> int:
        """``R`` of the text region (0 when no text region is produced)."""
        if not self.enabled or self.representation != "text":
            return 0
        if self.region_size is not None:
            return self.region_size
        ep = self.episodic if self.use_episodic else None
        wk = self.working if self.use_working else None
        return prompt.region_capacity(
            len(self.episodic_header),
            None if ep is None else (ep.k, ep.max_tokens),
            len(self.working_header),
            None if wk is None else (wk.window, wk.max_tokens),
        )


@struct.dataclass
class MemoryState:
    """All memory state of an agent; fields are None for disabled memories.

    Attributes:
      episodic: shared ``EpisodicMemory`` or None.
      working: ``WorkingMemory`` with leading [E] or None.
    """

    episodic: episodic.EpisodicMemory | None = None
    working: working.WorkingMemory | None = None


def init_memory(config: MemoryConfig, num_envs: int) -> MemoryState:
    """Empty memories for ``num_envs`` environments (``MemoryState(None, None)`` for "none")."""
    return MemoryState(
        episodic=episodic.init(config.episodic) if config.use_episodic else None,
        working=working.init(config.working, num_envs) if config.use_working else None,
    )


def record_step(
    state: MemoryState,
    config: MemoryConfig,
    tokens: jax.Array,
    token_mask: jax.Array,
    keys: jax.Array,
    importance: jax.Array,
    write_mask: jax.Array,
) -> MemoryState:
    """Appends one step per env [E, ...] to working memory (no-op without working memory)."""
    if not config.use_working:
        return state
    wm = working.write(state.working, tokens, token_mask, keys, importance, write_mask)
    return state.replace(working=wm)


def record_experience(
    state: MemoryState,
    config: MemoryConfig,
    keys: jax.Array,
    tokens: jax.Array,
    token_mask: jax.Array,
    returns: jax.Array,
    write_mask: jax.Array,
    actions: jax.Array | None = None,
) -> MemoryState:
    """Writes experiences [N, ...] to episodic memory (no-op without episodic memory).
    actions: [N] candidate index of each experience's action (None: unknown)."""
    if not config.use_episodic:
        return state
    mem = episodic.write(
        state.episodic, config.episodic, keys, tokens, token_mask, returns, write_mask, actions
    )
    return state.replace(episodic=mem)


def end_episodes(state: MemoryState, config: MemoryConfig, done: jax.Array) -> MemoryState:
    """Clears the working memory of envs whose episode ended, ``done`` [E] bool."""
    if not config.use_working:
        return state
    return state.replace(working=working.reset_where(state.working, done))


def memory_region(
    state: MemoryState, config: MemoryConfig, queries: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Text region [B, R] and mask for queries [B, D] (B = num envs when working memory is on).

    Raises ``ValueError`` when memory is off or latent (there is no region to build).
    """
    if not config.enabled or config.representation != "text":
        raise ValueError("memory_region needs an enabled text-mode memory")
    ep_tokens = ep_mask = wk_tokens = wk_mask = None
    if config.use_episodic:
        got = episodic.retrieve(state.episodic, config.episodic, queries)
        ep_tokens, ep_mask = got.tokens, got.token_mask
    if config.use_working:
        wk_tokens, wk_mask = working.read_text(state.working)
    return prompt.build_memory_region(
        config.episodic_header,
        ep_tokens,
        ep_mask,
        config.working_header,
        wk_tokens,
        wk_mask,
        config.text_region_size,
        config.pad_id,
    )


def augment_prompt(
    state: MemoryState,
    config: MemoryConfig,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    insert_at: jax.Array,
    queries: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Prompts [B, L] with the memory region spliced in: [B, L+R], still left-padded.

    Returns the prompt unchanged (same arrays, no ops) when memory is off or latent.
    """
    if not config.enabled or config.representation != "text":
        return prompt_tokens, prompt_mask
    region, region_mask = memory_region(state, config, queries)
    return prompt.splice(prompt_tokens, prompt_mask, region, region_mask, insert_at, config.pad_id)


def latent_inputs(
    state: MemoryState, config: MemoryConfig, queries: jax.Array
) -> latent.AdapterInputs:
    """What the latent adapter reads for queries [B, D]: top-k episodic keys [B, k, D] with
    their validity, returns and actions [B, k] (one invalid zero key without episodic
    memory) and the working summary [B, D] with [B] validity (None without working memory)."""
    b = queries.shape[0]
    if config.use_episodic:
        got = episodic.retrieve(state.episodic, config.episodic, queries)
        keys, valid, returns, actions = got.keys, got.valid, got.returns, got.actions
    else:
        keys = jnp.zeros((b, 1, queries.shape[-1]), jnp.float32)
        valid = jnp.zeros((b, 1), bool)
        returns, actions = jnp.zeros((b, 1), jnp.float32), jnp.full((b, 1), -1, jnp.int32)
    summary = wm_valid = None
    if config.use_working:
        summary, _ = working.attention_read(state.working, queries, config.working.temperature)
        wm_valid = jnp.any(state.working.valid, axis=-1)
    return latent.AdapterInputs(
        keys=keys, valid=valid, summary=summary, summary_valid=wm_valid, returns=returns,
        actions=actions,
    )  # fmt: skip


def soft_prompt(
    state: MemoryState,
    config: MemoryConfig,
    adapter_params: latent.AdapterParams | None,
    queries: jax.Array,
    embed_scale: float | jax.Array = 1.0,
) -> tuple[jax.Array, jax.Array] | None:
    """Soft-prompt vectors [B, M, H] and mask [B, M] for latent mode; None otherwise."""
    if not config.latent_enabled:
        return None
    inputs = latent_inputs(state, config, queries)
    return latent.apply_to_inputs(adapter_params, inputs, embed_scale)


def splice_soft_slots(
    state: MemoryState,
    config: MemoryConfig,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    insert_at: jax.Array,
    queries: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, latent.AdapterInputs]:
    """Latent mode's counterpart of ``augment_prompt``: reads memory for queries [B, D] and
    splices ``M`` soft-prompt slots into prompts [B, L] at ``insert_at`` [B].

    Returns (tokens [B, L+M], mask [B, L+M], slots [B, L+M] soft-prompt index or -1, the
    ``AdapterInputs`` [B, ...] to turn into vectors with ``latent.apply_to_inputs``). A row
    with nothing to remember gets no slot (its mask is the memory-free prompt's).
    """
    if not config.latent_enabled:
        raise ValueError("splice_soft_slots needs an enabled latent-mode memory")
    inputs = latent_inputs(state, config, queries)
    b, m = queries.shape[0], config.num_soft_slots
    slot_mask = jnp.broadcast_to(latent.has_memory(inputs)[:, None], (b, m))
    tokens, mask, slots = prompt.splice_slots(
        prompt_tokens, prompt_mask, slot_mask, insert_at, config.pad_id
    )
    return tokens, mask, slots, inputs
