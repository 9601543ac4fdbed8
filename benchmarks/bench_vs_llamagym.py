"""End-to-end training speed on Blackjack: rllama_jax against LlamaGym, same model and machine.

Both sides train SmolLM2-135M-Instruct (float32, LoRA r16/alpha 32 on q/k/v/o) with PPO on
gymnasium Blackjack, acting with the RLlama README's ``BlackjackAgent`` (its system prompt,
``format_observation`` and ``extract_action``), 4 PPO epochs over each collected turn.

* peer: ``benchmarks/peer_llamagym.py`` run by the peer virtualenv's python (LlamaGym 0.1.1,
  HF ``generate`` one env at a time, TRL 0.7 ``PPOTrainer``, batch 8 turns, 1 minibatch).
* like: ours like for like: ``RLlamaAgent`` in generate mode, the README's single-env
  ``act`` / ``assign_reward`` / ``terminate_episode`` loop, 32 new tokens, top-p 0.6,
  temperature 0.9, an update every 8 turns (4 epochs, 1 minibatch).
* best: ours at its best on the same task: N ``rllama/Blackjack-v0`` envs stepped together
  by ``Rollout``, score mode over the candidates "stay"/"hit", one jitted ``train_step`` per
  N x T turns (4 epochs, 1 minibatch: every turn still gets 4 gradient passes).

Each side runs in its own subprocess (so peak RSS is per side), in turn, on the same machine.
Steady state only: model loading, the compiling first calls and warm-up episodes are reported
separately. The matmul peak and memory bandwidth are measured in the same script (before and
after the runs) to place each phase against its CPU roofline.

Usage (repository root, project venv; the peer venv is made by benchmarks/README.md):
    python benchmarks/bench_vs_llamagym.py --runs 2
    python benchmarks/bench_vs_llamagym.py --only best --runs 1 --best-iters 4
Internal: ``--worker like|best`` runs one side and prints ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# The RLlama README's BlackjackAgent, verbatim (indentation of the system prompt included).
README_SYSTEM_PROMPT = """You are an expert blackjack player. Follow these rules:
        1. ALWAYS hit if your total is 11 or below
        2. With 12-16: hit if dealer shows 7+, stay if 6 or lower
        3. ALWAYS stay if your total is 17+ without an ace
        4. With a usable ace: hit if total is 17 or below"""


def readme_format_observation(observation) -> str:
    return (
        f"Current hand total: {observation[0]}\nDealer's card: {observation[1]}\n"
        f"Usable ace: {'yes' if observation[2] else 'no'}"
    )


def readme_extract_action(response: str):
    return 0 if "stay" in response.lower() else 1


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ---------------------------------------------------------------------------- roofline
def measure_machine(matmul_n: int = 1024, bandwidth_mb: int = 1024) -> dict[str, float]:
    """Peak fp32 matmul FLOP/s (jitted n^3, best of 7) and memory bandwidth (jitted sum over
    ``bandwidth_mb`` MiB, best of 7): the CPU roofline the phases are placed against."""
    import jax
    import jax.numpy as jnp

    def best(fn, repeats=7):
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    a = jax.random.normal(jax.random.key(0), (matmul_n, matmul_n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    flops = 2.0 * matmul_n**3 / best(lambda: mm(a, a).block_until_ready())
    x = jnp.ones((bandwidth_mb * 2**20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    bw = x.nbytes / best(lambda: total(x).block_until_ready())
    return {"peak_gflops": flops / 1e9, "bandwidth_gb_s": bw / 1e9, "load": load_average()}


def model_costs() -> dict[str, float]:
    """FLOPs per token and weight bytes of the default model (for the roofline)."""
    from rllama_jax.models import DEFAULT_MODEL, load_pretrained

    config, params, _ = load_pretrained(DEFAULT_MODEL, tokenizer=False)
    import jax

    nbytes = sum(x.nbytes for x in jax.tree.leaves(params))
    return {
        "flops_per_token_ctx0": config.flops_per_token(0),
        "flops_per_token_ctx128": config.flops_per_token(128),
        "weight_bytes": float(nbytes),
        "attn_flops_per_key": config.flops_per_token(1) - config.flops_per_token(0),
    }


# ---------------------------------------------------------------------------- our agent
def make_agent_class():
    from rllama_jax import RLlamaAgent

    class BlackjackAgent(RLlamaAgent):
        """The RLlama README's BlackjackAgent."""

        def get_system_prompt(self) -> str:
            return README_SYSTEM_PROMPT

        def format_observation(self, observation) -> str:
            if isinstance(observation, str):  # rllama/Blackjack-v0 renders the same text
                return observation
            return readme_format_observation(observation)

        def extract_action(self, response: str):
            return readme_extract_action(response)

    class ScoringBlackjackAgent(BlackjackAgent):
        def candidate_actions(self, observation) -> list[str]:
            return ["stay", "hit"]

    return BlackjackAgent, ScoringBlackjackAgent


