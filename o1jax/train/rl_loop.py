"""The RL stage (LLaMA-O1): each iteration searches a batch of training problems (self-play),
turns the trees into experiences, adds them to the prioritized replay buffer, runs PPO updates on
the RL adapter from buffer samples, and writes the new priorities back."""

from __future__ import annotations

import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from o1jax.data import answers
from o1jax.model import lora
from o1jax.rl import per
from o1jax.rl.experience import Experience, experience_width, tree_to_experiences
from o1jax.rl.ppo import PPOTrainer
from o1jax.search import mcts
from o1jax.search.format import encode_prompts, make_step_format
from o1jax.train.eval_stage import evaluate_policy
from o1jax.train.run_context import (
    STAGE_RL,
    NonFiniteLoss,
    Preempted,
    RunContext,
    lora_config,
    ppo_config,
    search_config,
)
from o1jax.train.sft import nonfinite_count


def run_rl(
    ctx: RunContext,
    base_params,
    start_iteration: int,
    rl_state=None,
    per_state=None,
    on_iteration=None,
):
    """RL iterations `start_iteration`..`rl.iterations` on the RL adapter over `base_params`.

    `rl_state` and `per_state` resume a run mid-RL (None: a fresh adapter and an empty buffer);
    `on_iteration(done, trainer, per_state)` runs after each iteration (the pipeline saves a
    checkpoint there). Returns (PPO trainer, replay buffer state).
    """
    config = ctx.config
    r = config.rl
    adapter = lora.init(ctx.cfg, jax.random.fold_in(ctx.key, STAGE_RL), lora_config(config))
    setup = self_play_setup(ctx)
    trainer = PPOTrainer(
        ctx.cfg,
        base_params,
        adapter,
        ppo_config(config),
        ctx.mesh,
        rating_tokens=(setup.fmt.positive_rating, setup.fmt.negative_rating),
    )
    if rl_state is not None:
        trainer.state = rl_state
    if per_state is None:
        per_state = per.init(r.buffer_capacity, _experience_item(setup.width), alpha=r.alpha)
    bar = tqdm(
        range(start_iteration, r.iterations), desc="rl", initial=start_iteration, total=r.iterations
    )
    for it in bar:
        if ctx.preemption.requested:  # arrived between stages: the last checkpoint holds it all
            raise Preempted(f"SIGTERM: stopped before RL iteration {it + 1}")
        key = _rl_iteration_key(ctx, it)
        t0 = time.perf_counter()
        stats = mcts.SearchStats()
        problems, tree, exps = self_play(ctx, setup, trainer.params, trainer.lora, it, stats)
        valid = np.flatnonzero(np.asarray(exps.valid))
        items = {k: np.asarray(v)[valid] for k, v in _buffer_items(exps).items()}
        per_state = _add_to_buffer(per_state, items, np.abs(items["advantage"]) + 1e-6)
        selfplay_s = time.perf_counter() - t0

        ppo_metrics, any_skipped = [], False
        # Nothing to learn from until some search has reached an outcome.
        updates = r.updates_per_iteration if int(per_state.size) > 0 else 0
        ppo_steps = int(trainer.state.step) if updates else 0  # optimizer steps so far
        for u in range(updates):
            beta = update_beta(r, ppo_steps, u)
            sample, indices, weights = per.sample(
                per_state, jax.random.fold_in(key, 1 + u), r.batch_size, beta
            )
            batch = _as_experience(sample, setup.search.thought_length)
            skipped_before = nonfinite_count(trainer.state.opt_state)
            metrics, priorities = trainer.update(batch, weights)
            metrics = jax.tree.map(float, metrics)
            # An optimizer step is skipped for a non-finite gradient, also under a finite loss.
            skipped = nonfinite_count(trainer.state.opt_state) > skipped_before
            skipped |= not np.isfinite(metrics["loss"])
            per_state = _write_priorities(per_state, indices, priorities, skipped)
            any_skipped |= skipped
            ppo_metrics.append(metrics)
        found = np.asarray(tree.is_answer & (tree.reward > 0.5)).any(axis=1).mean()
        answer_reward = np.asarray(tree.reward)[np.asarray(tree.is_answer)]
        scalars = {
            "rl/selfplay_success": float(found),
            "rl/answer_reward_mean": float(answer_reward.mean()) if answer_reward.size else 0.0,
            "rl/nodes_per_tree": float(np.asarray(tree.num_nodes).mean()),
            "rl/experiences": float(len(valid)),
            "rl/buffer_size": float(per_state.size),
            "rl/selfplay_seconds": selfplay_s,
            "rl/simulations_per_s": stats.simulations
            * len(problems)
            / max(stats.total_seconds, 1e-9),
        }
        for k in (
            "loss",
            "policy_loss",
            "value_loss",
            "kl",
            "entropy",
            "clip_fraction",
            "ratio_mean",
            "grad_norm",
        ):
            if ppo_metrics:
                scalars[f"ppo/{k}"] = float(np.mean([m[k] for m in ppo_metrics]))
        bad = nonfinite_count(trainer.state.opt_state)
        if any_skipped:
            tqdm.write(
                f"rl iteration {it + 1}: non-finite PPO loss or gradient, updates skipped "
                f"({bad} so far)",
                file=sys.stderr,
            )
            scalars["ppo/nonfinite_total"] = float(bad)
        if bad and bad >= config.max_nonfinite:  # only once some update was skipped
            raise NonFiniteLoss(
                f"rl: {bad} non-finite PPO updates (max_nonfinite={config.max_nonfinite}); "
                f"stopped at iteration {it + 1}"
            )
        every = config.eval.every
        if every and (it + 1) % every == 0 and it + 1 < r.iterations:
            # Not interruptible: this iteration is saved only after it (on_iteration below).
            periodic = evaluate_policy(
                ctx, trainer.params, trainer.lora, f"rl{it + 1}", False, interruptible=False
            )
            scalars["eval/rl_greedy_pass1"] = periodic["greedy_pass1"]
        ctx.metrics.scalars(config.sft.steps + config.pprm.steps + it + 1, scalars)
        bar.set_postfix(success=f"{found:.2f}", kl=f"{scalars.get('ppo/kl', 0.0):.4f}")
        if on_iteration is not None:
            on_iteration(it + 1, trainer, per_state)
        if ctx.preemption.requested:
            raise Preempted(f"SIGTERM: saved RL iteration {it + 1}")
    bar.close()
    return trainer, per_state


