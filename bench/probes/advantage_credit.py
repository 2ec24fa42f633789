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

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import context

from o1jax.data import tasks
from o1jax.data.longcot import CONCLUSION
from o1jax.search.export import thought_text
from o1jax.train import pipeline, rl_loop, run_context


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
    params, _ = pipeline.restore_policy(run_context.open_run(args.workdir))
    setup = rl_loop.self_play_setup(ctx)
    stats = defaultdict(list)
    for it in range(args.iterations):  # the RL stage's own problems and keys
        problems, tree, exps = rl_loop.self_play(ctx, setup, params, None, it)
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
