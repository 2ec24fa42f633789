"""The model with Pallas attention (interpret mode) equals the XLA path, past the window."""

import jax
import jax.numpy as jnp
import numpy as np

from o1jax.model import Gemma2Config, forward, init_params


def _random_model(d_model: int, ffn_dim: int, window: int, seed: int):
    """A 2-layer Gemma2 (4 heads, 2 kv heads of 16, vocab 64) whose params are all N(0, 0.2)."""
    cfg = Gemma2Config.tiny(
        vocab_size=64,
        num_layers=2,
        d_model=d_model,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        ffn_dim=ffn_dim,
        sliding_window=window,
    )
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    params = jax.tree.map(
        lambda x: jax.random.normal(next(keys), x.shape) * 0.2,
        jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(1)),  # shapes: none run
    )
    return cfg, params


def test_pallas_model_logits_equal_xla_past_the_window():
    cfg, params = _random_model(d_model=64, ffn_dim=128, window=8, seed=0)
    tokens = jax.random.randint(jax.random.key(2), (2, 37), 0, 64)  # 37 > window, not a block
    mask = jnp.ones((2, 37), bool).at[1, :5].set(False)  # a left-padded row
    xla = forward(params, cfg, tokens, attention_mask=mask)
    pallas = forward(params, cfg.replace(attention_impl="pallas"), tokens, attention_mask=mask)
    valid = np.asarray(mask)
    assert np.abs(np.asarray(xla) - np.asarray(pallas))[valid].max() <= 1e-4


def test_pallas_model_on_packed_rows_uses_the_kernel_and_equals_xla(monkeypatch):
    """SFT's packed rows (segment_ids): the Pallas branch runs the kernel with the documents
    (it used to fall back to XLA attention), logits and parameter gradients equal "xla"."""
    from kernels import flash

    calls = []
    kernel = flash.flash_attention

    def counted(*args, **kw):
        calls.append(kw.get("segment_ids") is not None)
        return kernel(*args, **kw)

    monkeypatch.setattr(flash, "flash_attention", counted)
    jax.clear_caches()  # retrace with the counter

    cfg, params = _random_model(d_model=32, ffn_dim=64, window=6, seed=3)
    # Row 0: documents of 9, 14 (> window) and 7 tokens, then padding; row 1: 20 + 13 + padding.
    lengths = [(9, 14, 7), (20, 13)]
    t = 33
    seg, pos, mask = (np.zeros((2, t), np.int32) for _ in range(3))
    for r, docs in enumerate(lengths):
        at = 0
        for i, n in enumerate(docs):
            seg[r, at : at + n], pos[r, at : at + n], mask[r, at : at + n] = i + 1, np.arange(n), 1
            at += n
    tokens = jax.random.randint(jax.random.key(2), (2, t), 0, 64)
    cot = jax.random.normal(jax.random.key(4), (2, t, 64)) * jnp.asarray(mask)[:, :, None]

    def run(impl):
        def loss(p):
            logits = forward(
                p,
                cfg.replace(attention_impl=impl),
                tokens,
                positions=jnp.asarray(pos),
                attention_mask=jnp.asarray(mask),
                segment_ids=jnp.asarray(seg),
            )
            return jnp.sum(logits * cot), logits

        return jax.value_and_grad(loss, has_aux=True)(params)

    (_, xla), xla_grads = run("xla")
    assert calls == []
    (_, pallas), pallas_grads = run("pallas")
    assert calls and all(calls)  # every layer's attention went through the kernel, with ids
    valid = mask.astype(bool)
    assert np.abs(np.asarray(xla) - np.asarray(pallas))[valid].max() <= 1e-4
    leaves = zip(jax.tree.leaves(xla_grads), jax.tree.leaves(pallas_grads), strict=True)
    for g_xla, g_pallas in leaves:
        np.testing.assert_allclose(g_pallas, g_xla, rtol=1e-3, atol=1e-4)
