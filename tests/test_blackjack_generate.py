"""experiments/blackjack_generate.py (the README agent in generate mode, LoRA) runs end to
end on the tiny model, and the agent's greedy batched acting is deterministic."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "experiments", "blackjack_generate.py")


def test_blackjack_generate_measures_before_and_after(tmp_path):
    out = tmp_path / "run.json"
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--model=tiny", "--updates=1", "--eval_every=0",
         "--eval_episodes=8", "--probe_samples=1", "--num_envs=2", "--batch_size=2",
         f"--out={out}"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["measurements"]
    assert [r["update"] for r in rows] == [0, 1] and rows[1]["env_steps"] == 4
    assert len(report["curve"]) == 1
    for row in rows:
        assert -1.0 <= row["greedy_return"] <= 1.0 and row["greedy_return_se"] >= 0
        for kind in ("sampled", "greedy"):
            rates = row[kind]
            assert sorted(int(t) for t in rates) == list(range(4, 22))
            assert all(0.0 <= r <= 1.0 for r in rates.values())


def test_greedy_act_batch_is_deterministic_and_sampling_is_not():
    from rllama_jax import RLlamaAgent
    from rllama_jax.models import load_pretrained

    class Agent(RLlamaAgent):
        def get_system_prompt(self) -> str:
            return "Pick a number."

        def format_observation(self, observation) -> str:
            return f"Observation {observation}"

        def extract_action(self, response: str) -> str:
            return response

    agent = Agent(load_pretrained("tiny"), action_mode="generate", max_new_tokens=4,
                  temperature=1.0, top_p=1.0)  # fmt: skip
    observations = list(range(16))
    greedy = [agent.act_batch(observations, greedy=True) for _ in range(2)]
    assert greedy[0] == greedy[1]
    # At temperature 1 over the random model's near-uniform 49k-token distribution, two
    # samples of 16 four-token replies coincide with probability ~0.
    sampled = [agent.act_batch(observations) for _ in range(2)]
    assert sampled[0] != sampled[1] and sampled[0] != greedy[0]
