"""Search trees out: chosen answers, OpenLongCoT text (feeds SFT), JSON."""

import jax.numpy as jnp
import numpy as np

from o1jax.data import longcot
from o1jax.data.tokenizer import build_tiny_tokenizer
from o1jax.search.export import choose_answer, tree_to_json, tree_to_longcot
from o1jax.search.format import encode_thought
from o1jax.search.tree import init_tree

THOUGHTS = [
    "<expansion>3 + 4 = 7",  # 1: child of root
    "<expansion>3 + 4 = 8",  # 2: child of root (wrong)
    "<conclusion>\\boxed{14}",  # 3: child of 1
    "<conclusion>\\boxed{16}",  # 4: child of 2
    "<conclusion>\\boxed{16}",  # 5: child of 2
]


def _tree(tok):
    tree = init_tree(1, 6, 16)
    tokens = np.zeros((1, 6, 16), np.int32)
    lengths = np.zeros((1, 6), np.int32)
    for i, text in enumerate(THOUGHTS, start=1):
        ids = encode_thought(tok, text)
        tokens[0, i, : len(ids)] = ids
        lengths[0, i] = len(ids)
    return tree.replace(
        parent=jnp.asarray([[-1, 0, 0, 1, 2, 2]]),
        depth=jnp.asarray([[0, 1, 1, 2, 2, 2]]),
        visits=jnp.asarray([[5, 2, 3, 1, 1, 1]]),
        value_sum=jnp.asarray([[2.0, 1.6, 0.9, 0.9, 0.2, 0.3]]),
        rating=jnp.asarray([[0, 0.8, 0.3, 0.9, 0.2, 0.3]]),
        terminal=jnp.asarray([[False, False, False, True, True, True]]),
        is_answer=jnp.asarray([[False, False, False, True, True, True]]),
        tokens=jnp.asarray(tokens),
        lengths=jnp.asarray(lengths),
        num_nodes=jnp.asarray([6]),
    )


def test_answers_by_value_vote_and_best_value():
    tok = build_tiny_tokenizer()
    tree = _tree(tok)
    # "16" has two answer nodes (Q 0.2 + 0.3 = 0.5) but "14" has Q 0.9: value beats head count.
    assert choose_answer(tree, 0, tok, "vote") == "14"
    assert choose_answer(tree, 0, tok, "value") == "14"


def test_export_to_longcot_round_trips_and_to_json():
    tok = build_tiny_tokenizer()
    tree = _tree(tok)
    nodes = tree_to_longcot(tree, 0, tok, "Start with 3, add 4, multiply by 2.")
    text = longcot.render_tree(nodes)
    assert longcot.parse_tree(text) == nodes
    assert [n.text for n in nodes[1:]] == THOUGHTS
    assert [n.father_id for n in nodes] == [-1, 0, 0, 1, 2, 2]
    assert nodes[2].rating == longcot.NEGATIVE_RATING and nodes[3].rating == longcot.POSITIVE_RATING
    assert len(longcot.tree_to_paths(nodes)) == 3
    data = tree_to_json(tree, 0, tok, "Start with 3, add 4, multiply by 2.", truth="14")
    assert data["chosen_answer"] == "14"
    verdicts = [(n["answer"], n["correct"]) for n in data["nodes"] if n["answer"]]
    assert verdicts == [("14", True), ("16", False), ("16", False)]
    assert data["nodes"][2]["visits"] == 3 and abs(data["nodes"][2]["value"] - 0.3) < 1e-6


def test_equal_answers_written_differently_vote_together():
    """ "14", "14.0" and "x = 14" (Q 0.4 each) outvote "16" (Q 0.7); they once split the vote."""
    tok = build_tiny_tokenizer()
    answers = ["14", "14.0", "x = 14", "16"]
    n = 1 + len(answers)
    tokens = np.zeros((1, n, 16), np.int32)
    lengths = np.zeros((1, n), np.int32)
    for i, answer in enumerate(answers, start=1):
        ids = encode_thought(tok, f"<conclusion>\\boxed{{{answer}}}")
        tokens[0, i, : len(ids)] = ids
        lengths[0, i] = len(ids)
    tree = init_tree(1, n, 16).replace(
        parent=jnp.asarray([[-1] + [0] * len(answers)]),
        depth=jnp.asarray([[0] + [1] * len(answers)]),
        visits=jnp.ones((1, n), jnp.int32),
        value_sum=jnp.asarray([[1.0, 0.4, 0.4, 0.4, 0.7]]),
        is_answer=jnp.asarray([[False] + [True] * len(answers)]),
        tokens=jnp.asarray(tokens),
        lengths=jnp.asarray(lengths),
        num_nodes=jnp.asarray([n]),
    )
    assert choose_answer(tree, 0, tok, "vote") == "14"  # the first spelling of the winner
    assert choose_answer(tree, 0, tok, "value") == "16"


