"""A small random Gemma2 over the project's tiny tokenizer, with weights large enough that
greedy continuations and pairwise preferences vary (init_params alone gives near-uniform logits)."""

import jax

from o1jax.model import Gemma2Config, init_params


def random_tiny_model(vocab_size: int, seed: int, sliding_window: int = 16):
    """(cfg, params): 2 layers, d_model 64, 2 heads / 1 kv head, random norms and kernels."""
    cfg = Gemma2Config.tiny(
        vocab_size=vocab_size, num_layers=2, d_model=64, num_heads=2, num_kv_heads=1,
        head_dim=32, ffn_dim=128, sliding_window=sliding_window,
    )  # fmt: skip
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    params = jax.tree.map(
        lambda x: jax.random.normal(next(keys), x.shape) * (0.5 if x.ndim == 1 else 0.2),
        init_params(cfg, jax.random.key(0)),
    )
    return cfg, params
