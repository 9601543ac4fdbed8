"""Acting speed: our jitted ``generate`` / ``score_candidates`` vs transformers' ``generate``.

SmolLM2-135M-Instruct, float32, the same weights on both sides. Prompts are the RLlama
Blackjack system prompt plus one observation per row (~127 chat-template tokens), greedy,
exactly ``--new_tokens`` new tokens on both sides (no stop ids; transformers' eos disabled).
Ours is timed with and without the shared-prefix cache (the system prompt, common to every
row, run once), on the parameters as loaded (layer stacks) and on weights split per layer
once (``unstack_layers``, what an agent re-does after each update). Also: a roofline
(prefill FLOP/s against the measured peak matmul rate; decode time per step against
max(FLOP time, time to read the weights and KV cache once at the measured memory
bandwidth)), transformers' own prefill / decode split, and candidate scoring against
generating a few tokens.

python experiments/bench_sampling.py --batches=1,8,32 --repeats=3
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from rllama_jax.models import DEFAULT_MODEL, load_pretrained
from rllama_jax.models.llama import unstack_layers
from rllama_jax.models.loading import export_hf_dir
from rllama_jax.sampling import (
    SamplingConfig,
    build_prefix,
    generate,
    score_candidates,
)
from rllama_jax.tokenization import (
    encode_candidates,
    encode_chat_batch,
    encode_chat_suffixes,
    split_shared_prefix,
)

FLAGS = flags.FLAGS
flags.DEFINE_string("model", DEFAULT_MODEL, "Model name, local directory, .gguf or hub id.")
flags.DEFINE_list("batches", ["1", "8", "32"], "Batch sizes for generation.")
flags.DEFINE_integer("new_tokens", 16, "New tokens per row (forced: no early stop).")
flags.DEFINE_integer("repeats", 2, "Timed calls after the first one; the median is reported.")
flags.DEFINE_integer("score_batch", 32, "Rows for the candidate-scoring comparison (0: skip).")
flags.DEFINE_list("num_candidates", ["2", "8"], "Candidate counts to score.")
flags.DEFINE_integer("score_gen_tokens", 4, "Tokens generated in the scoring comparison.")
flags.DEFINE_boolean("torch", True, "Also time transformers' generate.")
flags.DEFINE_boolean(
    "split",
    True,
    "Also time generate on weights split per layer once (unstack_layers), as an agent that "
    "re-splits after each update would call it.",
)
flags.DEFINE_integer("threads", 0, "torch threads (0: all cores).")
flags.DEFINE_integer("matmul_size", 2048, "n of the n^3 fp32 matmul measuring peak FLOP/s.")
flags.DEFINE_integer("bandwidth_mb", 1024, "MB read when measuring memory bandwidth.")
flags.DEFINE_string("json_out", "", "Write the results as JSON here.")

SYSTEM = """You are an expert blackjack player. Follow these rules:
        1. ALWAYS hit if your total is 11 or below
        2. With 12-16: hit if dealer shows 7+, stay if 6 or lower
        3. ALWAYS stay if your total is 17+ without an ace
        4. With a usable ace: hit if total is 17 or below"""

CANDIDATES = [
    "stay",
    "hit",
    "double down",
    "split the pair",
    "surrender",
    "take insurance",
    "hit once more",
    "stand and wait",
]


def conversations(batch: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """Blackjack observations as the seed's BlackjackAgent formats them (two-digit totals,
    so every row has the same length and fits the 128 bucket)."""
    rng = np.random.default_rng(seed)
    convs = []
    for _ in range(batch):
        total, dealer, ace = int(rng.integers(12, 22)), int(rng.integers(2, 11)), rng.random()
        obs = (
            f"Current hand total: {total}\nDealer's card: {dealer}\n"
            f"Usable ace: {'yes' if ace < 0.3 else 'no'}"
        )
        convs.append([{"role": "system", "content": SYSTEM}, {"role": "user", "content": obs}])
    return convs


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float, list[float]]:
    """(first call seconds, median of ``repeats`` further calls, those calls)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times), times


