"""rllama_jax: online RL fine-tuning of Llama-family LLM agents in Gymnasium text environments,
with episodic and working memory, in JAX."""

__version__ = "0.1.0"

from rllama_jax.agent import Agent, RLlamaAgent  # noqa: E402

__all__ = ["Agent", "RLlamaAgent", "__version__"]
