"""The PPRM stage (LLaMA-Berry): preference pairs from a file, the task or the SFT'd policy,
then the PPRM's own adapter trained over the frozen SFT'd model, with its held-out accuracy."""

from __future__ import annotations

import functools

import jax
import numpy as np
from tqdm.auto import tqdm

from o1jax.data import tasks
from o1jax.model import lora
from o1jax.search.ratings import thought_ratings
from o1jax.train import pprm_mining
from o1jax.train.config import (
    ConfigError,
)
from o1jax.train.eval_stage import eval_batch
from o1jax.train.pprm import (
    Pairs,
    PPRMConfig,
    PPRMTrainer,
    encode_pairs,
    load_pairs,
    pairwise_accuracy,
    task_pairs,
)
from o1jax.train.run_context import (
    STAGE_PPRM,
    Preempted,
    RunContext,
    check_finite,
    lora_config,
    save_checkpoint,
)


def step_rater(ctx: RunContext, base_params):
    """None, or what writes the SFT'd model's verdicts into the PPRM's texts (`pprm.rated`)."""
    if not ctx.config.pprm.rates_steps:
        return None
    return functools.partial(
        thought_ratings, base_params, ctx.cfg, ctx.tokenizer, progress="pprm verdicts"
    )


def pprm_pairs(ctx: RunContext, base_params=None) -> tuple[Pairs, Pairs] | None:
    """(training, held-out) preference pairs of the PPRM stage: the `pprm.pairs_path` file split
    by question (a pair on one of the run's held-out problems `ctx.test`, those the searches are
    evaluated on, or in the `data.test_fraction` hash split of the file's own questions is held
    out; every other pair is for training), or (correct, flawed)
    solutions of the train and the held-out problems. The held-out set is cut to
    `pprm.eval_pairs` pairs. None when the pairs need the SFT'd model `base_params` and it is
    not given: `pprm.source: policy` (`policy_pprm_pairs`), or task pairs with the model's
    verdicts (`pprm.rated`)."""
    config, p = ctx.config, ctx.config.pprm
    if p.pairs_path:
        try:
            # Pairs longer than the model's context are left out (a DataWarning says so).
            triples = load_pairs(p.pairs_path, ctx.tokenizer, ctx.cfg.max_position_embeddings)
        except tasks.DataError as e:
            raise tasks.DataError(f"pprm.pairs_path: {e}") from None
        # No PPRM training pair may be on a problem the searches are tested on: a pair on one
        # of the run's held-out problems (the task's test split, or data.test_path) is held
        # out, and so is one whose question falls in the test split of the file's own hash.
        held_out = {tasks.question_key(q.question) for q in ctx.test}

        def is_held_out(question: str) -> bool:
            if tasks.question_key(question) in held_out:
                return True
            return tasks.question_split(question, config.data.test_fraction) == "test"

        train = [t for t in triples if not is_held_out(t[0])]
        test = [t for t in triples if is_held_out(t[0])]
        if not train or not test:
            raise ConfigError(
                f"pprm.pairs_path {p.pairs_path}: {len(train)} train / {len(test)} held-out "
                f"pairs after the split by question (held out: those on one of the run's "
                f"{len(ctx.test)} held-out problems or in the data.test_fraction "
                f"{config.data.test_fraction} split of the file); both must be non-empty"
            )
        return encode_pairs(ctx.tokenizer, train), encode_pairs(ctx.tokenizer, test[: p.eval_pairs])
    if p.source == "policy" or (p.rates_steps and base_params is None):
        return None  # made from the SFT'd policy in the PPRM stage
    rate = step_rater(ctx, base_params)
    try:
        with jax.set_mesh(ctx.mesh):  # `rate` runs the model: each device its share of rows
            train = task_pairs(
                ctx.tokenizer, ctx.train, np.random.default_rng([config.seed, STAGE_PPRM, 0]), rate
            )
            test = task_pairs(
                ctx.tokenizer, ctx.test, np.random.default_rng([config.seed, STAGE_PPRM, 1]), rate
            )
    except ValueError as e:
        raise ConfigError(
            f"pprm: cannot make (correct, flawed) pairs from the problems ({e}); "
            f"give pprm.pairs_path"
        ) from None
    return train, test.head(p.eval_pairs)


