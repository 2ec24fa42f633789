"""SR-MCTS against greedy and MCTSr on a trained workdir, with a PPRM trained here on task pairs,
on pairs mined from the policy's own samples, or on both.

python bench/probes/sr_mcts.py --workdir /tmp/sft_tiny --pairs policy --steps 400 --problems 64
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from o1jax.model import lora
from o1jax.search import refine
from o1jax.train import evaluate as ev
from o1jax.train import pprm, pprm_mining
from o1jax.train.pipeline import restore_policy
from o1jax.train.run_context import open_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--pairs", choices=["task", "policy", "both"], default="policy")
    parser.add_argument("--mine-problems", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--rollouts", type=int, default=8)
    parser.add_argument("--ebc-weight", type=float, default=0.5)
    parser.add_argument("--max-children", type=int, default=2)
    parser.add_argument("--mctsr", action="store_true", help="also run MCTSr (self-reward)")
    args = parser.parse_args()

    ctx = open_run(args.workdir)
    params, adapter = restore_policy(ctx)
    tok, cfg = ctx.tokenizer, ctx.cfg
    start = time.time()
    train_triples, test_triples, task = [], [], None
    if args.pairs in ("policy", "both"):
        mine = lambda problems, seed: pprm_mining.policy_triples(
            params, cfg, tok, problems, key=jax.random.key(seed), samples=args.samples,
            lora=adapter, seed=seed, progress=None,
        )  # fmt: skip
        train_triples += mine(ctx.train[: args.mine_problems], 1)
        test_triples += mine(ctx.test[: args.problems * 2][args.problems :], 2)
    if args.pairs in ("task", "both"):
        rng = np.random.default_rng(0)
        task = pprm.task_pairs(tok, ctx.train[: args.mine_problems], rng)
    print(f"mined {len(train_triples)} policy pairs ({time.time() - start:.0f} s)", flush=True)
    mined = pprm.encode_pairs(tok, train_triples) if train_triples else None
    train = training_pairs(args.pairs, mined, task, tok.pad_token_id or 0)
    held_policy = pprm.encode_pairs(tok, test_triples) if test_triples else None
    held_task = pprm.task_pairs(tok, ctx.test[:200], np.random.default_rng(1))

    pprm_adapter = lora.init(cfg, jax.random.key(9), lora.LoRAConfig(args.rank, 2.0 * args.rank))
    trainer = pprm.PPRMTrainer(
        cfg, params, pprm_adapter, pprm.PPRMConfig(learning_rate=args.learning_rate), ctx.mesh, tok
    )
    start = time.time()
    for step in range(args.steps):
        metrics = trainer.train_step(train.batch(step, 32, 0))
        if (step + 1) % 100 == 0:
            print(f"step {step + 1}: train loss {float(metrics['loss']):.3f}, batch accuracy "
                  f"{float(metrics['accuracy']):.3f}", flush=True)  # fmt: skip
    acc = lambda pairs: pprm.pairwise_accuracy(
        params, cfg, trainer.lora, pairs, trainer.answer_tokens
    )
    print(
        f"PPRM {args.steps} steps ({time.time() - start:.0f} s): held-out accuracy on task pairs "
        f"{acc(held_task):.3f}"
        + (f", on policy pairs {acc(held_policy):.3f}" if held_policy else ""),
        flush=True,
    )

    problems = ctx.test[: args.problems]
    key = jax.random.key(0)
    greedy = ev.evaluate(params, cfg, tok, problems, key=key, max_new_tokens=160, lora=adapter,
                         progress=None)  # fmt: skip
    print(f"greedy pass@1 {greedy.pass1:.3f}", flush=True)
    judge = refine.PPRMJudge(params, cfg, trainer.lora, tok)
    values = ["pprm", "self_reward"] if args.mctsr else ["pprm"]
    for value in values:
        config = refine.RefineConfig(
            rollouts=args.rollouts,
            value=value,
            ebc_weight=args.ebc_weight,
            max_children=args.max_children,
        )
        start = time.time()
        found = ev.refine_evaluate(params, cfg, tok, problems, config, key=key, lora=adapter,
                                   judge=judge, progress=None)  # fmt: skip
        oracle = np.mean([r["any_correct"] for r in found.records])
        print(f"{value}: accuracy {found.pass1:.3f}, any node right {oracle:.3f} "
              f"({time.time() - start:.0f} s)", flush=True)  # fmt: skip


def training_pairs(kind: str, mined, task, pad: int) -> pprm.Pairs:
    """The PPRM's training pairs for `--pairs kind`: the mined policy pairs (None when no
    problem gave a right and a wrong sample, as from a weak policy), the task pairs, or both
    (the task pairs alone when none were mined)."""
    if kind == "task" or (kind == "both" and mined is None):
        return task
    if mined is None:
        raise SystemExit(
            "sr_mcts: --pairs policy mined no pair (no problem had both a right and a wrong "
            "sample); raise --mine-problems or --samples, or use --pairs task or both"
        )
    return mined if kind == "policy" else _concat(mined, task, pad)


def _concat(a: pprm.Pairs, b: pprm.Pairs, pad: int) -> pprm.Pairs:
    width = max(a.tokens.shape[1], b.tokens.shape[1])
    widen = lambda t: np.pad(t, ((0, 0), (0, width - t.shape[1])), constant_values=pad)
    return pprm.Pairs(
        np.concatenate([widen(a.tokens), widen(b.tokens)]),
        np.concatenate([a.lengths, b.lengths]),
        np.concatenate([a.first_better, b.first_better]),
    )


if __name__ == "__main__":
    main()
