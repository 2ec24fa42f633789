"""Search trees out of the device: chosen answers, OpenLongCoT text, and JSON for people.

All of this runs on the host after a search; nothing here is in a hot path.
"""

from __future__ import annotations

import numpy as np

from o1jax.data import longcot
from o1jax.data.answers import extract_answer, is_equivalent, vote
from o1jax.search.tree import Tree


def _host(tree: Tree, b: int) -> dict[str, np.ndarray]:
    """Tree `b` as numpy arrays, cut to the nodes in use. Pass a host copy
    (`jax.device_get(tree)`) when exporting many trees of a batch: each field of a device tree
    is copied whole, as indexing it on the device would run (and first compile) a gather."""
    n = int(np.asarray(tree.num_nodes)[b])
    fields = (
        "parent",
        "depth",
        "visits",
        "value_sum",
        "prior_logit",
        "rating",
        "terminal",
        "is_answer",
        "reward",
        "tokens",
        "lengths",
    )
    return {f: np.asarray(getattr(tree, f))[b, :n] for f in fields}


def thought_text(tokenizer, tokens: np.ndarray, length: int) -> str:
    """The thought's text (meta-action tag included), without its <end_of_thought>."""
    text = tokenizer.decode([int(t) for t in tokens[:length]], skip_special_tokens=False)
    return text.removesuffix(longcot.END_OF_THOUGHT)


def plain_text(tokenizer, text: str) -> str:
    """`text` without any long-CoT token or special token of the tokenizer (<eos>, <pad>, ...),
    nor any that removing one would form. A sampled thought may hold such tokens; as text in a
    tree file they would come back as the tokens themselves when SFT encodes the thought."""
    specials = [s for s in getattr(tokenizer, "all_special_tokens", ()) if s]
    while True:
        before = text
        for token in specials:
            text = text.replace(token, "")
        text = longcot.strip_format_tokens(text)
        if text == before:
            return text


def choose_answer(tree: Tree, b: int, tokenizer, method: str = "vote") -> str | None:
    """The final answer of tree `b`, from its answer nodes, without looking at the truth.

    "vote": the answer with the largest total value (backed-up Q) over the answer nodes that
    state it, equal answers counted together ("14" and "14.0"; `answers.vote`): self-
    consistency weighted by the model's own values. "value": the answer node with the best Q.
    """
    if method not in ("vote", "value"):
        raise ValueError(f"choose_answer: method must be 'vote' or 'value', got {method!r}")
    t = _host(tree, b)
    q = t["value_sum"] / np.maximum(t["visits"], 1)
    nodes = np.flatnonzero(t["is_answer"])
    found = [
        extract_answer(thought_text(tokenizer, t["tokens"][n], t["lengths"][n])) for n in nodes
    ]
    if method == "vote":
        return vote(found, q[nodes])
    best: tuple[float, str | None] = (-np.inf, None)
    for node, answer in zip(nodes, found, strict=True):
        if answer is not None and q[node] > best[0]:
            best = (float(q[node]), answer)
    return best[1]


def tree_to_longcot(
    tree: Tree,
    b: int,
    tokenizer,
    question: str,
    truth: str | None = None,
    checked: bool = False,
) -> list[longcot.Node]:
    """Tree `b` as OpenLongCoT nodes (local id = slot), ready for `longcot.render_tree` and SFT
    (`data.sft_trees`). An answer's rating comes from `truth` when given, else from its reward
    when the search checked its answers (`checked`: `mcts.run` had a `reward_fn`; a reward of 0
    alone cannot tell "checked and wrong" from "not checked"), else from the model's rating, as
    every other thought's does. With `truth` or `checked`, a <conclusion> that was cut off
    before its end (no answer to check) is rated negative: it is no right path to learn.
    Thoughts are written without stray special tokens (`plain_text`), and an answer is rated by
    what its written text states: one whose raw thought stated another answer before a stray
    token ("\\boxed{5}<start_of_rating>\\boxed{7}" is written "\\boxed{5}\\boxed{7}") is
    checked again against `truth`, and with `checked` alone it is rated negative."""
    t = _host(tree, b)
    nodes = [
        longcot.Node(longcot.ROOT_FATHER_ID, 0, question, longcot.POSITIVE_RATING, longcot.PROBLEM)
    ]
    for i in range(1, len(t["parent"])):
        text = thought_text(tokenizer, t["tokens"][i], t["lengths"][i])
        action, body = longcot.split_action(text)
        body = plain_text(tokenizer, body)  # a sampled thought may contain stray tokens
        written = extract_answer((action or "") + body) if t["is_answer"][i] else None
        if t["is_answer"][i] and truth is not None:
            good = written is not None and is_equivalent(written, truth)
        elif t["is_answer"][i] and checked:  # the check read the raw thought
            good = t["reward"][i] > 0.5 and written == extract_answer(text)
        elif action == longcot.CONCLUSION and (truth is not None or checked):
            good = False  # a conclusion cut off before its end states no answer
        else:
            good = t["rating"][i] >= 0.5
        rating = longcot.POSITIVE_RATING if good else longcot.NEGATIVE_RATING
        nodes.append(longcot.Node(int(t["parent"][i]), i, body, rating, action))
    return nodes


def tree_to_json(tree: Tree, b: int, tokenizer, question: str, truth: str | None = None) -> dict:
    """Tree `b` as a JSON-able dict (what `python -m o1jax.show_tree` draws)."""
    t = _host(tree, b)
    chosen = choose_answer(tree, b, tokenizer)
    out_nodes = []
    for i in range(len(t["parent"])):
        text = question if i == 0 else thought_text(tokenizer, t["tokens"][i], t["lengths"][i])
        answer = extract_answer(text) if t["is_answer"][i] else None
        verdict = None
        if answer is not None and truth is not None:
            verdict = bool(is_equivalent(answer, truth))
        out_nodes.append(
            {
                "id": i,
                "parent": int(t["parent"][i]),
                "depth": int(t["depth"][i]),
                "text": text,
                "visits": int(t["visits"][i]),
                "value": float(t["value_sum"][i] / max(int(t["visits"][i]), 1)),
                "rating": float(t["rating"][i]),
                "prior_logit": float(t["prior_logit"][i]),
                "terminal": bool(t["terminal"][i]),
                "answer": answer,
                "correct": verdict,
            }
        )
    return {"question": question, "truth": truth, "chosen_answer": chosen, "nodes": out_nodes}
