"""Forward-pass throughput: our jitted Flax Llama vs transformers' PyTorch LlamaForCausalLM.

Same weights (SmolLM2-135M-Instruct, float32), same batch of tokens, full logits on both
sides, side by side in one process. Also measures this machine's peak fp32 matmul rate and
reports the forward's achieved FLOP/s against it. ``--layers=both`` also times our forward
with the layers unrolled (a Python loop over static slices) instead of the default scan.

python experiments/bench_forward.py --batch=8 --seq=128 --repeats=5 [--layers=both]
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

from rllama_jax.models import DEFAULT_MODEL, forward, load_pretrained, positions_from_mask
from rllama_jax.models.loading import export_hf_dir

FLAGS = flags.FLAGS
flags.DEFINE_string("model", DEFAULT_MODEL, "Model name, local directory, .gguf or hub id.")
flags.DEFINE_integer("batch", 8, "Rows per forward pass.")
flags.DEFINE_integer("seq", 128, "Tokens per row.")
flags.DEFINE_integer("warmup", 2, "Untimed calls after the first (compile) call.")
flags.DEFINE_integer("repeats", 5, "Timed calls; the median is reported.")
flags.DEFINE_integer("matmul_size", 2048, "n of the n x n x n fp32 matmul measuring peak.")
flags.DEFINE_integer("threads", 0, "torch threads (0: all cores).")
flags.DEFINE_boolean("torch", True, "Also time transformers' PyTorch model.")
flags.DEFINE_enum(
    "layers",
    "scan",
    ["scan", "unrolled", "both"],
    "How our forward runs the layers: lax.scan over the stacked weights (the default), a "
    "Python loop over static slices (forward(..., scan_layers=False)), or both side by side.",
)
flags.DEFINE_string("json_out", "", "Write the results as JSON here.")


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


def peak_matmul_flops(n: int, repeats: int) -> float:
    """FLOP/s of a jitted n x n @ n x n float32 matmul, best of ``repeats`` (at least 5)
    calls: a peak, and the least disturbed by other processes on a shared machine."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    _, _, times = timed(lambda: mm(a, b).block_until_ready(), 2, max(repeats, 5))
    return 2.0 * n**3 / min(times)


