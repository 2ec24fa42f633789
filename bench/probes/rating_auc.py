"""How well do an SFT'd model's own rating tokens tell right steps from wrong ones?

    python bench/probes/rating_auc.py --workdir /tmp/sft_tiny    # a train.py run (its SFT model)

The rating of a step is P(<positive_rating>) / (P(<positive_rating>) + P(<negative_rating>))
read after its <start_of_rating>, in one forward over the rendered chain (as search reads it).
Prints, on the run's held-out problems:

1. controlled flaws: AUC of the rating of a correct step against the same step with its result
   moved by 1, by 2, or by 3..5 (the chain cut right after it);
2. on-policy: AUC over the arithmetic steps of the run's own greedy outputs (`eval_sft.jsonl`),
   right steps against wrong ones, labelled by redoing the arithmetic;
3. task pairs (a correct chain against `tasks.flawed_chain`, as the PPRM is trained and scored):
   how often the correct chain has the higher min / mean / conclusion rating.
"""

from __future__ import annotations

import argparse
import json
import os
import re

import numpy as np

from o1jax.data import tasks
from o1jax.search.ratings import thought_ratings
from o1jax.train import pipeline, run_context

# The task's own parsing of an arithmetic step (tasks.flawed_chain uses it too).
STEP = tasks._ARITH_STEP_RE


def auc(positives, negatives) -> float:
    """P(a random positive scores above a random negative), ties counted half."""
    pos, neg = np.asarray(positives)[:, None], np.asarray(negatives)[None, :]
    return float(np.mean(pos > neg) + 0.5 * np.mean(pos == neg))


class Rater:
    def __init__(self, workdir: str):
        self.ctx = run_context.open_run(workdir)
        self.params, _ = pipeline.restore_policy(self.ctx)

    def ratings(self, solutions: list[tuple[str, list[str]]]) -> list[np.ndarray]:
        """Per (question, thoughts) solution, the rating of each thought."""
        return thought_ratings(self.params, self.ctx.cfg, self.ctx.tokenizer, solutions)


def controlled(rater: Rater, problems, sizes: tuple[int, ...], rng) -> float:
    texts, index = [], []
    for p in problems:
        steps = list(p.steps)
        k = int(rng.integers(len(steps) - 1))
        a, op, b, c = STEP.match(steps[k]).groups()
        delta = int(rng.choice(sizes)) * (1 if int(c) < 5 or rng.random() < 0.5 else -1)
        flawed = [*steps[:k], f"<expansion>{a} {op} {b} = {int(c) + delta}"]
        texts += [(p.question, steps[: k + 1]), (p.question, flawed)]
        index.append(k)
    r = rater.ratings(texts)
    right = [r[2 * i][k] for i, k in enumerate(index)]
    wrong = [r[2 * i + 1][k] for i, k in enumerate(index)]
    return auc(right, wrong)


def on_policy(rater: Rater, workdir: str, problems) -> tuple[float, int, int]:
    by_id = {p.id: p for p in problems}
    texts, labels = [], []
    for line in open(os.path.join(workdir, "eval_sft.jsonl")):
        row = json.loads(line)
        if row["id"] not in by_id:
            continue
        thoughts = re.findall(r"<start_of_thought>(.*?)<end_of_thought>", row["output"])
        texts.append((by_id[row["id"]].question, thoughts))
        labels.append([tasks.arithmetic_step_is_right(t) for t in thoughts])
    right, wrong = [], []
    for r, steps in zip(rater.ratings(texts), labels, strict=True):
        for value, ok in zip(r, steps, strict=False):
            if ok is not None:
                (right if ok else wrong).append(value)
    return auc(right, wrong), len(right), len(wrong)


def task_pairs(rater: Rater, problems, rng) -> dict[str, float]:
    texts = []
    for p in problems:
        flawed = tasks.flawed_chain(p, rng)
        if flawed is not None:
            texts += [(p.question, list(p.steps)), (p.question, flawed[0])]
    r = rater.ratings(texts)
    rules = {"min": np.min, "mean": np.mean, "conclusion": lambda x: x[-1]}
    out = {}
    for name, rule in rules.items():
        right = np.asarray([rule(x) for x in r[0::2]])
        wrong = np.asarray([rule(x) for x in r[1::2]])
        out[name] = float(np.mean((right > wrong) + 0.5 * (right == wrong)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a train.py workdir with an SFT model")
    parser.add_argument("--problems", type=int, default=200)
    args = parser.parse_args()
    rater = Rater(args.workdir)
    test = rater.ctx.test[: args.problems]
    for sizes in ((1,), (2,), (3, 4, 5)):
        value = controlled(rater, test, sizes, np.random.default_rng(0))
        print(f"controlled flaw of {sizes}: AUC {value:.3f}")
    value, n_right, n_wrong = on_policy(rater, args.workdir, test)
    print(f"on-policy greedy steps ({n_right} right, {n_wrong} wrong): AUC {value:.3f}")
    accuracy = task_pairs(rater, test, np.random.default_rng(1))
    print("task pairs, correct chain rated higher by " + ", ".join(
        f"{name} {value:.3f}" for name, value in accuracy.items()))  # fmt: skip


if __name__ == "__main__":
    main()
