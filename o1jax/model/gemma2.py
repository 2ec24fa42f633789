"""Gemma2 as Flax linen layers, exposed as one pure function over an explicit params pytree.

    logits = forward(params, cfg, tokens)                       # [B, T, V] float32
    logits, cache = forward(params, cfg, tokens, cache=cache)   # prefill or decode

The params pytree (linen's naming; every matmul kernel is `[in, out]`):

    embedder/embedding                       [V, D]      tied with the output layer
    layer_{i}/input_norm/scale               [D]         RMSNorm weights, applied as (1 + w)
    layer_{i}/attn/{q,k,v}_proj/kernel       [D, H*Hd] / [D, K*Hd] / [D, K*Hd]
    layer_{i}/attn/o_proj/kernel             [H*Hd, D]
    layer_{i}/post_attn_norm/scale           [D]
    layer_{i}/pre_ffw_norm/scale             [D]
    layer_{i}/mlp/{gate,up}_proj/kernel      [D, F]
    layer_{i}/mlp/down_proj/kernel           [F, D]
    layer_{i}/post_ffw_norm/scale            [D]
    final_norm/scale                         [D]

Activations run in the params' dtype (float32 or bfloat16); norms, the GELU, softmax and logits
in float32 (each rounded once to the activations' dtype where it returns to them).

Attention masking is by *position*, never by slot: a key slot carries the position of its token
(-1 for padding or an empty cache slot) and query at position p sees key position j iff
0 <= j <= p and, on sliding layers (even index), j > p - W. This one rule covers left-padded
batches, right-padded prompts, prefill and token-by-token decode.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from o1jax.model import lora as lora_lib
from o1jax.model.config import Gemma2Config
from o1jax.parallel.mesh import constrain_rows

Params = Any  # nested dict of arrays (see module docstring)
Cache = dict  # see `init_cache`

_MASKED = float(jnp.finfo(jnp.float32).min)


# ----------------------------------------------------------------------------- building blocks
class RMSNorm(nn.Module):
    """Gemma's RMSNorm: `x * rsqrt(mean(x^2) + eps) * (1 + w)`, computed in float32."""

    eps: float

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


class LoRADense(nn.Module):
    """A bias-free projection `x @ W` plus an optional low-rank update `scale * x @ A @ B`.

    The LoRA factors come in as an argument (never as module params), so the frozen base and the
    adapters stay separate pytrees and the base is never copied.
    """

    features: int

    @nn.compact
    def __call__(self, x, lora: dict | None = None, lora_scale: float = 0.0):
        kernel = self.param("kernel", scaled_normal, (x.shape[-1], self.features), jnp.float32)
        y = jnp.einsum("...i,io->...o", x, kernel.astype(x.dtype))
        if lora is not None:
            a, b = lora["a"], lora["b"]  # [in, r], [r, out]
            delta = jnp.einsum("...i,ir,ro->...o", x.astype(a.dtype), a, b)
            y = y + (lora_scale * delta).astype(y.dtype)
        return y


def rope(x, positions, theta: float):
    """Rotary embedding with the half-split (rotate_half) convention.

    x: [B, T, N, Hd]; positions: [B, T] int. Angles in float32, applied in x's dtype.
    """
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, half, dtype=jnp.float32) * 2.0 / x.shape[-1]))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Hd/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, Hd]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos + rotated * sin


def attention_mask_from_positions(q_pos, k_pos, window: int | None, segments=None):
    """Which keys each query may see. q_pos [B, T], k_pos [B, S] (-1 = no key) -> [B, T, S].

    segments: optional [B, T] document ids of packed rows (T == S); keys of another document
    are never seen.
    """
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    allowed = (kp >= 0) & (kp <= qp)
    if window is not None:
        allowed &= kp > qp - window
    if segments is not None:
        allowed &= segments[:, :, None] == segments[:, None, :]
    return allowed