@dataclasses.dataclass(frozen=True)
class SelfPlaySetup:
    """What every RL iteration's self-play shares: the step format, the search settings, the
    prompt width and the experience width (tokens)."""

    fmt: mcts.StepFormat
    search: mcts.MCTSConfig
    prompt_width: int
    width: int


def update_beta(r, ppo_steps: int, u: int) -> float:
    """PER's importance exponent for an iteration's update `u`, annealed by the samples drawn
    before it: `ppo_steps` optimizer steps (`r.epochs` per update) of `r.batch_size` items, so
    an iteration that ran no update (an empty buffer) anneals nothing."""
    drawn = (ppo_steps // r.epochs + u) * r.batch_size
    return per.beta_schedule(drawn, r.beta0, 1.0, r.beta_steps)


def self_play_setup(ctx: RunContext) -> SelfPlaySetup:
    """The step format, search settings and token widths of this run's self-play."""
    fmt = make_step_format(ctx.tokenizer, ctx.config.search.max_depth)
    search = search_config(ctx.config)
    prompt_width = _prompt_width(ctx)
    return SelfPlaySetup(fmt, search, prompt_width, experience_width(fmt, prompt_width, search))


def _rl_iteration_key(ctx: RunContext, iteration: int) -> jax.Array:
    """RL iteration `iteration`'s key: a function of the seed and the iteration only."""
    return jax.random.fold_in(jax.random.fold_in(ctx.key, STAGE_RL), iteration)


def self_play(ctx: RunContext, setup: SelfPlaySetup, params, adapter, iteration: int, stats=None):
    """RL iteration `iteration`'s self-play: its training problems (drawn from the seed), their
    search trees (B = rl.problems_per_iteration) and the experiences built from them.

    Returns (problems, tree, experiences).
    """
    config, r = ctx.config, ctx.config.rl
    rng = np.random.default_rng([config.seed, STAGE_RL, iteration])
    picked = rng.choice(len(ctx.train), size=r.problems_per_iteration, replace=False)
    problems = [ctx.train[i] for i in picked]
    questions = [p.question for p in problems]
    prompts, plens = encode_prompts(ctx.tokenizer, questions, setup.prompt_width)
    # Under the run's mesh, the model pins the sampler's rows (and their KV cache) to the batch
    # axes: each device samples its share of the B * K rows instead of all of them.
    with jax.set_mesh(ctx.mesh):
        expand = mcts.make_lm_expand_fn(
            params, ctx.cfg, prompts, plens, setup.fmt, setup.search, lora=adapter, stats=stats
        )
        tree = mcts.run(
            expand,
            len(problems),
            setup.search,
            jax.random.fold_in(_rl_iteration_key(ctx, iteration), 0),
            reward_fn=_reward_fn(ctx.tokenizer, problems),
            stats=stats,
        )
        exps = tree_to_experiences(
            tree,
            prompts,
            plens,
            setup.fmt,
            setup.search,
            r.gamma,
            r.lam,
            setup.width,
            r.terminal_paths_only,
            r.values,
        )
    return problems, tree, exps


def _prompt_width(ctx: RunContext) -> int:
    """Token width of the self-play prompts: the longest training question, rounded up to 8."""
    _, lengths = encode_prompts(ctx.tokenizer, [p.question for p in ctx.train])
    return -(-int(jnp.max(lengths)) // 8) * 8


# Experience fields the buffer does not store: `valid` (it holds valid rows only) and the
# sampler's log-probs, which PPO never reads (an update's old log-probs are its own first
# forward's, `o1jax.rl.ppo`): [L] float32 an item, 64 of its ~1 200 four-byte values at
# configs/gemma2-2b.yaml's settings, in memory and in every mid-RL checkpoint. (A mid-RL
# checkpoint written while the buffer held them does not restore: its replay state has another
# layout, a one-line CheckpointError.)
_NOT_STORED = ("valid", "behaviour_logprobs")


def _experience_item(width: int) -> dict:
    """One replay item of zeros: the buffer's layout (`tokens` [width], the rest scalars)."""
    return {
        "tokens": np.zeros((width,), np.int32),
        "length": np.zeros((), np.int32),
        "action_start": np.zeros((), np.int32),
        "action_length": np.zeros((), np.int32),
        "advantage": np.zeros((), np.float32),
        "value_target": np.zeros((), np.float32),
        "reward": np.zeros((), np.float32),
    }


def _buffer_items(exps: Experience) -> dict:
    """The Experience fields the buffer stores, as a dict (all but `_NOT_STORED`)."""
    fields = dataclasses.fields(exps)
    return {f.name: getattr(exps, f.name) for f in fields if f.name not in _NOT_STORED}


def _as_experience(items: dict, thought_length: int) -> Experience:
    """A batch of buffer items back as an Experience whose rows are all valid. Its behaviour
    log-probs [B, thought_length], which PPO reads only the width of, are NaN: not stored."""
    rows = items["length"].shape[0]
    return Experience(
        valid=jnp.ones((rows,), bool),
        behaviour_logprobs=jnp.full((rows, thought_length), jnp.nan, jnp.float32),
        **items,
    )


def _write_priorities(state, indices, priorities, skipped: bool):
    """The batch's new priorities [B] written at `indices` [B], unless its update was `skipped`
    (a non-finite loss or gradient): its priorities may then be NaN, and `per.update` would
    store them as mass 0, dropping those items from replay for good. The buffer lives on one
    device; the priorities come back from the mesh."""
    if skipped:
        return state
    return per.update(state, indices, np.asarray(priorities))


def _add_to_buffer(state, items: dict, priorities: np.ndarray, chunk: int = 256):
    """Adds a variable number of items in fixed-size chunks (one compiled `add`). The last chunk
    is padded with copies that take no slot (`per.add`'s `count`)."""
    n = len(priorities)
    chunk = min(chunk, state.capacity)
    pad = (-n) % chunk
    idx = np.concatenate([np.arange(n), np.zeros(pad, np.int64)])
    prio = np.concatenate([priorities, np.zeros(pad, priorities.dtype)]).astype(np.float32)
    for start in range(0, n + pad, chunk):
        sel = idx[start : start + chunk]
        batch = jax.tree.map(lambda x, sel=sel: x[sel], items)
        count = np.int32(min(chunk, n - start))
        state = per.add(state, batch, prio[start : start + chunk], count)
    return state


def _reward_fn(tokenizer, problems):
    """The self-play answer check: (tree index [M], thought tokens [M, L], lengths [M]) -> 1.0
    where the thought's boxed answer equals that problem's ground truth, else 0.0 [M]."""
    from o1jax.search.export import thought_text

    def reward(tree_index, tokens, lengths):
        out = np.zeros(len(tree_index), np.float32)
        for i, (b, tok, n) in enumerate(zip(tree_index, tokens, lengths, strict=True)):
            text = thought_text(tokenizer, tok, int(n))
            answer = answers.extract_answer(text)
            out[i] = float(answer is not None and answers.is_equivalent(answer, problems[b].answer))
        return out

    return reward


def rl_structures(ctx: RunContext, base):
    """An RL trainer and an empty buffer with the shapes a checkpoint of this run holds."""
    config, r = ctx.config, ctx.config.rl
    fmt = make_step_format(ctx.tokenizer, config.search.max_depth)
    adapter = lora.init(ctx.cfg, jax.random.fold_in(ctx.key, STAGE_RL), lora_config(config))
    trainer = PPOTrainer(
        ctx.cfg,
        base,
        adapter,
        ppo_config(config),
        ctx.mesh,
        rating_tokens=(fmt.positive_rating, fmt.negative_rating),
    )
    search = search_config(config)
    width = experience_width(fmt, _prompt_width(ctx), search)
    return trainer, per.init(r.buffer_capacity, _experience_item(width), alpha=r.alpha)
