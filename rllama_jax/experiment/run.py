"""The training run behind ``experiments/train.py``: collect, update, evaluate, log,
checkpoint, resume.

``run_experiment(cfg)`` trains for ``cfg.total_steps`` environment steps in updates of
``num_envs x steps_per_update`` turns. The workdir holds ``config.json``, ``metrics.jsonl``,
TensorBoard events, orbax checkpoints, ``summary.json`` and ``learning_curve.png``. Given
the workdir of an interrupted run it resumes from the last checkpoint (after checking the
settings describe the same experiment) and, for picklable environments, ends with the same
parameters as a run that was never interrupted.

``--mesh`` runs the whole loop on a device mesh (``rllama_jax.distributed.Placement``):
state placed by the partition rules, acting and the train step sharded by rows; with
``--distributed`` every process of a multi-host job runs this same function on its own share
of the environments, and only process 0 writes metrics, plots and the summary (checkpoints
are written together, each process's environments included). A checkpoint restores onto
any mesh: orbax reads each array into the shardings of the new run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
import warnings
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from rllama_jax.distributed import Placement, maybe_initialize_distributed
from rllama_jax.distributed.precision import apply_precision, compute_config
from rllama_jax.experiment.build import (
    FEATURE_CACHE_FILE,
    check_env,
    extract_action,
    feature_cache,
    load_model,
    make_envs,
    rollout_config,
    train_config,
)
from rllama_jax.experiment.checkpoint import (
    RunCheckpointer,
    UnreadableCheckpointError,
    restore_rollout_host_state,
    rollout_host_state,
    saved_steps,
)
from rllama_jax.experiment.config import ExperimentConfig, incompatible_changes
from rllama_jax.experiment.evaluation import EvalResult, evaluate
from rllama_jax.experiment.memory_check import TrainMemoryError, check_train_memory
from rllama_jax.experiment.metrics import MetricsWriter, plot_learning_curve
from rllama_jax.loop import LoopRecord, train_loop
from rllama_jax.models import CheckpointError
from rllama_jax.rollout import Rollout, transitions_example
from rllama_jax.train import init_train_state, make_train_step

RECENT_EPISODES = 100


@dataclasses.dataclass
class RunResult:
    """What a finished run reports (also written to ``workdir/summary.json``)."""

    workdir: str
    updates: int
    env_steps: int
    episodes: int
    train_return: float
    eval_return: float
    eval_return_se: float
    seconds: float
    compile_seconds: float

    def table(self, cfg: ExperimentConfig) -> str:
        rows = [
            ("environment", cfg.env), ("algorithm", cfg.algo), ("model", cfg.model),
            ("trainable", cfg.trainable), ("memory", f"{cfg.memory} ({cfg.memory_mode})"),
            ("updates", self.updates), ("environment steps", self.env_steps),
            ("episodes", self.episodes),
            (f"train return (last {RECENT_EPISODES} episodes)",
             f"{self.train_return:+.3f}" if np.isfinite(self.train_return)
             else "- (no training episode finished)"),
            (f"greedy eval return ({cfg.eval_episodes} episodes)",
             f"{self.eval_return:+.3f} ± {self.eval_return_se:.3f}"),
            ("wall time", f"{self.seconds:.0f} s (first-update compile {self.compile_seconds:.0f} s)"),
            ("workdir", self.workdir),
        ]  # fmt: skip
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


class RunError(RuntimeError):
    """A run that cannot start, with a one-line reason (the launcher prints it as is)."""


def default_workdir(cfg: ExperimentConfig) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{cfg.env}-{cfg.algo}-{cfg.memory}-s{cfg.seed}-{stamp}")


def check_resumable(cfg: ExperimentConfig) -> bool:
    """True if ``cfg.workdir`` holds a run to resume (its settings and a checkpoint); raises
    if it is a different experiment (before anything in it is touched). A workdir without a
    checkpoint holds nothing trained: it is started afresh, whatever settings it names."""
    path = os.path.join(cfg.workdir, "config.json")
    if not os.path.exists(path) or not saved_steps(cfg.workdir):
        return False
    saved = ExperimentConfig.load(cfg.workdir)
    changed = incompatible_changes(saved, cfg)
    if changed:
        diffs = ", ".join(f"{k}: {getattr(saved, k)!r} -> {getattr(cfg, k)!r}" for k in changed)
        raise ValueError(
            f"{cfg.workdir} holds a different experiment ({diffs}); use a new --workdir "
            "or the saved settings"
        )
    return True


def run_experiment(
    cfg: ExperimentConfig,
    *,
    progress: bool = True,
    sigkill_at_update: int = 0,
    log: Any = print,
) -> RunResult:
    """Trains (or resumes) the run described by ``cfg``; see the module docstring.

    sigkill_at_update: for resume tests, the process kills itself with SIGKILL in that
    update, after collecting and before the gradient step (checkpoints are flushed first).
    """
    cfg.validate()
    maybe_initialize_distributed(cfg.distributed)  # before any device is touched
    check_env(cfg)
    if not cfg.workdir:
        cfg = cfg.replace(workdir=default_workdir(cfg))
    resuming = check_resumable(cfg)
    # The workdir is written only once the model has loaded: a wrong --model leaves nothing.
    try:
        model_config, params, tokenizer = load_model(cfg.model, cfg.seed)
    except (OSError, CheckpointError) as err:
        raise RunError(f"--model={cfg.model}: {err}") from err
    model_config = compute_config(model_config, cfg.precision)
    placement = None
    if cfg.mesh:
        try:
            placement = Placement(cfg.mesh, model_config, cfg.precision)
            placement.check_rows(cfg.num_envs, "--num_envs")
            placement.check_rows(min(cfg.eval_envs, cfg.eval_episodes), "--eval_envs")
            placement.check_rows(cfg.eval_episodes, "--eval_episodes")
        except ValueError as err:
            raise RunError(f"--mesh={cfg.mesh}: {err}") from None
    lead = jax.process_index() == 0  # writes metrics, plots, summary; prints
    multi = placement is not None and placement.processes > 1  # several processes
    if not lead:
        log = lambda *_: None  # noqa: E731
    os.makedirs(cfg.workdir, exist_ok=True)
    if lead:
        cfg.save(cfg.workdir)
    tcfg = train_config(cfg, model_config, tokenizer)
    rcfg = rollout_config(cfg)
    # Shared by the training and evaluation loops; a finished run extended with a larger
    # --total_steps starts from the features it saved (they depend on the frozen LLM only).
    # Features are cached per process: a multi-process run goes without.
    features = None
    if not multi:
        features = feature_cache(cfg, tcfg, cfg.workdir if resuming else None)
    local_envs = cfg.num_envs if placement is None else placement.local_rows(cfg.num_envs)
    rollout = Rollout(
        make_envs(cfg, local_envs), tokenizer, model_config, tcfg, rcfg, seed=cfg.seed,
        extract_action=extract_action(cfg) if cfg.action_mode == "generate" else None,
        feature_cache=features, placement=placement,
    )  # fmt: skip
    example = transitions_example(tcfg, rcfg, model_config)  # sizes a replay buffer if any
    state = init_train_state(
        tcfg, model_config, params, jax.random.key(cfg.seed), num_envs=cfg.num_envs,
        replay_example=example,
    )  # fmt: skip
    del params  # the state holds what it needs
    if placement is None:
        state = apply_precision(state, cfg.precision)
        train_step = make_train_step(tcfg, model_config)
    else:
        state = placement.state(state)
        train_step = placement.train_step(tcfg)
    if cfg.trainable != "heads":  # steps through the LLM: refuse one that cannot fit
        try:
            check_train_memory(train_step, state, cfg, tcfg, model_config)
        except TrainMemoryError as err:
            raise RunError(str(err)) from err
    checkpointer = RunCheckpointer(cfg.workdir, cfg.keep_checkpoints)
    start, env_steps, elapsed = 0, 0, 0.0
    if resuming:
        try:
            state, host, _ = checkpointer.restore_readable(state)
        except UnreadableCheckpointError as err:
            raise RunError(str(err)) from err
        snapshot = _own_snapshot(host["rollout"], placement)
        if snapshot is not None:
            restore_rollout_host_state(rollout, snapshot)
        start, env_steps, elapsed = host["update"], host["env_steps"], host["seconds"]
        log(f"resuming {cfg.workdir} at update {start} ({env_steps} environment steps)")
    writer = MetricsWriter(
        cfg.workdir, resume_from=start if resuming else None,
        wandb_project=cfg.wandb_project, run_config=cfg.to_json(),
    ) if lead else None  # fmt: skip

    def host_snapshot(update: int) -> dict[str, Any]:
        snapshot: Any = rollout_host_state(rollout)
        if multi:  # one per process, in order
            snapshot = [json.loads(t) for t in placement.gather_text(json.dumps(snapshot))]
        return {"update": update, "env_steps": env_steps, "seconds": elapsed,
                "rollout": snapshot}  # fmt: skip

    def run_eval() -> EvalResult:
        return evaluate(
            state, cfg, model_config, tcfg, tokenizer, episodes=cfg.eval_episodes,
            num_envs=cfg.eval_envs, greedy=True, feature_cache=features, placement=placement,
        )  # fmt: skip

    def episode_stats() -> tuple[int, float]:
        """(episodes finished, mean return of the last RECENT_EPISODES), over processes
        (each process's last RECENT_EPISODES / processes episodes)."""
        stats = rollout.episodes
        if not multi:
            return stats.count, stats.mean(RECENT_EPISODES) if stats.count else float("nan")
        last = list(stats.recent)[-(-RECENT_EPISODES // placement.processes) :]
        rows = placement.gather(np.asarray([[stats.count, len(last), sum(last)]], np.float64))
        recent = rows[:, 1].sum()
        return int(rows[:, 0].sum()), float(rows[:, 2].sum() / recent) if recent else float("nan")

    total = cfg.num_updates
    bar = tqdm(total=total * cfg.steps_per_batch, initial=env_steps, unit="step",
               disable=not progress or not lead, dynamic_ncols=True)  # fmt: skip
    progress_state: dict[str, Any] = {"compile_seconds": 0.0, "last_eval": None,
                                      "out_of_time": False}  # fmt: skip
    budget_start = time.monotonic()

    def kill_before_train(update: int) -> None:
        if sigkill_at_update and update == sigkill_at_update:
            checkpointer.manager.wait_until_finished()
            os.kill(os.getpid(), signal.SIGKILL)

    def on_update(rec: LoopRecord, new_state: Any) -> None:
        nonlocal env_steps, elapsed, state
        state = new_state
        seconds = rec.collect_seconds + rec.train_seconds
        if rec.update == start + 1:
            progress_state["compile_seconds"] = seconds
        elapsed += seconds
        env_steps += cfg.steps_per_batch
        episodes, train_return = episode_stats()
        parse_failures = rollout.parse_failures
        if multi:
            parse_failures = int(placement.total(parse_failures))
        record: dict[str, Any] = {
            "update": rec.update,
            "env_steps": env_steps,
            "episodes": episodes,
            "train_return": train_return if episodes else None,
            "parse_failures": parse_failures,
            "collect_seconds": rec.collect_seconds,
            "train_seconds": rec.train_seconds,
            "steps_per_second": cfg.steps_per_batch / seconds,
            **rec.metrics,
        }
        out_of_time = bool(cfg.max_minutes) and (
            time.monotonic() - budget_start >= 60.0 * cfg.max_minutes
        )
        if multi:  # all stop at the same update
            out_of_time = placement.total(float(out_of_time)) > 0
        progress_state["out_of_time"] = out_of_time
        progress_state["updates"] = rec.update
        done = rec.update == total or out_of_time
        if done or (cfg.eval_every and rec.update % cfg.eval_every == 0):
            progress_state["last_eval"] = result = run_eval()
            record["eval_return"], record["eval_return_se"] = result.mean, result.se
            record["eval_success"] = result.success
        if writer is not None:
            writer.write(record)
        if done or (cfg.checkpoint_every and rec.update % cfg.checkpoint_every == 0):
            checkpointer.save(rec.update, state, host_snapshot(rec.update))
        bar.update(cfg.steps_per_batch)
        last_eval = progress_state["last_eval"]
        bar.set_postfix(
            ret=f"{train_return:+.3f}" if episodes else "-",
            eval=f"{last_eval.mean:+.3f}" if last_eval else "-",
            sps=f"{record['steps_per_second']:.1f}",
        )  # fmt: skip

    state = train_loop(
        rollout, state, train_step, total, start=start, on_update=on_update,
        before_train=kill_before_train, stop=lambda _: progress_state["out_of_time"],
    )  # fmt: skip
    compile_seconds = progress_state["compile_seconds"]
    last_eval = progress_state["last_eval"]
    bar.close()
    if last_eval is None:  # resumed a finished run: evaluate what it holds
        last_eval = run_eval()
    updates = progress_state.get("updates", start)
    if progress_state["out_of_time"]:
        log(f"stopped by --max_minutes={cfg.max_minutes:g} after update {updates} of {total}")
    checkpointer.close()
    if writer is not None:
        writer.close()
    episodes, train_return = episode_stats()
    if not lead:  # returns once process 0 has written the summary
        placement.barrier("summary written")
        return RunResult(cfg.workdir, updates, env_steps, episodes, train_return,
                         last_eval.mean, last_eval.se, elapsed, compile_seconds)  # fmt: skip
    if features is not None:  # lets experiments/evaluate.py start with what the run saw
        features.save(os.path.join(cfg.workdir, FEATURE_CACHE_FILE))
    result = RunResult(
        workdir=cfg.workdir, updates=updates, env_steps=env_steps,
        episodes=episodes, train_return=train_return,
        eval_return=last_eval.mean, eval_return_se=last_eval.se, seconds=elapsed,
        compile_seconds=compile_seconds,
    )  # fmt: skip
    with open(os.path.join(cfg.workdir, "summary.json"), "w", encoding="utf-8") as f:
        # Valid JSON: a train return with no finished episode is null, not NaN.
        summary = {k: None if isinstance(v, float) and not np.isfinite(v) else v
                   for k, v in dataclasses.asdict(result).items()}  # fmt: skip
        json.dump(summary, f, indent=2)
    trained = {"heads": "LLM frozen, heads trained", "lora": "LLM trained (LoRA)",
               "full": "LLM trained (all weights)"}[cfg.trainable]  # fmt: skip
    plot_learning_curve(cfg.workdir, title=f"{cfg.env} / {cfg.algo} / {cfg.model}: {trained}",
                        references=cfg.preset.references)  # fmt: skip
    if multi:
        placement.barrier("summary written")
    log(result.table(cfg))
    return result


def _own_snapshot(saved: Any, placement: Placement | None) -> dict[str, Any] | None:
    """This process's environment loop from a checkpoint's ``host["rollout"]``: a dict
    (one process saved it) or a list, one per process. Saved by another number of
    processes, the environments cannot be split the same way: they start fresh episodes."""
    processes = 1 if placement is None else placement.processes
    count = len(saved) if isinstance(saved, list) else 1
    if count != processes:
        warnings.warn(
            f"the checkpoint was written by {count} process(es) and this run has {processes}: "
            "parameters and optimizer state are restored, the environments start fresh "
            "episodes",
            stacklevel=2,
        )
        return None
    return saved[jax.process_index()] if isinstance(saved, list) else saved


def load_run(workdir: str, step: int | None = None, mesh: str = ""):
    """``(cfg, model_config, tokenizer, train_config, state)`` of a run's checkpoint.

    mesh: restore onto this device mesh (``cfg.mesh`` becomes it; ``Placement(cfg.mesh,
    model_config, cfg.precision)`` acts on the state); '' the default device, whatever mesh
    the run trained on."""
    cfg = ExperimentConfig.load(workdir).replace(workdir=workdir, mesh=mesh)
    model_config, params, tokenizer = load_model(cfg.model, cfg.seed)
    model_config = compute_config(model_config, cfg.precision)
    tcfg = train_config(cfg, model_config, tokenizer)
    example = transitions_example(tcfg, rollout_config(cfg), model_config)
    state = init_train_state(
        tcfg, model_config, params, jax.random.key(cfg.seed), num_envs=cfg.num_envs,
        replay_example=example,
    )  # fmt: skip
    state = apply_precision(state, cfg.precision)
    if cfg.mesh:  # orbax reads every array straight into its sharding on this mesh
        state = Placement(cfg.mesh, model_config, cfg.precision).state(state)
    checkpointer = RunCheckpointer(workdir)
    state, _ = checkpointer.restore(state, step)
    checkpointer.close()
    return cfg, model_config, tokenizer, tcfg, state