def xla_attention(q, k, v, allowed, *, scale: float, softcap: float | None):
    """Grouped-query attention that materialises scores (the reference path).

    q: [B, T, H, Hd]; k, v: [B, S, K, Hd]; allowed: [B, T, S] bool. Returns [B, T, H, Hd].
    Scores are soft-capped before the mask; the softmax runs in float32.
    """
    kv_major = lambda x: x.transpose(0, 2, 1, 3)  # [B, K, S, Hd]
    return cached_attention(q, kv_major(k), kv_major(v), allowed, scale=scale, softcap=softcap)


def cached_attention(q, k_cache, v_cache, allowed, *, scale: float, softcap: float | None):
    """`xla_attention` with kv-head-major keys and values (the KV cache's layout).

    q: [B, T, H, Hd]; k_cache, v_cache: [B, K, S, Hd]; allowed: [B, T, S]. Returns [B, T, H, Hd].
    Both matmuls are batched over (B, K) with the G query heads of a group folded into the rows,
    the layout XLA's CPU and GPU dots take without transposing the [.., T, S] scores (forward or
    backward).
    """
    b, t, h, hd = q.shape
    kv_heads, s = k_cache.shape[1], k_cache.shape[2]
    g = h // kv_heads
    qg = q.reshape(b, t, kv_heads, g, hd).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, g * t, hd)
    scores = jnp.einsum("bkqd,bksd->bkqs", qg, k_cache, preferred_element_type=jnp.float32)
    scores = scores * scale  # [B, K, G*T, S]
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    mask = jnp.broadcast_to(allowed[:, None, None], (b, kv_heads, g, t, s)).reshape(scores.shape)
    scores = jnp.where(mask, scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v_cache)  # [B, K, G*T, Hd]
    out = out.reshape(b, kv_heads, g, t, hd).transpose(0, 3, 1, 2, 4)
    return out.reshape(b, t, h, hd)


def shared_prefix_attention(
    q, k_cache, v_cache, allowed, k_prefix, v_prefix, allowed_prefix, *, scale, softcap
):
    """`cached_attention` for rows that continue shared prefixes: one softmax over each row's
    prefix keys (stored once per prefix) followed by its own cache.

    q: [R, T, H, Hd] with R = P * C: row r continues prefix r // C. k_cache, v_cache: [R, K, S,
    Hd] the rows' own keys and values; allowed: [R, T, S]. k_prefix, v_prefix: [P, K, S0, Hd];
    allowed_prefix: [P, C * T, S0], the queries of a prefix's C rows in row order. Returns
    [R, T, H, Hd]: what `cached_attention` gives over each row's copy of its prefix followed by
    its own slots, without the C copies. The prefix matmuls are batched over (P, K) with the C
    rows' queries folded in, so each prefix key and value is read once per prefix, not per row.
    """
    r, t, h, hd = q.shape
    p, kv_heads, s0 = k_prefix.shape[:3]
    c, g = r // p, h // kv_heads
    rows = c * g * t  # a prefix's query rows, ordered (row of the group, head of the group, T)

    def to_prefix_layout(x):  # [R, K, G, T, X] -> [P, K, C*G*T, X]
        x = x.reshape(p, c, kv_heads, g, t, x.shape[-1]).transpose(0, 2, 1, 3, 4, 5)
        return x.reshape(p, kv_heads, rows, x.shape[-1])

    def to_row_layout(x):  # [P, K, C*G*T, X] -> [R, K, G, T, X]
        x = x.reshape(p, kv_heads, c, g, t, x.shape[-1]).transpose(0, 2, 1, 3, 4, 5)
        return x.reshape(r, kv_heads, g, t, x.shape[-1])

    def capped(scores):
        scores = scores * scale
        return scores if softcap is None else softcap * jnp.tanh(scores / softcap)

    qg = q.reshape(r, t, kv_heads, g, hd).transpose(0, 2, 3, 1, 4)  # [R, K, G, T, Hd]
    qp = to_prefix_layout(qg)  # [P, K, C*G*T, Hd]
    shared = capped(jnp.einsum("pkqd,pksd->pkqs", qp, k_prefix, preferred_element_type=jnp.float32))
    mask = jnp.broadcast_to(
        allowed_prefix.reshape(p, 1, c, 1, t, s0), (p, kv_heads, c, g, t, s0)
    ).reshape(shared.shape)
    shared = jnp.where(mask, shared, _MASKED)  # [P, K, C*G*T, S0]
    own = capped(jnp.einsum("rkgtd,rksd->rkgts", qg, k_cache, preferred_element_type=jnp.float32))
    own = jnp.where(allowed[:, None, None], own, _MASKED)  # [R, K, G, T, S]
    scores = jnp.concatenate([shared, to_prefix_layout(own)], axis=-1)  # [P, K, C*G*T, S0 + S]
    probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
    out = jnp.einsum(
        "pkqs,pksd->pkqd", probs[..., :s0], v_prefix, preferred_element_type=jnp.float32
    )  # [P, K, C*G*T, Hd]
    out_own = jnp.einsum(
        "rkgts,rksd->rkgtd",
        to_row_layout(probs[..., s0:]),
        v_cache,
        preferred_element_type=jnp.float32,
    )  # [R, K, G, T, Hd]
    out = (to_row_layout(out) + out_own).astype(v_cache.dtype)  # [R, K, G, T, Hd]
    return out.transpose(0, 3, 1, 2, 4).reshape(r, t, h, hd)


