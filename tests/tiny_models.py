"""A small random Gemma2 over the project's tiny tokenizer, with weights large enough that
greedy continuations and pairwise preferences vary (init_params alone gives near-uniform logits),
and cache-free full-forward references to check the sampler against."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from o1jax.model import Gemma2Config, forward, init_params


def random_tiny_model(vocab_size: int, seed: int, sliding_window: int = 16):
    """(cfg, params): 2 layers, d_model 64, 2 heads / 1 kv head, random norms and kernels."""
    cfg = Gemma2Config.tiny(
        vocab_size=vocab_size, num_layers=2, d_model=64, num_heads=2, num_kv_heads=1,
        head_dim=32, ffn_dim=128, sliding_window=sliding_window,
    )  # fmt: skip
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    params = jax.tree.map(
        lambda x: jax.random.normal(next(keys), x.shape) * (0.5 if x.ndim == 1 else 0.2),
        jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0)),  # shapes: none run
    )
    return cfg, params


def full_forward_logits(params, cfg, seq, width: int = 32) -> jax.Array:
    """Logits [T, V] of one cache-free `forward` over `seq` (T tokens), right-padded to a
    multiple of `width` and masked, so sequences of many lengths share a few compiled forwards
    (an eager forward costs seconds; the padding is never attended)."""
    seq = np.asarray(seq)
    padded = np.zeros((1, -(-len(seq) // width) * width), np.int32)
    padded[0, : len(seq)] = seq
    return _masked_forward(params, cfg, jnp.asarray(padded), len(seq))[0, : len(seq)]


def greedy_by_full_forwards(params, cfg, prompt, steps: int, stop: int | None = None) -> list[int]:
    """Greedy continuation of `prompt` by one full, cache-free `forward` per new token
    (`full_forward_logits`); stops after `stop`."""
    seq = list(prompt)
    for _ in range(steps):
        seq.append(int(jnp.argmax(full_forward_logits(params, cfg, seq)[-1])))
        if seq[-1] == stop:
            break
    return seq[len(prompt) :]


@functools.partial(jax.jit, static_argnums=1)
def _masked_forward(params, cfg, tokens, length):
    mask = jnp.arange(tokens.shape[1])[None, :] < length  # [1, W]
    return forward(params, cfg, tokens, attention_mask=mask)
