"""Held-out evaluation inside a run: greedy pass@1 and search accuracy, with per-problem
records written to the workdir."""

from __future__ import annotations

import os

import jax

from o1jax.train import evaluate as ev
from o1jax.train import metrics as run_metrics
from o1jax.train.config import (
    RunConfig,
)
from o1jax.train.run_context import STAGE_EVAL, Preempted, RunContext, search_config


def evaluate_policy(
    ctx: RunContext, params, adapter, tag: str, with_search: bool, interruptible: bool = True
) -> dict:
    """Held-out greedy pass@1 (and search accuracy), with per-problem JSONL in the workdir.

    interruptible: on SIGTERM, stop before the next batch and raise Preempted (the evaluation
    holds no state worth saving: a resumed run evaluates again from its last checkpoint)."""

    def before_batch() -> None:
        if interruptible and ctx.preemption.requested:
            raise Preempted(
                f"SIGTERM during the {tag} evaluation: resumes from the last checkpoint"
            )

    with jax.set_mesh(ctx.mesh):  # each device decodes its share of the rows
        return _evaluate(ctx, params, adapter, tag, with_search, before_batch)


def _evaluate(ctx: RunContext, params, adapter, tag: str, with_search: bool, before_batch):
    """`evaluate_policy`'s work, under the run's mesh (process 0 writes the records)."""
    config = ctx.config
    primary = run_metrics.is_primary()
    problems = ctx.test[: config.eval.num_problems]
    key = jax.random.fold_in(ctx.key, STAGE_EVAL)
    batch = eval_batch(config, len(problems))
    greedy = ev.evaluate(
        params,
        ctx.cfg,
        ctx.tokenizer,
        problems,
        key=key,
        max_new_tokens=config.eval.max_new_tokens,
        batch_size=batch,
        lora=adapter,
        progress=f"eval {tag}",
        before_batch=before_batch,
    )
    if primary:
        ev.write_records(os.path.join(ctx.workdir, f"eval_{tag}.jsonl"), greedy.records)
    out = {"greedy_pass1": greedy.pass1}
    if with_search:
        found = ev.search_evaluate(
            params,
            ctx.cfg,
            ctx.tokenizer,
            problems,
            search_config(config, config.eval.search_simulations),
            key=key,
            batch_size=batch,
            lora=adapter,
            progress=f"search {tag}",
            tree_dir=os.path.join(ctx.workdir, f"trees_{tag}") if primary else None,
            max_trees=8,
            before_batch=before_batch,
        )
        if primary:
            ev.write_records(os.path.join(ctx.workdir, f"search_{tag}.jsonl"), found.records)
        out["search_accuracy"] = found.pass1
    return out


def eval_batch(config: RunConfig, n: int) -> int:
    """Rows per evaluation call for `n` problems (at most 32)."""
    shards = 1  # evaluation runs replicated; batch only bounds memory
    return max(shards, min(32, n))
