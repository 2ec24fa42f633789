"""o1jax: LLaMA-O1 and LLaMA-Berry in JAX/Flax."""

__version__ = "0.1.0"