def test_checked_answers_take_their_rating_from_the_check():
    """A reward of 0 is also "not checked": only `checked` lets it mark a confident answer
    wrong; otherwise answers keep the model's rating."""
    tok = build_tiny_tokenizer()
    # The checks: "14" right, both "16" wrong (one of them rated 0.9 by the model).
    tree = _tree(tok).replace(
        reward=jnp.asarray([[0, 0, 0, 1.0, 0, 0]]),
        rating=jnp.asarray([[0, 0.8, 0.3, 0.9, 0.9, 0.3]]),
    )
    ratings = lambda **kw: [n.rating for n in tree_to_longcot(tree, 0, tok, "q", **kw)[3:]]
    pos, neg = longcot.POSITIVE_RATING, longcot.NEGATIVE_RATING
    assert ratings(checked=True) == [pos, neg, neg]
    assert ratings() == [pos, pos, neg]  # the model's own ratings
    assert ratings(truth="16") == [neg, pos, pos]


def test_stray_tags_that_would_form_a_format_token_when_stripped_are_all_removed():
    """A sampled thought can hold tags anywhere, e.g. "<start_of_" <critic> "rating>": removing
    <critic> must not leave a <start_of_rating> in the exported thought."""
    tok = build_tiny_tokenizer()
    texts = ["<expansion>x <start_of_<critic>rating> y", "<expansion>3 <end_of_thought>+ 4"]
    tree = init_tree(1, 3, 32)
    tokens = np.zeros((1, 3, 32), np.int32)
    lengths = np.zeros((1, 3), np.int32)
    for i, text in enumerate(texts, start=1):
        ids = encode_thought(tok, text)
        tokens[0, i, : len(ids)], lengths[0, i] = ids, len(ids)
    tree = tree.replace(
        parent=jnp.asarray([[-1, 0, 0]]),
        depth=jnp.asarray([[0, 1, 1]]),
        visits=jnp.asarray([[2, 1, 1]]),
        rating=jnp.asarray([[0, 0.7, 0.2]]),
        tokens=jnp.asarray(tokens),
        lengths=jnp.asarray(lengths),
        num_nodes=jnp.asarray([3]),
    )
    nodes = tree_to_longcot(tree, 0, tok, "q")
    assert [n.text for n in nodes[1:]] == ["<expansion>x  y", "<expansion>3 + 4"]
    assert longcot.parse_tree(longcot.render_tree(nodes)) == nodes


def test_a_conclusion_cut_off_before_its_end_is_no_right_path():
    """A <conclusion> that ran out of tokens is not an answer (nothing was checked); rated 0.9
    by the model it must still not become an SFT right path when the truth is known."""
    tok = build_tiny_tokenizer()
    step = encode_thought(tok, "<expansion>3 + 4 = 7")
    cut = tok.encode("<conclusion>so the answer is 1", add_special_tokens=False)[:10]
    tokens = np.zeros((1, 3, 16), np.int32)
    tokens[0, 1, : len(step)], tokens[0, 2, : len(cut)] = step, cut
    tree = init_tree(1, 3, 16).replace(
        parent=jnp.asarray([[-1, 0, 1]]),
        depth=jnp.asarray([[0, 1, 2]]),
        visits=jnp.asarray([[2, 2, 1]]),
        rating=jnp.asarray([[0.0, 0.8, 0.9]]),
        terminal=jnp.asarray([[False, False, True]]),  # cut off: terminal, not an answer
        tokens=jnp.asarray(tokens),
        lengths=jnp.asarray([[0, len(step), len(cut)]]),
        num_nodes=jnp.asarray([3]),
    )
    question = "Start with 3, add 4, multiply by 2."
    nodes = tree_to_longcot(tree, 0, tok, question, truth="14")
    assert nodes[2].action == longcot.CONCLUSION and nodes[2].rating == longcot.NEGATIVE_RATING
    assert longcot.right_paths(nodes) == []
    assert tree_to_longcot(tree, 0, tok, question, checked=True)[2].rating == (
        longcot.NEGATIVE_RATING
    )
    # Unchecked (no truth, no answer checks): the model's rating, as for any other thought.
    assert tree_to_longcot(tree, 0, tok, question)[2].rating == longcot.POSITIVE_RATING


