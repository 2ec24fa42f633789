"""MCTS throughput: simulations per second for B = 1, 8, 32 trees on the tiny model, the share
of time outside `generate`, node expansions per second of one tree with V leaves per simulation
(virtual loss), and the tree operations against mctx.

    python bench/search.py [--simulations 8] [--batches 1 8 32] [--leaves 1 4 8]

Part 1 runs the real search (the sampler expands K = 2 thoughts of up to 24 tokens per leaf) on
a random tiny Gemma2 (4 layers, d_model 128) with the project's tokenizer, where B trees share
every sampler call. Part 2 isolates the tree operations: ours (select + insert/backup, a
synthetic expansion of random priors and values; `mcts.run`'s jitted calls per simulation and
`mcts.run_compiled`'s one program) against mctx's muzero_policy with a synthetic recurrent_fn of
the same cost, the same number of trees, simulations and children.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from o1jax.data import tasks
from o1jax.data.tokenizer import build_tiny_tokenizer
from o1jax.model import Gemma2Config, init_params
from o1jax.search import mcts
from o1jax.search.format import encode_prompts, make_step_format

sys.path.insert(0, "tests")


def lm_search(batch: int, simulations: int, params, cfg, tokenizer, problems, leaves: int = 1):
    search = mcts.MCTSConfig(
        num_simulations=simulations, num_children=2, max_depth=6, thought_length=24,
        leaves_per_tree=leaves,
    )  # fmt: skip
    fmt = make_step_format(tokenizer, search.max_depth)
    prompts, lengths = encode_prompts(tokenizer, [p.question for p in problems[:batch]], 48)
    expand = mcts.make_lm_expand_fn(params, cfg, prompts, lengths, fmt, search)
    mcts.run(expand, batch, search, jax.random.key(0))  # compile
    stats = mcts.SearchStats()
    expand = mcts.make_lm_expand_fn(params, cfg, prompts, lengths, fmt, search, stats=stats)
    tree = mcts.run(expand, batch, search, jax.random.key(1), stats=stats)
    return stats, tree


def our_tree_ops(batch: int, simulations: int, k: int, reps: int) -> tuple[float, float]:
    """Median seconds per search: `mcts.run` (jitted calls per simulation, as the LM search
    runs) and `mcts.run_compiled` (one program, as mctx runs)."""
    from test_mcts import synthetic_expand_fn

    config = mcts.MCTSConfig(
        num_simulations=simulations, num_children=k, max_depth=8, thought_length=6
    )
    expand = synthetic_expand_fn(config, answer_depth=99)
    times = []
    for search in (mcts.run, mcts.run_compiled):

        def once(search=search):
            tree = search(expand, batch, config, jax.random.key(0))
            jax.block_until_ready(tree.visits)

        once()
        times.append(statistics.median(_time(once) for _ in range(reps)))
    return times[0], times[1]


def mctx_tree_ops(batch: int, simulations: int, k: int, reps: int) -> float:
    import mctx

    def recurrent_fn(params, key, action, embedding):
        logits = jax.random.normal(key, (batch, k))
        value = jax.random.uniform(jax.random.fold_in(key, 1), (batch,))
        out = mctx.RecurrentFnOutput(
            reward=jnp.zeros(batch), discount=jnp.full(batch, 0.9), prior_logits=logits, value=value
        )
        return out, embedding

    root = mctx.RootFnOutput(
        prior_logits=jnp.zeros((batch, k)), value=jnp.zeros(batch), embedding=jnp.zeros(batch)
    )

    @jax.jit
    def search(key):
        return mctx.muzero_policy(None, key, root, recurrent_fn, simulations, max_depth=8)

    jax.block_until_ready(search(jax.random.key(0)))
    return statistics.median(
        _time(lambda: jax.block_until_ready(search(jax.random.key(1)).action)) for _ in range(reps)
    )


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--simulations", type=int, default=8)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--leaves", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    tokenizer = build_tiny_tokenizer()
    cfg = Gemma2Config.tiny(
        vocab_size=len(tokenizer),
        d_model=128,
        num_heads=4,
        head_dim=32,
        ffn_dim=512,
        query_pre_attn_scalar=32.0,
    )
    params = init_params(cfg, jax.random.key(0))
    task = tasks.ArithmeticTask(num_ops=(2, 3), max_operand=9, max_multiplier=3, max_value=99)
    problems = tasks.generate_problems(task, max(args.batches), 0, "test")
    print(
        f"part 1: LM search, tiny Gemma2 ({cfg.num_layers} layers, d_model {cfg.d_model}), "
        f"K=2 children of <= 24 tokens, {args.simulations} simulations, jax {jax.__version__} "
        f"({jax.default_backend()})"
    )
    print(
        f"{'B':>3} {'sims/s (all trees)':>19} {'sims/s per tree':>16} "
        f"{f'vs B={args.batches[0]}':>7} "
        f"{'outside generate':>17} {'prefill saved':>14}"
    )
    base = None
    for b in args.batches:
        stats, _ = lm_search(b, args.simulations, params, cfg, tokenizer, problems)
        per_tree = stats.simulations / stats.total_seconds
        base = base or b * per_tree  # the first B's rate over all its trees
        outside = 1 - stats.expand_seconds / stats.total_seconds
        saved = 1 - stats.prefilled_tokens / stats.prefilled_without_sharing
        print(
            f"{b:>3} {b * per_tree:>19.1f} {per_tree:>16.2f} {b * per_tree / base:>6.1f}x "
            f"{outside:>16.1%} {saved:>13.0%}"
        )
    print(
        f"\npart 1b: one tree, V nodes selected per simulation (virtual loss), all expanded in "
        f"one sampler call of 2V rows; {args.simulations} simulations"
    )
    # Every selected node gets its K thoughts sampled, as every simulation of part 1 does (the
    # random model's thoughts are mostly truncated, so its trees stay small and later
    # selections land on terminal nodes, whose thoughts are dropped).
    print(f"{'V':>3} {'nodes sampled/s':>16} {f'vs V={args.leaves[0]}':>7}")
    base = None
    for v in args.leaves:
        stats, _ = lm_search(1, args.simulations, params, cfg, tokenizer, problems, leaves=v)
        rate = stats.simulations * v / stats.total_seconds
        base = base or rate
        print(f"{v:>3} {rate:>16.1f} {rate / base:>6.1f}x")
    print(
        f"\npart 2: tree operations only, {args.simulations * 4} simulations, 2 children, "
        "synthetic expansion (median seconds per search)"
    )
    print(
        f"{'B':>3} {'o1jax run':>10} {'run_compiled':>13} {'mctx':>9} {'mctx/run':>9} "
        f"{'mctx/run_compiled':>18}"
    )
    for b in args.batches:
        ours, compiled = our_tree_ops(b, args.simulations * 4, 2, args.reps)
        theirs = mctx_tree_ops(b, args.simulations * 4, 2, args.reps)
        print(
            f"{b:>3} {ours:>10.4f} {compiled:>13.4f} {theirs:>9.4f} {theirs / ours:>8.2f}x "
            f"{theirs / compiled:>17.2f}x"
        )


if __name__ == "__main__":
    main()