# ----------------------------------------------------------------------------- layers
class Attention(nn.Module):
    cfg: Gemma2Config
    layer: int

    @nn.compact
    def __call__(self, x, positions, key_positions, lora, lora_scale, cache, token_mask, segments):
        cfg = self.cfg
        b, t, _ = x.shape
        lora = lora or {}
        proj = lambda name, n: LoRADense(n, name=name)(x, lora.get(name), lora_scale)
        q = proj("q_proj", cfg.num_heads * cfg.head_dim).reshape(b, t, cfg.num_heads, -1)
        k = proj("k_proj", cfg.num_kv_heads * cfg.head_dim).reshape(b, t, cfg.num_kv_heads, -1)
        v = proj("v_proj", cfg.num_kv_heads * cfg.head_dim).reshape(b, t, cfg.num_kv_heads, -1)
        q = rope(q, positions, cfg.rope_theta)
        k = rope(k, positions, cfg.rope_theta)

        window = cfg.layer_window(self.layer)
        scale = cfg.query_pre_attn_scalar**-0.5
        new_cache = None
        if cache is not None:
            # Write this chunk at slots [index, index + T) and attend over the whole cache.
            # The cache is kv-head major ([B, K, S, Hd]) so both attention matmuls read it in
            # place; a [B, S, K, Hd] cache costs a transposed copy of it per layer and step.
            index = cache["index"]
            to_cache = lambda x: x.transpose(0, 2, 1, 3).astype(cache["k"].dtype)
            k_all = jax.lax.dynamic_update_slice_in_dim(cache["k"], to_cache(k), index, 2)
            v_all = jax.lax.dynamic_update_slice_in_dim(cache["v"], to_cache(v), index, 2)
            new_cache = {"k": k_all, "v": v_all}
            allowed = attention_mask_from_positions(positions, key_positions, window)
            if "prefix" in cache:  # rows continuing shared prefixes (see `forward`)
                prefix = cache["prefix"]
                groups, prefix_positions = prefix["k"].shape[0], cache["prefix_positions"]
                allowed_prefix = attention_mask_from_positions(
                    positions.reshape(groups, -1), prefix_positions, window
                )  # [P, C * T, S0]
                out = shared_prefix_attention(
                    q,
                    k_all.astype(q.dtype),
                    v_all.astype(q.dtype),
                    allowed,
                    prefix["k"].astype(q.dtype),
                    prefix["v"].astype(q.dtype),
                    allowed_prefix,
                    scale=scale,
                    softcap=cfg.attn_logit_softcapping,
                )
            else:
                out = cached_attention(
                    q,
                    k_all.astype(q.dtype),
                    v_all.astype(q.dtype),
                    allowed,
                    scale=scale,
                    softcap=cfg.attn_logit_softcapping,
                )
        elif cfg.attention_impl == "pallas":
            import kernels  # the Pallas kernels live in a top-level package beside o1jax
            from o1jax.parallel.mesh import BATCH_AXES

            # Under a mesh each device runs the kernel on its own rows and heads (shard_map):
            # XLA cannot partition the Pallas call and would all-gather q, k and v. Packed rows
            # (segments) mask other documents' keys in the kernel.
            out = kernels.attention(
                q,
                k,
                v,
                causal=True,
                softcap=cfg.attn_logit_softcapping,
                window=window,
                scale=scale,
                mask=token_mask,
                segment_ids=segments,
                impl="pallas",
                interpret=jax.default_backend() == "cpu",
                batch_axes=BATCH_AXES,
                head_axis="tensor",
            )
        else:
            allowed = attention_mask_from_positions(positions, key_positions, window, segments)
            out = xla_attention(q, k, v, allowed, scale=scale, softcap=cfg.attn_logit_softcapping)
        out = out.reshape(b, t, cfg.num_heads * cfg.head_dim)
        return LoRADense(cfg.d_model, name="o_proj")(out, lora.get("o_proj"), lora_scale), new_cache


