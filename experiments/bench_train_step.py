"""train_step throughput: one PPO update on SmolLM2-135M (full and LoRA) vs PyTorch.

The batch is PPO in generate mode: N rows x T=1 turn, a prompt of L tokens and a reply of R
tokens (N x (L + R) tokens per row, 32 x 256 by default), random token ids, every mask 1.
One ``train_step`` with ``epochs=1`` is one pass over the batch: forward + backward + AdamW
on each of ``--minibatches`` row slices (default 2: with 1, JAX full fine-tuning at 32 x 256
needs ~21 GiB of XLA temporaries, more than this 23 GiB machine has free; both frameworks
take the same minibatches). The PyTorch reference runs the same model
(``transformers.LlamaForCausalLM``, same float32 weights) on the same tokens with a loss of
the same shape (log-probs of the R reply tokens times advantages, plus an MSE value head on
the last prompt hidden state), backward, gradient clipping and ``torch.optim.AdamW.step()``.

Each case runs in its own spawned process (``--isolate``), so its peak RSS is its own and
no framework's thread pool or memory lingers into the next case. The peak fp32 matmul rate
(jitted n x n @ n x n, and torch.mm) is measured in the parent before and after the cases;
"of peak" divides by the higher of the two medians.

FLOP model (matmul FLOPs, 2 per multiply-add; ``LlamaConfig.flops_per_token``):
  forward = N (L + R) * layers(ctx) + N R * lm_head, ctx = (L + R + 1) / 2 (causal average;
            the LM head runs on the R reply positions only, as ``sequence_logprobs`` does)
  full    = 3 x forward (forward, activation gradients, weight gradients)
  LoRA    = 2 x forward (no weight gradient for frozen weights) + 1 x attention forward
            (QK^T and PV have no weights: both inputs need gradients, as in full) + 3 x
            adapter forward
The step also reports the matmul FLOPs the optimised HLO actually executes (its dots, each
weighted by its while loop's trip count), which should equal the same model with dense T x T
attention (the model masks scores rather than skipping them) if nothing is recomputed.

jax_* cases use TrainConfig's default sampling (temperature 0.9, top-p 0.6): the training
log-probs go through the top-p filter, whose cutoff sorts the whole vocabulary for all rows
when any row's nucleus exceeds the top-k candidates. jax_*_nofilter use temperature 1 and
top-p 1 (a plain log-softmax, as the PyTorch loss does): the like-for-like comparison.

python experiments/bench_train_step.py --batch=32 --prompt_len=192 --response_len=64 \
    --minibatches=2 --repeats=3
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m-instruct", "Model name or local directory.")
flags.DEFINE_integer("batch", 32, "Rows N of the PPO batch (T = 1 turn each).")
flags.DEFINE_integer("prompt_len", 192, "Prompt tokens L per row.")
flags.DEFINE_integer("response_len", 64, "Reply tokens R per row.")
flags.DEFINE_integer("warmup", 0, "Untimed steps after the first (compile) step.")
flags.DEFINE_integer("repeats", 3, "Timed steps per case; the median is reported.")
flags.DEFINE_integer(
    "minibatches",
    2,
    "Gradient steps per train_step (each on N / minibatches rows, each with its AdamW "
    "update); both frameworks. 1 needs ~21 GiB of XLA temporaries for JAX full at 32 x 256.",
)
flags.DEFINE_integer("lora_rank", 16, "LoRA rank (targets: TrainConfig's default).")
flags.DEFINE_integer("matmul_size", 2048, "n of the n x n x n fp32 matmul measuring peak.")
flags.DEFINE_integer("peak_repeats", 7, "Timed matmuls per peak measurement.")
flags.DEFINE_list(
    "cases",
    ["jax_full", "jax_lora", "jax_full_nofilter", "torch_full", "torch_lora"],
    "Cases to run: jax_full, jax_lora, jax_full_nofilter, jax_lora_nofilter, torch_full, "
    "torch_lora (torch_lora needs peft; skipped with a note when it is not installed). "
    "*_nofilter: sampling temperature 1, top_p 1 (a plain log-softmax, as the torch loss).",
)
flags.DEFINE_boolean("isolate", True, "Run each case in its own spawned process.")
flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads (0: os.cpu_count()).")
flags.DEFINE_boolean(
    "omp_passive",
    True,
    "Set OMP_WAIT_POLICY=PASSIVE for torch (before it is imported; needs --isolate or an "
    "unimported torch). On a shared, oversubscribed machine OpenMP's spinning threads made a "
    "small torch step ~5x slower.",
)
flags.DEFINE_boolean("hlo_stats", True, "Report XLA cost analysis and dot counts (JAX).")
flags.DEFINE_float(
    "mem_fraction",
    0.9,
    "Skip a JAX case whose compiled memory need exceeds this fraction of MemAvailable "
    "(the machine is shared; an OOM kill would take others' jobs with it). 0: never skip.",
)
flags.DEFINE_string("json_out", "", "Write the results as JSON here.")


# ---------------------------------------------------------------------------- helpers
def timed(fn: Callable[[], object], warmup: int, repeats: int) -> tuple[float, float, list[float]]:
    """(first call seconds, median of ``repeats`` timed calls, all timed calls)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times), times


