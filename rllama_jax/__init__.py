"""rllama_jax: online RL fine-tuning of Llama-family LLM agents in Gymnasium text environments,
with episodic and working memory, in JAX."""

__version__ = "0.1.0"