class MLP(nn.Module):
    cfg: Gemma2Config

    @nn.compact
    def __call__(self, x, lora, lora_scale):
        lora = lora or {}
        f = self.cfg.ffn_dim
        gate = LoRADense(f, name="gate_proj")(x, lora.get("gate_proj"), lora_scale)
        up = LoRADense(f, name="up_proj")(x, lora.get("up_proj"), lora_scale)
        # The activation in float32, rounded once to the activations' dtype, as torch computes it
        # for HF: in bfloat16 `jax.nn.gelu` rounds its constants and every step to bfloat16.
        hidden = jax.nn.gelu(gate.astype(jnp.float32), approximate=True).astype(gate.dtype) * up
        return LoRADense(self.cfg.d_model, name="down_proj")(
            hidden, lora.get("down_proj"), lora_scale
        )


class DecoderLayer(nn.Module):
    cfg: Gemma2Config
    layer: int

    @nn.compact
    def __call__(self, x, positions, key_positions, lora, lora_scale, cache, token_mask, segments):
        eps = self.cfg.rms_norm_eps
        lora = lora or {}
        h = RMSNorm(eps, name="input_norm")(x)
        h, new_cache = Attention(self.cfg, self.layer, name="attn")(
            h, positions, key_positions, lora.get("attn"), lora_scale, cache, token_mask, segments
        )
        x = x + RMSNorm(eps, name="post_attn_norm")(h)
        h = RMSNorm(eps, name="pre_ffw_norm")(x)
        h = MLP(self.cfg, name="mlp")(h, lora.get("mlp"), lora_scale)
        x = x + RMSNorm(eps, name="post_ffw_norm")(h)
        return x, new_cache