def main(argv: list[str]) -> None:
    del argv
    cores = os.cpu_count() or 1
    config, params, _ = load_pretrained(FLAGS.model, tokenizer=False)
    b, t = FLAGS.batch, FLAGS.seq
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, config.vocab_size, (b, t)).astype(np.int32)
    mask = np.ones((b, t), np.int32)
    positions = np.asarray(positions_from_mask(mask))
    # Causal attention: token i attends to i + 1 keys, (t + 1) / 2 on average.
    flops = b * t * config.flops_per_token((t + 1) / 2)

    scan = FLAGS.layers != "unrolled"
    fwd = jax.jit(lambda p, x, pos, m: forward(p, config, x, pos, m, scan_layers=scan).logits)
    args = [jnp.asarray(a) for a in (tokens, positions, mask)]
    unrolled = {}
    if FLAGS.layers == "both":
        fwd_unrolled = jax.jit(
            lambda p, x, pos, m: forward(p, config, x, pos, m, scan_layers=False).logits
        )
        u_first, u_med, u_times = timed(
            lambda: fwd_unrolled(params, *args).block_until_ready(), FLAGS.warmup, FLAGS.repeats
        )
        unrolled = dict(
            unrolled_first_call_s=u_first,
            unrolled_median_s=u_med,
            unrolled_times_s=u_times,
            unrolled_tokens_per_s=b * t / u_med,
            unrolled_gflops=flops / u_med / 1e9,
        )
    ours_first, ours_med, ours_times = timed(
        lambda: fwd(params, *args).block_until_ready(), FLAGS.warmup, FLAGS.repeats
    )
    peak = peak_matmul_flops(FLAGS.matmul_size, FLAGS.repeats)
    results: dict[str, object] = {
        "model": FLAGS.model,
        "batch": b,
        "seq": t,
        "cores": cores,
        "jax": jax.__version__,
        "forward_gflop": flops / 1e9,
        "peak_matmul_gflops": peak / 1e9,
        "ours_first_call_s": ours_first,
        "ours_median_s": ours_med,
        "ours_times_s": ours_times,
        "ours_tokens_per_s": b * t / ours_med,
        "ours_gflops": flops / ours_med / 1e9,
        "ours_fraction_of_peak": flops / ours_med / peak,
        "layers": FLAGS.layers,
        **unrolled,
    }

    if FLAGS.torch:
        import torch
        from transformers import LlamaForCausalLM

        torch.set_num_threads(FLAGS.threads or cores)
        with tempfile.TemporaryDirectory() as tmp:
            export_hf_dir(FLAGS.model, tmp)
            model = LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        x = torch.tensor(tokens, dtype=torch.long)
        am = torch.tensor(mask, dtype=torch.long)

        def torch_forward() -> None:
            with torch.inference_mode():
                model(input_ids=x, attention_mask=am).logits.sum().item()

        # Same logits on both sides (a sanity check that the comparison is like for like).
        with torch.inference_mode():
            ref = model(input_ids=x, attention_mask=am).logits.numpy()
        diff = float(np.abs(np.asarray(fwd(params, *args)) - ref).max())
        th_first, th_med, th_times = timed(torch_forward, FLAGS.warmup, FLAGS.repeats)
        a = torch.randn(FLAGS.matmul_size, FLAGS.matmul_size)
        _, _, mm_times = timed(lambda: torch.mm(a, a), 2, max(FLAGS.repeats, 5))
        results.update(
            torch=torch.__version__,
            torch_threads=torch.get_num_threads(),
            max_abs_logit_diff=diff,
            torch_first_call_s=th_first,
            torch_median_s=th_med,
            torch_times_s=th_times,
            torch_tokens_per_s=b * t / th_med,
            torch_gflops=flops / th_med / 1e9,
            torch_fraction_of_peak=flops / th_med / peak,
            torch_peak_matmul_gflops=2.0 * FLAGS.matmul_size**3 / min(mm_times) / 1e9,
            ours_speedup=th_med / ours_med,
        )

    print(f"forward {FLAGS.model}, batch {b} x {t} tokens, float32, {cores} cores")
    print(
        f"peak fp32 matmul ({FLAGS.matmul_size}^3, best of {max(FLAGS.repeats, 5)}): jax {results['peak_matmul_gflops']:.1f} "
        f"GFLOP/s" + (f", torch {results['torch_peak_matmul_gflops']:.1f}" if FLAGS.torch else "")
    )
    print(f"forward FLOPs: {flops / 1e9:.1f} GFLOP")
    header = (
        f"{'':8} {'first call s':>12} {'median s':>9} {'tokens/s':>9} {'GFLOP/s':>8} {'of peak':>8}"
    )
    print(header)
    if unrolled:
        results["unrolled_fraction_of_peak"] = flops / results["unrolled_median_s"] / peak
    rows = [("ours", "ours")] + ([("torch", "torch")] if FLAGS.torch else [])
    if FLAGS.layers == "both":
        rows.insert(1, ("unrolled", "unrolled"))
    for label, key in rows:
        print(
            f"{label:8} {results[f'{key}_first_call_s']:12.2f} {results[f'{key}_median_s']:9.3f} "
            f"{results[f'{key}_tokens_per_s']:9.0f} {results[f'{key}_gflops']:8.1f} "
            f"{results[f'{key}_fraction_of_peak']:8.0%}"
        )
    if FLAGS.torch:
        print(
            f"ours / torch speed: {results['ours_speedup']:.2f}x "
            f"(max |logit diff| {results['max_abs_logit_diff']:.1e})"
        )
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    app.run(main)
