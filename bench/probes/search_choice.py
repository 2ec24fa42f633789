"""How well can a search tree's answer be chosen without the truth? Rules side by side.

    python bench/probes/search_choice.py --params /tmp/sft/step_600 --problems 96 \\
        --specs "0.7,2,16;1.0,2,16;1.0,3,16"

Each spec is temperature,K,simulations. Prints greedy pass@1, then per spec the accuracy of
each choice rule (Q-weighted vote, best Q, best min/product of ratings along the path, the
conclusion's own rating, majority) and of an oracle that sees the truth.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections import Counter, defaultdict

import jax
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import add_policy_source, context, policy_params

from o1jax.data.answers import extract_answer, is_equivalent
from o1jax.search import mcts
from o1jax.search.export import _host, thought_text
from o1jax.search.format import encode_prompts, make_step_format
from o1jax.train import evaluate as ev
from o1jax.train import run_context


def candidates(tree, b, tokenizer):
    """(answer, Q, min rating on the path, product of ratings, own rating) per answer node."""
    t = _host(tree, b)
    q = t["value_sum"] / np.maximum(t["visits"], 1)
    out = []
    for i in np.flatnonzero(t["is_answer"]):
        answer = extract_answer(thought_text(tokenizer, t["tokens"][i], t["lengths"][i]))
        if answer is None:
            continue
        ratings, j = [], i
        while j > 0:
            ratings.append(t["rating"][j])
            j = t["parent"][j]
        out.append((answer, q[i], min(ratings), float(np.prod(ratings)), t["rating"][i]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_policy_source(parser)
    parser.add_argument("--problems", type=int, default=96)
    parser.add_argument("--specs", default="0.7,2,16")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    ctx = context("/tmp/o1jax_probe_search", args.overrides)
    params = policy_params(args)
    problems = ctx.test[: args.problems]
    greedy = ev.evaluate(params, ctx.cfg, ctx.tokenizer, problems, key=jax.random.key(0),
                         max_new_tokens=160, batch_size=32, progress=None)  # fmt: skip
    print(f"greedy pass@1 {greedy.pass1:.3f}", flush=True)
    _, lengths = encode_prompts(ctx.tokenizer, [p.question for p in problems])
    width = int(lengths.max())
    for spec in args.specs.split(";"):
        temperature, k, sims = spec.split(",")
        search = dataclasses.replace(
            run_context.search_config(ctx.config, int(sims)),
            temperature=float(temperature),
            num_children=int(k),
        )
        fmt = make_step_format(ctx.tokenizer, search.max_depth)
        right, start = defaultdict(float), time.time()
        for s in range(0, len(problems), 32):
            chunk = problems[s : s + 32]
            prompts, plens = encode_prompts(ctx.tokenizer, [p.question for p in chunk], width)
            expand = mcts.make_lm_expand_fn(params, ctx.cfg, prompts, plens, fmt, search)
            tree = mcts.run(expand, len(chunk), search, jax.random.key(1 + s))
            for b, p in enumerate(chunk):
                cands = candidates(tree, b, ctx.tokenizer)
                if not cands:
                    continue
                ok = lambda a, truth=p.answer: is_equivalent(a, truth)

                def best(i, c=cands):
                    return max(c, key=lambda cand: cand[i])[0]

                def vote(i, c=cands):
                    scores = defaultdict(float)
                    for x in c:
                        scores[x[0]] += x[i]
                    return max(scores, key=scores.get)

                right["vote by Q"] += ok(vote(1))
                right["best Q"] += ok(best(1))
                right["best path-min rating"] += ok(best(2))
                right["vote by path-min"] += ok(vote(2))
                right["best path-product"] += ok(best(3))
                right["best own rating"] += ok(best(4))
                right["majority"] += ok(Counter(x[0] for x in cands).most_common(1)[0][0])
                right["oracle (any right)"] += any(ok(x[0]) for x in cands)
        scores = {k: round(v / len(problems), 3) for k, v in right.items()}
        print(f"T={temperature} K={k} sims={sims} ({time.time() - start:.0f} s): {scores}",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
