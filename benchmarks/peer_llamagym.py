"""LlamaGym's training loop on Blackjack, timed: the peer side of ``bench_vs_llamagym.py``.

Runs inside the peer virtualenv (see ``benchmarks/README.md``), never in ours: it imports
``llamagym`` (PyTorch, TRL 0.7 ``PPOTrainer``) and installs nothing. The agent is the RLlama
README's ``BlackjackAgent`` as a subclass of ``llamagym.Agent``; the loop is the README's
"Basic Training Loop" (``act`` -> ``env.step`` -> ``assign_reward`` ... ``terminate_episode``,
which runs a PPO update once ``batch_size`` turns are collected).

Timed phases: generation (``model.generate`` plus its tokenization/decoding, i.e. ``Agent.llm``),
PPO update (``PPOTrainer.step``), and the rest (env, bookkeeping). The first ``--warmup``
episodes are excluded from the steady-state figures. Writes one JSON object.

Usage (from the repository root):
    .peer-venv/bin/python benchmarks/peer_llamagym.py \
        --model-dir .bench-cache/smollm2-hf --episodes 20 --out peer.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time

# LlamaGym splits replies at Llama-2's "[/INST]": the standard Llama-2-chat template.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", required=True, help="Hugging Face format model directory")
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2, help="episodes left out of steady state")
    p.add_argument(
        "--warmup-updates", type=int, default=0,
        help="if > 0: steady state starts after this many updates (overrides --warmup)",
    )  # fmt: skip
    p.add_argument(
        "--updates", type=int, default=0,
        help="if > 0: stop right after this many steady-state updates (overrides --episodes)",
    )  # fmt: skip
    p.add_argument("--batch-size", type=int, default=8, help="PPO batch (turns per update)")
    p.add_argument("--mini-batch-size", type=int, default=8)
    p.add_argument("--ppo-epochs", type=int, default=4)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--out", default="", help="JSON output path (default: stdout only)")
    p.add_argument("--log-every", type=int, default=10, help="print progress every N episodes")
    args = p.parse_args()

    t_import = time.perf_counter()
    import gymnasium as gym
    import torch
    from llamagym import Agent
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import AutoModelForCausalLMWithValueHead

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    class BlackjackAgent(Agent):
        """The RLlama README's BlackjackAgent (same three methods), on llamagym.Agent."""

        def get_system_prompt(self) -> str:
            return """You are an expert blackjack player. Follow these rules:
        1. ALWAYS hit if your total is 11 or below
        2. With 12-16: hit if dealer shows 7+, stay if 6 or lower
        3. ALWAYS stay if your total is 17+ without an ace
        4. With a usable ace: hit if total is 17 or below"""

        def format_observation(self, observation) -> str:
            return (
                f"Current hand total: {observation[0]}\nDealer's card: {observation[1]}\n"
                f"Usable ace: {'yes' if observation[2] else 'no'}"
            )

        def extract_action(self, response: str):
            return 0 if "stay" in response.lower() else 1

    t0 = time.perf_counter()
    lora = LoraConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=0.0,  # ours has no LoRA dropout
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],  # ours: wq, wk, wv, wo
    )
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        args.model_dir, peft_config=lora, torch_dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    tokenizer.chat_template = LLAMA2_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    agent = BlackjackAgent(
        model,
        tokenizer,
        "cpu",
        ppo_config_dict={
            "batch_size": args.batch_size,
            "mini_batch_size": args.mini_batch_size,
            "ppo_epochs": args.ppo_epochs,
            "seed": args.seed,
        },
    )
    load_s = time.perf_counter() - t0

    # ------------------------------------------------------------------ phase timers
    timing = {"generate_s": 0.0, "update_s": 0.0, "gen_tokens": 0, "prompt_tokens": 0}
    per_generation: list[float] = []
    per_update: list[float] = []  # every update, warm-up included
    steady_updates: list[float] = []
    counting = {"on": False}
    model_generate = agent.model.generate

    def timed_generate(*a, **kw):
        out = model_generate(*a, **kw)
        if counting["on"]:
            n_in = kw["inputs"].shape[1]
            timing["prompt_tokens"] += n_in
            timing["gen_tokens"] += out.shape[1] - n_in
        return out

    agent.model.generate = timed_generate
    llm = agent.llm

    def timed_llm(messages):
        t = time.perf_counter()
        out = llm(messages)
        dt = time.perf_counter() - t
        if counting["on"]:
            timing["generate_s"] += dt
            per_generation.append(dt)
        return out

    agent.llm = timed_llm
    ppo_step = agent.ppo_trainer.step

    def timed_step(*a, **kw):
        t = time.perf_counter()
        out = ppo_step(*a, **kw)
        dt = time.perf_counter() - t
        per_update.append(dt)
        if counting["on"]:
            timing["update_s"] += dt
            steady_updates.append(dt)
        return out

    agent.ppo_trainer.step = timed_step

    # ------------------------------------------------------------------ README training loop
    env = gym.make("Blackjack-v1")
    returns: list[float] = []
    steps = steady_steps = 0
    parse_failures = 0
    t_steady = None
    t_loop = time.perf_counter()
    episode = 0
    while True:
        # Steady state starts once --warmup-updates updates are done (or --warmup episodes).
        if not counting["on"] and (
            (args.warmup_updates and len(per_update) >= args.warmup_updates)
            or (not args.warmup_updates and episode == args.warmup)
        ):
            counting["on"] = True
            t_steady = time.perf_counter()
        if args.updates and len(steady_updates) >= args.updates:
            break
        if not args.updates and episode >= args.episodes:
            break
        observation, info = env.reset(seed=args.seed + episode)
        done = False
        total = 0.0
        while not done:
            action = agent.act(observation)
            if action is None:  # llamagym.Agent.act returns None when extract_action raises
                parse_failures += 1
                action = 1
            observation, reward, terminated, truncated, info = env.step(action)
            agent.assign_reward(reward)
            total += float(reward)
            done = terminated or truncated
            steps += 1
            steady_steps += counting["on"]
        agent.terminate_episode()
        returns.append(total)
        episode += 1
        if args.log_every and episode % args.log_every == 0:
            el = time.perf_counter() - t_loop
            last = returns[-args.log_every :]
            print(
                f"episode {episode}: steps {steps}, {steps / el:.3f} steps/s, "
                f"updates {len(per_update)}, mean return (last {len(last)}) "
                f"{sum(last) / len(last):+.3f}, returns {last}",
                flush=True,
            )
    end = time.perf_counter()
    steady_s = end - t_steady if t_steady is not None else float("nan")

    gen_s, upd_s = timing["generate_s"], timing["update_s"]
    result = {
        "side": "llamagym",
        "config": {
            "episodes": len(returns),
            "warmup_episodes": args.warmup,
            "warmup_updates": args.warmup_updates,
            "batch_size": args.batch_size,
            "mini_batch_size": args.mini_batch_size,
            "ppo_epochs": args.ppo_epochs,
            "lora_rank": args.lora_rank,
            "lora_alpha": args.lora_alpha,
            "max_new_tokens": args.max_new_tokens,
            "sampling": agent.generate_config_dict,
            "seed": args.seed,
            "torch_threads": torch.get_num_threads(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "trl": __import__("trl").__version__,
            "peft": __import__("peft").__version__,
        },
        "import_s": t0 - t_import,
        "load_s": load_s,
        "total_loop_s": end - t_loop,
        "total_env_steps": steps,
        "steady_s": steady_s,
        "warmup_s": (t_steady or end) - t_loop,
        "steady_env_steps": steady_steps,
        "env_steps_per_s": steady_steps / steady_s,
        "generations": len(per_generation),
        "generate_s": gen_s,
        "s_per_generation": gen_s / max(len(per_generation), 1),
        "gen_tokens": timing["gen_tokens"],
        "prompt_tokens": timing["prompt_tokens"],
        "gen_tokens_per_s": timing["gen_tokens"] / gen_s if gen_s else float("nan"),
        "updates_total": len(per_update),
        "updates_steady": len(steady_updates),
        "update_s": upd_s,
        "per_update_s": per_update,
        "s_per_update": upd_s / max(len(steady_updates), 1),
        "other_s": steady_s - gen_s - upd_s,
        "parse_failures": parse_failures,
        "episode_returns": returns,
        "mean_return": sum(returns) / len(returns),
        "peak_rss_mib": peak_rss_mib(),
    }
    text = json.dumps(result)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    print("RESULT " + text, flush=True)


if __name__ == "__main__":
    main()
