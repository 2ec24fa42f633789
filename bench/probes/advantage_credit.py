"""Which thoughts PPO's advantages credit: gold steps, wrong arithmetic, right or wrong answers.

Runs the default's self-play search (the RL stage's first iterations) with a run's SFT policy,
turns the trees into experiences as `run_rl` does, and sorts every experience's thought by
what it is against the problem's worked solution:

    python bench/probes/advantage_credit.py --workdir /tmp/seed2 --iterations 2 seed=2

Prints, per kind of thought, how many there are, their mean raw advantage, the share with a
positive one, and their share of all positive advantage mass.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict

import jax
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import context

from o1jax.data import tasks
from o1jax.data.longcot import CONCLUSION
from o1jax.rl.experience import experience_width, tree_to_experiences
from o1jax.search import mcts
from o1jax.search.export import thought_text
from o1jax.search.format import encode_prompts, make_step_format
from o1jax.train import pipeline
from o1jax.train.pipeline import STAGE_RL


def kind(text: str, depth: int, problem, reward: float) -> str:
    """What a thought at `depth` (1-based) is, judged against the problem's worked steps."""
    steps = problem.steps
    if text.startswith(CONCLUSION):
        return "conclusion, right" if reward > 0.5 else "conclusion, wrong"
    if depth <= len(steps) and text == steps[depth - 1]:
        return "the worked step"
    right = tasks.arithmetic_step_is_right(text)
    if right is None:
        return "other"
    return "right arithmetic, off the worked path" if right else "wrong arithmetic"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a train.py workdir: its SFT'd policy")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--out", default="/tmp/advantage_credit")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    ctx = context(args.out, args.overrides)
    params, _ = pipeline.restore_policy(pipeline.open_run(args.workdir))
    config, r = ctx.config, ctx.config.rl
    fmt = make_step_format(ctx.tokenizer, config.search.max_depth)
    search = pipeline.search_config(config)
    prompt_width = pipeline._prompt_width(ctx)
    width = experience_width(fmt, prompt_width, search)
    stats = defaultdict(list)
    for it in range(args.iterations):  # the RL stage's own problems and keys
        key = jax.random.fold_in(jax.random.fold_in(ctx.key, STAGE_RL), it)
        rng = np.random.default_rng([config.seed, STAGE_RL, it])
        picked = rng.choice(len(ctx.train), size=r.problems_per_iteration, replace=False)
        problems = [ctx.train[i] for i in picked]
        prompts, plens = encode_prompts(ctx.tokenizer, [p.question for p in problems], prompt_width)
        expand = mcts.make_lm_expand_fn(params, ctx.cfg, prompts, plens, fmt, search)
        tree = mcts.run(
            expand, len(problems), search, jax.random.fold_in(key, 0),
            reward_fn=pipeline._reward_fn(ctx.tokenizer, problems),
        )  # fmt: skip
        exps = tree_to_experiences(
            tree, prompts, plens, fmt, search, r.gamma, r.lam, width, r.terminal_paths_only,
            r.values,
        )  # fmt: skip
        n = tree.capacity - 1
        valid, adv = np.asarray(exps.valid), np.asarray(exps.advantage)
        tokens, depth = np.asarray(tree.tokens), np.asarray(tree.depth)
        lengths, rewards = np.asarray(tree.lengths), np.asarray(tree.reward)
        for row in np.flatnonzero(valid):
            b, node = divmod(int(row), n)
            node += 1
            text = thought_text(ctx.tokenizer, tokens[b, node], int(lengths[b, node]))
            what = kind(text, int(depth[b, node]), problems[b], float(rewards[b, node]))
            stats[what].append(adv[row])
    total_positive = sum(np.clip(v, 0, None).sum() for v in stats.values())
    print(f"{'thought':<40} {'count':>6} {'mean adv':>9} {'adv > 0':>8} {'of + mass':>10}")
    for name, values in sorted(stats.items()):
        v = np.asarray(values)
        print(
            f"{name:<40} {v.size:>6} {v.mean():>9.3f} {np.mean(v > 0):>8.2f} "
            f"{np.clip(v, 0, None).sum() / max(total_positive, 1e-9):>10.2f}"
        )


if __name__ == "__main__":
    main()
