"""PPO on the LoRA adapters, with the frozen base as the KL reference.

Per experience (see `o1jax.rl.experience`): a token-level clipped surrogate on the thought
tokens, a value loss (cross-entropy of the two rating tokens' renormalised probabilities against
the value target, read at the final <start_of_rating> position), a k3 KL estimate to the base
(the same forward with LoRA switched off: no second model in memory), and an entropy bonus.
Token terms are normalised by the number of thought tokens in the batch; every term is weighted
by the replay buffer's importance weights. Rows with `valid` False weigh nothing in any term, nor
in the advantage normalisation.

`ppo_epochs` runs E updates on one batch. The behaviour log-probs of the epoch are those of the
policy at its start, computed inside the first update by the very same program, so the ratio is
exactly 1 there. Gradients are taken with respect to the LoRA pytree only: the base gets no
gradient and no optimizer state.

The sampler's own log-probs (`Experience.behaviour_logprobs`) are not the ratio's denominator:
they are of the untempered distribution while self-play samples at `search.temperature`, and a
replayed experience was sampled by an older adapter. So the ratio measures the move within an
epoch, not the lag of replayed data (the replay's importance weights correct its sampling, not
that lag), and the k3 term averages over the sampled thoughts rather than the current policy's:
a penalty that is 0 exactly when policy and reference agree on them, not an exact KL. PPO reads
only their width L, the thought length (the replay buffer does not store them: batches sampled
from it carry NaN there).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import struct

from o1jax.model.gemma2 import forward, unembed
from o1jax.model.logprobs import token_logprobs
from o1jax.parallel.mesh import micro_batches, unmicro_batches
from o1jax.rl.experience import Experience
from o1jax.search.mcts import check_fields


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    clip_eps: float = 0.2
    value_coef: float = 1.0
    kl_coef: float = 0.05
    entropy_coef: float = 0.0
    learning_rate: float = 1e-4
    max_grad_norm: float = 1.0
    epochs: int = 2  # updates per sampled batch
    normalize_advantages: bool = True
    loss_chunk: int = 0  # thought positions unembedded at a time (0: all); changes no number
    # Experiences per gradient-accumulation pass (0: the whole batch at once); changes no number.
    micro_batch_size: int = 0

    def __post_init__(self):
        # Unchecked, epochs <= 0 still ran one update, a negative clip_eps inverted the clip
        # range and max_grad_norm 0 zeroed every update, all silently.
        check_fields(
            self,
            epochs=(int, 1, None),
            loss_chunk=(int, 0, None),
            micro_batch_size=(int, 0, None),
            value_coef=(float, 0.0, None),
            kl_coef=(float, 0.0, None),
            entropy_coef=(float, 0.0, None),
            learning_rate=(float, 0.0, None),
        )
        for name in ("clip_eps", "max_grad_norm"):  # inf: no clipping
            value = getattr(self, name)
            if isinstance(value, bool) or not value > 0:
                raise ValueError(f"PPOConfig.{name} must be > 0, got {value!r}")


@struct.dataclass
class TrainState:
    lora: object  # LoRAParams
    opt_state: object
    step: jax.Array  # [] int32


def make_optimizer(config: PPOConfig) -> optax.GradientTransformation:
    inner = optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm), optax.adamw(config.learning_rate)
    )
    return optax.apply_if_finite(inner, max_consecutive_errors=1_000_000)


def init_train_state(lora, optimizer: optax.GradientTransformation) -> TrainState:
    """A fresh state on a copy of `lora`: `ppo_epochs` donates the state, and the caller keeps
    its adapter."""
    lora = jax.tree.map(jnp.copy, lora)
    return TrainState(lora=lora, opt_state=optimizer.init(lora), step=jnp.zeros((), jnp.int32))


def check_batch(batch: Experience, weights) -> None:
    """Raises a ValueError naming the first field of `batch` (or `weights`) that is not [M] (or
    [M, W] tokens, [M, L] behaviour_logprobs), M = the rows of `batch.tokens`."""
    if len(jnp.shape(batch.tokens)) != 2:
        raise ValueError(f"ppo: tokens must be [M, W], got shape {jnp.shape(batch.tokens)}")
    m = jnp.shape(batch.tokens)[0]
    for f in dataclasses.fields(batch):
        shape = jnp.shape(getattr(batch, f.name))
        rank = 2 if f.name in ("tokens", "behaviour_logprobs") else 1
        if len(shape) != rank or shape[0] != m:
            want = {"tokens": "[M, W]", "behaviour_logprobs": "[M, L]"}.get(f.name, "[M]")
            raise ValueError(f"ppo: {f.name} must be {want} with M = {m}, got shape {shape}")
    if jnp.shape(weights) != (m,):
        raise ValueError(f"ppo: weights must be [M] with M = {m}, got shape {jnp.shape(weights)}")


def sequence_logprobs(logits, tokens, action_start, max_len: int):
    """Log-probs [M, L] of the thought tokens and the log-softmax rows [M, L, V] they come from."""
    logp = jax.nn.log_softmax(logits)  # [M, W, V]
    pos = action_start[:, None] - 1 + jnp.arange(max_len)[None, :]  # predicting positions
    pos = jnp.clip(pos, 0, tokens.shape[1] - 1)
    rows = jnp.take_along_axis(logp, pos[:, :, None], axis=1)  # [M, L, V]
    targets = jnp.take_along_axis(tokens, jnp.clip(pos + 1, 0, tokens.shape[1] - 1), axis=1)
    token_logp = jnp.take_along_axis(rows, targets[:, :, None], axis=-1)[..., 0]  # [M, L]
    return token_logp, rows


def thought_logprobs(
    params, cfg, hidden, tokens, action_start, max_len: int, entropy=False, chunk: int = 0
):
    """Log-probs [M, L] of the thought tokens from `forward(..., return_hidden=True)` states
    [M, W, D] (and with `entropy`, the entropy [M, L] of each position's distribution): only the
    L positions that predict thought tokens are unembedded, `chunk` of them at a time (0: all),
    through `token_logprobs`, which keeps each device on its own rows under fsdp. Equal to
    `sequence_logprobs` of the full logits."""
    pos = action_start[:, None] - 1 + jnp.arange(max_len)[None, :]  # predicting positions
    pos = jnp.clip(pos, 0, tokens.shape[1] - 1)  # [M, L]
    h = jnp.take_along_axis(hidden, pos[:, :, None], axis=1)  # [M, L, D]
    targets = jnp.take_along_axis(tokens, jnp.clip(pos + 1, 0, tokens.shape[1] - 1), axis=1)
    return token_logprobs(params, cfg, h, targets, chunk=chunk, with_entropy=entropy)


def rating_logprob(last_logits, positive: int, negative: int):
    """log P(positive) and log P(negative) [M] renormalised over the two rating tokens, from the
    logits [M, V] of each sequence's last position (its `<start_of_rating>`)."""
    last = last_logits
    pair = jnp.stack([last[:, positive], last[:, negative]], axis=-1)
    pair = jax.nn.log_softmax(pair, axis=-1)
    return pair[:, 0], pair[:, 1]


def batch_norms(batch: Experience, config: PPOConfig) -> dict:
    """The whole batch's normalisers, so that micro-batches add up to its loss: valid rows
    `n_valid` [], thought tokens of valid rows `n_tok` [], and the advantage normalisation
    (`adv_mean`, `adv_std` over valid rows; `spread` False when they are all equal)."""
    max_len = batch.behaviour_logprobs.shape[1]
    ok = batch.valid.astype(bool)  # [M]
    valid = ok.astype(jnp.float32)
    act = (jnp.arange(max_len)[None, :] < batch.action_length[:, None]).astype(jnp.float32)
    norms = {
        "n_valid": jnp.maximum(valid.sum(), 1.0),
        "n_tok": jnp.maximum((act * valid[:, None]).sum(), 1.0),
    }
    adv = jnp.where(ok, batch.advantage, 0.0)  # whatever an invalid row holds
    if config.normalize_advantages:
        mean = jnp.sum(adv) / norms["n_valid"]
        std = jnp.sqrt(jnp.sum((adv - mean) ** 2 * valid) / norms["n_valid"])
        # A batch of equal advantages carries no signal: its float32 residue around the mean,
        # divided by a near-zero std, would not be 0.
        norms |= {"adv_mean": mean, "adv_std": std, "spread": std > 1e-6 * (1.0 + jnp.abs(mean))}
    return norms


def ppo_loss(
    lora,
    params,
    cfg,
    batch: Experience,
    weights,
    old_logp,
    config: PPOConfig,
    rating_tokens: tuple[int, int],
    norms: dict | None = None,
):
    """Scalar loss and aux. weights: [M] importance weights. old_logp None: use this policy's
    own (stopped) log-probs. Rows with `batch.valid` False get weight 0 everywhere. norms: from
    `batch_norms` of the whole batch when `batch` is one micro-batch of it (None: this batch's);
    the loss and every aux value are then this micro-batch's share of the whole batch's."""
    check_batch(batch, weights)
    if len(rating_tokens) != 2 or not all(0 <= t < cfg.vocab_size for t in rating_tokens):
        # An id past the vocabulary would be clamped to the last logit, silently.
        raise ValueError(
            f"ppo: rating_tokens {tuple(rating_tokens)} must be two ids (positive, negative) "
            f"in [0, {cfg.vocab_size}) (the vocabulary)"
        )
    if norms is None:
        norms = batch_norms(batch, config)
    max_len = batch.behaviour_logprobs.shape[1]
    mask = jnp.arange(batch.tokens.shape[1])[None, :] < batch.length[:, None]
    # Hidden states [M, W, D]; only the thought and rating positions are unembedded, so no
    # [M, W, V] logits exist (at Gemma2's 256k vocabulary they would dwarf the model).
    hidden = forward(params, cfg, batch.tokens, attention_mask=mask, lora=lora, return_hidden=True)
    chunk = config.loss_chunk
    logp, entropy_tok = thought_logprobs(
        params, cfg, hidden, batch.tokens, batch.action_start, max_len, True, chunk
    )
    ref_hidden = jax.lax.stop_gradient(  # LoRA off: the frozen reference
        forward(params, cfg, batch.tokens, attention_mask=mask, return_hidden=True)
    )
    ref_logp = thought_logprobs(
        params, cfg, ref_hidden, batch.tokens, batch.action_start, max_len, chunk=chunk
    )
    if old_logp is None:
        old_logp = jax.lax.stop_gradient(logp)
    # Invalid rows weigh 0 in every term and count in no mean. (Multiplying by 1.0 and keeping
    # the token masks as they were leave an all-valid batch's numbers bit for bit the same.)
    ok = batch.valid.astype(bool)  # [M]
    valid = ok.astype(jnp.float32)
    n_valid, n_tok = norms["n_valid"], norms["n_tok"]
    weights = weights * valid
    act = (jnp.arange(max_len)[None, :] < batch.action_length[:, None]).astype(jnp.float32)
    w_tok = act * weights[:, None]  # [M, L], 0 on invalid rows
    act_v = act * valid[:, None]  # thought tokens of valid rows [M, L]

    adv = jnp.where(ok, batch.advantage, 0.0)  # whatever an invalid row holds
    if config.normalize_advantages:
        centred = adv - norms["adv_mean"]
        adv = jnp.where(norms["spread"], centred / (norms["adv_std"] + 1e-6), 0.0)
    # Positions past a thought's end (padding, the rating marker) are zeroed before any exp:
    # the policy may put any log-prob there, and inf * 0 would turn the sums into NaN.
    on = act > 0
    log_ratio = jnp.where(on, logp - old_logp, 0.0)
    ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, 1.0 - config.clip_eps, 1.0 + config.clip_eps)
    pg_tok = -jnp.minimum(ratio * adv[:, None], clipped * adv[:, None])  # [M, L]
    log_r = jnp.where(on, ref_logp - logp, 0.0)
    kl_tok = jnp.exp(log_r) - log_r - 1.0  # k3 estimator of KL(pi || ref), on the sampled tokens
    entropy_tok = jnp.where(on, entropy_tok, 0.0)  # [M, L]

    last = jnp.take_along_axis(hidden, (batch.length - 1)[:, None, None], axis=1)[:, 0]  # [M, D]
    pos_lp, neg_lp = rating_logprob(unembed(params, cfg, last), *rating_tokens)
    target = jnp.where(ok, batch.value_target, 0.0)
    value_item = jnp.where(ok, -(target * pos_lp + (1.0 - target) * neg_lp), 0.0)  # [M]

    pg = jnp.sum(pg_tok * w_tok) / n_tok
    kl = jnp.sum(kl_tok * w_tok) / n_tok
    entropy = jnp.sum(entropy_tok * w_tok) / n_tok
    value = jnp.sum(value_item * weights) / n_valid
    loss = pg + config.value_coef * value + config.kl_coef * kl - config.entropy_coef * entropy

    # Replay priorities (LLaMA-O1: |loss| + 1e-6) from each item's policy loss alone, with the
    # raw advantage, not the batch-normalised one: a replayed item's priority is then on the
    # scale of a new item's |advantage| + 1e-6 (at ratio 1 they are equal). Normalised, or with
    # the value term added, an item of advantage 0 came back from 1e-6 to about 0.7 (the
    # cross-entropy never falls below its target's entropy: 0.69 at a target of 0.5), and the
    # signed policy term and the value term cancelled: of two items of advantage +0.5 and -0.5,
    # the negative one came back with six times the positive one's priority.
    raw = jnp.where(ok, batch.advantage, 0.0)[:, None]  # [M, 1]
    item_pg = -jnp.minimum(ratio * raw, clipped * raw)  # [M, L]
    item_tokens = jnp.maximum(act.sum(1), 1.0)
    item_loss = (item_pg * act_v).sum(1) / item_tokens
    aux = {
        "loss": loss,
        "policy_loss": pg,
        "value_loss": value,
        "kl": kl,
        "entropy": entropy,
        "ratio_mean": jnp.sum(ratio * act_v) / n_tok,
        "clip_fraction": jnp.sum((jnp.abs(ratio - 1.0) > config.clip_eps) * act_v) / n_tok,
        "value_pred": jnp.sum(jnp.exp(pos_lp) * valid) / n_valid,
    }
    return loss, (aux, logp, jnp.abs(item_loss) + 1e-6)


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "config", "optimizer", "rating_tokens"),
    donate_argnums=(0,),
)
def ppo_epochs(
    state: TrainState,
    params,
    batch: Experience,
    weights,
    *,
    cfg,
    config: PPOConfig,
    optimizer,
    rating_tokens: tuple[int, int],
):
    """`config.epochs` PPO updates on one batch, weighted by `weights` [M]. Returns (state,
    metrics of the first and last update, new priorities [M]). With `config.micro_batch_size`,
    each update accumulates the gradients of micro-batches of that many experiences in a
    `lax.scan` (each normalised by the whole batch: the same loss, gradients and metrics).

    Donates `state`: its arrays are deleted, use only the returned one."""
    check_batch(batch, weights)
    grad_fn = jax.value_and_grad(ppo_loss, has_aux=True)
    m = batch.tokens.shape[0]
    n_micro = m // config.micro_batch_size if config.micro_batch_size else 1
    if n_micro > 1 and m % config.micro_batch_size:
        raise ValueError(f"ppo: {m} experiences are no whole number of micro-batches of "
                         f"{config.micro_batch_size}")  # fmt: skip

    def gradients(lora, old_logp):
        """(grads, aux, logp [M, L], priorities [M]) of the whole batch; with micro-batches,
        accumulated in a `lax.scan`, every micro-batch normalised by the whole batch."""
        if n_micro <= 1:
            (_, (aux, logp, priority)), grads = grad_fn(
                lora, params, cfg, batch, weights, old_logp, config, rating_tokens
            )
            return grads, aux, logp, priority
        norms = batch_norms(batch, config)
        split = functools.partial(micro_batches, n=n_micro)
        xs = (jax.tree.map(split, batch), split(weights))
        if old_logp is not None:
            xs += (split(old_logp),)

        def accumulate(grads, xs):
            micro_batch, micro_weights, *old = xs
            (_, (aux, logp, priority)), g = grad_fn(
                lora, params, cfg, micro_batch, micro_weights, old[0] if old else None, config,
                rating_tokens, norms,
            )  # fmt: skip
            return jax.tree.map(jnp.add, grads, g), (aux, logp, priority)

        zeros = jax.tree.map(jnp.zeros_like, lora)
        grads, (auxs, logp, priority) = jax.lax.scan(accumulate, zeros, xs)
        aux = jax.tree.map(lambda x: jnp.sum(x, axis=0), auxs)  # shares of the whole batch's
        return grads, aux, unmicro_batches(logp), unmicro_batches(priority)

    def update(state, old_logp):
        grads, aux, logp, priority = gradients(state.lora, old_logp)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.lora)
        aux["grad_norm"] = optax.tree.norm(grads)
        new = TrainState(
            lora=optax.apply_updates(state.lora, updates), opt_state=opt_state, step=state.step + 1
        )
        return new, aux, logp, priority

    state, first, old_logp, priority = update(state, None)

    def later(state, _):
        state, aux, _, priority = update(state, old_logp)
        return state, (aux, priority)

    last, priority = first, priority
    if config.epochs > 1:
        state, (auxs, priorities) = jax.lax.scan(later, state, None, length=config.epochs - 1)
        last = jax.tree.map(lambda x: x[-1], auxs)
        priority = priorities[-1]
    metrics = {f"first/{k}": v for k, v in first.items()} | {k: v for k, v in last.items()}
    return state, metrics, priority


