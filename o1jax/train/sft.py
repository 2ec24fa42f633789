"""SFT / continued pretraining on long-CoT text: packing, loss masks, one jitted step on a Mesh.

    packed = pack(examples, seq_len=256)                  # numpy, deterministic
    trainer = SFTTrainer(cfg, params, SFTConfig(...), mesh, lora=adapter_or_None)
    for step in range(start, config.steps):
        metrics = trainer.train_step(packed.batch(step, config.batch_size, seed))

Loss: next-token cross-entropy on tokens whose `loss_mask` is set (thoughts and ratings, not the
problem), never across document boundaries of a packed row, averaged over those tokens. With a
LoRA adapter only the adapter trains (the base gets no gradient and no optimizer state);
without one, every parameter trains. The batch of a step is a pure function of (step, seed), so a
resumed run sees exactly the data of an uninterrupted one.

Memory (a real Gemma2's 256k vocabulary makes the [B, T, V] float32 logits a step's largest
arrays): `loss_chunk` > 0 unembeds `loss_chunk` positions at a time (o1jax.model.logprobs), and
`micro_batch_size` > 0 runs the batch as micro-batches of that many rows in a `lax.scan`, summing
their gradients, NLL sums and token counts, and dividing once: the loss and gradient of the
whole batch (up to float reassociation), one optimizer update. `Gemma2Config.remat` recomputes
each layer's activations in the backward pass. `bench/memory.py` measures a step's memory.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from o1jax.model.gemma2 import forward
from o1jax.model.logprobs import token_logprobs
from o1jax.parallel.mesh import (
    copy_to_mesh,
    init_sharded,
    micro_batches,
    param_shardings,
    replicated,
    shard_batch,
)
from o1jax.train.config import ConfigError, require_batch_fits_mesh


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    steps: int = 300
    batch_size: int = 16  # packed rows per step
    seq_len: int = 256
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    # Memory knobs; the same loss and gradient up to float reassociation (see the docstring).
    loss_chunk: int = 0  # positions unembedded at a time in the loss; 0: all at once
    micro_batch_size: int = 0  # rows per gradient-accumulation pass; 0: the whole batch at once


@dataclasses.dataclass(frozen=True)
class Example:
    tokens: np.ndarray  # [n] int32
    loss_mask: np.ndarray  # [n] bool, True where the token is a training target


@dataclasses.dataclass
class Packed:
    """Packed rows [R, T]: documents back to back, segment id 0 on padding."""

    tokens: np.ndarray  # [R, T] int32
    loss_mask: np.ndarray  # [R, T] bool
    segment_ids: np.ndarray  # [R, T] int32
    positions: np.ndarray  # [R, T] int32, restart at 0 in every document

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    def batch(self, step: int, batch_size: int, seed: int) -> dict[str, np.ndarray]:
        """Rows of `step`: epoch e = step // steps_per_epoch reads the permutation of (seed, e)."""
        per_epoch = max(self.num_rows // batch_size, 1)
        epoch, i = divmod(step, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(self.num_rows)
        idx = np.resize(order[i * batch_size : (i + 1) * batch_size], batch_size)
        return {
            "tokens": self.tokens[idx],
            "loss_mask": self.loss_mask[idx],
            "segment_ids": self.segment_ids[idx],
            "positions": self.positions[idx],
        }


def pack(examples: Sequence[Example], seq_len: int, pad_id: int = 0) -> Packed:
    """Next-fit packing in order (deterministic: each example goes into the last row, or starts
    a new one). Longer examples, non-integer tokens and a loss_mask of another shape than the
    tokens' are an error."""
    rows: list[list[Example]] = []
    used: list[int] = []
    for n, ex in enumerate(examples):
        tokens, mask = np.asarray(ex.tokens), np.asarray(ex.loss_mask)
        if tokens.ndim != 1 or mask.shape != tokens.shape:
            raise ValueError(
                f"pack: example {n} has tokens of shape {tokens.shape} and a loss_mask of shape "
                f"{mask.shape}; both must be [n]"
            )
        if not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"pack: example {n} has {tokens.dtype} tokens; token ids are integers")
        size = len(tokens)
        if size > seq_len:
            raise ValueError(f"pack: example {n} has {size} tokens, more than seq_len={seq_len}")
        if rows and used[-1] + size <= seq_len:
            rows[-1].append(ex)
            used[-1] += size
        else:
            rows.append([ex])
            used.append(size)
    r = len(rows)
    tokens = np.full((r, seq_len), pad_id, np.int32)
    mask = np.zeros((r, seq_len), bool)
    segments = np.zeros((r, seq_len), np.int32)
    positions = np.zeros((r, seq_len), np.int32)
    for i, row in enumerate(rows):
        at = 0
        for s, ex in enumerate(row, start=1):
            n = len(ex.tokens)
            tokens[i, at : at + n] = ex.tokens
            mask[i, at : at + n] = ex.loss_mask
            segments[i, at : at + n] = s
            positions[i, at : at + n] = np.arange(n)
            at += n
    return Packed(tokens, mask, segments, positions)


def target_mask(loss_mask, segment_ids):
    """[B, T-1] float32: 1 where token t+1 is a target of position t (its loss_mask is set, and it
    is in position t's document, not padding)."""
    mask = loss_mask[:, 1:] & (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
    return mask.astype(jnp.float32)


def lm_nll(logits, tokens, loss_mask, segment_ids):
    """(Sum of next-token NLL over the target tokens, their count) from logits [B, T, V]."""
    logp = jax.nn.log_softmax(logits[:, :-1])
    targets = tokens[:, 1:]
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    mask = target_mask(loss_mask, segment_ids)
    count = mask.sum()
    return jnp.sum(nll * mask), count


def lm_nll_chunked(params, cfg, hidden, tokens, loss_mask, segment_ids, *, chunk: int):
    """`lm_nll` from final hidden states [B, T, D] (`forward(..., return_hidden=True)`), with the
    logits unembedded `chunk` positions at a time (o1jax.model.logprobs)."""
    # Position t predicts token t+1; the last position predicts nothing (target 0, masked out).
    # All T positions go in, so that a T divisible by `chunk` needs no padding.
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))  # [B, T]
    logp = token_logprobs(params, cfg, hidden, targets, chunk=chunk)[:, :-1]  # [B, T-1]
    mask = target_mask(loss_mask, segment_ids)
    return -jnp.sum(logp * mask), mask.sum()


