"""Refuse, before the first update, a train step that would not fit in this machine's memory.

``check_train_memory`` compiles the run's train step ahead of time on the shapes of the
batches the rollout will hand it (``example_batch``: abstract arrays, nothing is run) and
reads XLA's own account of its buffers (``Compiled.memory_analysis()``: temporaries and
outputs). If they exceed what the machine has available (``/proc/meminfo`` MemAvailable),
the run stops with one line naming the flags that shrink the step, instead of dying in the
first update with XLA's ``RESOURCE_EXHAUSTED``. The launcher keeps XLA's persistent
compilation cache on, so the first real update loads this compilation instead of redoing it.

Figures for the default LoRA run (SmolLM2-135M, 256-row minibatches): BENCHMARKS.md,
"Train-step memory".
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from rllama_jax.experiment.build import rollout_config
from rllama_jax.experiment.config import ExperimentConfig
from rllama_jax.models import LlamaConfig
from rllama_jax.rollout import act
from rllama_jax.train import Observation, TrainConfig, Trajectory

GIB = 1024**3
# Refuse when the step needs more than this share of the available memory: the rest is for
# what the host side allocates meanwhile (batches, environments, Python) and for XLA:CPU
# buffers that memory_analysis does not list.
DEFAULT_MARGIN = 0.9


class TrainMemoryError(ValueError):
    """The train step would not fit; the message (one line) says which flags to change."""


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """XLA's account of one compiled train step, in bytes.

    temp: temporaries (activations, gradients, workspace) live during the step; output:
    buffers the step allocates for its results (donated inputs it reuses are not counted);
    batch: the batch it is handed. The state itself is already resident when the check runs,
    so it is not part of ``needed``."""

    temp: int
    output: int
    batch: int

    @property
    def needed(self) -> int:
        return self.temp + self.output + self.batch


def available_memory() -> int | None:
    """Bytes the machine can still allocate without swapping (MemAvailable of
    ``/proc/meminfo``; psutil elsewhere), or None when neither can say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def example_batch(
    cfg: ExperimentConfig, tcfg: TrainConfig, model_config: LlamaConfig, state: Any
) -> Trajectory:
    """Abstract arrays (``jax.ShapeDtypeStruct``) with the structure, shapes and dtypes of
    the trajectories ``Rollout.collect`` hands the train step in this run (``[N, T]``,
    ``next_obs`` included for off-policy algorithms). The observation is what the
    acting call returns for the rollout's encoded prompts (memory spliced in, frozen-LLM
    features attached), traced abstractly with ``jax.eval_shape``: nothing runs."""
    rcfg = rollout_config(cfg)
    n, t = cfg.num_envs, cfg.steps_per_update
    score = tcfg.action_mode == "score"

    def arr(shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))

    i32, f32 = jnp.int32, jnp.float32
    prompts = Observation(arr((n, rcfg.prompt_len), i32), arr((n, rcfg.prompt_len), i32))
    if score:  # what Rollout.encode builds
        a, c = rcfg.max_actions, rcfg.candidate_len
        prompts = prompts.replace(
            candidate_tokens=arr((n, a, c), i32),
            candidate_mask=arr((n, a, c), i32),
            action_mask=arr((n, a), bool),
        )
    out = jax.eval_shape(
        lambda s, obs, at, key: act(
            s.trainable, s.frozen, s.memory, obs, at, key, model_config, tcfg
        ),
        state, prompts, arr((n,), i32), jax.random.key(0),
    )  # fmt: skip

    def turns(x: Any) -> jax.ShapeDtypeStruct:  # [n, ...] per step -> [n, t, ...]
        return arr((n, t) + tuple(x.shape[1:]), x.dtype)

    fields: dict[str, Any] = {}
    if score:
        fields["actions"] = turns(out.actions)
    else:
        fields["response_tokens"] = turns(out.response_tokens)
        fields["response_mask"] = turns(out.response_mask)
    if tcfg.algorithm.group_size > 0:  # the rollout's grouped rows carry group ids
        fields["group_ids"] = arr((n,), i32)
    if tcfg.algorithm.needs_next_obs:
        fields["next_obs"] = jax.tree.map(turns, out.obs)
    if tcfg.memory.use_episodic:
        width = tcfg.memory.episodic.max_tokens
        fields["memory_keys"] = turns(out.keys)
        fields["memory_tokens"] = arr((n, t, width), i32)
        fields["memory_mask"] = arr((n, t, width), i32)
        fields["memory_actions"] = arr((n, t), i32)
    return Trajectory(
        obs=jax.tree.map(turns, out.obs), rewards=arr((n, t), f32),
        terminated=arr((n, t), bool), truncated=arr((n, t), bool), valid=arr((n, t), bool),
        old_logp=turns(out.logp), old_values=turns(out.values),
        final_values=arr((n, t), f32), bootstrap_value=arr((n,), f32), **fields,
    )  # fmt: skip