def mem_available_gib() -> float:
    """MemAvailable from /proc/meminfo (nan elsewhere)."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def peak_rss_gib() -> float:
    """This process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def jax_matmul_samples(n: int, repeats: int) -> list[float]:
    """FLOP/s of ``repeats`` jitted n x n @ n x n float32 matmuls (after 2 warm-ups)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    _, _, times = timed(lambda: mm(a, b).block_until_ready(), 2, repeats)
    return [2.0 * n**3 / t for t in times]


def torch_matmul_samples(n: int, repeats: int) -> list[float]:
    import torch

    a = torch.randn(n, n)
    b = torch.randn(n, n)
    _, _, times = timed(lambda: torch.mm(a, b), 2, repeats)
    return [2.0 * n**3 / t for t in times]


def flop_model(config: Any, s: dict) -> dict[str, float]:
    """Matmul FLOPs of one step under the model stated in the module docstring."""
    n, lp, r = s["batch"], s["prompt_len"], s["response_len"]
    t = lp + r
    ctx = (t + 1) / 2
    head = 2.0 * config.hidden_size * config.vocab_size
    layers = config.flops_per_token(ctx) - head
    forward = n * t * layers + n * r * head
    dense = n * t * (config.flops_per_token(t) - head) + n * r * head
    attention = n * t * (config.flops_per_token(ctx) - config.flops_per_token(0))
    attention_dense = n * t * (config.flops_per_token(t) - config.flops_per_token(0))
    # LoRA adapters (TrainConfig's default targets) : 2 r (in + out) per token per target.
    from rllama_jax.models.llama import param_shapes
    from rllama_jax.models.lora import LoraConfig

    shapes = param_shapes(config)["layers"]
    targets = LoraConfig().targets
    adapter = sum(2.0 * s["lora_rank"] * (shapes[k][1] + shapes[k][2]) for k in targets)
    adapter_forward = n * t * config.num_layers * adapter
    return {
        "context": ctx,
        "forward": forward,
        "full": 3.0 * forward,
        "lora": 2.0 * forward + attention + 3.0 * adapter_forward,
        "adapter_forward": adapter_forward,
        "attention_forward": attention,
        # The same with every attention score computed (T x T, masked afterwards), as the
        # model does: what the HLO's dots should add up to if nothing is recomputed.
        "full_dense_attention": 3.0 * dense,
        "lora_dense_attention": 2.0 * dense + attention_dense + 3.0 * adapter_forward,
    }


_COMP = re.compile(r"^(?:ENTRY )?%(\S+) \((.*)\) -> .*\{$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = \w+\[([\d,]*)\]")
_CALLEE = re.compile(r"\b(?:calls|body|to_apply|true_computation|false_computation)=%([\w.\-]+)")


def dot_flops(text: str) -> tuple[float, int]:
    """Matmul FLOPs the optimised HLO executes (2 x output elements x contracted size per
    dot, each weighted by how often its computation runs: while bodies x known trip count,
    both branches of a conditional), and the number of dot instructions."""
    shapes: dict[str, list[int]] = {}
    calls: dict[str, list[tuple[str, int]]] = {}
    dots: dict[str, list[float]] = {}
    comp, entry = "", ""
    dims = lambda s: [int(d) for d in s.split(",") if d]  # noqa: E731
    for line in text.splitlines():
        m = _COMP.match(line)
        if m:
            comp = m.group(1)
            entry = comp if line.startswith("ENTRY") else entry
            for name, shape in re.findall(r"([\w.\-]+): \w+\[([\d,]*)\]", m.group(2)):
                shapes[name] = dims(shape)
            continue
        m = _INSTR.match(line)
        if m:
            shapes[m.group(1)] = dims(m.group(2))
        trip = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
        for callee in _CALLEE.findall(line):
            body = f"body=%{callee}" in line
            calls.setdefault(comp, []).append((callee, int(trip.group(1)) if trip and body else 1))
        for branches in re.findall(r"branch_computations=\{([^}]*)\}", line):
            calls.setdefault(comp, []).extend((b.strip(" %"), 1) for b in branches.split(","))
        d = re.search(r"\bdot\(%([\w.\-]+), %[\w.\-]+\).*?lhs_contracting_dims=\{([\d,]*)\}", line)
        if m and d:
            lhs = shapes.get(d.group(1), [])
            contracted = float(np.prod([lhs[i] for i in dims(d.group(2))])) if lhs else 0.0
            dots.setdefault(comp, []).append(2.0 * float(np.prod(shapes[m.group(1)])) * contracted)
    total, count = 0.0, 0

    def visit(name: str, times: float, depth: int = 0) -> None:
        nonlocal total, count
        if depth > 64:
            return
        total += times * sum(dots.get(name, []))
        count += len(dots.get(name, []))
        for callee, trip in calls.get(name, []):
            visit(callee, times * trip, depth + 1)

    visit(entry, 1.0)
    return total, count


def hlo_stats(compiled: Any) -> dict[str, Any]:
    """XLA's own cost analysis and what the optimised HLO's dots add up to."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    text = compiled.as_text()
    flops, n_dots = dot_flops(text)
    return {
        "xla_cost_flops": float(cost.get("flops", float("nan"))),
        "hlo_dot_flops": flops,
        "hlo_dots": n_dots,
        "hlo_whiles": len(re.findall(r"\bwhile\(", text)),
        "hlo_sorts": len(re.findall(r"\bsort\(", text)),
    }


