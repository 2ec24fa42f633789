"""Evaluation on a problem set: greedy pass@1, sampled pass@k and maj@k, and search accuracy.

Free-running generation starts from the problem's root node and lets the model write the whole
chain (headers, thoughts, ratings) until EOS; the answer is taken from its `<conclusion>`
thought only. Search accuracy runs MCTS with no access to the ground truth (terminal values are
the model's own ratings) and picks the answer by value-weighted vote over its answer nodes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from o1jax.data import longcot
from o1jax.data.answers import extract_answer, is_equivalent, vote
from o1jax.model.sampler import generate
from o1jax.search import mcts, refine
from o1jax.search.export import choose_answer, tree_to_json, tree_to_longcot
from o1jax.search.format import encode_prompts, make_step_format


@dataclass
class EvalResult:
    pass1: float
    num_problems: int
    pass_k: float | None = None
    maj_k: float | None = None
    k: int = 1
    records: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        out = {"pass1": self.pass1, "num_problems": self.num_problems}
        if self.k > 1:
            out |= {f"pass@{self.k}": self.pass_k, f"maj@{self.k}": self.maj_k}
        return out


def _batches(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield i, items[i : i + size]


def _prompt_batches(tokenizer, problems, batch_size: int):
    """(start, chunk, questions [batch_size], prompts [batch_size, P], lengths [batch_size]):
    every batch padded to `batch_size` rows (repeating its first problem) and to the widest
    prompt of the whole set, so one compiled search serves them all."""
    _, lengths = encode_prompts(tokenizer, [p.question for p in problems])
    width = int(jnp.max(lengths))
    for start, chunk in _batches(list(problems), batch_size):
        questions = [p.question for p in chunk] + [chunk[0].question] * (batch_size - len(chunk))
        prompts, plens = encode_prompts(tokenizer, questions, width)
        yield start, chunk, questions, prompts, plens


def generate_texts(
    params,
    cfg,
    tokenizer,
    questions: Sequence[str],
    *,
    key,
    max_new_tokens: int,
    temperature: float = 0.0,
    num_samples: int = 1,
    batch_size: int = 32,
    lora=None,
    progress: str | None = None,
    stop_tokens: Sequence[int] | None = None,
    before_batch: Callable[[], None] | None = None,
) -> list[list[str]]:
    """`num_samples` free-running completions per question (decoded, special tokens kept).

    Every batch is padded to `batch_size` rows and a common prompt width, so one compiled
    program serves the whole evaluation. stop_tokens: the ids that end a completion; None: the
    tokenizer's EOS. before_batch: called before each batch (it may raise to stop the work, as
    a run does on SIGTERM).
    """
    _, lengths = encode_prompts(tokenizer, questions)
    width = int(jnp.max(lengths))
    if stop_tokens is None:
        eos = tokenizer.eos_token_id
        stop_tokens = (eos,) if eos is not None else ()
    outputs: list[list[str]] = []
    bar = tqdm(total=len(questions), desc=progress, disable=progress is None, leave=False)
    for start, chunk in _batches(list(questions), batch_size):
        if before_batch is not None:
            before_batch()
        padded = list(chunk) + [chunk[0]] * (batch_size - len(chunk))
        prompts, plens = encode_prompts(tokenizer, padded, width)
        out = generate(
            params,
            cfg,
            prompts,
            plens,
            key=jax.random.fold_in(key, start),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            stop_tokens=tuple(stop_tokens),
            num_samples=num_samples,
            lora=lora,
        )
        tokens, out_len = np.asarray(out.tokens), np.asarray(out.lengths)
        for row in range(len(chunk)):
            texts = []
            for j in range(num_samples):
                r = row * num_samples + j
                texts.append(
                    tokenizer.decode(tokens[r, : out_len[r]].tolist(), skip_special_tokens=False)
                )
            outputs.append(texts)
        bar.update(len(chunk))
    bar.close()
    return outputs


def evaluate(
    params,
    cfg,
    tokenizer,
    problems,
    *,
    key,
    max_new_tokens: int,
    samples: int = 1,
    batch_size: int = 32,
    lora=None,
    progress: str | None = "eval",
    stop_tokens: Sequence[int] | None = None,
    before_batch: Callable[[], None] | None = None,
) -> EvalResult:
    """Greedy pass@1, and with samples > 1 also pass@k and maj@k at temperature 1.

    stop_tokens: the ids that end a completion (`generate_texts`); None: the tokenizer's EOS.
    before_batch: called before each batch (`generate_texts`).
    """
    questions = [p.question for p in problems]
    greedy = generate_texts(
        params,
        cfg,
        tokenizer,
        questions,
        key=key,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        lora=lora,
        progress=progress,
        stop_tokens=stop_tokens,
        before_batch=before_batch,
    )
    sampled = None
    if samples > 1:
        sampled = generate_texts(
            params,
            cfg,
            tokenizer,
            questions,
            key=jax.random.fold_in(key, 1),
            max_new_tokens=max_new_tokens,
            temperature=1.0,
            num_samples=samples,
            batch_size=max(batch_size // samples, 1),
            lora=lora,
            progress=progress,
            stop_tokens=stop_tokens,
            before_batch=before_batch,
        )
    records = []
    n_greedy = n_pass = n_maj = 0
    for i, problem in enumerate(problems):
        answer = extract_answer(greedy[i][0])
        correct = answer is not None and is_equivalent(answer, problem.answer)
        n_greedy += correct
        record = {
            "id": problem.id,
            "question": problem.question,
            "truth": problem.answer,
            "output": greedy[i][0],
            "answer": answer,
            "correct": bool(correct),
        }
        if sampled is not None:
            answers = [extract_answer(t) for t in sampled[i]]
            verdicts = [a is not None and is_equivalent(a, problem.answer) for a in answers]
            majority = vote(answers)
            maj_ok = majority is not None and is_equivalent(majority, problem.answer)
            n_pass += any(verdicts)
            n_maj += maj_ok
            record |= {
                "samples": answers,
                "pass_k": any(verdicts),
                "maj_answer": majority,
                "maj_k": bool(maj_ok),
            }
        records.append(record)
    n = max(len(problems), 1)
    return EvalResult(
        pass1=n_greedy / n,
        num_problems=len(problems),
        k=samples,
        records=records,
        pass_k=n_pass / n if sampled else None,
        maj_k=n_maj / n if sampled else None,
    )


def search_evaluate(
    params,
    cfg,
    tokenizer,
    problems,
    search: mcts.MCTSConfig,
    *,
    key,
    batch_size: int = 32,
    lora=None,
    progress: str | None = "search",
    stats: mcts.SearchStats | None = None,
    tree_dir: str | None = None,
    max_trees: int | None = None,
    before_batch: Callable[[], None] | None = None,
) -> EvalResult:
    """MCTS accuracy without the ground truth: answers chosen by value-weighted vote.
    before_batch: called before each batch of searches (it may raise to stop the work).

    tree_dir: also write each problem's tree as `tree_dir/<id>.json` (`tree_to_json`, what
      `python -m o1jax.show_tree` draws) and as OpenLongCoT text `tree_dir/<id>.txt` (answers
      rated by the answer check: SFT data through `data.sft_trees`), the first `max_trees` of
      them (None: all).
    """
    fmt = make_step_format(tokenizer, search.max_depth)
    records, n_correct = [], 0
    bar = tqdm(total=len(problems), desc=progress, disable=progress is None, leave=False)
    for start, chunk, _, prompts, plens in _prompt_batches(tokenizer, problems, batch_size):
        if before_batch is not None:
            before_batch()
        expand = mcts.make_lm_expand_fn(
            params, cfg, prompts, plens, fmt, search, lora=lora, stats=stats
        )
        tree = mcts.run(expand, batch_size, search, jax.random.fold_in(key, start), stats=stats)
        tree = jax.device_get(tree)  # numpy: each problem's answer and files read one tree
        for b, problem in enumerate(chunk):
            answer = choose_answer(tree, b, tokenizer)
            correct = answer is not None and is_equivalent(answer, problem.answer)
            n_correct += correct
            if tree_dir is not None and (max_trees is None or len(records) < max_trees):
                _write_tree(tree_dir, tree, b, tokenizer, problem)
            records.append(
                {
                    "id": problem.id,
                    "truth": problem.answer,
                    "answer": answer,
                    "correct": bool(correct),
                    "nodes": int(tree.num_nodes[b]),
                }
            )
        bar.update(len(chunk))
    bar.close()
    return EvalResult(
        pass1=n_correct / max(len(problems), 1), num_problems=len(problems), records=records
    )


def refine_evaluate(
    params,
    cfg,
    tokenizer,
    problems,
    search: refine.RefineConfig,
    *,
    key,
    batch_size: int = 32,
    lora=None,
    judge: refine.PPRMJudge | None = None,
    progress: str | None = "refine",
    tree_dir: str | None = None,
    max_trees: int | None = None,
    before_batch: Callable[[], None] | None = None,
) -> EvalResult:
    """MCTSr (self-reward) or SR-MCTS (PPRM + EBC) accuracy, without the ground truth.
    before_batch: called before each batch of searches (it may raise to stop the work).

    Records also say whether any solution of the tree was right (`any_correct`: what a perfect
    judge would have picked), whether the first answer (the root) was, and how many refinements
    were cut for want of room (`truncated_children`, counted as answerless). tree_dir: also write
    each tree in the OpenLongCoT format as `tree_dir/<id>.txt` (conclusions rated by the answer
    check, so the file is SFT data), the first `max_trees` of them (None: all).
    """
    records, n_correct = [], 0
    bar = tqdm(total=len(problems), desc=progress, disable=progress is None, leave=False)
    for start, chunk, questions, prompts, plens in _prompt_batches(tokenizer, problems, batch_size):
        if before_batch is not None:
            before_batch()
        result = refine.run(
            params,
            cfg,
            tokenizer,
            questions,
            prompts,
            plens,
            search,
            jax.random.fold_in(key, start),
            lora=lora,
            judge=judge,
            live=len(chunk),
        )
        for b, problem in enumerate(chunk):
            check = lambda a, truth=problem.answer: a is not None and is_equivalent(a, truth)
            answer = result.answer(b)
            correct = check(answer)
            n_correct += correct
            if tree_dir is not None and (max_trees is None or len(records) < max_trees):
                nodes = refine.tree_to_longcot(result, b, problem.question, problem.answer)
                _write_text(tree_dir, problem, longcot.render_tree(nodes))
            records.append(
                {
                    "id": problem.id,
                    "truth": problem.answer,
                    "answer": answer,
                    "correct": bool(correct),
                    "first_answer_correct": bool(check(result.answers[b][0])),
                    "any_correct": any(check(a) for a in result.answers[b]),
                    "answers": result.answers[b],
                    "chosen": result.best_node(b),
                    "truncated_children": int(result.truncated_children[b]),
                }
            )
        bar.update(len(chunk))
    bar.close()
    return EvalResult(
        pass1=n_correct / max(len(problems), 1), num_problems=len(problems), records=records
    )


def _tree_name(problem) -> str:
    """A file name for the problem's tree: its id, with a short hash of the id when characters
    had to be replaced (so ids "a/b" and "a_b" do not overwrite each other)."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", str(problem.id))
    if name != str(problem.id):
        name += "-" + hashlib.sha1(str(problem.id).encode()).hexdigest()[:8]
    return name


def _write_text(tree_dir: str, problem, text: str) -> None:
    os.makedirs(tree_dir, exist_ok=True)
    with open(os.path.join(tree_dir, f"{_tree_name(problem)}.txt"), "w") as f:
        f.write(text)


def _write_tree(tree_dir: str, tree, b: int, tokenizer, problem) -> None:
    os.makedirs(tree_dir, exist_ok=True)
    name = _tree_name(problem)
    data = tree_to_json(tree, b, tokenizer, problem.question, truth=problem.answer)
    with open(os.path.join(tree_dir, f"{name}.json"), "w") as f:
        json.dump(data, f, indent=1)
    nodes = tree_to_longcot(tree, b, tokenizer, problem.question, truth=problem.answer)
    _write_text(tree_dir, problem, longcot.render_tree(nodes))


def write_records(path: str, records: list[dict]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def summary_table(rows: dict[str, float]) -> str:
    width = max(len(k) for k in rows)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    lines += [
        f"{k:<{width}}  {v:.3f}" if isinstance(v, float) else f"{k:<{width}}  {v}"
        for k, v in rows.items()
    ]
    return "\n".join(lines)
