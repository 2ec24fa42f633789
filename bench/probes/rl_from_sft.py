"""RL iterations from saved SFT params, then held-out greedy before and after.

    python bench/probes/rl_from_sft.py --params /tmp/sft/step_450 --out /tmp/rl_a \\
        rl.learning_rate=1e-4 rl.updates_per_iteration=8 rl.value_coef=0.0
    python bench/probes/rl_from_sft.py --workdir /tmp/sft_tiny --out /tmp/rl_b   # a train.py run

Prints the per-iteration self-play success, experiences and PPO losses, then greedy pass@1 on
200 held-out problems with and without the learned adapter.

--strict-steps: a right answer earns its reward in the experiences only if every `a op b = c`
step on its path is right too (the search itself still backs up the plain answer check).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys

import jax
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import add_policy_source, context, policy_params

from o1jax.data import tasks
from o1jax.search.export import thought_text
from o1jax.train import evaluate as ev
from o1jax.train import rl_loop

KEYS = ("rl/selfplay_success", "rl/answer_reward_mean", "rl/nodes_per_tree", "rl/experiences",
        "ppo/kl", "ppo/value_loss", "ppo/policy_loss")  # fmt: skip


def strict_experiences(tokenizer, make_experiences):
    """`tree_to_experiences` whose trees first lose the reward of right answers reached
    through a wrong arithmetic step."""

    def wrapped(tree, *args, **kwargs):
        reward = np.array(tree.reward)
        parent, tokens, lengths = map(np.asarray, (tree.parent, tree.tokens, tree.lengths))
        for b, node in zip(*np.nonzero(np.asarray(tree.is_answer) & (reward > 0.5)), strict=True):
            path, at = [], int(parent[b, node])
            while at > 0:
                path.append(thought_text(tokenizer, tokens[b, at], int(lengths[b, at])))
                at = int(parent[b, at])
            if any(tasks.arithmetic_step_is_right(text) is False for text in path):
                reward[b, node] = 0.0
        return make_experiences(tree.replace(reward=jax.numpy.asarray(reward)), *args, **kwargs)

    return wrapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_policy_source(parser)
    parser.add_argument("--out", required=True)
    parser.add_argument("--strict-steps", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    ctx = context(args.out, args.overrides, metrics=True)
    params = policy_params(args)
    if args.strict_steps:
        rl_loop.tree_to_experiences = strict_experiences(ctx.tokenizer, rl_loop.tree_to_experiences)
    trainer, _ = rl_loop.run_rl(ctx, params, 0)
    ctx.metrics.close()
    for line in open(f"{args.out}/metrics.jsonl"):
        record = json.loads(line)
        print({k: round(v, 3) for k, v in record.items() if k in KEYS})
    for tag, adapter in (("after SFT", None), ("after RL", trainer.lora)):
        result = ev.evaluate(
            params, ctx.cfg, ctx.tokenizer, ctx.test[:200], key=jax.random.key(7),
            max_new_tokens=160, batch_size=32, lora=adapter, progress=None,
        )  # fmt: skip
        print(f"greedy pass@1 {tag}: {result.pass1:.3f}", flush=True)


if __name__ == "__main__":
    main()
