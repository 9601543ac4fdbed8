"""Blackjack in generate mode: the README's agent, LoRA, learns when to say "stay".

The agent writes free text; ``extract_action`` maps a reply containing "stay" to stick and
anything else to hit (the seed RLlama BlackjackAgent's rule). With a system prompt that
names both words, SmolLM2's replies contain both, so PPO has something to reinforce; the
policy is the LLM's own text and only its LoRA adapters (and a value head) train.

Before training, at each checkpoint and at the end the script measures, on every
(hand total 4-21, dealer card 1-10, no usable ace) state:

* the sampled stay rate per hand total (``--probe_samples`` replies per state), and
* the greedy (temperature-0) decision per state,

and plays ``--eval_episodes`` greedy episodes of gymnasium's Blackjack-v1 (always stick
scores -0.186 per hand, basic strategy about -0.05).

    python experiments/blackjack_generate.py --updates=24 --out=runs/blackjack-generate.json
    python experiments/blackjack_generate.py --model=tiny --updates=2 --eval_episodes=16 \\
        --probe_samples=1   # a minute: the pipeline only
"""

from __future__ import annotations

import json
import time
from typing import Any

import gymnasium as gym
import numpy as np
from absl import app, flags

from rllama_jax import RLlamaAgent
from rllama_jax.models import DEFAULT_MODEL, load_pretrained

FLAGS = flags.FLAGS
flags.DEFINE_string("model", DEFAULT_MODEL, "A load_pretrained name ('tiny' for a dry run).")
flags.DEFINE_integer("num_envs", 16, "Environments stepped together by agent.train.")
flags.DEFINE_integer("batch_size", 4, "Turns per environment per update.")
flags.DEFINE_integer("updates", 24, "PPO updates in all.")
flags.DEFINE_integer("eval_every", 8, "Updates between measurements (0: before and after only).")
flags.DEFINE_integer("eval_episodes", 256, "Greedy Blackjack episodes per measurement.")
flags.DEFINE_integer("probe_samples", 4, "Sampled replies per probed state.")
flags.DEFINE_integer("max_new_tokens", 8, "Reply length (the answer is one word).")
flags.DEFINE_integer("prompt_len", 64, "Prompt tokens (system prompt + observation: 52).")
flags.DEFINE_integer("lora_rank", 8, "LoRA rank (q/k/v/o).")
flags.DEFINE_float("learning_rate", 2e-4, "Learning rate of the adapters.")
flags.DEFINE_integer("epochs", 2, "PPO epochs per update.")
flags.DEFINE_integer("minibatches", 2, "PPO minibatches per epoch.")
flags.DEFINE_integer("seed", 0, "Seed of the agent and the evaluation episodes.")
flags.DEFINE_string("out", "", "Optional JSON file for the measurements.")

SYSTEM_PROMPT = "You are playing blackjack. Reply with one word: stay or hit."
TOTALS = tuple(range(4, 22))
DEALER_CARDS = tuple(range(1, 11))


class BlackjackAgent(RLlamaAgent):
    """The README's agent with a prompt that names the two actions."""

    def get_system_prompt(self) -> str:
        return SYSTEM_PROMPT

    def format_observation(self, observation: Any) -> str:
        return (
            f"Current hand total: {observation[0]}\nDealer's card: {observation[1]}\n"
            f"Usable ace: {'yes' if observation[2] else 'no'}"
        )

    def extract_action(self, response: str) -> int:
        return 0 if "stay" in response.lower() else 1


def act_in_batches(agent: BlackjackAgent, states: list, batch: int, greedy: bool) -> list:
    """``agent.act_batch`` over ``states`` in calls of exactly ``batch`` rows (the last one
    padded with copies of the first state): one compiled shape whatever the count."""
    actions = []
    for i in range(0, len(states), batch):
        chunk = states[i : i + batch]
        actions += agent.act_batch(chunk + [states[0]] * (batch - len(chunk)), greedy=greedy)[
            : len(chunk)
        ]
    return actions


