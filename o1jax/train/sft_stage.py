"""The SFT stage: the run's training examples, the SFT loop with its checkpoints, and the SFT'd
policy as plain params."""

from __future__ import annotations

import time
import warnings

import jax
import numpy as np
from tqdm.auto import tqdm

from o1jax.data import longcot, tasks
from o1jax.model import lora
from o1jax.search.format import encode_chain
from o1jax.train.config import (
    ConfigError,
    RunConfig,
)
from o1jax.train.run_context import (
    STAGE_SFT,
    Preempted,
    RunContext,
    check_finite,
    lora_config,
    save_checkpoint,
)
from o1jax.train.sft import Example, SFTConfig, SFTTrainer, pack, trained_params


def sft_examples(config: RunConfig, tokenizer, problems, held_out=()) -> list[Example]:
    """Correct chains, journeys with a fixed mistake (a `journey_fraction` of them), and extra
    wrong chains trained on their ratings only (`flawed_fraction`), which teach the rating
    tokens, the search's value function, to reject a wrong path. With `data.sft_trees`, also
    the right paths of those OpenLongCoT trees (search trees fed back as SFT data), except the
    trees of `held_out` questions (the run's held-out problems: `evaluate --trees` searches
    those by default, and training on them would leak the test set). A right path that repeats
    one read before (the same question, thoughts and ratings) is read once: MCTSr's and SR-MCTS's
    trees of a problem (`evaluate --search mctsr,sr-mcts --trees DIR`) share their root."""
    rng = np.random.default_rng([config.seed, STAGE_SFT])
    task = config.data.task
    out, too_long = [], []  # too_long: the token count of each example left out

    def add(question, thoughts, ratings, train_thoughts=True):
        ids, mask = encode_chain(tokenizer, question, thoughts, ratings, train_thoughts)
        if len(ids) <= config.sft.seq_len:
            out.append(Example(ids, mask))
        else:
            too_long.append(len(ids))

    for p in problems:
        if not p.steps:
            continue
        # A journey flaws a step's result; a problem with no '... = N' step keeps its chain.
        if rng.random() < task.journey_fraction and tasks.can_flaw(p):
            nodes = tasks.journey_solution(p, rng)[1:]
            add(p.question, [n.text for n in nodes], [n.rating for n in nodes])
        else:
            add(p.question, list(p.steps), None)
        if rng.random() < task.flawed_fraction:
            flawed = tasks.flawed_chain(p, rng)
            if flawed is not None:
                add(p.question, *flawed, train_thoughts=False)
    if config.data.sft_trees:
        skip, seen = {tasks.question_key(q) for q in held_out}, set()
        try:
            trees = tasks.load_trees(config.data.sft_trees)
        except tasks.DataError as e:
            raise tasks.DataError(f"data.sft_trees: {e}") from None
        for nodes in trees:
            if tasks.question_key(nodes[0].thought) in skip:
                continue
            for path in longcot.right_paths(nodes):
                chain = (nodes[0].thought, *((n.text, n.rating) for n in path[1:]))
                if chain not in seen:
                    seen.add(chain)
                    add(chain[0], [n.text for n in path[1:]], [n.rating for n in path[1:]])
    if too_long and out:
        warnings.warn(
            f"sft: {len(too_long)} of {len(out) + len(too_long)} training examples are longer "
            f"than sft.seq_len {config.sft.seq_len} tokens (the longest {max(too_long)}) and "
            "are left out; raise sft.seq_len to train on them",
            tasks.DataWarning,
            stacklevel=2,
        )
    if not out:
        source = f"data.path {config.data.path}" if config.data.path else "the built-in task"
        worked = sum(1 for p in problems if p.steps)
        raise ConfigError(
            f"sft: no training example: {worked} of the {len(problems)} train problems of "
            f"{source} have a worked solution, and none of those fits sft.seq_len "
            f"{config.sft.seq_len}"
            if worked
            else f"sft: no training example: none of the {len(problems)} train problems of "
            f"{source} has a worked solution (GSM8K's steps before '####', or MATH's "
            "'solution'), and data.sft_trees gives none"
        )
    return out


