"""Chunked token log-probabilities: equal to the full log-softmax, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from o1jax.model import Gemma2Config, init_params, unembed
from o1jax.model.logprobs import token_logprobs

CFG = Gemma2Config.tiny(
    vocab_size=97, num_layers=1, d_model=16, num_heads=2, num_kv_heads=1, head_dim=8, ffn_dim=32
)
B, T = 3, 12


def _inputs():
    params = init_params(CFG, jax.random.key(0))
    hidden = jax.random.normal(jax.random.key(1), (B, T, CFG.d_model))
    targets = jax.random.randint(jax.random.key(2), (B, T), 0, CFG.vocab_size)
    return params, hidden, targets


def _reference(params, hidden, targets):
    logp = jax.nn.log_softmax(unembed(params, CFG, hidden), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return picked, -jnp.sum(jnp.exp(logp) * logp, axis=-1)


@pytest.mark.parametrize("chunk", [0, 4, 5, T, 40])  # all at once, a divisor, a non-divisor
def test_chunked_logprobs_and_grads_equal_the_full_log_softmax(chunk):
    params, hidden, targets = _inputs()
    weights = jax.random.normal(jax.random.key(3), (B, T))

    def objective(fn):  # a weighted sum of both outputs, differentiated in params and hidden
        def f(emb, h):
            p = {**params, "embedder": {"embedding": emb}}
            picked, entropy = fn(p, h)
            return jnp.sum(weights * picked) + 0.3 * jnp.sum(weights * entropy), (picked, entropy)

        return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)

    emb = params["embedder"]["embedding"]
    (want, (want_lp, want_ent)), want_grads = objective(lambda p, h: _reference(p, h, targets))(
        emb, hidden
    )
    (got, (got_lp, got_ent)), got_grads = objective(
        lambda p, h: token_logprobs(p, CFG, h, targets, chunk=chunk, with_entropy=True)
    )(emb, hidden)
    assert got_lp.shape == got_ent.shape == (B, T) and got_lp.dtype == jnp.float32
    np.testing.assert_allclose(got_lp, want_lp, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_ent, want_ent, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
    # Without the entropy: the same log-probabilities, alone.
    alone = token_logprobs(params, CFG, hidden, targets, chunk=chunk)
    np.testing.assert_allclose(alone, want_lp, rtol=1e-6, atol=1e-6)


def test_bfloat16_hidden_gives_float32_logprobs():
    params, hidden, targets = _inputs()
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    hidden = hidden.astype(jnp.bfloat16)
    want, _ = _reference(params, hidden, targets)
    got = token_logprobs(params, CFG, hidden, targets, chunk=5)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_the_backward_pass_holds_one_chunk_of_logits():
    """Compiled memory of the gradient: all at once, about 4 [B, T, V] float32 arrays (logits,
    log-softmax, their gradients); with chunks of 16 positions about 4 [B, 16, V] blocks."""
    cfg = CFG.replace(vocab_size=8192)
    params = init_params(cfg, jax.random.key(0))
    hidden = jax.ShapeDtypeStruct((2, 256, cfg.d_model), jnp.float32)
    targets = jax.ShapeDtypeStruct((2, 256), jnp.int32)
    full = 2 * 256 * cfg.vocab_size * 4

    def temp(chunk):
        f = lambda h, tg: jnp.sum(token_logprobs(params, cfg, h, tg, chunk=chunk))
        compiled = jax.jit(jax.grad(f)).lower(hidden, targets).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp(0) > 3 * full
    assert temp(16) < full / 3


def test_bad_shapes_and_chunks_are_refused():
    params, hidden, targets = _inputs()
    with pytest.raises(AssertionError):
        token_logprobs(params, CFG, hidden, targets[:, :-1])
    with pytest.raises(AssertionError):
        token_logprobs(params, CFG, hidden, targets.astype(jnp.float32))
    with pytest.raises(ValueError, match="chunk must be >= 0"):
        token_logprobs(params, CFG, hidden, targets, chunk=-1)


def test_target_ids_outside_the_vocabulary_are_refused():
    """HF's ignored label -100, or an id past V, gave a NaN log-prob without a word."""
    params, hidden, targets = _inputs()
    for bad in (-100, CFG.vocab_size):
        with pytest.raises(ValueError, match=rf"targets: token id {bad} is outside \[0, "):
            token_logprobs(params, CFG, hidden, targets.at[0, 1].set(bad), chunk=4)