def test_tokenizer_special_tokens_sampled_in_a_thought_do_not_reach_sft():
    """A sampled thought may hold the tokenizer's own special tokens (<eos>, <pad>, <bos>).
    Exported as text, SFT would encode them back into those tokens (an EOS inside a chain);
    they are dropped, also when removing one would form a long-CoT token."""
    from o1jax.search.format import encode_chain

    tok = build_tiny_tokenizer()
    eos, pad, bos = tok.eos_token_id, tok.pad_token_id, tok.bos_token_id
    step = [*_ids(tok, "<expansion>3 + 4 = 7"), eos, pad, *_ids(tok, " ok<end_of_thought>")]
    answer = _ids(tok, "<conclusion>\\boxed{14}<end_of_thought>")
    stray = [*_ids(tok, "<expansion>x <start_of_"), bos, *_ids(tok, "rating> y<end_of_thought>")]
    tokens = np.zeros((1, 4, 32), np.int32)
    for i, ids in enumerate((step, answer, stray), start=1):
        tokens[0, i, : len(ids)] = ids
    tree = init_tree(1, 4, 32).replace(
        parent=jnp.asarray([[-1, 0, 1, 0]]),
        depth=jnp.asarray([[0, 1, 2, 1]]),
        visits=jnp.asarray([[3, 2, 1, 1]]),
        rating=jnp.asarray([[0.0, 0.8, 0.9, 0.6]]),
        terminal=jnp.asarray([[False, False, True, False]]),
        is_answer=jnp.asarray([[False, False, True, False]]),
        tokens=jnp.asarray(tokens),
        lengths=jnp.asarray([[0, len(step), len(answer), len(stray)]]),
        num_nodes=jnp.asarray([4]),
    )
    question = "Start with 3, add 4, multiply by 2."
    nodes = tree_to_longcot(tree, 0, tok, question, truth="14")
    assert [n.text for n in nodes[1:]] == [
        "<expansion>3 + 4 = 7 ok",
        THOUGHTS[2],
        "<expansion>x  y",
    ]
    assert longcot.parse_tree(longcot.render_tree(nodes)) == nodes
    (path,) = longcot.right_paths(nodes)
    ids, _ = encode_chain(tok, question, [n.text for n in path[1:]], [n.rating for n in path[1:]])
    assert eos not in ids[:-1].tolist() and pad not in ids.tolist() and bos not in ids[1:].tolist()
    # The JSON for people keeps the thought as sampled.
    assert "<eos><pad>" in tree_to_json(tree, 0, tok, question)["nodes"][1]["text"]


def _ids(tok, text):
    return list(tok.encode(text, add_special_tokens=False))


def test_an_answer_is_rated_by_the_answer_its_written_text_states():
    """The check reads a raw thought up to its first stray long-CoT token; the tree file holds
    the thought with that token deleted, which may state another answer (here 7, checked as 5).
    A right path for SFT must state the answer that was found right."""
    tok = build_tiny_tokenizer()
    stray = _ids(tok, "<conclusion>\\boxed{5}<start_of_rating>\\boxed{7}<end_of_thought>")
    clean = _ids(tok, "<conclusion>\\boxed{5}<end_of_thought>")
    tokens = np.zeros((1, 3, 32), np.int32)
    tokens[0, 1, : len(stray)], tokens[0, 2, : len(clean)] = stray, clean
    tree = init_tree(1, 3, 32).replace(
        parent=jnp.asarray([[-1, 0, 0]]),
        depth=jnp.asarray([[0, 1, 1]]),
        rating=jnp.asarray([[0.0, 0.9, 0.9]]),
        terminal=jnp.asarray([[False, True, True]]),
        is_answer=jnp.asarray([[False, True, True]]),
        reward=jnp.asarray([[0.0, 1.0, 1.0]]),  # both checked right: each raw thought says 5
        tokens=jnp.asarray(tokens),
        lengths=jnp.asarray([[0, len(stray), len(clean)]]),
        num_nodes=jnp.asarray([3]),
    )
    question = "Start with 2, add 3."
    for kwargs in (dict(truth="5"), dict(checked=True)):
        nodes = tree_to_longcot(tree, 0, tok, question, **kwargs)
        assert nodes[1].text == "<conclusion>\\boxed{5}\\boxed{7}"
        assert [n.rating for n in nodes[1:]] == [longcot.NEGATIVE_RATING, longcot.POSITIVE_RATING]
        assert [p[-1].text for p in longcot.right_paths(nodes)] == ["<conclusion>\\boxed{5}"]