# ---------------------------------------------------------------------------- cases
def jax_case(case: str, s: dict) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from rllama_jax.algos import PPO
    from rllama_jax.models import load_pretrained
    from rllama_jax.models.lora import LoraConfig
    from rllama_jax.sampling import SamplingConfig
    from rllama_jax.train import (
        Batch,
        Observation,
        TrainConfig,
        init_train_state,
        make_train_step,
    )

    trainable = "lora" if "lora" in case else "full"
    extra = {}
    if case.endswith("_nofilter"):
        extra["sampling"] = SamplingConfig(temperature=1.0, top_p=1.0)
    cfg = TrainConfig(
        algorithm=PPO(epochs=1), action_mode="generate", trainable=trainable,
        minibatches=s["minibatches"],
        lora=LoraConfig(rank=s["lora_rank"]), **extra,
    )  # fmt: skip
    config, params, _ = load_pretrained(s["model"], tokenizer=False)
    mm = jax_matmul_samples(s["matmul_size"], s["peak_repeats"])
    n, lp, r = s["batch"], s["prompt_len"], s["response_len"]
    rng = np.random.default_rng(0)
    ones = lambda *shape: jnp.ones(shape, jnp.int32)  # noqa: E731
    batch = Batch(
        obs=Observation(
            prompt_tokens=jnp.asarray(rng.integers(3, config.vocab_size, (n, 1, lp)), jnp.int32),
            prompt_mask=ones(n, 1, lp),
        ),
        response_tokens=jnp.asarray(rng.integers(3, config.vocab_size, (n, 1, r)), jnp.int32),
        response_mask=ones(n, 1, r),
        # old_logp = 0 keeps the PPO ratio exp(logp - old_logp) <= 1: finite, never skipped.
        old_logp=jnp.zeros((n, 1, r), jnp.float32),
        rewards=jnp.asarray(rng.standard_normal((n, 1)), jnp.float32),
        terminated=jnp.ones((n, 1), bool), truncated=jnp.zeros((n, 1), bool),
        valid=jnp.ones((n, 1), bool), old_values=jnp.zeros((n, 1), jnp.float32),
        final_values=jnp.zeros((n, 1), jnp.float32), bootstrap_value=jnp.zeros((n,), jnp.float32),
    )  # fmt: skip
    state = init_train_state(cfg, config, params, jax.random.key(0))
    del params  # owned (and donated) by the state
    n_trainable = sum(x.size for x in jax.tree.leaves(state.trainable))
    step = make_train_step(cfg, config)

    start = time.perf_counter()
    compiled = step.compile(state, batch)
    compile_s = time.perf_counter() - start
    out: dict[str, Any] = {"compile_s": compile_s, "trainable_params": int(n_trainable)}
    if s["hlo_stats"]:
        out.update(hlo_stats(compiled.executable))
    mem = compiled.executable.memory_analysis()
    if mem is not None:
        out["xla_temp_gib"] = mem.temp_size_in_bytes / 2**30
        need = (mem.temp_size_in_bytes + mem.argument_size_in_bytes) / 2**30
        avail = mem_available_gib()
        if s["mem_fraction"] > 0 and need > s["mem_fraction"] * avail:
            out["skipped"] = (
                f"needs {need:.1f} GiB (XLA temporaries {out['xla_temp_gib']:.1f} + arguments), "
                f"{avail:.1f} GiB available"
            )
            return out

    holder = {"state": state}
    metrics_box: dict[str, Any] = {}

    def one_step() -> None:
        new_state, metrics = compiled(holder["state"], batch)
        jax.block_until_ready((new_state, metrics))
        holder["state"] = new_state  # the old state was donated
        metrics_box.update(metrics)

    first, med, times = timed(one_step, s["warmup"], s["repeats"])
    out.update(
        framework="jax " + jax.__version__,
        first_step_s=first,
        median_s=med,
        times_s=times,
        matmul_gflops=statistics.median(mm) / 1e9,
        skipped_updates=int(holder["state"].skipped),
        loss=float(metrics_box.get("loss", float("nan"))),
        peak_rss_gib=peak_rss_gib(),
    )
    return out