class Gemma2(nn.Module):
    """The decoder. Call through `forward`; `init_params` builds a random params pytree."""

    cfg: Gemma2Config

    @nn.compact
    def __call__(
        self,
        tokens,
        positions,
        key_positions,
        lora,
        lora_scale,
        cache,
        token_mask,
        segments=None,
        return_hidden=False,
    ):
        cfg = self.cfg
        embedding = self.param(
            "embedder",
            lambda key, shape: {"embedding": scaled_normal(key, shape)},
            (cfg.vocab_size, cfg.d_model),
        )["embedding"]
        dtype = embedding.dtype
        x = embedding[tokens]  # [B, T, D]
        x = x * jnp.asarray(math.sqrt(cfg.d_model), dtype)  # normaliser rounded to dtype first
        # Under a mesh, the residual stream's rows stay on their devices (see
        # `o1jax.parallel.mesh.constrain`), in training and in the sampler's prefill and decode.
        x = constrain_rows(x)
        lora = lora or {}
        new_layers = {}
        layer_cls = nn.remat(DecoderLayer) if cfg.remat else DecoderLayer
        for i in range(cfg.num_layers):
            name = f"layer_{i}"
            layer_cache = None if cache is None else {**cache[name], "index": cache["index"]}
            if cache is not None and "prefix" in cache:
                layer_cache["prefix"] = cache["prefix"][name]
                layer_cache["prefix_positions"] = cache["prefix"]["positions"]
            x, new_layers[name] = layer_cls(cfg, i, name=name)(
                x,
                positions,
                key_positions,
                lora.get(name),
                lora_scale,
                layer_cache,
                token_mask,
                segments,
            )
            x = constrain_rows(x)
        x = RMSNorm(cfg.rms_norm_eps, name="final_norm")(x)
        if return_hidden:
            return x, new_layers
        return unembed_with(embedding, cfg, x), new_layers


def unembed_with(embedding, cfg: Gemma2Config, hidden):
    """Float32 logits [..., V] of final hidden states [..., D] (tied embedding [V, D], soft-cap);
    `embedding` may be some rows [K, V] of it, giving those tokens' logits [..., K]."""
    logits = jnp.einsum("...d,vd->...v", hidden, embedding, preferred_element_type=jnp.float32)
    if cfg.final_logit_softcapping is not None:
        cap = cfg.final_logit_softcapping
        logits = cap * jnp.tanh(logits / cap)
    return logits


def unembed(params: Params, cfg: Gemma2Config, hidden, token_ids=None):
    """`forward`'s logits from its `return_hidden=True` states: hidden [..., D] -> [..., V] f32,
    or only the logits [..., K] of `token_ids` (K ids, static or an int array).

    Unembedding only the positions and tokens a caller reads (a prompt's last token; the two
    rating tokens; a chunk of a sequence in a loss) keeps [B, T, V] logits from ever existing:
    at Gemma2's 256k vocabulary those are the largest array of a step.
    """
    embedding = params["embedder"]["embedding"]
    if token_ids is not None:
        embedding = embedding[jnp.asarray(token_ids, jnp.int32)]  # [K, D]
    return unembed_with(embedding, cfg, hidden)