def lm_loss(logits, tokens, loss_mask, segment_ids):
    """Mean next-token NLL over target tokens inside their own document; and the token count."""
    total, count = lm_nll(logits, tokens, loss_mask, segment_ids)
    return total / jnp.maximum(count, 1.0), count


@struct.dataclass
class SFTState:
    trainable: object  # full params, or a LoRAParams
    opt_state: object
    step: jax.Array  # [] int32


def make_optimizer(config: SFTConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0,
        config.learning_rate,
        config.warmup_steps,  # 0: the full rate from the first step
        max(config.steps, config.warmup_steps + 1),
        end_value=config.learning_rate * 0.1,
    )
    inner = optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm),
        optax.adamw(schedule, weight_decay=config.weight_decay),
    )
    # Skips (and counts) updates whose gradients are not finite.
    return optax.apply_if_finite(inner, max_consecutive_errors=1_000_000)


def nonfinite_count(opt_state) -> int:
    """Updates skipped so far for non-finite gradients (from optax.apply_if_finite's state)."""
    return int(opt_state.total_notfinite)


def trained_params(trainable, params):
    """A full fine-tune's `trainable` in the dtypes of `params` (arrays or shape structs): the
    float32 master copy of bfloat16 params rounded back to bfloat16. Float32 passes through."""
    return jax.tree.map(
        lambda t, p: t if t.dtype == p.dtype else t.astype(p.dtype), trainable, params
    )


class SFTTrainer:
    """Holds the compiled step and the sharded state of one SFT run.

    Full fine-tuning of params that are not all float32 (bfloat16) trains a float32 master copy
    (`state.trainable`, and so Adam's moments, are float32): Adam's first steps, about the
    learning rate in size, would round away when added to bfloat16 weights. The loss casts the
    copy to the params' dtypes before `forward`; `params` gives it back in those dtypes.
    """

    def __init__(self, cfg, params, config: SFTConfig, mesh, lora=None):
        self.cfg, self.config, self.mesh = cfg, config, mesh
        self.use_lora = lora is not None
        if config.steps > 0:  # a trainer that takes no step (sft.steps 0) splits no batch
            require_batch_fits_mesh("sft.batch_size", config.batch_size, mesh)
            check_micro_batch(config, mesh)
        self.optimizer = make_optimizer(config)
        # The params' dtypes, when a full fine-tune trains a float32 master copy of them.
        self._master_of = master_dtypes(params, use_lora=lora is not None)
        with jax.set_mesh(mesh):
            # What is trained is a copy: the step donates the state, and the caller keeps its
            # params (full fine-tuning) or its adapter. The frozen base may alias the caller's.
            shardings = param_shardings(params, mesh, heads=cfg)
            if lora is not None or self._master_of is not None:
                params = jax.device_put(params, shardings)
            else:  # the trained params themselves: a copy
                params = copy_to_mesh(params, mesh, heads=cfg)
            if lora is not None:
                trainable = copy_to_mesh(lora, mesh, heads=cfg)
            elif self._master_of is not None:  # a new float32 copy (the aliased input stays)
                to_f32 = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)
                trainable = jax.jit(to_f32, out_shardings=shardings)(params)
            else:
                trainable = params
            self.frozen = None if lora is None else params
            opt_state = init_sharded(self.optimizer.init, trainable, mesh, heads=cfg)
            step = jax.device_put(jnp.zeros((), jnp.int32), replicated(mesh))
        self.state = SFTState(trainable, opt_state, step)
        self._cast_back = jax.jit(functools.partial(trained_params, params=self._master_of))
        self._step = compile_step(cfg, config, self.optimizer, self.use_lora, self._master_of)

    @property
    def params(self):
        """The model params to sample with: the frozen base with LoRA; else the trained params,
        in the dtypes of the params given (a new cast of a float32 master copy)."""
        if self.use_lora:
            return self.frozen
        if self._master_of is None:
            return self.state.trainable
        with jax.set_mesh(self.mesh):
            return self._cast_back(self.state.trainable)

    @property
    def lora(self):
        return self.state.trainable if self.use_lora else None

    def train_step(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        with jax.set_mesh(self.mesh):
            self.state, metrics = self._step(self.state, self.frozen, shard_batch(batch, self.mesh))
        return metrics


def master_dtypes(params, use_lora: bool):
    """The params' shapes and dtypes (`jax.ShapeDtypeStruct`s) when a full fine-tune trains a
    float32 master copy of them (some are not float32); None otherwise (LoRA, or all float32)."""
    if use_lora or all(x.dtype == jnp.float32 for x in jax.tree.leaves(params)):
        return None
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)