def torch_case(case: str, s: dict) -> dict[str, Any]:
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(s["torch_threads"] or os.cpu_count() or 1)
    torch.manual_seed(0)
    mm = torch_matmul_samples(s["matmul_size"], s["peak_repeats"])
    model = LlamaForCausalLM.from_pretrained(s["hf_dir"], dtype=torch.float32)
    if case == "torch_lora":
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        from rllama_jax.models.lora import LoraConfig

        lcfg = LoraConfig(rank=s["lora_rank"])
        names = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
        peft_cfg = PeftLoraConfig(
            r=lcfg.rank, lora_alpha=lcfg.alpha, lora_dropout=0.0,
            target_modules=[names[t] for t in lcfg.targets],
        )  # fmt: skip
        model = get_peft_model(model, peft_cfg)
    model.train()
    config = model.config
    value_head = torch.nn.Linear(config.hidden_size, 1)
    torch.nn.init.zeros_(value_head.weight)
    torch.nn.init.zeros_(value_head.bias)
    params = [p for p in model.parameters() if p.requires_grad] + list(value_head.parameters())
    n_trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)

    n, lp, r = s["batch"], s["prompt_len"], s["response_len"]
    rng = np.random.default_rng(0)
    tokens = torch.tensor(rng.integers(3, config.vocab_size, (n, lp + r)), dtype=torch.long)
    attention_mask = torch.ones_like(tokens)
    advantages = torch.tensor(rng.standard_normal(n), dtype=torch.float32)
    returns = torch.tensor(rng.standard_normal(n), dtype=torch.float32)
    base = model.get_base_model() if case == "torch_lora" else model
    loss_box: dict[str, float] = {}

    def minibatch_step(rows: slice) -> None:
        opt.zero_grad(set_to_none=True)
        x = tokens[rows]
        hidden = base.model(input_ids=x, attention_mask=attention_mask[rows]).last_hidden_state
        # As sequence_logprobs: the LM head only on the positions predicting reply tokens.
        logits = base.lm_head(hidden[:, lp - 1 : -1]).float()
        logp = torch.log_softmax(logits, -1).gather(-1, x[:, lp:, None])[..., 0]
        pg = -(logp * advantages[rows, None]).mean()
        values = value_head(hidden[:, lp - 1])[:, 0]
        loss = pg + 0.5 * torch.mean((values - returns[rows]) ** 2)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        loss_box["loss"] = float(loss.detach())

    def one_step() -> None:
        size = n // s["minibatches"]
        for i in range(s["minibatches"]):
            minibatch_step(slice(i * size, (i + 1) * size))

    first, med, times = timed(one_step, s["warmup"], s["repeats"])
    return {
        "framework": "torch " + torch.__version__,
        "attn_implementation": str(getattr(config, "_attn_implementation", "?")),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "trainable_params": int(n_trainable),
        "compile_s": float("nan"),  # eager: the first step is the warm-up
        "first_step_s": first,
        "median_s": med,
        "times_s": times,
        "matmul_gflops": statistics.median(mm) / 1e9,
        "loss": loss_box.get("loss", float("nan")),
        "peak_rss_gib": peak_rss_gib(),
    }