def estimate_train_memory(train_step: Any, state: Any, batch: Any) -> MemoryEstimate | None:
    """XLA's memory account of ``train_step`` (anything with jit's ``lower``) compiled for
    ``state`` and ``batch`` (concrete or abstract arrays); None when the backend gives none."""
    stats = train_step.lower(state, batch).compile().memory_analysis()
    if stats is None:
        return None
    batch_bytes = sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(batch))
    output = max(stats.output_size_in_bytes - stats.alias_size_in_bytes, 0)
    return MemoryEstimate(temp=stats.temp_size_in_bytes, output=output, batch=batch_bytes)


def _forward_rows(cfg: ExperimentConfig, tcfg: TrainConfig) -> tuple[int, int]:
    """(rows per minibatch, rows per forward/backward pass) of the run's train step."""
    if tcfg.off_policy:
        return tcfg.algorithm.replay_batch, tcfg.algorithm.replay_batch
    rows = cfg.steps_per_batch // tcfg.minibatches
    micro = tcfg.microbatch_rows
    return rows, micro if 0 < micro < rows else rows


def _size(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= 0.1 * GIB else f"{n / 2**20:.1f} MiB"


def advice(
    estimate: MemoryEstimate, available: int, cfg: ExperimentConfig, tcfg: TrainConfig
) -> str:
    """The one-line refusal: what the step needs, what there is, which flags to change."""
    rows, per_pass = _forward_rows(cfg, tcfg)
    trains_llm = tcfg.trainable != "heads" or tcfg.memory.latent_enabled
    need = (
        f"the train step needs about {_size(estimate.needed)} "
        f"({_size(estimate.temp)} of XLA temporaries for {per_pass}-row passes"
        f"{', --remat off' if trains_llm and not tcfg.remat else ''}) but "
        f"{_size(available)} is available"
    )
    remat = "turn --remat on, " if trains_llm and not tcfg.remat else ""
    if tcfg.off_policy:
        return f"{need}: {remat}lower --replay_batch={tcfg.algorithm.replay_batch}"
    # Temporaries grow about linearly with the rows of one pass: suggest the largest
    # divisor of the minibatch that would fit.
    budget = DEFAULT_MARGIN * available - estimate.output - estimate.batch
    fits = [
        d for d in range(1, per_pass) if rows % d == 0 and estimate.temp * d / per_pass < budget
    ]
    micro = f"--microbatch_rows={fits[-1]}" if fits else "--microbatch_rows"
    return (
        f"{need}: set {micro} (rows per forward/backward pass; now {per_pass}), {remat}"
        f"raise --minibatches (now {tcfg.minibatches}) or lower --num_envs (now {cfg.num_envs})"
    )


def check_train_memory(
    train_step: Any,
    state: Any,
    cfg: ExperimentConfig,
    tcfg: TrainConfig,
    model_config: LlamaConfig,
    *,
    available: int | None = None,
    margin: float = DEFAULT_MARGIN,
) -> MemoryEstimate | None:
    """Compiles ``train_step`` for this run's batches and raises ``TrainMemoryError`` (one
    line naming ``--microbatch_rows``, ``--remat``, ``--minibatches``, ``--num_envs``) when
    it needs more than ``margin`` x the available memory. Call it after building the state
    and the step, before the first collect. ``available``: bytes (default: read now).
    Returns the estimate (None when the backend reports no memory statistics)."""
    batch = example_batch(cfg, tcfg, model_config, state)
    estimate = estimate_train_memory(train_step, state, batch)
    available = available_memory() if available is None else available
    if estimate is None or available is None:
        return estimate
    if estimate.needed > margin * available:
        raise TrainMemoryError(advice(estimate, available, cfg, tcfg))
    return estimate