def policy_pprm_pairs(ctx: RunContext, base_params) -> tuple[Pairs, Pairs]:
    """Pairs mined from the SFT'd policy's own solutions: right against wrong final answers
    among `pprm.samples` samples per train problem (and per held-out problem for the accuracy).
    Deterministic in the seed, so a resumed stage mines the same pairs."""
    config, p = ctx.config, ctx.config.pprm
    key = jax.random.fold_in(ctx.key, STAGE_PPRM)
    mine = lambda problems, part: pprm_mining.policy_triples(
        base_params,
        ctx.cfg,
        ctx.tokenizer,
        problems,
        key=jax.random.fold_in(key, part),
        samples=p.samples,
        max_new_tokens=config.eval.max_new_tokens,
        batch_size=eval_batch(config, len(problems)) * p.samples,
        seed=(config.seed, STAGE_PPRM, part),
        progress=f"pprm pairs ({'train' if part == 0 else 'held-out'})",
        rate=step_rater(ctx, base_params),
    )
    with jax.set_mesh(ctx.mesh):  # each device samples its share of the rows
        train = mine(ctx.train[: p.mine_problems], 0)
        test = mine(ctx.test[: config.eval.num_problems], 1)
    if not train or not test:
        raise ConfigError(
            f"pprm.source policy: the SFT'd policy's samples gave {len(train)} train / "
            f"{len(test)} held-out (right, wrong) pairs; both must be non-empty (more "
            f"pprm.samples or pprm.mine_problems, or pprm.source: task)"
        )
    return encode_pairs(ctx.tokenizer, train), encode_pairs(ctx.tokenizer, test).head(p.eval_pairs)


def pprm_trainer(ctx: RunContext, base_params) -> PPRMTrainer:
    """The PPRM: the frozen SFT'd model with its own LoRA adapter (and its optimizer)."""
    config, p = ctx.config, ctx.config.pprm
    adapter = lora.init(ctx.cfg, jax.random.fold_in(ctx.key, STAGE_PPRM), lora_config(config))
    pprm_config = PPRMConfig(
        learning_rate=p.learning_rate, max_grad_norm=p.max_grad_norm, weight_decay=p.weight_decay
    )
    return PPRMTrainer(ctx.cfg, base_params, adapter, pprm_config, ctx.mesh, ctx.tokenizer)


def run_pprm(
    ctx: RunContext,
    base_params,
    pairs: Pairs,
    held_out: Pairs,
    sft_state,
    results: dict,
    start_state=None,
    start_step: int = 0,
):
    """Trains the PPRM for `pprm.steps` steps, then measures its held-out pairwise accuracy.

    Returns (PPRM state, results + pprm_accuracy). Checkpoints every `checkpoint.every` steps;
    the stage's last checkpoint is written after the accuracy and holds it.
    """
    config, p = ctx.config, ctx.config.pprm
    s_steps, eval_step = config.sft.steps, config.sft.steps + 1
    trainer = pprm_trainer(ctx, base_params)
    if start_state is not None:
        trainer.state = start_state
    bar = tqdm(range(start_step, p.steps), desc="pprm", initial=start_step, total=p.steps)

    def settle(done: int, metrics: dict) -> None:
        """Host-side logs and checks of a finished step (the only place that waits for it)."""
        if done % 10 == 0 or done == p.steps:
            loss, accuracy = float(metrics["loss"]), float(metrics["accuracy"])
            ctx.metrics.scalars(
                s_steps + done,
                {
                    "pprm/loss": loss,
                    "pprm/accuracy": accuracy,
                    "pprm/grad_norm": float(metrics["grad_norm"]),
                },
            )
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{accuracy:.2f}")
        check_finite(ctx, "pprm", done, metrics, log_step=s_steps + done)

    # As in SFT: step s is settled after step s + 1 was dispatched, and before any checkpoint.
    pending = None
    for step in bar:
        metrics = trainer.train_step(pairs.batch(step, p.batch_size, (config.seed, STAGE_PPRM)))
        done = step + 1
        if pending is not None:
            settle(*pending)
        pending = (done, metrics)
        save = done < p.steps and (done % config.checkpoint.every == 0 or ctx.preemption.requested)
        if save or done == p.steps:
            settle(*pending)
            pending = None
        if save:
            save_checkpoint(
                ctx,
                eval_step + done,
                {"sft": sft_state, "pprm": trainer.state},
                {"stage": "pprm", "step": done, "results": results},
            )
            if ctx.preemption.requested:
                raise Preempted(f"SIGTERM: saved PPRM step {done}")
    bar.close()
    accuracy = pairwise_accuracy(
        trainer.params, ctx.cfg, trainer.lora, held_out, trainer.answer_tokens
    )
    results = {**results, "pprm_accuracy": accuracy, "pprm_eval_pairs": held_out.num_pairs}
    ctx.metrics.scalars(s_steps + p.steps, {"eval/pprm_accuracy": accuracy})
    save_checkpoint(
        ctx,
        eval_step + p.steps,
        {"sft": sft_state, "pprm": trainer.state},
        {"stage": "pprm", "step": p.steps, "results": results},
    )
    if ctx.preemption.requested:
        raise Preempted(f"SIGTERM: saved the finished PPRM stage (step {p.steps})")
    return trainer.state, results
