"""In-kernel building blocks shared by the flash (`flash.py`) and decode (`decode.py`) kernels.

Everything here runs on tiles already loaded from refs: 2-D arrays whose sizes are powers of two
(a Triton requirement), with float32 accumulation. Row counts are M (queries), N (keys in the
tile), D (padded head dim).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from kernels.reference import MASKED_SCORE

# Log-sum-exp stored for a query row that sees no key: exp(s - lse) is then exactly 0.
EMPTY_LSE = 1e30

_NT = (((1,), (1,)), ((), ()))  # contract the last dims of both: [M, D] x [N, D] -> [M, N]
_NN = (((1,), (0,)), ((), ()))  # plain matmul: [M, N] x [N, D] -> [M, D]


def _dot(a, b, dims):
    # float32 operands stay exact (HIGHEST = IEEE on Triton, no TF32); bf16 uses tensor cores.
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32, precision=precision)


def dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [M, D] . b [N, D]^T -> float32 [M, N]."""
    return _dot(a, b, _NT)


def dot_nn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [M, N] . b [N, D] -> float32 [M, D]."""
    return _dot(a, b, _NN)


def capped_scores(a, b, scale: float, softcap: float | None):
    """Scaled, soft-capped scores of a [M, D] against b [N, D] -> (float32 [M, N], tanh | None).

    The tanh is returned for the backward, where d(c * tanh(s / c))/ds = 1 - tanh^2.
    """
    s = dot_nt(a, b) * scale
    if softcap is None:
        return s, None
    t = jnp.tanh(s * (1.0 / softcap))
    return softcap * t, t


def cdiv(a, b: int):
    """Ceil division of a non-negative (traced) int32 by a static positive int."""
    return lax.div(a + (b - 1), b)


def softmax_init(rows: int, dim: int):
    """Online-softmax carry: (acc [M, D], running max m [M], running row_sum [M]), float32."""
    return (
        jnp.zeros((rows, dim), jnp.float32),
        jnp.full((rows,), MASKED_SCORE, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )


def softmax_step(carry, s, ok, v):
    """Fold one key tile into the online softmax.

    carry: (acc [M, D], m [M], row_sum [M]); s: float32 [M, N] scores; ok: bool [M, N] visibility or
    None (all visible); v: [N, D]. Masked scores never reach exp: a row that has seen nothing yet
    keeps m = MASKED_SCORE, row_sum = 0, acc = 0 (no inf, no NaN).
    """
    acc, m, row_sum = carry
    if ok is not None:
        s = jnp.where(ok, s, MASKED_SCORE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.exp(s - m_new[:, None])
    if ok is not None:
        p = jnp.where(ok, p, 0.0)
    alpha = jnp.exp(m - m_new)
    acc = acc * alpha[:, None] + dot_nn(p.astype(v.dtype), v)
    return acc, m_new, row_sum * alpha + jnp.sum(p, axis=1)
