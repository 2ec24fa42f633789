"""The model with Pallas attention (interpret mode) equals the XLA path, past the window."""

import jax
import jax.numpy as jnp
import numpy as np

from o1jax.model import Gemma2Config, forward, init_params


def test_pallas_model_logits_equal_xla_past_the_window():
    cfg = Gemma2Config.tiny(
        vocab_size=64,
        num_layers=2,
        d_model=64,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        ffn_dim=128,
        sliding_window=8,
    )
    keys = iter(jax.random.split(jax.random.key(0), 64))
    params = jax.tree.map(
        lambda x: jax.random.normal(next(keys), x.shape) * 0.2, init_params(cfg, jax.random.key(1))
    )
    tokens = jax.random.randint(jax.random.key(2), (2, 37), 0, 64)  # 37 > window, not a block
    mask = jnp.ones((2, 37), bool).at[1, :5].set(False)  # a left-padded row
    xla = forward(params, cfg, tokens, attention_mask=mask)
    pallas = forward(params, cfg.replace(attention_impl="pallas"), tokens, attention_mask=mask)
    valid = np.asarray(mask)
    assert np.abs(np.asarray(xla) - np.asarray(pallas))[valid].max() <= 1e-4