def fitted_prompt_len(tokenizer, multiple: int = 8) -> int:
    """The smallest multiple of ``multiple`` holding every Blackjack prompt (chat template
    applied), so no row pays for padding it does not need."""
    from rllama_jax.tokenization import chat_token_ids

    convs = [
        [
            {"role": "system", "content": README_SYSTEM_PROMPT},
            {"role": "user", "content": readme_format_observation((total, dealer, ace))},
        ]
        for total in (4, 12, 21)
        for dealer in (1, 10)
        for ace in (0, 1)
    ]
    longest = max(len(r) for r in chat_token_ids(tokenizer, convs, add_generation_prompt=True))
    return -(-longest // multiple) * multiple


def worker_like(args) -> dict:
    """Config 1: the README loop with RLlamaAgent in generate mode, one env."""
    import gymnasium as gym
    import jax
    import numpy as np

    t0 = time.perf_counter()
    from rllama_jax.models import DEFAULT_MODEL, load_pretrained

    model = load_pretrained(DEFAULT_MODEL)
    prompt_len = args.prompt_len or fitted_prompt_len(model[2])
    BlackjackAgent, _ = make_agent_class()
    agent = BlackjackAgent(
        model,
        algorithm="ppo",
        action_mode="generate",
        max_new_tokens=32,
        temperature=0.9,
        top_p=0.6,
        batch_size=8,
        lora_rank=16,
        lora_alpha=32.0,
        prompt_len=prompt_len,
        seed=args.seed,
        epochs=4,
        minibatches=1,
    )
    load_s = time.perf_counter() - t0

    timing = {"act": [], "update": [], "gen_tokens": 0, "prompt_tokens": 0}
    counting = {"on": False}
    act_impl, step_impl = agent._act, agent._train_step

    def timed_act(observations):
        t = time.perf_counter()
        actions, out = act_impl(observations)  # returns host values: synchronous
        dt = time.perf_counter() - t
        if counting["on"]:
            timing["act"].append(dt)
            timing["gen_tokens"] += int(np.asarray(out.response_mask).sum())
            timing["prompt_tokens"] += int(np.asarray(out.obs.prompt_mask).sum())
        else:
            timing.setdefault("act_warmup", []).append(dt)
        return actions, out

    def timed_step(state, batch):
        t = time.perf_counter()
        state, metrics = step_impl(state, batch)
        jax.block_until_ready((state, metrics))
        dt = time.perf_counter() - t
        (timing["update"] if counting["on"] else timing.setdefault("update_warmup", [])).append(dt)
        return state, metrics

    agent._act, agent._train_step = timed_act, timed_step

    env = gym.make("Blackjack-v1")
    returns, steps, steady_steps, episode, first_ep = [], 0, 0, 0, 0
    t_steady = None
    while True:
        # steady state: after the warm-up updates (compiles), until --like-updates more
        if not counting["on"] and len(timing.get("update_warmup", [])) >= args.like_warmup_updates:
            counting["on"], t_steady, first_ep = True, time.perf_counter(), episode
        if counting["on"] and len(timing["update"]) >= args.like_updates:
            break
        observation, info = env.reset(seed=args.seed + episode)
        done, total = False, 0.0
        while not done:
            action = agent.act(observation)
            observation, reward, terminated, truncated, info = env.step(action)
            agent.assign_reward(reward)
            total += float(reward)
            done = terminated or truncated
            steps += 1
            steady_steps += counting["on"]
        agent.terminate_episode()
        returns.append(total)
        episode += 1
        print(
            f"episode {episode}: steps {steps}, updates "
            f"{len(timing.get('update_warmup', [])) + len(timing['update'])}, last act "
            f"{(timing['act'] or timing['act_warmup'])[-1]:.2f}s, load {load_average()}",
            file=sys.stderr,
            flush=True,
        )
    steady_s = time.perf_counter() - t_steady
    act_s, upd_s = sum(timing["act"]), sum(timing["update"])
    return {
        "side": "ours-like",
        "prompt_len": prompt_len,
        "load_s": load_s,
        "first_act_s": timing["act_warmup"][0],
        "first_update_s": timing["update_warmup"][0] if timing.get("update_warmup") else None,
        "compile_act_s": timing["act_warmup"][0] - statistics.median(timing["act"]),
        "compile_update_s": (
            timing["update_warmup"][0] - statistics.median(timing["update"])
            if timing["update"] and timing.get("update_warmup")
            else None
        ),
        "warmup_episodes": first_ep,
        "steady_s": steady_s,
        "steady_env_steps": steady_steps,
        "env_steps_per_s": steady_steps / steady_s,
        "generations": len(timing["act"]),
        "generate_s": act_s,
        "s_per_generation": act_s / len(timing["act"]),
        "gen_tokens": timing["gen_tokens"],
        "prompt_tokens": timing["prompt_tokens"],
        "gen_tokens_per_s": timing["gen_tokens"] / act_s,
        "updates_steady": len(timing["update"]),
        "update_s": upd_s,
        "per_update_s": timing["update"],
        "s_per_update": upd_s / max(len(timing["update"]), 1),
        "update_tokens_padded": 8 * (prompt_len + 32),
        "other_s": steady_s - act_s - upd_s,
        "episode_returns": returns,
        "mean_return": float(np.mean(returns)),
        "peak_rss_mib": peak_rss_mib(),
    }


def worker_best(args) -> dict:
    """Config 2: N envs batched, score mode, one train_step per N x T turns."""
    import gymnasium as gym
    import jax

    import rllama_jax.envs  # noqa: F401  (registers rllama/Blackjack-v0)
    from rllama_jax.models import DEFAULT_MODEL, load_pretrained
    from rllama_jax.rollout import Rollout

    t0 = time.perf_counter()
    model = load_pretrained(DEFAULT_MODEL)
    prompt_len = args.prompt_len or fitted_prompt_len(model[2])
    _, ScoringBlackjackAgent = make_agent_class()
    from rllama_jax.feature_cache import FeatureCache
    from rllama_jax.loop import LoopRecord, train_loop
    from rllama_jax.rollout import shared_prefix_length

    heads = args.best_trainable == "heads"
    extra = {}
    if heads:  # the launcher's frozen-LLM recipe: MLP heads on standardised features
        extra = {"head_hidden": 256, "head_input_norm": True, "ent_coef": 0.05}
    agent = ScoringBlackjackAgent(
        model,
        algorithm="ppo",
        action_mode="score",
        batch_size=args.num_steps,
        trainable=args.best_trainable,
        lora_rank=16,
        lora_alpha=32.0,
        prompt_len=prompt_len,
        max_actions=2,
        candidate_len=args.candidate_len,
        seed=args.seed,
        epochs=4,
        minibatches=args.minibatches,
        prefix_len=shared_prefix_length(model[2], README_SYSTEM_PROMPT),
        **extra,
    )
    cache = FeatureCache(args.feature_cache) if heads and args.feature_cache > 0 else None
    envs = [gym.make("rllama/Blackjack-v0") for _ in range(args.num_envs)]
    rollout = Rollout(
        envs,
        agent.tokenizer,
        agent.model_config,
        agent.train_config,
        agent.rollout_config,
        seed=args.seed,
        extract_action=agent.extract_action,
        format_observation=agent.format_observation,
        system_prompt=agent.get_system_prompt(),
        candidate_actions=agent.candidate_actions,
        feature_cache=cache,
    )
    load_s = time.perf_counter() - t0

    # Phase timers: encode (tokenization), act (the jitted call), env.step, train_step.
    phase = {"encode": 0.0, "act": 0.0, "env": 0.0, "acts": 0}
    encode_impl, act_impl = rollout.encode, rollout._act

    def timed_encode(*a, **kw):
        t = time.perf_counter()
        out = encode_impl(*a, **kw)
        phase["encode"] += time.perf_counter() - t
        return out

    def timed_act(state, obs):
        t = time.perf_counter()
        out = act_impl(state, obs)
        jax.block_until_ready(out)
        phase["act"] += time.perf_counter() - t
        phase["acts"] += 1
        return out

    rollout.encode, rollout._act = timed_encode, timed_act
    for env in envs:
        env_step = env.step

        def timed_env_step(action, _step=env_step):
            t = time.perf_counter()
            out = _step(action)
            phase["env"] += time.perf_counter() - t
            return out

        env.step = timed_env_step

    iters = []
    n_finished_before = 0

    def record(rec: LoopRecord, _state) -> None:
        # train_s: the loop's learn step (host-to-device transfer of the trajectory, the
        # heads' input calibration on the first update, the jitted train_step).
        nonlocal n_finished_before
        if rec.update == args.best_warmup:
            n_finished_before = rollout.episodes.count
        iters.append(
            {
                "collect_s": rec.collect_seconds,
                "encode_s": phase["encode"],
                "act_s": phase["act"],
                "acts": phase["acts"],
                "env_s": phase["env"],
                "collect_other_s": (
                    rec.collect_seconds - phase["encode"] - phase["act"] - phase["env"]
                ),
                "train_s": rec.train_seconds,
                "env_steps": args.num_envs * args.num_steps,
                "loss": rec.metrics.get("loss", float("nan")),
            }
        )
        print(
            f"iter {rec.update - 1}: collect {rec.collect_seconds:.1f}s (act {phase['act']:.1f}s "
            f"x{phase['acts']}, encode {phase['encode']:.2f}s, env {phase['env']:.3f}s) "
            f"train {rec.train_seconds:.1f}s finished episodes {rollout.episodes.count} "
            f"load {load_average()}",
            file=sys.stderr,
            flush=True,
        )
        for k in ("encode", "act", "env", "acts"):
            phase[k] = 0

    state = train_loop(
        rollout, agent.state, agent._train_step, args.best_warmup + args.best_iters,
        on_update=record,
    )  # fmt: skip
    agent.state = state
    warm, steady = iters[: args.best_warmup], iters[args.best_warmup :]
    tot = lambda k: sum(x[k] for x in steady)  # noqa: E731
    steady_s = tot("collect_s") + tot("train_s")
    rows = args.num_envs * args.num_steps
    episodes = rollout.episodes
    return {
        "side": "ours-best",
        "trainable": args.best_trainable,
        "feature_cache": args.feature_cache if cache is not None else 0,
        "feature_cache_hit_rate": cache.hit_rate if cache is not None else None,
        "num_envs": args.num_envs,
        "num_steps": args.num_steps,
        "best_warmup": args.best_warmup,
        "prompt_len": prompt_len,
        "candidate_len": args.candidate_len,
        "load_s": load_s,
        "compile_s": (
            sum(x["collect_s"] + x["train_s"] for x in warm)
            - args.best_warmup * (tot("collect_s") + tot("train_s")) / len(steady)
        ),
        "steady_s": steady_s,
        "steady_env_steps": tot("env_steps"),
        "env_steps_per_s": tot("env_steps") / steady_s,
        "s_per_update": tot("train_s") / len(steady),
        "update_rows": rows,
        "update_tokens_padded": rows * (prompt_len + 2 * args.candidate_len),
        "act_calls_per_update": steady[0]["acts"],
        "phases_s": {
            k: tot(k) for k in ("act_s", "encode_s", "env_s", "collect_other_s", "train_s")
        },
        "iters": iters,
        "episodes_total": episodes.count,
        "episodes_steady": episodes.count - n_finished_before,
        "episode_returns": list(episodes.recent),  # the last episodes.window of them
        "mean_return_last200": episodes.mean(200),
        "peak_rss_mib": peak_rss_mib(),
    }


# ---------------------------------------------------------------------------- driver
def run_json(cmd: list[str], log_path: str) -> dict:
    print(f"$ {' '.join(cmd)}   (load {load_average()})", flush=True)
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
        else:
            print("   " + line, flush=True)
    if proc.returncode != 0 or result is None:
        raise RuntimeError(f"{cmd[:3]} failed (rc {proc.returncode}); see {log_path}")
    result["load_before_after"] = result.get("load_before_after", load_average())
    return result


def prepare_peer_model(out_dir: str) -> str:
    """Exports the embedded SmolLM2 as a HF directory that transformers 4.37 reads:
    safetensors with ``format: pt`` metadata, a tokenizer_config naming
    PreTrainedTokenizerFast, and BPE merges as "a b" strings (tokenizers 0.15)."""
    if os.path.exists(os.path.join(out_dir, ".peer-ready")):
        return out_dir
    from safetensors.numpy import load_file, save_file

    from rllama_jax.models import DEFAULT_MODEL
    from rllama_jax.models.loading import export_hf_dir

    os.makedirs(out_dir, exist_ok=True)
    export_hf_dir(DEFAULT_MODEL, out_dir)
    weights = os.path.join(out_dir, "model.safetensors")
    save_file(load_file(weights), weights, metadata={"format": "pt"})
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("backend", "is_local", "local_files_only"):
        cfg.pop(key, None)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    path = os.path.join(out_dir, "tokenizer.json")
    with open(path, encoding="utf-8") as f:
        tok = json.load(f)
    merges = tok["model"].get("merges", [])
    if merges and isinstance(merges[0], list):
        tok["model"]["merges"] = [" ".join(m) for m in merges]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(tok, f, ensure_ascii=False)
    open(os.path.join(out_dir, ".peer-ready"), "w").close()
    return out_dir


def roofline(side: dict, machine: dict, costs: dict, n_layers_note: str = "") -> dict:
    """Roofline seconds of the generation and update phases, and the fraction achieved."""
    peak = machine["peak_gflops"] * 1e9
    bw = machine["bandwidth_gb_s"] * 1e9
    fpt = costs["flops_per_token_ctx128"]
    out = {}
    gens = side.get("generations", 0)
    if gens:
        new = side["gen_tokens"] / gens
        prompt = side["prompt_tokens"] / gens
        # prefill is compute-bound, each decode step reads the weights once (batch 1)
        t = prompt * fpt / peak + new * max(costs["weight_bytes"] / bw, fpt / peak)
        out["generate_roofline_s"] = t
        out["generate_fraction"] = t / side["s_per_generation"]
    if side.get("update_tokens"):
        # forward for old values/ref + epochs x (forward + backward through frozen weights)
        t = side["update_tokens"] * fpt * side["update_passes"] / peak
        out["update_roofline_s"] = t
        out["update_fraction"] = t / side["s_per_update"]
    return out


def fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", choices=["like", "best"], default=None)
    p.add_argument("--only", default="peer,like,best", help="comma list of sides to run")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peer-python", default=os.path.join(ROOT, ".peer-venv", "bin", "python"))
    p.add_argument("--peer-model-dir", default=os.path.join(ROOT, ".bench-cache", "smollm2-hf"))
    p.add_argument("--peer-updates", type=int, default=2, help="steady-state updates timed")
    p.add_argument(
        "--peer-threads", type=int, default=0,
        help="torch threads for the peer (0: torch's default; 1 is fairer on a loaded machine)",
    )  # fmt: skip
    p.add_argument(
        "--from-json", action="append", default=[], metavar="SIDE=PATH",
        help="reuse a saved result (SIDE: peer, like or best; a worker's RESULT JSON)",
    )  # fmt: skip
    p.add_argument("--like-updates", type=int, default=2, help="steady-state updates timed")
    p.add_argument("--like-warmup-updates", type=int, default=1)
    p.add_argument("--num-envs", type=int, default=32)
    p.add_argument("--num-steps", type=int, default=8, help="turns per env per update (T)")
    p.add_argument("--minibatches", type=int, default=1)
    p.add_argument("--candidate-len", type=int, default=2)
    p.add_argument("--best-iters", type=int, default=3)
    p.add_argument("--best-warmup", type=int, default=1)
    p.add_argument(
        "--best-trainable", choices=["heads", "lora"], default="heads",
        help="best side: heads on the frozen LLM (the launcher's default) or LoRA r16",
    )  # fmt: skip
    p.add_argument(
        "--feature-cache", type=int, default=65536,
        help="best side, heads only: FeatureCache rows (0: the LLM runs every step)",
    )  # fmt: skip
    p.add_argument("--prompt-len", type=int, default=0, help="0: the smallest that fits")
    p.add_argument("--out-dir", default=os.path.join(ROOT, ".bench-cache", "runs"))
    args = p.parse_args()

    if args.worker:
        result = worker_like(args) if args.worker == "like" else worker_best(args)
        print("RESULT " + json.dumps(result), flush=True)
        return

    os.makedirs(args.out_dir, exist_ok=True)
    sides = [x for x in args.only.split(",") if x]
    machine = [measure_machine()]
    print(f"machine: {machine[0]}", flush=True)
    costs = model_costs()
    results: dict[str, list[dict]] = {"peer": [], "like": [], "best": []}
    for item in args.from_json:
        side, path = item.split("=", 1)
        with open(path, encoding="utf-8") as f:
            results[side].append(json.load(f))
    if "peer" in sides:
        prepare_peer_model(args.peer_model_dir)
    common = [f"--seed={args.seed}", f"--prompt-len={args.prompt_len}"]
    for run in range(args.runs):
        for side in sides:
            out = os.path.join(args.out_dir, f"{side}-{run}")
            load_before = load_average()
            if side == "peer":
                cmd = [
                    args.peer_python, os.path.join(HERE, "peer_llamagym.py"),
                    f"--model-dir={args.peer_model_dir}", "--warmup-updates=1",
                    f"--updates={args.peer_updates}", f"--seed={args.seed}", "--log-every=0",
                    f"--threads={args.peer_threads}",
                    f"--out={out}.json",
                ]  # fmt: skip
            elif side == "like":
                cmd = [sys.executable, __file__, "--worker=like", *common,
                       f"--like-updates={args.like_updates}",
                       f"--like-warmup-updates={args.like_warmup_updates}"]  # fmt: skip
            else:
                cmd = [sys.executable, __file__, "--worker=best", *common,
                       f"--num-envs={args.num_envs}", f"--num-steps={args.num_steps}",
                       f"--minibatches={args.minibatches}",
                       f"--candidate-len={args.candidate_len}",
                       f"--best-iters={args.best_iters}",
                       f"--best-warmup={args.best_warmup}",
                       f"--best-trainable={args.best_trainable}",
                       f"--feature-cache={args.feature_cache}"]  # fmt: skip
            r = run_json(cmd, out + ".log")
            r["load_before_after"] = f"{load_before} / {load_average()}"
            with open(out + ".json", "w", encoding="utf-8") as f:
                json.dump(r, f)
            results[side].append(r)
            print(
                f"{side} run {run}: {r['env_steps_per_s']:.3f} env steps/s "
                f"(load {r['load_before_after']})",
                flush=True,
            )
    machine.append(measure_machine())
    print(f"machine after: {machine[1]}", flush=True)
    report(results, machine, costs, args)


def report(results, machine, costs, args) -> None:
    m = {
        "peak_gflops": max(x["peak_gflops"] for x in machine),
        "bandwidth_gb_s": max(x["bandwidth_gb_s"] for x in machine),
    }
    for r in results["peer"]:
        # TRL: policy + reference forward, then epochs x (forward + backward) over the batch
        tok = (r["prompt_tokens"] + r["gen_tokens"]) / max(r["generations"], 1)
        r["update_tokens"] = tok * r["config"]["batch_size"]
        r["update_passes"] = 2 + 2 * r["config"]["ppo_epochs"]
    for r in results["like"]:
        r["update_tokens"] = r["update_tokens_padded"]
        r["update_passes"] = 2 * 4
    for r in results["best"]:
        r["update_tokens"] = r["update_tokens_padded"]
        r["update_passes"] = 2 * 4

    def med(side, key):
        vals = [r[key] for r in results[side] if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    peer_rate = med("peer", "env_steps_per_s")
    print(
        f"\nroofline: peak {m['peak_gflops']:.1f} GFLOP/s, bandwidth {m['bandwidth_gb_s']:.1f} "
        f"GB/s, weights {costs['weight_bytes'] / 2**20:.0f} MiB"
    )
    head = (
        "| side | run | env steps/s | gen tokens/s | s/generation (of roofline) "
        "| s/update (of roofline) | peak RSS MiB | x peer steps/s |"
    )
    print(head)
    print("|" + "---|" * 8)
    for side in ("peer", "like", "best"):
        for i, r in enumerate(results[side]):
            rf = roofline(r, m, costs)
            ratio = r["env_steps_per_s"] / peer_rate if peer_rate else None
            if "generate_fraction" in rf:
                gen = f"{r['s_per_generation']:.2f} ({rf['generate_fraction']:.0%})"
            elif side == "best":
                steady_iters = len(r["iters"]) - r.get("best_warmup", 1)
                calls = r["act_calls_per_update"] * steady_iters
                gen = f"{r['phases_s']['act_s'] / calls:.2f} per batched call"
            else:
                gen = "-"
            print(
                f"| {side} | {i} | {r['env_steps_per_s']:.3f} | "
                f"{fmt(r.get('gen_tokens_per_s'), '.1f')} | {gen} | "
                f"{r['s_per_update']:.1f} ({rf.get('update_fraction', 0):.0%}) | "
                f"{r['peak_rss_mib']:.0f} | {fmt(ratio, '.2f')} |"
            )
    for side in ("peer", "like", "best"):
        for i, r in enumerate(results[side]):
            extra = {k: r.get(k) for k in ("load_s", "compile_s", "compile_act_s",
                                           "compile_update_s", "mean_return",
                                           "mean_return_last200", "phases_s",
                                           "load_before_after")}  # fmt: skip
            print(f"{side} {i}: {json.dumps({k: v for k, v in extra.items() if v is not None})}")
    with open(os.path.join(args.out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump({"machine": machine, "costs": costs, "results": results}, f)


if __name__ == "__main__":
    main()