def trainer_config(config: RunConfig) -> SFTConfig:
    """The `SFTTrainer` settings of the run's `sft` section."""
    s = config.sft
    return SFTConfig(
        steps=s.steps,
        batch_size=s.batch_size,
        seq_len=s.seq_len,
        learning_rate=s.learning_rate,
        warmup_steps=s.warmup_steps,
        weight_decay=s.weight_decay,
        max_grad_norm=s.max_grad_norm,
        loss_chunk=s.loss_chunk,
        micro_batch_size=s.micro_batch_size,
    )


def run_sft(ctx: RunContext, start_state=None, start_step: int = 0, examples=None):
    """SFT steps `start_step`..`sft.steps` from `start_state` (None: a fresh adapter, or the full
    params with `sft.full_finetune`), on `examples` (None: `sft_examples` of the train problems).
    Checkpoints every `checkpoint.every` steps, at the end and on SIGTERM (then raises
    Preempted). Returns the trainer."""
    config = ctx.config
    s = config.sft
    sft_config = trainer_config(config)
    adapter = None
    if not s.full_finetune:
        adapter = lora.init(ctx.cfg, jax.random.fold_in(ctx.key, STAGE_SFT), lora_config(config))
    trainer = SFTTrainer(ctx.cfg, ctx.params, sft_config, ctx.mesh, lora=adapter)
    if start_state is not None:
        trainer.state = start_state
    if s.steps == 0:  # nothing to train: the fresh adapter (B = 0) or the params as loaded
        return trainer
    if examples is None:
        examples = sft_examples(config, ctx.tokenizer, ctx.train, [p.question for p in ctx.test])
    packed = pack(
        examples,
        s.seq_len,
        pad_id=ctx.tokenizer.pad_token_id or 0,
    )
    bar = tqdm(range(start_step, s.steps), desc="sft", initial=start_step, total=s.steps)
    t0, tokens_seen = time.perf_counter(), 0

    def settle(done: int, metrics: dict) -> None:
        """Host-side logs and checks of a finished step (the only place that waits for it)."""
        if done % 10 == 0 or done == s.steps:
            loss = float(metrics["loss"])
            rate = tokens_seen / (time.perf_counter() - t0)
            ctx.metrics.scalars(
                done,
                {
                    "sft/loss": loss,
                    "sft/tokens_per_s": rate,
                    "sft/grad_norm": float(metrics["grad_norm"]),
                },
            )
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}")
        check_finite(ctx, "sft", done, metrics, log_step=done)

    # Step s is settled after step s + 1 was dispatched, so the host prepares the next batch
    # while the device computes; a checkpoint settles its own step first, so nothing logged
    # can be lost by a kill.
    pending = None
    for step in bar:
        batch = packed.batch(step, s.batch_size, config.seed)
        metrics = trainer.train_step(batch)
        tokens_seen += int((batch["segment_ids"] > 0).sum())
        done = step + 1
        if pending is not None:
            settle(*pending)
        pending = (done, metrics)
        if done % config.checkpoint.every == 0 or done == s.steps or ctx.preemption.requested:
            settle(*pending)
            pending = None
            save_checkpoint(ctx, done, {"sft": trainer.state}, {"stage": "sft", "step": done})
            if ctx.preemption.requested:
                raise Preempted(f"SIGTERM: saved SFT step {done}")
    bar.close()
    return trainer


def policy_params(ctx: RunContext, sft_state):
    """The SFT'd model as a plain params pytree (an SFT adapter is merged into the base)."""
    if ctx.config.sft.full_finetune:  # a float32 master copy goes back to the base's dtype
        return trained_params(sft_state.trainable, ctx.params)
    return lora.merge(ctx.params, sft_state.trainable)
