"""`refine_evaluate` (MCTSr / SR-MCTS accuracy): its `before_batch` hook stops the work between
batches, as the step-level evaluations' does on SIGTERM."""

import jax
import numpy as np
import pytest

from o1jax.data.tasks import Problem
from o1jax.data.tokenizer import build_tiny_tokenizer
from o1jax.search import refine
from o1jax.train import evaluate as ev


class _Result:
    """What `refine_evaluate` reads of a `refine.run` result: every problem answered "7"."""

    def __init__(self, batch):
        self.answers = [["7"] for _ in range(batch)]
        self.truncated_children = np.zeros(batch, int)

    def answer(self, b):
        return self.answers[b][0]

    def best_node(self, b):
        return 0


class _Stop(Exception):
    pass


@pytest.mark.parametrize("stop_after", [1, None])
def test_before_batch_stops_the_refine_evaluation_before_the_next_batch(monkeypatch, stop_after):
    searched = []  # the questions of each batch that was searched

    def run(params, cfg, tokenizer, questions, *args, **kwargs):
        searched.append(list(questions))  # [batch_size]
        return _Result(len(questions))

    def before_batch():
        if stop_after is not None and len(searched) >= stop_after:
            raise _Stop

    monkeypatch.setattr(refine, "run", run)
    problems = [Problem(f"p{i}", f"Start with {i}, add 7.", str(i + 7)) for i in range(4)]
    search = refine.RefineConfig(rollouts=1)
    evaluate = lambda: ev.refine_evaluate(
        None, None, build_tiny_tokenizer(), problems, search, key=jax.random.key(0), batch_size=2,
        progress=None, before_batch=before_batch,
    )  # fmt: skip
    if stop_after is None:
        result = evaluate()
        assert len(searched) == 2 and result.num_problems == 4 and result.pass1 == 0.25
    else:
        with pytest.raises(_Stop):
            evaluate()
        assert searched == [[p.question for p in problems[:2]]]
