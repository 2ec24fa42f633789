"""Log-probabilities of given tokens from final hidden states, a chunk of positions at a time.

    hidden = forward(params, cfg, tokens, return_hidden=True)           # [B, T, D]
    logp = token_logprobs(params, cfg, hidden, targets, chunk=256)      # [B, T] float32
    logp, entropy = token_logprobs(..., chunk=256, with_entropy=True)   # and [B, T] float32

At Gemma2's 256k vocabulary the float32 logits [B, T, V] of a training batch are its largest
arrays by far (8 x 2048 rows: 15.6 GiB each, and a loss keeps them, their log-softmax and their
gradient). With `chunk` > 0 the logits exist only `chunk` positions at a time: the chunks run in a
`lax.map` whose body is `jax.checkpoint`ed, so the forward pass keeps only each chunk's inputs
and the backward pass recomputes one chunk's [B, chunk, V] logits at a time. The values and
gradients are those of `log_softmax(unembed(params, cfg, hidden))` gathered at `targets`.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from o1jax.model.config import Gemma2Config
from o1jax.model.gemma2 import Params, check_token_ids, unembed
from o1jax.parallel.mesh import BATCH_AXES, constrain

_TENSOR = "tensor"


def _block(embedding, cfg: Gemma2Config, hidden, targets, with_entropy: bool):
    """hidden [B, C, D], targets [B, C] -> log p(target) [B, C] (and entropy [B, C]), float32."""
    # Rows stay on their devices, the embedding [V, D] is gathered over fsdp (see `constrain`).
    embedding = constrain(embedding, _TENSOR, None)
    hidden = constrain(hidden, BATCH_AXES, None, None)
    logits = unembed({"embedder": {"embedding": embedding}}, cfg, hidden)  # [B, C, V] f32
    logits = constrain(logits, BATCH_AXES, None, _TENSOR)
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, C]
    if not with_entropy:
        return picked, None
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)  # [B, C]
    return picked, entropy


def token_logprobs(
    params: Params,
    cfg: Gemma2Config,
    hidden: jax.Array,
    targets: jax.Array,
    *,
    chunk: int = 0,
    with_entropy: bool = False,
):
    """log p(targets) under the logits of `hidden`, never more than [B, chunk, V] of them at once.

    params: the model params (only the tied embedding `embedder/embedding` [V, D] is read).
    hidden: [B, T, D] final normed hidden states (`forward(..., return_hidden=True)`).
    targets: [B, T] int token ids in [0, V), one per position (concrete ids outside it, such as
      HF's ignored label -100, raise a ValueError; traced ones give NaN there).
    chunk: positions unembedded at a time (forward and backward); 0, or >= T: all T at once.
      T need not be a multiple: the last chunk is padded, and the padding dropped.
    with_entropy: also return the entropy [B, T] of each position's full distribution.

    Returns log p [B, T] float32, or (log p, entropy), both [B, T] float32.
    """
    chex.assert_rank(hidden, 3)
    chex.assert_rank(targets, 2)
    chex.assert_equal_shape_prefix([hidden, targets], 2)
    chex.assert_type(targets, int)
    embedding = params["embedder"]["embedding"]  # [V, D]
    chex.assert_axis_dimension(embedding, 1, hidden.shape[-1])
    if not isinstance(targets, jax.core.Tracer):
        check_token_ids(targets, cfg.vocab_size, "token_logprobs: targets")
    b, t, d = hidden.shape
    if chunk < 0:
        raise ValueError(f"token_logprobs: chunk must be >= 0, got {chunk}")
    if chunk == 0 or chunk >= t:
        picked, entropy = _block(embedding, cfg, hidden, targets, with_entropy)
        return (picked, entropy) if with_entropy else picked

    n = -(-t // chunk)  # chunks, the last one padded
    pad = n * chunk - t
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    # [n, B, C, D] and [n, B, C]: chunk-major, so that the map runs over the leading axis and
    # the batch axis (the one a mesh splits) stays where it was.
    hidden_chunks = hidden.reshape(b, n, chunk, d).swapaxes(0, 1)
    target_chunks = targets.reshape(b, n, chunk).swapaxes(0, 1)

    # Checkpointed: the backward pass keeps each chunk's inputs, not its [B, C, V] logits, and
    # recomputes them chunk by chunk. (prevent_cse is only needed outside scan-like loops.)
    block = jax.checkpoint(
        lambda emb, h, tg: _block(emb, cfg, h, tg, with_entropy), prevent_cse=False
    )
    picked, entropy = jax.lax.map(lambda xs: block(embedding, *xs), (hidden_chunks, target_chunks))

    def unchunk(x):  # [n, B, C] -> [B, T]
        return x.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]

    if not with_entropy:
        return unchunk(picked)
    return unchunk(picked), unchunk(entropy)