def compile_step(cfg, config: SFTConfig, optimizer, use_lora: bool, master_of):
    """The jitted SFT step `(state, frozen, batch) -> (state, metrics)`, `state` donated, with
    the memory settings of `config` (`loss_chunk`, `micro_batch_size`); master_of from
    `master_dtypes`."""
    return jax.jit(
        functools.partial(
            _sft_step,
            cfg=cfg,
            optimizer=optimizer,
            use_lora=use_lora,
            master_of=master_of,
            loss_chunk=config.loss_chunk,
            micro_batch_size=config.micro_batch_size,
        ),
        donate_argnums=(0,),
    )


def check_micro_batch(config: SFTConfig, mesh) -> None:
    """Raises ConfigError unless `config.micro_batch_size` (when > 0) divides the batch into
    micro-batches that each split over the mesh's data x fsdp devices."""
    m = config.micro_batch_size
    if m < 0 or config.loss_chunk < 0:
        bad, value = ("micro_batch_size", m) if m < 0 else ("loss_chunk", config.loss_chunk)
        raise ConfigError(f"sft.{bad}: must be >= 0, got {value!r}")
    if m == 0:
        return
    if config.batch_size % m:
        raise ConfigError(
            f"sft.micro_batch_size: must divide sft.batch_size ({config.batch_size}), got {m!r}"
        )
    require_batch_fits_mesh("sft.micro_batch_size", m, mesh)


def _sft_step(
    state: SFTState,
    frozen,
    batch,
    *,
    cfg,
    optimizer,
    use_lora: bool,
    master_of,
    loss_chunk: int = 0,
    micro_batch_size: int = 0,
):
    chex.assert_rank(batch["tokens"], 2)

    def nll_sum(trainable, batch):
        """(Sum of the NLL of `batch`'s target tokens, their count)."""
        if use_lora:
            params, lora = frozen, trainable
        else:  # a float32 master copy is cast to the params' dtypes (grads come back float32)
            params = trainable if master_of is None else trained_params(trainable, master_of)
            lora = None
        out = forward(
            params,
            cfg,
            batch["tokens"],
            positions=batch["positions"],
            segment_ids=batch["segment_ids"],
            lora=lora,
            return_hidden=loss_chunk > 0,
        )  # [B, T, D] hidden states with loss_chunk, else [B, T, V] logits
        masks = (batch["tokens"], batch["loss_mask"], batch["segment_ids"])
        if loss_chunk > 0:
            return lm_nll_chunked(params, cfg, out, *masks, chunk=loss_chunk)
        return lm_nll(out, *masks)

    rows = batch["tokens"].shape[0]
    n_micro = rows // micro_batch_size if micro_batch_size else 1
    if n_micro <= 1:

        def loss_fn(trainable):
            total, count = nll_sum(trainable, batch)
            return total / jnp.maximum(count, 1.0), count

        (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
    else:
        if rows % micro_batch_size:
            raise ValueError(
                f"sft: {rows} rows are no whole number of {micro_batch_size}-row batches"
            )
        micro = jax.tree.map(functools.partial(micro_batches, n=n_micro), batch)
        grad_sum = jax.value_and_grad(nll_sum, has_aux=True)
        f32 = lambda t: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), t)

        def accumulate(carry, mb):
            grads, total, count = carry
            (nll, n), g = grad_sum(state.trainable, mb)
            grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
            return (grads, total + nll, count + n), None

        zero = jnp.zeros((), jnp.float32)
        (grads, total, count), _ = jax.lax.scan(
            accumulate, (f32(state.trainable), zero, zero), micro
        )
        denom = jnp.maximum(count, 1.0)
        loss = total / denom
        grads = jax.tree.map(lambda g, t: (g / denom).astype(t.dtype), grads, state.trainable)

    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    new = SFTState(optax.apply_updates(state.trainable, updates), opt_state, state.step + 1)
    metrics = {
        "loss": loss,
        "target_tokens": count,
        "grad_norm": optax.tree.norm(grads),
        "finite": jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads)),
        "nonfinite_total": opt_state.total_notfinite,  # updates skipped so far
    }
    return new, metrics


def num_steps_per_epoch(packed: Packed, batch_size: int) -> int:
    return max(math.floor(packed.num_rows / batch_size), 1)