def interleaved(
    fns: dict[str, Callable[[], object]], repeats: int
) -> tuple[dict[str, float], dict[str, float], dict[str, list[float]]]:
    """Times several functions side by side: one first (compiling) call each, then
    ``repeats`` rounds calling each in turn, so that load from other processes on a shared
    machine hits all of them alike. Returns (first-call seconds, medians, all timed calls)."""
    first, times = {}, {name: [] for name in fns}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - start
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return first, {k: statistics.median(v) for k, v in times.items()}, times


def peak_matmul_flops(n: int) -> float:
    """FLOP/s of a jitted n^3 float32 matmul, best of 7 calls (a peak: the call least
    disturbed by other processes)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    _, _, times = timed(lambda: mm(a, a).block_until_ready(), 7)
    return 2.0 * n**3 / min(times)


def memory_bandwidth(megabytes: int) -> float:
    """Bytes/s of a jitted sum over a float32 array of ``megabytes`` (read once), best of 7."""
    x = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    _, _, times = timed(lambda: total(x).block_until_ready(), 7)
    return x.nbytes / min(times)


def main(argv: list[str]) -> None:
    del argv
    cores = os.cpu_count() or 1
    config, params, tok = load_pretrained(FLAGS.model)
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    n = FLAGS.new_tokens
    greedy = SamplingConfig(max_new_tokens=n, temperature=0.0, top_p=1.0, pad_token_id=0)
    one = SamplingConfig(max_new_tokens=1, temperature=0.0, top_p=1.0, pad_token_id=0)
    peak = peak_matmul_flops(FLAGS.matmul_size)
    bandwidth = memory_bandwidth(FLAGS.bandwidth_mb)
    results: dict[str, object] = {
        "model": FLAGS.model,
        "cores": cores,
        "new_tokens": n,
        "repeats": FLAGS.repeats,
        "peak_matmul_gflops": peak / 1e9,
        "bandwidth_gb_s": bandwidth / 1e9,
        "param_mb": param_bytes / 2**20,
        "batches": {},
    }
    print(
        f"peak fp32 matmul {peak / 1e9:.1f} GFLOP/s; memory bandwidth (sum) "
        f"{bandwidth / 1e9:.1f} GB/s; weights {param_bytes / 2**20:.0f} MiB"
    )

    torch_model = None
    if FLAGS.torch:
        import torch
        from transformers import LlamaForCausalLM

        torch.set_num_threads(FLAGS.threads or cores)
        with tempfile.TemporaryDirectory() as tmp:
            export_hf_dir(FLAGS.model, tmp)
            torch_model = LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        torch_model.generation_config.eos_token_id = None

    prefix_ids = split_shared_prefix(tok, SYSTEM)
    prefix_first, prefix_s, _ = timed(
        lambda: jax.block_until_ready(build_prefix(params, config, prefix_ids)), FLAGS.repeats
    )
    prefix = build_prefix(params, config, prefix_ids)
    results.update(
        prefix_tokens=len(prefix_ids), build_prefix_s=prefix_s, build_prefix_first_s=prefix_first
    )
    key = jax.random.key(0)
    split = None
    if FLAGS.split:
        split_first, split_s, _ = timed(
            lambda: jax.block_until_ready(unstack_layers(params)), FLAGS.repeats
        )
        split = jax.block_until_ready(unstack_layers(params))
        results.update(unstack_layers_s=split_s, unstack_layers_first_s=split_first)

    for b in [int(x) for x in FLAGS.batches]:
        convs = conversations(b)
        tokens, mask = encode_chat_batch(tok, convs)
        s_tokens, s_mask = encode_chat_suffixes(tok, convs, prefix_ids)
        length = tokens.shape[1]
        fns: dict[str, Callable[[], object]] = {
            "ours": lambda t=tokens, m=mask: jax.block_until_ready(
                generate(params, config, t, m, key, greedy)
            ),
            "ours_prefix": lambda t=s_tokens, m=s_mask: jax.block_until_ready(
                generate(params, config, t, m, key, greedy, prefix=prefix)
            ),
            # The same call with one new token: the prefill (plus one sampling step); the
            # other n - 1 decode steps are the difference.
            "ours_prefill": lambda t=tokens, m=mask: jax.block_until_ready(
                generate(params, config, t, m, key, one)
            ),
        }
        if split is not None:
            fns.update(
                ours_split=lambda t=tokens, m=mask: jax.block_until_ready(
                    generate(split, config, t, m, key, greedy)
                ),
                ours_split_prefix=lambda t=s_tokens, m=s_mask: jax.block_until_ready(
                    generate(split, config, t, m, key, greedy, prefix=prefix)
                ),
                ours_split_prefill=lambda t=tokens, m=mask: jax.block_until_ready(
                    generate(split, config, t, m, key, one)
                ),
            )
        if torch_model is not None:
            import torch

            x = torch.tensor(tokens, dtype=torch.long)
            am = torch.tensor(mask, dtype=torch.long)

            def theirs(x=x, am=am, new=n):
                with torch.inference_mode():
                    return torch_model.generate(
                        input_ids=x,
                        attention_mask=am,
                        max_new_tokens=new,
                        min_new_tokens=new,
                        do_sample=False,
                        eos_token_id=None,
                        pad_token_id=0,
                    )

            fns["torch"] = theirs
            # transformers' prefill (one new token), to split its time the same way as ours.
            fns["torch_prefill"] = lambda theirs=theirs: theirs(new=1)
        first, med, times = interleaved(fns, FLAGS.repeats)
        row: dict[str, object] = {
            "prompt_tokens_max": int(mask.sum(1).max()),
            "L": length,
            "suffix_tokens_max": int(s_mask.sum(1).max()),
            "L_suffix": s_tokens.shape[1],
            "first_s": first,
            "median_s": med,
            "times_s": times,
        }
        out, out_p = fns["ours"](), fns["ours_prefix"]()
        row["prefix_tokens_equal"] = bool(np.array_equal(out.tokens, out_p.tokens))
        if split is not None:
            row["split_tokens_equal"] = bool(
                np.array_equal(out.tokens, fns["ours_split"]().tokens)
                and np.array_equal(out.tokens, fns["ours_split_prefix"]().tokens)
            )
        # The prefill computes logits at the last position only.
        head_flops = 2.0 * config.hidden_size * config.vocab_size
        prefill_flops = b * length * (config.flops_per_token((length + 1) / 2) - head_flops)
        prefill_flops += b * head_flops
        step_s = (med["ours"] - med["ours_prefill"]) / max(n - 1, 1)
        context = length + n // 2
        kv_bytes = 2 * config.num_layers * b * context * config.num_kv_heads * config.head_dim * 4
        step_flop_s = b * config.flops_per_token(context) / peak
        step_mem_s = (param_bytes + kv_bytes) / bandwidth
        row.update(
            prefill_gflops=prefill_flops / med["ours_prefill"] / 1e9,
            prefill_fraction_of_peak=prefill_flops / med["ours_prefill"] / peak,
            decode_step_s=step_s,
            decode_step_flop_bound_s=step_flop_s,
            decode_step_memory_bound_s=step_mem_s,
            decode_step_vs_roofline=step_s / max(step_flop_s, step_mem_s),
            prefix_saves_s=med["ours"] - med["ours_prefix"],
        )
        if split is not None:
            split_step_s = (med["ours_split"] - med["ours_split_prefill"]) / max(n - 1, 1)
            row.update(
                split_decode_step_s=split_step_s,
                split_decode_step_vs_roofline=split_step_s / max(step_flop_s, step_mem_s),
            )
        if torch_model is not None:
            ref = fns["torch"]()[:, length:].numpy()
            assert ref.shape == (b, n), ref.shape
            row.update(
                tokens_equal_fraction=float(np.mean(ref == np.asarray(out.tokens))),
                speedup=med["torch"] / med["ours"],
                speedup_prefix=med["torch"] / med["ours_prefix"],
                torch_prefill_s=med["torch_prefill"],
                torch_decode_step_s=(med["torch"] - med["torch_prefill"]) / max(n - 1, 1),
                prefill_speedup=med["torch_prefill"] / med["ours_prefill"],
            )
            if split is not None:
                row.update(
                    speedup_split=med["torch"] / med["ours_split"],
                    speedup_split_prefix=med["torch"] / med["ours_split_prefix"],
                )
        results["batches"][str(b)] = row
        print(f"batch {b}: {json.dumps({k: v for k, v in row.items() if k != 'times_s'})}")

    if FLAGS.score_batch:
        b = FLAGS.score_batch
        convs = conversations(b, seed=1)
        s_tokens, s_mask = encode_chat_suffixes(tok, convs, prefix_ids)
        k = FLAGS.score_gen_tokens
        gen = SamplingConfig(max_new_tokens=k, temperature=0.0, top_p=1.0, pad_token_id=0)
        fns = {
            f"generate_{k}": lambda: jax.block_until_ready(
                generate(params, config, s_tokens, s_mask, key, gen, prefix=prefix)
            )
        }
        if split is not None:
            fns[f"generate_{k}_split"] = lambda: jax.block_until_ready(
                generate(split, config, s_tokens, s_mask, key, gen, prefix=prefix)
            )
        shapes = {}
        for a in [int(x) for x in FLAGS.num_candidates]:
            c_tokens, c_mask, _ = encode_candidates(tok, [CANDIDATES[:a]] * b)
            shapes[f"score_{a}"] = list(c_tokens.shape)
            fns[f"score_{a}"] = lambda c=c_tokens, m=c_mask: jax.block_until_ready(
                score_candidates(params, config, s_tokens, s_mask, c, m, prefix=prefix)
            )
        first, med, times = interleaved(fns, FLAGS.repeats)
        results["scoring"] = {
            "batch": b,
            "first_s": first,
            "median_s": med,
            "times_s": times,
            "candidate_shapes": shapes,
        }
        print(f"scoring: {json.dumps(results['scoring'])}")

    print()
    print(
        f"generate: {n} new tokens greedy, chat prompt ({results['prefix_tokens']} shared "
        f"prefix tokens), float32, {cores} cores; new tokens/s (x torch), median of "
        f"{FLAGS.repeats} interleaved calls. stacked: params as loaded; split: "
        "unstack_layers(params) passed in; +pfx: shared-prefix cache"
    )
    variants = [("ours", "stacked"), ("ours_prefix", "stacked+pfx")]
    if FLAGS.split:
        variants += [("ours_split", "split"), ("ours_split_prefix", "split+pfx")]
    print(f"{'batch':>5} {'L':>4} {'torch':>7} " + " ".join(f"{v:>16}" for _, v in variants))
    for b, row in results["batches"].items():
        bi, med = int(b), row["median_s"]
        th = f"{bi * n / med['torch']:7.1f}" if "torch" in med else f"{'-':>7}"
        cells = []
        for name, _ in variants:
            ratio = f" ({med['torch'] / med[name]:.2f}x)" if "torch" in med else ""
            cells.append(f"{bi * n / med[name] + 0:>7.1f}{ratio:>9}")
        print(f"{bi:5d} {row['L']:4d} {th} " + " ".join(cells))
    print()
    print(
        "where the time goes: prefill s (fraction of the in-run matmul peak), decode step ms "
        "(stacked, split), roofline ms = max(FLOP time at peak, weights + KV cache read once "
        "at the measured bandwidth), compile s (first call minus median)"
    )
    print(
        f"{'batch':>5} {'prefill s':>9} {'of peak':>7} {'step':>6} {'split':>6} "
        f"{'roofline':>8} {'torch prefill s':>15} {'torch step':>10} {'compile':>7} "
        f"{'compile split':>13}"
    )
    for b, row in results["batches"].items():
        med, first = row["median_s"], row["first_s"]
        roof = max(row["decode_step_flop_bound_s"], row["decode_step_memory_bound_s"])
        split_step = f"{1e3 * row['split_decode_step_s']:6.1f}" if FLAGS.split else f"{'-':>6}"
        torch_cells = (
            f"{row['torch_prefill_s']:15.2f} {1e3 * row['torch_decode_step_s']:10.1f}"
            if "torch_prefill_s" in row
            else f"{'-':>15} {'-':>10}"
        )
        compile_split = (
            f"{first['ours_split'] - med['ours_split']:13.1f}" if FLAGS.split else f"{'-':>13}"
        )
        print(
            f"{int(b):5d} {med['ours_prefill']:9.2f} {row['prefill_fraction_of_peak']:7.0%} "
            f"{1e3 * row['decode_step_s']:6.1f} {split_step} {1e3 * roof:8.1f} {torch_cells} "
            f"{first['ours'] - med['ours']:7.1f} {compile_split}"
        )
    if "scoring" in results:
        sc = results["scoring"]
        parts = [f"{name} {t:.2f} s" for name, t in sc["median_s"].items()]
        print(f"batch {sc['batch']} with prefix cache: " + ", ".join(parts))
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    app.run(main)
