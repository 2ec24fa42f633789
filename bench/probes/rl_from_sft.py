"""RL iterations from saved SFT params, then held-out greedy before and after.

    python bench/probes/rl_from_sft.py --params /tmp/sft/step_450 --out /tmp/rl_a \
        rl.learning_rate=1e-4 rl.updates_per_iteration=8 rl.value_coef=0.0
    python bench/probes/rl_from_sft.py --workdir /tmp/sft_tiny --out /tmp/rl_b   # a train.py run

Prints the per-iteration self-play success, experiences and PPO losses, then greedy pass@1 on
200 held-out problems with and without the learned adapter.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys

import jax

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import context, load_params

from o1jax.train import evaluate as ev
from o1jax.train import pipeline

KEYS = ("rl/selfplay_success", "rl/answer_reward_mean", "rl/nodes_per_tree", "rl/experiences",
        "ppo/kl", "ppo/value_loss", "ppo/policy_loss")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--params", help="an HF directory from sft_curve.py")
    source.add_argument("--workdir", help="a train.py workdir: its SFT'd policy")
    parser.add_argument("--out", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    ctx = context(args.out, args.overrides, metrics=True)
    if args.params:
        _, params = load_params(args.params)
    else:
        params, _ = pipeline.restore_policy(pipeline.open_run(args.workdir))
    trainer, _ = pipeline.run_rl(ctx, params, 0)
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