def stay_rates(agent: BlackjackAgent, samples: int, batch: int) -> dict[str, dict[int, float]]:
    """Per hand total: the sampled stay rate (``samples`` replies per dealer card) and the
    fraction of dealer cards at which the greedy reply stays."""
    states = [(t, d, False) for t in TOTALS for d in DEALER_CARDS]
    sampled = np.asarray(act_in_batches(agent, states * samples, batch, greedy=False))
    sampled = sampled.reshape(samples, len(TOTALS), -1)
    greedy = np.asarray(act_in_batches(agent, states, batch, greedy=True))
    greedy = greedy.reshape(len(TOTALS), -1)
    return {
        "sampled": {t: float(np.mean(sampled[:, i] == 0)) for i, t in enumerate(TOTALS)},
        "greedy": {t: float(np.mean(greedy[i] == 0)) for i, t in enumerate(TOTALS)},
    }


def greedy_return(agent: BlackjackAgent, episodes: int, seed: int) -> tuple[float, float]:
    """Mean and standard error of ``episodes`` greedy Blackjack-v1 hands, all played together
    (seeds ``seed .. seed + episodes - 1``, the same at every measurement). Every call acts
    on all ``episodes`` rows (finished hands repeat their last observation), so acting
    compiles once."""
    envs = [gym.make("Blackjack-v1") for _ in range(episodes)]
    obs = [env.reset(seed=seed + i)[0] for i, env in enumerate(envs)]
    returns, live = np.zeros(episodes), list(range(episodes))
    while live:
        every = agent.act_batch(obs, greedy=True)
        actions = [every[i] for i in live]
        still = []
        for i, a in zip(live, actions, strict=True):
            obs[i], reward, terminated, truncated, _ = envs[i].step(a)
            returns[i] += reward
            if not (terminated or truncated):
                still.append(i)
        live = still
    return float(returns.mean()), float(returns.std(ddof=1) / np.sqrt(episodes))


def measure(agent: BlackjackAgent, update: int, steps: int, seconds: float) -> dict[str, Any]:
    start = time.time()
    mean, se = greedy_return(agent, FLAGS.eval_episodes, 10_000 + FLAGS.seed)
    rates = stay_rates(agent, FLAGS.probe_samples, FLAGS.eval_episodes)
    row = {"update": update, "env_steps": steps, "train_seconds": seconds,
           "greedy_return": mean, "greedy_return_se": se, **rates,
           "measure_seconds": time.time() - start}  # fmt: skip
    s, g = rates["sampled"], rates["greedy"]
    print(f"update {update:3d} ({steps} steps, {seconds:.0f} s training): greedy return "
          f"{mean:+.3f} ± {se:.3f} over {FLAGS.eval_episodes}")  # fmt: skip
    print("  total        " + " ".join(f"{t:>4d}" for t in TOTALS))
    print("  stay sampled " + " ".join(f"{s[t]:4.2f}" for t in TOTALS))
    print("  stay greedy  " + " ".join(f"{g[t]:4.2f}" for t in TOTALS), flush=True)
    return row


def main(argv: list[str]) -> None:
    del argv
    agent = BlackjackAgent(
        load_pretrained(FLAGS.model, seed=FLAGS.seed), algorithm="ppo", action_mode="generate",
        batch_size=FLAGS.batch_size, max_new_tokens=FLAGS.max_new_tokens,
        lora_rank=FLAGS.lora_rank, lora_alpha=2.0 * FLAGS.lora_rank,
        prompt_len=FLAGS.prompt_len,
        learning_rate=FLAGS.learning_rate, epochs=FLAGS.epochs, minibatches=FLAGS.minibatches,
        seed=FLAGS.seed,
    )  # fmt: skip
    turns = FLAGS.num_envs * FLAGS.batch_size
    rows, curve, seconds, done = [measure(agent, 0, 0, 0.0)], [], 0.0, 0
    every = FLAGS.eval_every or FLAGS.updates
    while done < FLAGS.updates:
        chunk = min(every, FLAGS.updates - done)
        start = time.time()
        records = agent.train("Blackjack-v1", chunk * turns, num_envs=FLAGS.num_envs)
        seconds += time.time() - start
        done += len(records)
        curve += [{"update": len(curve) + 1, "mean_return": r["mean_return"],
                   "seconds": r.get("seconds")} for r in records]  # fmt: skip
        print("  train mean return (last 100 episodes) by update: "
              + " ".join(f"{r['mean_return']:+.2f}" for r in records), flush=True)  # fmt: skip
        rows.append(measure(agent, done, done * turns, seconds))
        if FLAGS.out:
            with open(FLAGS.out, "w", encoding="utf-8") as f:
                json.dump({"flags": FLAGS.flag_values_dict(), "measurements": rows,
                           "curve": curve}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    app.run(main)