# ----------------------------------------------------------------------------- public API
def init_params(cfg: Gemma2Config, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random params (normal(0.02) kernels, zero norm weights), cast to `dtype`.

    Jitted: linen's `init` runs the model on a token, which eagerly was about a hundred ops
    compiled one by one in every process (the default's model: 7.7 s in a fresh process against
    2.6 s jitted); under jit that forward is dead code. The values are those of an eager init to
    the bit (`scaled_normal`)."""
    return _init_params(cfg, key, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init_params(cfg: Gemma2Config, key: jax.Array, dtype) -> Params:
    tokens = jnp.zeros((1, 1), jnp.int32)
    pos = jnp.zeros((1, 1), jnp.int32)
    params = Gemma2(cfg).init(key, tokens, pos, pos, None, 0.0, None, None)["params"]
    return jax.tree.map(lambda p: p.astype(dtype), params)


def scaled_normal(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    """normal(0, 0.02) draws. The barrier keeps XLA from folding the 0.02 into the sampler's own
    constant factors when this runs inside a jitted program (`init_params`): the draws stay
    those of the eager `jax.random.normal(key, shape) * 0.02`, to the bit."""
    return jax.lax.optimization_barrier(jax.random.normal(key, shape, dtype)) * 0.02


def init_cache(cfg: Gemma2Config, batch: int, length: int, dtype=jnp.float32) -> Cache:
    """An empty KV cache of `length` slots per row.

    layer_{i}/k, layer_{i}/v   [B, K, S, Hd]  (kv-head major: attention reads it in place)
    positions                  [B, S] int32, position of the token in each slot, -1 if none
    index                      [] int32, next slot to write (shared by all rows)
    """
    kv = lambda: jnp.zeros((batch, cfg.num_kv_heads, length, cfg.head_dim), dtype)
    cache: Cache = {f"layer_{i}": {"k": kv(), "v": kv()} for i in range(cfg.num_layers)}
    cache["positions"] = jnp.full((batch, length), -1, jnp.int32)
    cache["index"] = jnp.zeros((), jnp.int32)
    return cache


def with_shared_prefix(cache: Cache, prefix: Cache) -> Cache:
    """`cache` [R rows] whose rows continue the prompts of `prefix` [P rows], R = P * C: row r
    attends to prefix row r // C's keys, then to its own slots. The prefix is read, never
    written, and stored once instead of C times (the sampler's K samples of one prompt).

    prefix/layer_{i}/k, v   [P, K, S0, Hd]
    prefix/positions        [P, S0]
    """
    rows, groups = cache["positions"].shape[0], prefix["positions"].shape[0]
    if rows % groups:
        raise ValueError(f"with_shared_prefix: {rows} cache rows do not split into {groups} groups")
    shared = {name: {"k": layer["k"], "v": layer["v"]} for name, layer in prefix.items()
              if name.startswith("layer_")}  # fmt: skip
    return {**cache, "prefix": {**shared, "positions": prefix["positions"]}}


def forward(
    params: Params,
    cfg: Gemma2Config,
    tokens: jax.Array,
    *,
    positions: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
    lora=None,
    cache: Cache | None = None,
    segment_ids: jax.Array | None = None,
    return_hidden: bool = False,
):
    """Runs Gemma2 on `tokens` [B, T] and returns float32 logits [B, T, V].

    positions: [B, T] int; defaults to `cumsum(attention_mask) - 1` (left padding) when a mask is
      given, else `arange(T)`, offset per row by 1 + the largest position in the cache when a
      cache is given (so each row continues from its own last real token).
    attention_mask: [B, T], 1 for real tokens, 0 for padding (padding is never attended).
    lora: a `LoRAParams` (see `o1jax.model.lora`) applied on the fly, or None.
    cache: from `init_cache` (or `with_shared_prefix`: rows continuing shared prompts); when
      given, the T new tokens are written at slots [index, index + T) and `(logits, new_cache)`
      is returned. index + T must not exceed the cache's length: a concrete index is checked
      (ValueError); under `jax.jit` it is not, and an overflowing write would overwrite earlier
      slots.
    segment_ids: [B, T] document ids of packed rows (no cache): a token attends only to its own
      document. Give per-document `positions` with it.
    return_hidden: return the final (normed) hidden states [B, T, D], in the params' dtype,
      instead of the logits; `unembed(params, cfg, hidden)` gives the logits of any of them.

    With `cfg.attention_impl == "pallas"` (no cache; packed rows included, their segment ids
    passed to the kernel) the kernel measures causality and the sliding window in slots, not in
    `positions`: each row's real tokens (each document's, with segment_ids) must be contiguous
    (left or right padding, no holes) with consecutive positions, as every caller in o1jax gives
    them. Rows with holes in `attention_mask` need the "xla" path.

    Concrete `tokens` outside [0, vocab_size) and a `lora` that does not fit `params` raise a
    ValueError (traced tokens are not checked: the embedding gather would clamp them). Rows
    longer than `cfg.max_position_embeddings` (the cache's slots, with a shared prefix's, when a
    cache is given) draw a `PositionWarning`.
    """
    if not isinstance(tokens, jax.core.Tracer):
        check_token_ids(tokens, cfg.vocab_size, "forward: tokens")
    if lora is not None:
        lora_lib.check_fits(params, lora, "forward")
    span = tokens.shape[-1]  # positions a row can reach: [0, span) unless given explicitly
    if cache is not None:
        t, slots = tokens.shape[-1], cache["positions"].shape[-1]
        index = None if isinstance(cache["index"], jax.core.Tracer) else int(cache["index"])
        if (index or 0) + t > slots:  # a traced index can only be checked for T > slots
            raise ValueError(
                f"forward: writing {t} tokens at cache index {index} overflows the cache's "
                f"{slots} slots"
            )
        span = slots + (cache["prefix"]["positions"].shape[-1] if "prefix" in cache else 0)
    if span > cfg.max_position_embeddings:  # shapes are static: once per compilation under jit
        warnings.warn(
            PositionWarning(
                f"forward: rows of up to {span} positions run past the model's "
                f"max_position_embeddings {cfg.max_position_embeddings}; it was never trained "
                "on the positions beyond (RoPE extrapolates silently): shorten the sequences "
                "(sft.seq_len, eval.max_new_tokens, search.max_depth * thought_length)"
            ),
            stacklevel=2,
        )
    return _forward(
        params,
        cfg,
        tokens,
        positions=positions,
        attention_mask=attention_mask,
        lora=lora,
        cache=cache,
        segment_ids=segment_ids,
        return_hidden=return_hidden,
    )


class PositionWarning(UserWarning):
    """A forward pass over more positions than `cfg.max_position_embeddings` (the context the
    checkpoint was trained for); the message gives both numbers."""


def check_token_ids(tokens, vocab_size: int, what: str) -> None:
    """Raises a ValueError naming the smallest or largest id of concrete `tokens` (any shape)
    if it is outside [0, vocab_size)."""
    ids = np.asarray(tokens)
    if ids.size == 0:
        return
    lo, hi = ids.min(), ids.max()
    if lo < 0 or hi >= vocab_size:
        raise ValueError(
            f"{what}: token id {lo if lo < 0 else hi} is outside [0, {vocab_size}) (cfg.vocab_size)"
        )


# Jitted so that a call outside any other `jax.jit` (a notebook, a test) compiles one program per
# shape instead of dispatching its few hundred ops one by one; inside a jitted caller it inlines.
@functools.partial(jax.jit, static_argnames=("cfg", "return_hidden"))
def _forward(
    params, cfg, tokens, *, positions, attention_mask, lora, cache, segment_ids, return_hidden
):
    chex.assert_rank(tokens, 2)
    b, t = tokens.shape
    if segment_ids is not None:
        if cache is not None:
            raise ValueError("forward: segment_ids (packed rows) cannot be used with a cache")
        chex.assert_shape(segment_ids, (b, t))
    if attention_mask is None:
        token_mask = None
        valid = jnp.ones((b, t), bool)
    else:
        chex.assert_shape(attention_mask, (b, t))
        token_mask = attention_mask.astype(bool)
        valid = token_mask
    if positions is None:
        if attention_mask is not None:
            positions = jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)
        else:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if cache is not None:
            last = jnp.max(cache["positions"], axis=1)  # [B]
            if "prefix" in cache:  # a row's prefix comes before its own slots
                prefix_last = jnp.max(cache["prefix"]["positions"], axis=1)  # [P]
                last = jnp.maximum(last, jnp.repeat(prefix_last, b // prefix_last.shape[0]))
            positions = positions + last[:, None] + 1
    chex.assert_shape(positions, (b, t))
    positions = positions.astype(jnp.int32)
    new_key_positions = jnp.where(valid, positions, -1)  # [B, T]

    if cache is not None:
        key_positions = jax.lax.dynamic_update_slice_in_dim(
            cache["positions"], new_key_positions, cache["index"], 1
        )  # [B, S]
    else:
        key_positions = new_key_positions

    lora_weights, lora_scale = (None, 0.0) if lora is None else (lora.weights, lora.scale)
    logits, new_layers = Gemma2(cfg).apply(
        {"params": params},
        tokens,
        positions,
        key_positions,
        lora_weights,
        lora_scale,
        cache,
        token_mask,
        segment_ids,
        return_hidden,
    )
    if cache is None:
        return logits
    new_cache = dict(new_layers)
    if "prefix" in cache:
        new_cache["prefix"] = cache["prefix"]
    new_cache["positions"] = key_positions
    new_cache["index"] = cache["index"] + t
    return logits, new_cache
