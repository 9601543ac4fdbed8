"""Loads a model (default: the embedded SmolLM2-135M-Instruct) and prints a greedy chat reply.

python experiments/chat_demo.py --prompt="What is the capital of France?"
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import app, flags

from rllama_jax.models import DEFAULT_MODEL, load_pretrained
from rllama_jax.sampling import SamplingConfig, generate

FLAGS = flags.FLAGS
flags.DEFINE_string("model", DEFAULT_MODEL, "Model name, local directory, .gguf file or hub id.")
flags.DEFINE_string("prompt", "You are playing blackjack. Should you hit or stay on 19?", "")
flags.DEFINE_integer("max_new_tokens", 48, "Tokens to generate.")


def main(argv: list[str]) -> None:
    del argv
    start = time.perf_counter()
    config, params, tokenizer = load_pretrained(FLAGS.model)
    print(
        f"loaded {FLAGS.model} ({config.num_params() / 1e6:.0f}M params) in "
        f"{time.perf_counter() - start:.1f}s"
    )
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": FLAGS.prompt}], add_generation_prompt=True
    )["input_ids"]
    tokens = np.asarray(ids, np.int32)[None]
    sampling = SamplingConfig(
        max_new_tokens=FLAGS.max_new_tokens,
        temperature=0.0,
        stop_token_ids=(tokenizer.eos_token_id,),
        pad_token_id=tokenizer.pad_token_id or 0,
    )
    start = time.perf_counter()
    out = generate(params, config, tokens, np.ones_like(tokens), jax.random.key(0), sampling)
    reply = tokenizer.decode(
        np.asarray(out.tokens[0])[np.asarray(out.mask[0])], skip_special_tokens=True
    )
    print(f"user: {FLAGS.prompt}\nassistant: {reply}")
    print(f"({int(out.lengths[0])} tokens in {time.perf_counter() - start:.1f}s incl. compile)")


if __name__ == "__main__":
    app.run(main)