def run_case(case: str, s: dict) -> dict[str, Any]:
    """Runs one case (top level, so a spawned process can pickle it)."""
    if case.startswith("jax_"):
        return jax_case(case, s)
    if s["omp_passive"]:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return torch_case(case, s)


# ---------------------------------------------------------------------------- main
def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        name = next(
            (ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if "Model name" in ln), "?"
        )
    except OSError:
        name = platform.processor() or "?"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{name}, {os.cpu_count()} cores, load average {load:.2f} at start"


def main(argv: list[str]) -> None:
    del argv
    import jax

    from rllama_jax.models import load_pretrained

    known = {"jax_full", "jax_lora", "jax_full_nofilter", "jax_lora_nofilter"}
    known |= {"torch_full", "torch_lora"}
    unknown = [c for c in FLAGS.cases if c not in known]
    if unknown:
        raise app.UsageError(f"unknown cases {unknown}; choose from {sorted(known)}")
    if FLAGS.batch % FLAGS.minibatches:
        raise app.UsageError(f"--batch={FLAGS.batch} is not divisible by --minibatches")
    cases = list(FLAGS.cases)
    notes: list[str] = []
    if "torch_lora" in cases:
        try:
            import peft  # noqa: F401
        except ImportError:
            cases.remove("torch_lora")
            notes.append("torch_lora skipped: peft is not installed (this script installs nothing)")

    s: dict[str, Any] = {
        k: getattr(FLAGS, k)
        for k in (
            "model", "batch", "prompt_len", "response_len", "warmup", "repeats", "minibatches",
            "lora_rank", "matmul_size", "peak_repeats", "hlo_stats", "mem_fraction",
            "torch_threads", "omp_passive",
        )
    }  # fmt: skip
    config, _, _ = load_pretrained(FLAGS.model, tokenizer=False)
    flops = flop_model(config, s)
    n, lp, r = s["batch"], s["prompt_len"], s["response_len"]
    tokens_per_step = n * (lp + r)
    info = machine()

    tmp = None
    if any(c.startswith("torch") for c in cases):
        from rllama_jax.models.loading import export_hf_dir

        tmp = tempfile.mkdtemp(prefix="bench_train_step_")
        export_hf_dir(FLAGS.model, tmp)
        s["hf_dir"] = tmp

    if FLAGS.omp_passive:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # before torch is imported
    try:
        import torch

        torch.set_num_threads(FLAGS.torch_threads or os.cpu_count() or 1)
        torch_peak: Callable[[], list[float]] = lambda: torch_matmul_samples(  # noqa: E731
            FLAGS.matmul_size, FLAGS.peak_repeats
        )
    except ImportError:
        torch_peak = lambda: []  # noqa: E731
    peak_samples = jax_matmul_samples(FLAGS.matmul_size, FLAGS.peak_repeats)
    torch_samples = torch_peak()
    results: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()
    try:
        for case in cases:
            print(f"running {case} ...", flush=True)
            if FLAGS.isolate:
                ctx = multiprocessing.get_context("spawn")
                with ProcessPoolExecutor(1, mp_context=ctx) as pool:
                    try:
                        results[case] = pool.submit(run_case, case, s).result()
                    except BrokenProcessPool:
                        results[case] = {"skipped": "its process died (killed: out of memory?)"}
            else:
                results[case] = run_case(case, s)
            res = results[case]
            done = f"skipped: {res['skipped']}" if "skipped" in res else f"{res['median_s']:.2f} s"
            print(f"  {case}: {done}", flush=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    wall = time.perf_counter() - start
    peak_samples += jax_matmul_samples(FLAGS.matmul_size, FLAGS.peak_repeats)
    torch_samples += torch_peak()
    jax_peak = statistics.median(peak_samples)
    peak = max(jax_peak, statistics.median(torch_samples) if torch_samples else 0.0)

    print()
    print(
        f"train_step {FLAGS.model}, PPO generate mode, batch {n} x ({lp} prompt + {r} reply) "
        f"= {tokens_per_step} tokens, float32, AdamW, epochs=1, minibatches={FLAGS.minibatches}"
    )
    print(f"machine: {info}; jax {jax.__version__}; cases took {wall:.0f} s")
    print(
        f"peak fp32 matmul ({FLAGS.matmul_size}^3, parent, before + after the cases): jitted "
        f"jax median {jax_peak / 1e9:.1f} GFLOP/s (range {min(peak_samples) / 1e9:.1f}-"
        f"{max(peak_samples) / 1e9:.1f})"
        + (
            f", torch.mm median {statistics.median(torch_samples) / 1e9:.1f} (range "
            f"{min(torch_samples) / 1e9:.1f}-{max(torch_samples) / 1e9:.1f})"
            if torch_samples
            else ""
        )
        + f"; 'of peak' uses the higher median, {peak / 1e9:.1f}"
    )
    print(
        f"FLOP model: forward = N(L+R)*layers(ctx={flops['context']:.1f}) + NR*lm_head = "
        f"{flops['forward'] / 1e9:.0f} GFLOP; full = 3x forward = {flops['full'] / 1e9:.0f}; "
        f"LoRA = 2x forward + attention ({flops['attention_forward'] / 1e9:.0f}) + 3x adapters "
        f"({flops['adapter_forward'] / 1e9:.1f}) = "
        f"{flops['lora'] / 1e9:.0f} GFLOP"
    )
    header = (
        f"{'case':18} {'compile s':>9} {'1st step s':>10} {'median s':>9} {'min-max s':>13} "
        f"{'tokens/s':>8} {'GFLOP/s':>8} {'of peak':>7} {'mm GF/s':>8} {'RSS GiB':>7} "
        f"{'XLA tmp':>7}"
    )
    print(header)
    for case, res in results.items():
        if "skipped" in res:
            print(f"{case:18} skipped: {res['skipped']}")
            continue
        step_flops = flops["lora" if "lora" in case else "full"]
        res["model_gflop"] = step_flops / 1e9
        res["tokens_per_s"] = tokens_per_step / res["median_s"]
        res["gflops"] = step_flops / res["median_s"] / 1e9
        res["of_peak"] = step_flops / res["median_s"] / peak
        print(
            f"{case:18} {res['compile_s']:9.1f} {res['first_step_s']:10.1f} "
            f"{res['median_s']:9.2f} {min(res['times_s']):6.2f}-{max(res['times_s']):<6.2f} "
            f"{res['tokens_per_s']:8.0f} {res['gflops']:8.1f} {res['of_peak']:7.0%} "
            f"{res['matmul_gflops']:8.1f} {res['peak_rss_gib']:7.2f} "
            f"{res.get('xla_temp_gib', float('nan')):7.2f}"
        )
    print(
        "mm GF/s: the same matmul in the case's own process and framework just before it "
        "(contention check); RSS: the case process's peak; XLA tmp: compiled temporaries, "
        "GiB."
    )
    for jax_name in ("jax_full", "jax_full_nofilter"):
        pair = [results.get(jax_name, {}), results.get("torch_full", {})]
        if all("median_s" in r for r in pair):
            ratio = pair[1]["median_s"] / pair[0]["median_s"]
            print(f"{jax_name} speed / torch_full speed: {ratio:.2f}x")
    for case, res in results.items():
        if "hlo_dot_flops" in res:
            kind = "lora" if "lora" in case else "full"
            expect = flops[f"{kind}_dense_attention"]
            print(
                f"{case}: optimised HLO dots {res['hlo_dot_flops'] / 1e9:.1f} GFLOP "
                f"(trip-count weighted, {res['hlo_dots']} dots) vs FLOP model with dense "
                f"T x T attention {expect / 1e9:.1f} (ratio {res['hlo_dot_flops'] / expect:.3f}; "
                f"> 1 would mean recomputation); XLA cost_analysis (loop bodies once, "
                f"elementwise included) {res['xla_cost_flops'] / 1e9:.1f}; "
                f"{res['hlo_whiles']} whiles, {res['hlo_sorts']} sorts"
            )
        if "skipped_updates" in res:
            print(f"{case}: skipped updates {res['skipped_updates']}, loss {res['loss']:.4f}")
        if "attn_implementation" in res:
            print(
                f"{case}: attn_implementation={res['attn_implementation']}, "
                f"threads={res['torch_threads']}, OMP_WAIT_POLICY={res['omp_wait_policy']}, "
                f"loss {res['loss']:.4f}"
            )
    for note in notes:
        print(note)
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w", encoding="utf-8") as f:
            json.dump(
                {"settings": s, "machine": info, "peak_flops": peak, "flops": flops,
                 "jax_peak_samples": peak_samples, "torch_peak_samples": torch_samples,
                 "results": results, "notes": notes},
                f, indent=1,
            )  # fmt: skip


if __name__ == "__main__":
    app.run(main)