class PPOTrainer:
    """The LoRA train state of an RL run, placed on a mesh, and its compiled update."""

    def __init__(self, cfg, params, lora, config: PPOConfig, mesh, rating_tokens: tuple[int, int]):
        from o1jax.parallel.mesh import copy_to_mesh, init_sharded, param_shardings, replicated

        self.cfg, self.config, self.mesh = cfg, config, mesh
        self.rating_tokens = tuple(int(t) for t in rating_tokens)
        self.optimizer = make_optimizer(config)
        with jax.set_mesh(mesh):
            self.params = jax.device_put(params, param_shardings(params, mesh, heads=cfg))
            # A copy: the update donates the state, and the caller keeps its adapter.
            lora = copy_to_mesh(lora, mesh, heads=cfg)
            step = jax.device_put(jnp.zeros((), jnp.int32), replicated(mesh))
            self.state = TrainState(lora, init_sharded(self.optimizer.init, lora, mesh, cfg), step)

    @property
    def lora(self):
        return self.state.lora

    def update(self, batch: Experience, weights) -> tuple[dict, jax.Array]:
        """`config.epochs` updates on `batch` (M items, M a multiple of data x fsdp), weighted
        by `weights` [M]."""
        from o1jax.parallel.mesh import shard_batch

        check_batch(batch, weights)
        shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        m = batch.tokens.shape[0]
        if m % shards:
            raise ValueError(f"ppo: batch of {m} is not a multiple of data x fsdp = {shards}")
        micro = self.config.micro_batch_size
        if micro and (m % micro or micro % shards):
            raise ValueError(
                f"ppo: micro_batch_size {micro} must divide the batch of {m} and be a multiple "
                f"of data x fsdp = {shards}"
            )
        with jax.set_mesh(self.mesh):
            batch, weights = shard_batch((batch, jnp.asarray(weights, jnp.float32)), self.mesh)
            self.state, metrics, priorities = ppo_epochs(
                self.state,
                self.params,
                batch,
                weights,
                cfg=self.cfg,
                config=self.config,
                optimizer=self.optimizer,
                rating_tokens=self.rating_tokens,
            )
        return metrics, priorities
