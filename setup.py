"""rllama_jax: online RL fine-tuning of Llama-family LLM agents in text environments, in JAX."""

from setuptools import find_packages, setup

setup(
    name="rllama_jax",
    version="0.1.0",
    description=(
        "JAX/Flax online RL (PPO, DQN, A2C, SAC, REINFORCE, GRPO) for LLM agents in "
        "Gymnasium text environments, with episodic and working memory."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["rllama_jax", "rllama_jax.*"]),
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "chex>=0.1.92",
        "orbax-checkpoint>=0.12.8",
        "gymnasium>=1.4.0",
        "transformers>=5.24.0",
        "absl-py>=2.5.1",
        "safetensors>=0.8.0",
        "huggingface_hub>=2.4.0",
        "gguf>=0.19.0",
        "numpy>=2.4",
        "tqdm>=4.70",
        "jinja2>=3.1",
        "tensorboardX>=2.6",
        "matplotlib>=3.11",
    ],
    extras_require={
        "test": [
            "pytest>=9.0",
            "pytest-xdist>=3.8",
            "torch==2.13.0",
            "rlax>=0.1.9",
            "ruff>=0.17",
            "accelerate>=1.0",
            "minigrid>=3.2.0",
            "textworld>=1.7.0",
            "nbclient>=0.11.0",
            "nbformat>=5.11.1",
            "ipykernel>=7.4.0",
            "jupyter_client>=8.10.0",
        ],
        "wandb": ["wandb"],
        "babyai": ["minigrid>=3.2.0"],
        "textworld": ["textworld>=1.7.0"],
    },
)
