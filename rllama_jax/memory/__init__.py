"""Functional episodic and working memory for LLM agents (pytrees updated by pure functions).

Modules:
  episodic: fixed-capacity store of past experiences, top-k retrieval by similarity+importance.
  working: per-env ring buffer of the last W steps, read as text or by importance attention.
  prompt: token operations that splice memory text into left-padded prompts inside jit.
  latent: trainable adapter mapping memory to soft-prompt embeddings.
  config: ``MemoryConfig`` (mode/representation) and mode-dispatching entry points.
  inspect: ``render_memory`` tables for notebooks.
"""

from rllama_jax.memory import episodic, latent, prompt, working
from rllama_jax.memory.config import (
    MemoryConfig,
    MemoryState,
    augment_prompt,
    end_episodes,
    init_memory,
    latent_inputs,
    memory_region,
    record_experience,
    record_step,
    soft_prompt,
    splice_soft_slots,
)
from rllama_jax.memory.episodic import EpisodicConfig, EpisodicMemory, Retrieved
from rllama_jax.memory.inspect import render_memory
from rllama_jax.memory.latent import AdapterInputs, LatentConfig
from rllama_jax.memory.working import WorkingConfig, WorkingMemory

__all__ = [
    "AdapterInputs",
    "EpisodicConfig",
    "EpisodicMemory",
    "LatentConfig",
    "MemoryConfig",
    "MemoryState",
    "Retrieved",
    "WorkingConfig",
    "WorkingMemory",
    "augment_prompt",
    "end_episodes",
    "episodic",
    "init_memory",
    "latent",
    "latent_inputs",
    "memory_region",
    "prompt",
    "record_experience",
    "record_step",
    "render_memory",
    "soft_prompt",
    "splice_soft_slots",
    "working",
]
