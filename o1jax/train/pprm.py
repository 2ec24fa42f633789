"""Training the pairwise preference reward model (LLaMA-Berry's PPRM) on its own LoRA adapter.

    pairs = task_pairs(tokenizer, problems, rng)          # correct vs flawed solutions
    pairs = encode_pairs(tokenizer, load_pairs(path))     # or a JSONL file of preferences
    trainer = PPRMTrainer(cfg, params, adapter, PPRMConfig(), mesh, tokenizer)
    for step in range(steps):
        metrics = trainer.train_step(pairs.batch(step, 32, seed))
    accuracy = pairwise_accuracy(params, cfg, trainer.lora, held_out_pairs, trainer.answer_tokens)

Loss: the pairwise logistic (Bradley-Terry) loss on the answer-token logit difference,
`softplus(-y * (log P(A) - log P(B)))` with y = +1 when the first solution is the better one.
Every pair is shown in both orders, which teaches the symmetry that `pprm.preferences` enforces.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Sequence
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from o1jax.data import tasks
from o1jax.search import pprm
from o1jax.search.pprm import solution_text


@dataclasses.dataclass(frozen=True)
class PPRMConfig:
    learning_rate: float = 1e-3
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0


@dataclasses.dataclass
class Pairs:
    """Comparison prompts [M, W] (right-padded), lengths [M] and labels [M] (1: first better)."""

    tokens: np.ndarray
    lengths: np.ndarray
    first_better: np.ndarray

    @property
    def num_pairs(self) -> int:
        return len(self.lengths) // 2  # each pair is stored in both orders

    def batch(self, step: int, batch_size: int, seed: int | Sequence[int]) -> dict[str, np.ndarray]:
        """Batch `step` of an epoch-wise shuffle (deterministic in seed and step; `seed` may be
        a tuple of ints, such as (run seed, stage))."""
        m = len(self.lengths)
        per_epoch = max(m // batch_size, 1)
        order = np.random.default_rng([*np.atleast_1d(seed), step // per_epoch]).permutation(m)
        # Always `batch_size` rows (fewer rows than that repeat), so the batch shards evenly.
        idx = np.resize(order[(step % per_epoch) * batch_size :], batch_size)
        return {
            "tokens": self.tokens[idx],
            "lengths": self.lengths[idx],
            "first_better": self.first_better[idx],
        }

    def head(self, num_pairs: int) -> Pairs:
        """The first `num_pairs` pairs (both orders of each)."""
        n = 2 * num_pairs
        return Pairs(self.tokens[:n], self.lengths[:n], self.first_better[:n])


def task_pairs(
    tokenizer, problems: Sequence[tasks.Problem], rng: np.random.Generator, rate=None
) -> Pairs:
    """For each problem with a flawable solution, (correct, flawed) in both orders.

    rate: None, or a function from [(question, thoughts)] to the policy's rating of each thought
    (`ratings.thought_ratings` bound to the policy), whose verdicts then go into the texts."""
    solutions = []
    for p in problems:
        flawed = tasks.flawed_chain(p, rng)
        if flawed is not None:
            solutions += [(p.question, list(p.steps)), (p.question, flawed[0])]
    if not solutions:
        raise ValueError("pprm: no problem has a worked solution with a result to flaw")
    verdicts = rate(solutions) if rate is not None else [None] * len(solutions)
    texts = [solution_text(t, r) for (_, t), r in zip(solutions, verdicts, strict=True)]
    triples = [(q, texts[i], texts[i + 1]) for i, (q, _) in enumerate(solutions) if i % 2 == 0]
    return encode_pairs(tokenizer, triples)


def load_pairs(
    path: str | Path, tokenizer=None, max_len: int | None = None
) -> list[tuple[str, str, str]]:
    """(question, chosen, rejected) triples from a JSON-lines file, one object a line:

        {"question": "...", "chosen": "the better solution", "rejected": "the worse one"}

    Blank lines are skipped, and so is a row that repeats an earlier one exactly (a copy would
    count twice in the held-out accuracy). Errors (`tasks.DataError`) name the file, the line
    and the field; a row whose chosen and rejected texts are the same states no preference and
    is one too. A row that reverses an earlier one (the same question and solutions, the other
    preferred: raters who disagree) is kept, and one `tasks.DataWarning` names their count and
    first lines: together the two rows teach no preference, and a held-out accuracy counts one
    of them wrong whatever the PPRM says. With `tokenizer` and `max_len` (the PPRM's context),
    a pair whose comparison prompt (`pprm.encode_pair`, either order) is longer than `max_len`
    tokens is left out, and one `tasks.DataWarning` names their count and first lines: the PPRM
    cannot read it, and every batch would be padded to its width.
    """
    triples, seen, too_long, reversed_rows = [], set(), [], []
    kept = {}  # (question, chosen, rejected) of each kept row -> its line
    for where, lineno, row in tasks.jsonl_rows(path):
        if not isinstance(row, dict):
            raise tasks.DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        values = []
        for field in ("question", "chosen", "rejected"):
            value = row.get(field)
            if value is None:
                raise tasks.DataError(f"{where}: field {field!r} is missing or null")
            if not isinstance(value, str) or not value.strip():
                raise tasks.DataError(f"{where}: field {field!r} must be a non-empty string")
            values.append(value)
        question, chosen, rejected = values
        if chosen.strip() == rejected.strip():
            raise tasks.DataError(f"{where}: 'chosen' and 'rejected' are the same text")
        if (question, chosen, rejected) in seen:
            continue
        seen.add((question, chosen, rejected))
        if max_len is not None:
            width = max(
                len(pprm.encode_pair(tokenizer, question, a, b))
                for a, b in ((chosen, rejected), (rejected, chosen))
            )
            if width > max_len:
                too_long.append((lineno, width))
                continue
        if (question, rejected, chosen) in kept:
            reversed_rows.append((lineno, kept[question, rejected, chosen]))
        kept[question, chosen, rejected] = lineno
        triples.append((question, chosen, rejected))
    if reversed_rows:
        lines = ", ".join(f"{n} reverses {m}" for n, m in reversed_rows[:5])
        warnings.warn(
            f"{path}: {len(reversed_rows)} row(s) reverse an earlier row's preference (the same "
            f"question and solutions, the other preferred; line {lines}"
            f"{', ...' if len(reversed_rows) > 5 else ''}); both rows are kept, so the PPRM "
            "learns no preference between those solutions",
            tasks.DataWarning,
            stacklevel=2,
        )
    if too_long:
        lines = ", ".join(str(n) for n, _ in too_long[:5]) + (", ..." if len(too_long) > 5 else "")
        warnings.warn(
            f"{path}: {len(too_long)} of {len(too_long) + len(triples)} pairs are longer than "
            f"the PPRM's {max_len}-token context (longest {max(w for _, w in too_long)} tokens) "
            f"and are left out (lines {lines})",
            tasks.DataWarning,
            stacklevel=2,
        )
    if not triples:
        longer = f" that fit {max_len} tokens" if too_long else ""
        raise tasks.DataError(f"{path}: holds no preference pairs{longer}")
    return triples


def encode_pairs(tokenizer, triples: Sequence[tuple[str, str, str]]) -> Pairs:
    """(question, better, worse) triples as comparison prompts, each in both orders (rows 2k:
    better first, label 1; 2k + 1: worse first, label 0), right-padded to the longest."""
    rows, labels = [], []
    for question, good, bad in triples:
        for first, second, label in ((good, bad, 1), (bad, good, 0)):
            rows.append(pprm.encode_pair(tokenizer, question, first, second))
            labels.append(label)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens = np.full((len(rows), width), pad, np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    return Pairs(
        tokens,
        np.asarray([len(r) for r in rows], np.int32),
        np.asarray(labels, np.int32),
    )


@struct.dataclass
class PPRMState:
    lora: object  # LoRAParams
    opt_state: object
    step: jax.Array  # [] int32


def pairwise_loss(lora, params, cfg, batch, answer_tokens: tuple[int, int]):
    """Mean pairwise logistic loss and accuracy over a batch of ordered pairs."""
    logit = pprm.first_better_logit(
        params, cfg, batch["tokens"], batch["lengths"], lora, answer_tokens
    )  # [M]
    sign = 2.0 * batch["first_better"].astype(jnp.float32) - 1.0
    loss = jnp.mean(jax.nn.softplus(-sign * logit))
    accuracy = jnp.mean((sign * logit) > 0)
    return loss, accuracy


@functools.partial(
    jax.jit, static_argnames=("cfg", "optimizer", "answer_tokens"), donate_argnums=(0,)
)
def _pprm_step(state: PPRMState, params, batch, *, cfg, optimizer, answer_tokens):
    chex.assert_rank(batch["tokens"], 2)
    (loss, accuracy), grads = jax.value_and_grad(pairwise_loss, has_aux=True)(
        state.lora, params, cfg, batch, answer_tokens
    )
    updates, opt_state = optimizer.update(grads, state.opt_state, state.lora)
    new = PPRMState(optax.apply_updates(state.lora, updates), opt_state, state.step + 1)
    grad_norm = optax.tree.norm(grads)
    return new, {
        "loss": loss,
        "accuracy": accuracy,
        "grad_norm": grad_norm,
        "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm),
        "nonfinite_total": opt_state.total_notfinite,  # updates skipped so far
    }


class PPRMTrainer:
    """The PPRM's adapter and optimizer on a mesh, and its compiled step (the base is frozen)."""

    def __init__(self, cfg, params, lora, config: PPRMConfig, mesh, tokenizer):
        from o1jax.parallel.mesh import copy_to_mesh, init_sharded, param_shardings, replicated

        self.cfg, self.mesh = cfg, mesh
        self.answer_tokens = pprm.answer_format(tokenizer)[0]
        # Skips (and counts) updates whose gradients are not finite, as SFT's and PPO's do.
        self.optimizer = optax.apply_if_finite(
            optax.chain(
                optax.clip_by_global_norm(config.max_grad_norm),
                optax.adamw(config.learning_rate, weight_decay=config.weight_decay),
            ),
            max_consecutive_errors=1_000_000,
        )
        with jax.set_mesh(mesh):
            self.params = jax.device_put(params, param_shardings(params, mesh, heads=cfg))
            # A copy: the step donates the state, and the caller keeps its adapter.
            lora = copy_to_mesh(lora, mesh, heads=cfg)
            step = jax.device_put(jnp.zeros((), jnp.int32), replicated(mesh))
            self.state = PPRMState(lora, init_sharded(self.optimizer.init, lora, mesh, cfg), step)

    @property
    def lora(self):
        return self.state.lora

    def train_step(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        from o1jax.parallel.mesh import shard_batch

        with jax.set_mesh(self.mesh):
            self.state, metrics = _pprm_step(
                self.state,
                self.params,
                shard_batch(batch, self.mesh),
                cfg=self.cfg,
                optimizer=self.optimizer,
                answer_tokens=self.answer_tokens,
            )
        return metrics


def pairwise_accuracy(params, cfg, lora, pairs: Pairs, answer_tokens, batch_size: int = 64):
    """Share of pairs whose better solution gets symmetrised P(better > worse) > 1/2.

    `pairs` holds each pair in both orders (rows 2k: better first, 2k + 1: worse first), as
    `task_pairs` builds them; all rows run in fixed-size batches (one compiled shape).
    """
    m = len(pairs.lengths)
    p_first = np.zeros(m, np.float32)
    for start in range(0, m, batch_size):
        idx = np.arange(start, start + batch_size) % m  # the last batch wraps around
        logit = pprm.first_better_logit(
            params,
            cfg,
            jnp.asarray(pairs.tokens[idx]),
            jnp.asarray(pairs.lengths[idx]),
            lora,
            answer_tokens,
        )
        p_first[idx[: m - start]] = np.asarray(jax.nn.sigmoid(logit))[: m - start]
    p_better, _ = pprm.symmetrise(p_first[0::2], p_first[1::2])
    return float(np.mean(p_better > 0.5))
