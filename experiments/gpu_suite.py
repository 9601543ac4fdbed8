"""Everything a GPU session should measure, in one command of under 8 minutes.

    python experiments/gpu_suite.py --out=DIR                 # one NVIDIA GPU, SmolLM2
    python experiments/gpu_suite.py --smoke --out=DIR         # CPU dry run, tiny model (CI)
    experiments/gpu_suite.sh                                  # on the GPU machine: installs
                                                              # the carried wheels, then this

Sections, in order, each under its own share of ``--minutes`` (a section that fails is
recorded with its one-line error and the suite goes on):

1. ``precision``: bf16 vs fp32 logits of the same prompts (the forward in
   ``models.llama``, compute dtype bf16 with float32 norms/softmax/logits): largest
   |logit difference|, mean |log-prob difference| and top-1 agreement over every position.
2. ``acting``: ``sampling.generate`` at batches ``--act_batches`` (128 and 512), greedy, a
   fixed number of new tokens: new tokens/s of the decode phase (the call minus its prefill)
   and its share of the HBM roofline (bytes one decode step must read: the weights plus the
   KV cache, over the copy bandwidth measured in the same run).
3. ``train_step``: one PPO update of the LLM's weights (LoRA and full) in generate mode on
   random tokens: step time and MFU, the model's matmul FLOPs (the FLOP model of
   ``experiments/bench_train_step.py``) over the bf16 (fp32 in ``--smoke``) matmul peak
   measured in the same run.
4. ``blackjack``: the launcher, Blackjack, PPO, LoRA (the LLM learns), score mode, until
   ``--blackjack_minutes`` run out: greedy return vs environment steps, and the steps at
   which it first reached ``--blackjack_target``.
5. ``babyai``: the launcher, BabyAI-Text GoToLocal, PPO, LoRA, for the minutes left:
   greedy success rate vs steps (GLAM's Flan-T5-780M: ~0.8 after ~250k steps).

Writes ``DIR/suite.json`` (all figures, the machine, and each section's wall time) and the
two runs' workdirs (metrics.jsonl, learning_curve.png) under ``DIR``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "gpu-suite", "Directory for suite.json and the runs.")
flags.DEFINE_boolean("smoke", False, "CPU dry run: tiny model, tiny sizes, seconds per section.")
flags.DEFINE_float("minutes", 7.5, "Wall-time budget of the whole suite.")
flags.DEFINE_list(
    "sections", ["precision", "acting", "train_step", "blackjack", "babyai"], "What to run."
)
flags.DEFINE_list("act_batches", ["128", "512"], "Batches for the acting benchmark.")
flags.DEFINE_integer("act_new_tokens", 32, "New tokens per row in the acting benchmark.")
flags.DEFINE_integer("train_batch", 32, "Rows of the train-step benchmark.")
flags.DEFINE_integer("train_prompt_len", 192, "Prompt tokens per row (train step).")
flags.DEFINE_integer("train_response_len", 64, "Reply tokens per row (train step).")
flags.DEFINE_float("blackjack_minutes", 2.0, "Budget of the Blackjack LoRA run.")
flags.DEFINE_float("blackjack_target", -0.10, "Greedy return the Blackjack run should reach.")

SMOKE = dict(act_batches=[2, 4], act_new_tokens=4, train_batch=4, train_prompt_len=16,
             train_response_len=4, blackjack_minutes=0.05)  # fmt: skip


def settings() -> dict[str, Any]:
    s = dict(
        model="smollm2-135m-instruct", precision="bf16",
        act_batches=[int(b) for b in FLAGS.act_batches], act_new_tokens=FLAGS.act_new_tokens,
        train_batch=FLAGS.train_batch, train_prompt_len=FLAGS.train_prompt_len,
        train_response_len=FLAGS.train_response_len, blackjack_minutes=FLAGS.blackjack_minutes,
    )  # fmt: skip
    if FLAGS.smoke:
        s.update(SMOKE, model="tiny", precision="fp32")
    return s


# ----------------------------------------------------------------------------- helpers
def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """(first call seconds, median of ``repeats`` further calls); ``fn`` blocks."""
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return first, statistics.median(times)


def matmul_peak(dtype: Any, n: int, repeats: int = 5) -> float:
    """Best FLOP/s of jitted n x n @ n x n products in ``dtype`` (after a warm-up)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    mm = jax.jit(jnp.matmul)
    mm(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        mm(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def copy_bandwidth(megabytes: int, repeats: int = 5) -> float:
    """Bytes/s read plus written by a jitted ``x + 1`` over ``megabytes`` of float32."""
    x = jnp.zeros((megabytes * 2**20 // 4,), jnp.float32)
    f = jax.jit(lambda v: v + 1.0)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * x.nbytes / best


def blackjack_conversations(batch: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """Blackjack observations with the README agent's system prompt (names the actions)."""
    rng = np.random.default_rng(seed)
    system = "You are playing blackjack. Reply with one word: stay or hit."
    return [
        [{"role": "system", "content": system},
         {"role": "user", "content": f"Your hand totals {int(rng.integers(4, 22))}. The "
                                     f"dealer shows {int(rng.integers(1, 11))}."}]
        for _ in range(batch)
    ]  # fmt: skip


def load(s: dict[str, Any], precision: str) -> tuple[Any, Any, Any]:
    """(model config with ``precision``'s compute dtype, params stored for it, tokenizer)."""
    from rllama_jax.distributed.precision import compute_config
    from rllama_jax.models import load_pretrained

    config, params, tok = load_pretrained(s["model"])
    config = compute_config(config, precision)
    if precision == "bf16":
        params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    return config, params, tok


# ---------------------------------------------------------------------------- sections
def section_precision(s: dict[str, Any], budget: float) -> dict[str, Any]:
    from rllama_jax.models.llama import forward, positions_from_mask
    from rllama_jax.tokenization import encode_chat_batch

    del budget  # one forward pass per precision
    c32, p32, tok = load(s, "fp32")
    c16, p16, _ = load(s, "bf16")
    tokens, mask = encode_chat_batch(tok, blackjack_conversations(8))
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    pos = positions_from_mask(mask)

    def logits(params: Any, config: Any) -> np.ndarray:
        fn = jax.jit(lambda p, t, q, m: forward(p, config, t, q, m).logits)
        return np.asarray(fn(params, tokens, pos, mask), np.float32)

    a, b = logits(p32, c32), logits(p16, c16)
    real = np.asarray(mask, bool)
    la = jax.nn.log_softmax(a, -1)[real]
    lb = jax.nn.log_softmax(b, -1)[real]
    pa = np.exp(la)
    return {
        "positions": int(real.sum()),
        "max_abs_logit_diff": float(np.abs(a - b)[real].max()),
        "mean_abs_logprob_diff_under_fp32": float(np.sum(pa * np.abs(la - lb), -1).mean()),
        "kl_fp32_to_bf16_mean": float(np.sum(pa * (la - lb), -1).mean()),
        "top1_agreement": float(np.mean(a[real].argmax(-1) == b[real].argmax(-1))),
    }


def section_acting(s: dict[str, Any], budget: float) -> dict[str, Any]:
    from rllama_jax.sampling import SamplingConfig, generate
    from rllama_jax.tokenization import encode_chat_batch

    del budget
    config, params, tok = load(s, s["precision"])
    n = s["act_new_tokens"]
    greedy = SamplingConfig(max_new_tokens=n, temperature=0.0, top_p=1.0, pad_token_id=0,
                            stop_token_ids=())  # fmt: skip
    one = dataclasses.replace(greedy, max_new_tokens=1)
    bandwidth = copy_bandwidth(64 if s["model"] == "tiny" else 2048)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    kv_itemsize = jnp.dtype(config.dtype).itemsize
    out: dict[str, Any] = {"copy_bandwidth_gb_s": bandwidth / 1e9, "new_tokens": n,
                           "weight_mb": weight_bytes / 2**20, "batches": {}}  # fmt: skip
    key = jax.random.key(0)
    for b in s["act_batches"]:
        tokens, mask = encode_chat_batch(tok, blackjack_conversations(b))
        tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)

        def call(sampling: Any, tokens: Any = tokens, mask: Any = mask) -> None:
            jax.block_until_ready(generate(params, config, tokens, mask, key, sampling))

        first, t_full = timed(lambda: call(greedy), 3)
        _, t_pre = timed(lambda: call(one), 3)
        decode = max(t_full - t_pre, 1e-9)
        ctx = tokens.shape[1] + n / 2  # the mean number of cached positions read per step
        kv_bytes = 2 * config.num_layers * config.num_kv_heads * config.head_dim * ctx * b
        step_bytes = weight_bytes + kv_bytes * kv_itemsize
        per_step = decode / (n - 1) if n > 1 else float("nan")
        out["batches"][str(b)] = {
            "prompt_len": int(tokens.shape[1]), "first_call_s": first, "call_s": t_full,
            "prefill_s": t_pre, "decode_tokens_per_s": b * (n - 1) / decode,
            "decode_step_ms": 1e3 * per_step,
            "hbm_roofline_fraction": (step_bytes / bandwidth) / per_step,
        }  # fmt: skip
    return out


def train_flops(config: Any, n: int, lp: int, r: int, trainable: str, rank: int) -> float:
    """Matmul FLOPs of one PPO pass (``experiments/bench_train_step.py``'s model)."""
    t = lp + r
    ctx = (t + 1) / 2
    head = 2.0 * config.hidden_size * config.vocab_size
    layers = config.flops_per_token(int(ctx)) - head
    forward = n * t * layers + n * r * head
    if trainable == "full":
        return 3.0 * forward
    attn = n * t * 2.0 * 2 * config.num_heads * config.head_dim * ctx * config.num_layers
    d = config.hidden_size
    adapters = 2.0 * n * t * config.num_layers * rank * 7 * (d + d)  # 7 targets, A and B
    return 2.0 * forward + attn + 3.0 * adapters


def section_train_step(s: dict[str, Any], budget: float) -> dict[str, Any]:
    from rllama_jax.algos import PPO
    from rllama_jax.distributed.precision import apply_precision, compute_config
    from rllama_jax.models.lora import LoraConfig
    from rllama_jax.sampling import SamplingConfig
    from rllama_jax.train import Batch, Observation, TrainConfig, init_train_state, make_train_step

    del budget
    n, lp, r = s["train_batch"], s["train_prompt_len"], s["train_response_len"]
    dtype = jnp.bfloat16 if s["precision"] == "bf16" else jnp.float32
    peak = matmul_peak(dtype, 512 if s["model"] == "tiny" else 8192)
    out: dict[str, Any] = {"matmul_peak_tflops": peak / 1e12, "rows": n, "prompt_len": lp,
                           "response_len": r, "cases": {}}  # fmt: skip
    rng = np.random.default_rng(0)
    for trainable in ("lora", "full"):
        config, params, _ = load(s, "fp32")  # float32 masters; apply_precision casts the rest
        config = compute_config(config, s["precision"])
        rank = 16
        cfg = TrainConfig(
            algorithm=PPO(epochs=1), action_mode="generate", trainable=trainable, minibatches=1,
            lora=LoraConfig(rank=rank), sampling=SamplingConfig(temperature=1.0, top_p=1.0),
        )  # fmt: skip
        ones = lambda *shape: jnp.ones(shape, jnp.int32)  # noqa: E731

        def ids(*shape: int, vocab: int = config.vocab_size) -> jax.Array:
            return jnp.asarray(rng.integers(3, vocab, shape), jnp.int32)

        batch = Batch(
            obs=Observation(prompt_tokens=ids(n, 1, lp), prompt_mask=ones(n, 1, lp)),
            response_tokens=ids(n, 1, r), response_mask=ones(n, 1, r),
            old_logp=jnp.zeros((n, 1, r), jnp.float32),
            rewards=jnp.asarray(rng.standard_normal((n, 1)), jnp.float32),
            terminated=jnp.ones((n, 1), bool), truncated=jnp.zeros((n, 1), bool),
            valid=jnp.ones((n, 1), bool), old_values=jnp.zeros((n, 1), jnp.float32),
            final_values=jnp.zeros((n, 1), jnp.float32),
            bootstrap_value=jnp.zeros((n,), jnp.float32),
        )  # fmt: skip
        state = apply_precision(init_train_state(cfg, config, params, jax.random.key(0)),
                                s["precision"])  # fmt: skip
        del params
        t = time.perf_counter()
        compiled = make_train_step(cfg, config).compile(state, batch)
        compile_s = time.perf_counter() - t
        holder = {"state": state}

        def step(compiled: Any = compiled, holder: dict = holder, batch: Any = batch) -> None:
            new, metrics = compiled(holder["state"], batch)
            jax.block_until_ready((new, metrics))
            holder["state"] = new

        first, med = timed(step, 3)
        flops = train_flops(config, n, lp, r, trainable, rank)
        out["cases"][trainable] = {
            "compile_s": compile_s, "first_step_s": first, "step_s": med,
            "model_tflops_per_step": flops / 1e12, "mfu": flops / med / peak,
            "skipped_updates": int(holder["state"].skipped),
        }  # fmt: skip
        del holder, state, compiled
        jax.clear_caches()
    return out


def learning_run(s: dict[str, Any], name: str, minutes: float, **changes: Any) -> dict[str, Any]:
    """A launcher run (LoRA: the LLM's weights train) for ``minutes``; its greedy curve
    [(env steps, mean return, fraction of episodes with a positive return)]."""
    from rllama_jax.experiment import ExperimentConfig, run_experiment
    from rllama_jax.experiment.metrics import read_records

    workdir = os.path.join(FLAGS.out, name)
    cfg = ExperimentConfig(
        model=s["model"], trainable="lora", precision=s["precision"], workdir=workdir,
        max_minutes=minutes, total_steps=10**9, checkpoint_every=0, **changes,
    )  # fmt: skip
    result = run_experiment(cfg, progress=False, log=lambda line: print(line, flush=True))
    curve = [(r["env_steps"], r["eval_return"], r["eval_success"])
             for r in read_records(workdir) if r.get("eval_return") is not None]  # fmt: skip
    return {"workdir": workdir, "env_steps": result.env_steps, "episodes": result.episodes,
            "seconds": result.seconds, "compile_seconds": result.compile_seconds,
            "final_greedy_return": result.eval_return, "final_greedy_se": result.eval_return_se,
            "greedy_curve": curve, "final_greedy_success": curve[-1][2] if curve else None, "steps_per_second": result.env_steps / result.seconds}  # fmt: skip


def section_blackjack(s: dict[str, Any], budget: float) -> dict[str, Any]:
    smoke = s["model"] == "tiny"
    out = learning_run(
        s, "blackjack-lora", min(s["blackjack_minutes"], budget / 60),
        env="blackjack", num_envs=8 if smoke else 128, eval_every=1 if smoke else 8,
        eval_episodes=8 if smoke else 512, eval_envs=8 if smoke else 128,
    )  # fmt: skip
    hit = [steps for steps, ret, _ in out["greedy_curve"] if ret >= FLAGS.blackjack_target]
    out.update(target=FLAGS.blackjack_target, steps_to_target=hit[0] if hit else None,
               always_stick=-0.186)  # fmt: skip
    return out


def section_babyai(s: dict[str, Any], budget: float) -> dict[str, Any]:
    smoke = s["model"] == "tiny"
    out = learning_run(
        s, "babyai-goto-lora", budget / 60, env="babyai-goto", num_envs=4 if smoke else 64,
        steps_per_update=4 if smoke else 8, eval_every=1 if smoke else 16,
        eval_episodes=4 if smoke else 128, eval_envs=4 if smoke else 64,
    )  # fmt: skip
    # BabyAI's reward is 1 - 0.9 (steps / max_steps) on success, 0 on failure: the curve's
    # third column (greedy episodes with a positive return) is the success rate.
    out["glam_reference"] = "Flan-T5-780M: success ~0.8 after ~250k steps"
    return out


SECTIONS: dict[str, Callable[[dict[str, Any], float], dict[str, Any]]] = {
    "precision": section_precision, "acting": section_acting,
    "train_step": section_train_step, "blackjack": section_blackjack,
    "babyai": section_babyai,
}  # fmt: skip
# Shares of the budget the fixed-size sections are expected to take (the runs get the rest).
EXPECTED_SECONDS = {"precision": 30, "acting": 60, "train_step": 90}


def main(argv: list[str]) -> None:
    del argv
    unknown = sorted(set(FLAGS.sections) - set(SECTIONS))
    if unknown:
        raise app.UsageError(f"--sections: unknown {unknown}; choose from {list(SECTIONS)}")
    s = settings()
    os.makedirs(FLAGS.out, exist_ok=True)
    deadline = time.monotonic() + 60.0 * FLAGS.minutes
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": platform.node(),
        "devices": [str(d) for d in jax.devices()], "jax": jax.__version__,
        "settings": s, "sections": {},
    }  # fmt: skip
    path = os.path.join(FLAGS.out, "suite.json")
    order = [name for name in SECTIONS if name in FLAGS.sections]
    for i, name in enumerate(order):
        later_fixed = sum(EXPECTED_SECONDS.get(n, 0) for n in order[i + 1 :])
        later_runs = sum(1 for n in order[i + 1 :] if n not in EXPECTED_SECONDS)
        left = deadline - time.monotonic()
        # A run leaves the later runs an equal share of what the fixed sections leave.
        budget = (left - later_fixed) / (1 + later_runs) if name not in EXPECTED_SECONDS else left
        t = time.perf_counter()
        print(f"== {name} ({budget:.0f} s budgeted)", flush=True)
        try:
            result = SECTIONS[name](s, max(budget, 1.0))
        except Exception as err:  # noqa: BLE001  (recorded; the next section still runs)
            traceback.print_exc()
            result = {"error": f"{type(err).__name__}: {err}".splitlines()[0]}
        result["wall_s"] = time.perf_counter() - t
        report["sections"][name] = result
        print(json.dumps({name: result}, indent=1, default=str), flush=True)
        with open(path, "w", encoding="utf-8") as f:  # after each section: a kill keeps it
            json.dump(report, f, indent=1, default=str)
        jax.clear_caches()
    failed = [n for n, r in report["sections"].items() if "error" in r]
    print(f"suite.json written to {path}; failed sections: {failed or 'none'}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
