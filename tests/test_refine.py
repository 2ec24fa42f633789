"""MCTSr / SR-MCTS: step statistics, selection, backup, the refine prompts, a whole run, export."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import random_tiny_model

from o1jax.data import longcot
from o1jax.data.tasks import DataError
from o1jax.data.tokenizer import build_tiny_tokenizer
from o1jax.model.sampler import SampleOutput
from o1jax.search import refine
from o1jax.search.format import encode_chain, encode_prompts
from o1jax.train.config import ConfigError, DataConfig, RunConfig
from o1jax.train.sft_stage import sft_examples

QUESTION = "Start with 4, add 5, multiply by 2."
WRONG = ["<expansion>4 + 5 = 9", "<expansion>9 * 2 = 19", "<conclusion>\\boxed{19}"]
RIGHT_SOLUTION = ["<expansion>4 + 5 = 9", "<expansion>9 * 2 = 18", "<conclusion>\\boxed{18}"]
S = 160


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    cfg, params = random_tiny_model(len(tok), seed=2)
    return cfg, params


def _solution(tok, thoughts, ratings=None):
    """(prompt ids, solution ids) of a chain: what the search holds for a node."""
    ids, _ = encode_chain(tok, QUESTION, thoughts, ratings)
    plen = int(encode_prompts(tok, [QUESTION])[1][0])
    return ids[:plen], ids[plen:]


def _padded(ids, width):
    out = np.zeros((width,), np.int32)
    out[: len(ids)] = ids
    return out


def _stats(tok, thoughts, ratings, p_by_step):
    config = refine.RefineConfig(solution_length=S)
    fmt = refine.make_refine_format(tok, config)
    _, sol = _solution(tok, thoughts, ratings)
    sor = np.nonzero(sol == fmt.step.start_of_rating)[0]
    positive = np.full((S,), 0.5, np.float32)
    positive[sor] = p_by_step
    return refine._step_stats_one(
        jnp.asarray(_padded(sol, S)), len(sol), jnp.asarray(positive), fmt, config
    ), sor


def test_self_reward_is_min_plus_mean_over_two_with_suppression(tok):
    stats, sor = _stats(tok, WRONG, None, [0.99, 0.2, 0.9])
    scores = np.asarray([50.0, -60.0, 80.0])  # 98 >= 95 -> 50 (MCTSr's suppression)
    np.testing.assert_allclose(stats.self_reward, (scores.min() + scores.mean()) / 200, rtol=1e-5)
    assert bool(stats.has_answer)
    # The weakest reasoning step (step 2, 0-based 1) is critiqued: cut before its rating, and
    # the critic is step 3.
    assert int(stats.flaw_cut) == sor[1] and int(stats.flaw_header) == 3


def test_full_scores_are_suppressed_to_50_not_clipped_to_95(tok):
    """MCTSr's `if score >= 95: score = 50`: near-perfect steps count below ordinary good ones."""
    stats, _ = _stats(tok, RIGHT_SOLUTION, None, [0.99, 0.98, 0.97])  # raw 98, 96, 94
    scores = np.asarray([50.0, 50.0, 94.0])
    expected = (scores.min() + scores.mean()) / 200  # (min + mean) / 2 in MCTSr units, / 100
    np.testing.assert_allclose(stats.self_reward, expected, rtol=1e-5)
    assert abs(float(stats.self_reward) - 0.5733) < 1e-3  # a clip at 95 gives 0.943
    # Moved or switched off by the config.
    config = refine.RefineConfig(solution_length=S, suppress_at=float("inf"))
    fmt = refine.make_refine_format(tok, config)
    _, sol = _solution(tok, RIGHT_SOLUTION)
    positive = np.full((S,), 0.5, np.float32)
    positive[np.nonzero(sol == fmt.step.start_of_rating)[0]] = [0.99, 0.98, 0.97]
    off = refine._step_stats_one(
        jnp.asarray(_padded(sol, S)), len(sol), jnp.asarray(positive), fmt, config
    )
    np.testing.assert_allclose(off.self_reward, (94 + 96) / 200, rtol=1e-5)


def test_journey_steps_that_were_criticised_do_not_count(tok):
    thoughts = [
        "<expansion>4 + 5 = 8",
        "<critic>4 + 5 is not 8",
        "<refine>4 + 5 = 9",
        "<expansion>9 * 2 = 18",
        "<conclusion>\\boxed{18}",
    ]
    ratings = ["<negative_rating>"] + ["<positive_rating>"] * 4
    stats, sor = _stats(tok, thoughts, ratings, [0.01, 0.02, 0.6, 0.8, 0.9])
    scores = 100 * (2 * np.asarray([0.6, 0.8, 0.9]) - 1)  # refine, expansion, conclusion
    np.testing.assert_allclose(stats.self_reward, (scores.min() + scores.mean()) / 200, rtol=1e-5)
    assert int(stats.flaw_cut) == sor[2]  # the refine (0.6) is the weakest effective step
    steps = refine.solution_steps(
        tok.decode(_solution(tok, thoughts, ratings)[1].tolist(), skip_special_tokens=False)
    )
    assert [t for t, _ in refine.effective_steps(steps)] == [
        "<expansion>4 + 5 = 9",
        "<expansion>9 * 2 = 18",
        "<conclusion>\\boxed{18}",
    ]
    assert refine.solution_answer(steps) == "18"


def test_a_step_rated_negative_without_a_critic_still_counts(tok):
    """Only critiqued steps (a <critic> follows) drop out: a step the model itself rated negative
    lowers the self-reward, can be the flaw, and is read by the host (answer, PPRM text) alike,
    so judging a step worse never raises the solution's value."""
    thoughts = [*WRONG[:2], "<expansion>19 + 0 = 19", "<conclusion>\\boxed{19}"]
    pos, neg = longcot.POSITIVE_RATING, longcot.NEGATIVE_RATING
    p = [0.95, 0.45, 0.7, 0.9]
    better, _ = _stats(tok, thoughts, [pos, pos, pos, pos], p)
    ratings = [pos, neg, pos, pos]
    worse, sor = _stats(tok, thoughts, ratings, [0.95, 0.05, 0.7, 0.9])
    scores = np.asarray([90.0, -90.0, 40.0, 80.0])
    np.testing.assert_allclose(worse.self_reward, (scores.min() + scores.mean()) / 200, rtol=1e-5)
    assert float(worse.self_reward) < float(better.self_reward)
    assert int(worse.flaw_cut) == sor[1] and int(worse.flaw_header) == 3  # the negative step
    steps = refine.solution_steps(
        tok.decode(_solution(tok, thoughts, ratings)[1].tolist(), skip_special_tokens=False)
    )
    assert refine.effective_thoughts(steps) == thoughts
    assert bool(worse.has_answer) and refine.solution_answer(steps) == "19"
    # A conclusion rated negative (no critic after it) is still the solution's answer, on the
    # device and on the host; its low rating shows in the self-reward instead.
    ratings = [pos, pos, pos, neg]
    last, _ = _stats(tok, thoughts, ratings, [0.95, 0.8, 0.7, 0.1])
    steps = refine.solution_steps(
        tok.decode(_solution(tok, thoughts, ratings)[1].tolist(), skip_special_tokens=False)
    )
    assert bool(last.has_answer) and refine.solution_answer(steps) == "19"
    scores = np.asarray([90.0, 60.0, 40.0, -80.0])
    np.testing.assert_allclose(last.self_reward, (scores.min() + scores.mean()) / 200, rtol=1e-5)
    # Critiqued, the negative conclusion drops out on both sides: no answer.
    ratings = [pos, pos, pos, neg, pos]
    cut, _ = _stats(tok, [*thoughts, "<critic>19 is wrong"], ratings, [0.95, 0.8, 0.7, 0.1, 0.9])
    steps = refine.solution_steps(
        tok.decode(
            _solution(tok, [*thoughts, "<critic>19 is wrong"], ratings)[1].tolist(),
            skip_special_tokens=False,
        )
    )
    assert not bool(cut.has_answer) and refine.solution_answer(steps) is None
    assert refine.effective_thoughts(steps) == thoughts[:3]


def test_a_solution_without_a_conclusion_has_no_answer_and_the_lowest_value(tok):
    stats, _ = _stats(tok, WRONG[:2], None, [0.9, 0.9])
    assert not bool(stats.has_answer) and float(stats.self_reward) == -1.0


def _tree(parent, value, num_children=None, visits=None):
    b, n = 1, len(parent)
    tree = refine.init_tree(b, n, 4)
    parent = jnp.asarray([parent], jnp.int32)
    kids = [sum(1 for p in parent[0] if p == i) for i in range(n)]
    return refine.backup(
        tree.replace(
            parent=parent,
            num_children=jnp.asarray([num_children or kids], jnp.int32),
            visits=jnp.asarray([visits or [1] * n], jnp.int32),
            num_nodes=jnp.asarray([n], jnp.int32),
        ),
        jnp.asarray([value], jnp.float32),
    )


def test_backup_matches_a_hand_computed_tree():
    tree = _tree([-1, 0, 0, 1, 3], [0.2, 0.6, -0.4, 1.0, 0.0])
    # Q4 = 0; Q3 = (1 + 0) / 2 = 0.5; Q1 = (0.6 + 0.5) / 2 = 0.55; Q2 = -0.4;
    # Q0 = (0.2 + max(0.55, -0.4)) / 2 = 0.375.
    np.testing.assert_allclose(tree.q[0], [0.375, 0.55, -0.4, 0.5, 0.0], rtol=1e-6)


def _uct(tree, c, scale=1.0, eps=1e-6):
    """UCT by hand: scale * Q + c sqrt(ln(N(parent) + 1) / (N + eps)), the root without bonus."""
    q, visits = np.asarray(tree.q[0]), np.asarray(tree.visits[0])
    parent = np.asarray(tree.parent[0])
    parent_visits = np.where(parent >= 0, visits[np.maximum(parent, 0)], 0)
    return scale * q + c * np.sqrt(np.log(parent_visits + 1) / (visits + eps))


def test_selection_follows_mctsr_candidate_rule_and_uct():
    """MCTSr's `filter_mature_node`: fewer than max_children children OR no child above."""
    config = refine.RefineConfig(value="pprm", max_children=2, c_uct=1.4)
    # Node 1 has one child (3) valued above it, but room for another: still a candidate.
    # The root has 2 children and one (1) above it: fully expanded.
    tree = _tree([-1, 0, 0, 1], [0.0, 0.3, -0.9, 0.35], visits=[20, 2, 17, 1])
    q = np.asarray(tree.q[0])
    assert q[3] > q[1] and q[1] > q[0]
    uct = _uct(tree, 1.4)
    assert max((1, 2, 3), key=lambda i: uct[i]) == 1 and uct[3] > uct[2]  # 2.07 vs 1.82
    assert int(refine.select(tree, config)[0]) == 1  # AND rule: candidates {2, 3}, picks 3
    # A node that has reached max_children stays a candidate while no child beats it.
    tree = _tree([-1, 0, 0, 1], [0.9, 0.3, -0.9, 0.35], visits=[2, 2, 17, 1])
    assert np.asarray(tree.q[0])[0] > np.asarray(tree.q[0])[1]  # root 0.6125 > 0.325
    greedy = refine.RefineConfig(value="pprm", max_children=2, c_uct=0.0)
    assert int(refine.select(tree, greedy)[0]) == 0  # highest Q (AND rule: 3)


def test_self_reward_uct_reads_q_in_mctsr_units():
    """c_uct = 1.4 is MCTSr's constant for Q in [-100, 100]: self-reward mode scales Q by 100."""
    # Root (fully expanded, beaten) with visits 8; A: Q 0.9, N 6; B: Q -0.2, N 1.
    tree = _tree([-1, 0, 0], [0.0, 0.9, -0.2], visits=[8, 6, 1])
    mctsr = refine.RefineConfig(value="self_reward", max_children=2, c_uct=1.4)
    uct = _uct(tree, 1.4, scale=100.0)
    assert uct[1] > uct[2]  # 90.8 against -17.9
    assert int(refine.select(tree, mctsr)[0]) == 1  # Q unscaled: 1.75 against 1.88, B
    # PPRM values in [0, 1] are read as they are: exploration wins here.
    berry = refine.RefineConfig(value="pprm", max_children=2, c_uct=1.4)
    assert int(refine.select(tree, berry)[0]) == 2
    # Only the UCT score is scaled: values and Q stay in [-1, 1].
    np.testing.assert_allclose(tree.q[0], [0.45, 0.9, -0.2], rtol=1e-6)


@pytest.mark.parametrize("value, c", [("pprm", 0.4), ("self_reward", 40.0)])
def test_the_root_has_no_exploration_term(value, c):
    """MCTSr's root has no parent: N(parent) = 0, ln(1) = 0, so its UCT is its Q alone."""
    # Root Q 0.3 (V 0.5, child 0.1), visits 2; its child Q 0.1, visits 1. Both are candidates.
    tree = _tree([-1, 0], [0.5, 0.1], visits=[2, 1])
    config = refine.RefineConfig(value=value, max_children=3, c_uct=c)
    scale = 100.0 if value == "self_reward" else 1.0
    uct = _uct(tree, c, scale)
    assert uct[0] == pytest.approx(scale * 0.3)
    assert uct[1] > uct[0]  # 0.1 + c * 1.048 (in units of 1/scale)
    assert scale * 0.3 + c * np.sqrt(np.log(3) / 2) > uct[1]  # a root bonus would pick the root
    assert int(refine.select(tree, config)[0]) == 1


def test_pprm_values_mix_the_borda_rank_with_preferences_over_parent_and_siblings():
    parent = np.asarray([[-1, 0, 0, 1, -1]])  # slot 4 unused
    has = np.asarray([[True, True, True, True, False]])
    upper = {(0, 1): 0.3, (0, 2): 0.6, (0, 3): 0.2, (1, 2): 0.9, (1, 3): 0.55, (2, 3): 0.7}
    pref = np.full((1, 5, 5), np.nan, np.float32)
    for (i, j), p in upper.items():
        pref[0, i, j], pref[0, j, i] = p, 1 - p
    value, global_value = refine.pprm_values(parent, has, pref, weight=0.25)
    # 1 beats 0, 2 and 3; 0 > 2 > 3 > 0 is a cycle whose members reach each other and tie on
    # Borda count, re-ranked by summed preference: 3 (0.8 + 0.45 + 0.3 = 1.55), 2 (1.2), 0 (1.1).
    # Ranks 3, 0, 2, 1 of 4 -> global values 0, 1, 1/3, 2/3.
    np.testing.assert_allclose(global_value[0, :4], [0, 1, 1 / 3, 2 / 3], rtol=1e-6, atol=1e-6)
    local = [0.5, np.mean([0.7, 0.9]), np.mean([0.4, 0.1]), 0.45]  # root: nothing to compare
    expected = 0.25 * global_value[0, :4] + 0.75 * np.asarray(local)
    np.testing.assert_allclose(value[0, :4], expected, rtol=1e-6)
    assert value[0, 4] == 0.0


def _sample(tok, texts, width, stopped):
    rows = [tok.encode(t, add_special_tokens=False)[:width] for t in texts]
    return SampleOutput(
        tokens=jnp.asarray(np.stack([_padded(r, width) for r in rows])),
        lengths=jnp.asarray([len(r) for r in rows], jnp.int32),
        logprobs=jnp.zeros((len(rows), width)),
        stopped=jnp.asarray(stopped),
        scores=jnp.zeros((len(rows), 0)),
        entropy=jnp.zeros((len(rows), 0)),
        varentropy=jnp.zeros((len(rows), 0)),
    )


def test_critique_and_rewrite_prompts_write_the_journey_format(tok):
    config = refine.RefineConfig(rollouts=1, solution_length=S)
    fmt = refine.make_refine_format(tok, config)
    prompt, sol = _solution(tok, WRONG)
    stats, _ = _stats(tok, WRONG, None, [0.9, 0.1, 0.9])
    tree = refine.init_tree(1, 2, S)
    tree = refine.add_children(
        tree,
        jnp.asarray([-1]),
        jnp.asarray(_padded(sol, S)[None]),
        jnp.asarray([len(sol)]),
        jax.tree.map(lambda x: x[None], stats),
    )
    prompts = jnp.asarray(prompt[None])
    plens = jnp.asarray([len(prompt)], jnp.int32)
    node = jnp.asarray([0], jnp.int32)
    prefix, plen1 = refine.critique_prefixes(tree, node, prompts, plens, fmt)
    text = lambda ids, n: tok.decode(np.asarray(ids)[:n].tolist(), skip_special_tokens=False)
    head = longcot.render_chain(QUESTION, WRONG[:2], ["<positive_rating>", "<negative_rating>"])
    assert text(prefix[0], int(plen1[0])) == "<bos>" + head + longcot.step_header(2, 3) + "<critic>"

    critique = _sample(tok, ["9 * 2 is not 19"], 8, [False])  # ran out of budget: closed
    prefix2, plen2 = refine.rewrite_prefixes(prefix, plen1, tree, node, critique, fmt)
    kept = text(critique.tokens[0], 7)  # its last token gives way to <end_of_thought>
    assert kept == "9 * 2 is not "
    critic_line = longcot.step_header(2, 3) + "<critic>9 * 2 is not <end_of_thought>"
    rated = "<start_of_rating><positive_rating><end_of_rating>\n"
    assert text(prefix2[0], int(plen2[0])) == (
        "<bos>" + head + critic_line + rated + longcot.step_header(3, 4) + "<refine>"
    )
    rest = "9 * 2 = 18<end_of_thought>" + rated + longcot.step_header(4, 5)
    rest += "<conclusion>\\boxed{18}<end_of_thought>" + rated + "<eos>"
    rewrite = _sample(tok, [rest], S, [True])
    child, child_len, cut = refine.child_solutions(prefix2, plen2, plens, rewrite, fmt)
    assert not bool(cut[0])
    child_text = text(child[0], int(child_len[0]))
    prompt_text = longcot.render_prompt(QUESTION)
    assert child_text == text(prefix2[0], int(plen2[0]))[len("<bos>" + prompt_text) :] + rest
    steps = refine.solution_steps(child_text)
    assert refine.solution_answer(steps) == "18"


def _check_invariants(result, config):
    tree = result.tree
    n = config.capacity
    np.testing.assert_array_equal(tree.num_nodes, n)
    parent = np.asarray(tree.parent)
    for b in range(tree.batch_size):
        assert parent[b, 0] == -1 and all(0 <= parent[b, i] < i for i in range(1, n))
        kids = np.bincount(parent[b, 1:], minlength=n)
        np.testing.assert_array_equal(tree.num_children[b], kids)
        assert kids.max() <= config.max_children
        # A node's visits: its own evaluation and one per refinement below it.
        below = np.zeros(n, int)
        for i in range(n - 1, 0, -1):
            below[parent[b, i]] += 1 + below[i]
        np.testing.assert_array_equal(tree.visits[b], 1 + below)
        has = np.asarray(tree.has_answer[b])
        assert [a is not None for a in result.answers[b]] == has.tolist()
        cut = np.asarray(tree.truncated[b])
        assert not cut[0] and not (cut & has).any()  # a cut child has no answer
        assert result.truncated_children[b] == cut.sum()


@pytest.mark.parametrize("value", ["self_reward", "pprm"])
def test_a_run_keeps_the_tree_invariants_and_compiles_once(tok, model, value):
    cfg, params = model
    questions = [QUESTION, "Start with 7, subtract 3."]
    prompts, plens = encode_prompts(tok, questions)
    config = refine.RefineConfig(
        rollouts=3, solution_length=48, critique_length=8, value=value, max_children=2
    )
    judge = refine.PPRMJudge(params, cfg, None, tok) if value == "pprm" else None
    run = lambda seed: refine.run(
        params, cfg, tok, questions, prompts, plens, config, jax.random.key(seed), judge=judge
    )
    result = run(0)
    _check_invariants(result, config)
    w = refine.make_refine_format(tok, config).node_length  # S + the journey margin
    assert w > config.solution_length and result.tree.tokens.shape == (2, config.capacity, w)
    assert int(np.max(result.tree.lengths)) <= w
    jitted = (refine.select, refine.add_children, refine.backup, refine.step_statistics)
    sizes = [f._cache_size() for f in jitted]
    again = run(1)
    assert [f._cache_size() for f in jitted] == sizes
    _check_invariants(again, config)
    if value == "pprm":
        p = result.preferences[0]
        off = ~np.isnan(p)
        np.testing.assert_allclose((p + p.T)[off], 1.0, atol=1e-6)


def test_planted_tree_exports_to_longcot_and_feeds_sft(tok, tmp_path):
    """A root with a wrong answer and its refinement become one long-CoT tree that branches at
    the criticised step; its paths encode as SFT chains."""
    right = [
        "<expansion>4 + 5 = 9",
        "<expansion>9 * 2 = 19",
        "<critic>9 * 2 is not 19",
        "<refine>9 * 2 = 18",
        "<conclusion>\\boxed{18}",
    ]
    ratings = ["<positive_rating>", "<negative_rating>"] + ["<positive_rating>"] * 3
    steps = [
        refine.solution_steps(longcot.render_chain(QUESTION, WRONG)),
        refine.solution_steps(longcot.render_chain(QUESTION, right, ratings)),
    ]
    steps = [s[1:] for s in steps]  # drop the problem node the rendering starts with
    tree = refine.init_tree(1, 2, 4).replace(num_nodes=jnp.asarray([2]))
    result = refine.SearchResult(tree, [steps], [["19", "18"]], None, None)
    nodes = longcot.parse_tree(
        longcot.render_tree(refine.tree_to_longcot(result, 0, QUESTION, "18"))
    )
    assert len(nodes) == 1 + 3 + 4  # the shared first step, then two branches
    paths = longcot.tree_to_paths(nodes)
    assert [p[-1].rating for p in paths] == ["<negative_rating>", "<positive_rating>"]
    assert paths[1][2].rating == "<negative_rating>" and paths[1][3].action == "<critic>"
    # Written as `evaluate --trees` writes it, the tree feeds SFT through data.sft_trees: its
    # one right path (the journey) becomes one example.
    (tmp_path / "trees").mkdir()
    (tmp_path / "trees" / "p1.txt").write_text(longcot.render_tree(nodes))
    config = RunConfig(data=DataConfig(sft_trees=str(tmp_path / "trees")))
    (example,) = sft_examples(config, tok, [])
    journey = [n.text for n in longcot.right_paths(nodes)[0][1:]]
    assert journey == right
    ids, mask = encode_chain(tok, QUESTION, journey, ratings)
    np.testing.assert_array_equal(example.tokens, ids)
    np.testing.assert_array_equal(example.loss_mask, mask)
    # The same tree again, as a second search's (`evaluate --search mctsr,sr-mcts --trees`
    # writes both under DIR/<search>/; they share the root): its path is read once.
    (tmp_path / "trees" / "sr-mcts").mkdir()
    (tmp_path / "trees" / "sr-mcts" / "p1.txt").write_text(longcot.render_tree(nodes))
    assert len(sft_examples(config, tok, [])) == 1
    # The tree of a held-out problem (what `evaluate --trees` writes by default) never trains.
    with pytest.raises(ConfigError, match="no training example"):
        sft_examples(config, tok, [], held_out=[QUESTION])
    (tmp_path / "trees" / "p2.txt").write_text("<start_of_father_id>-1<end_of_father_id>oops")
    with pytest.raises(DataError, match=r"^data.sft_trees: .*p2\.txt: long-CoT text, offset \d+"):
        sft_examples(config, tok, [])


@pytest.mark.parametrize("rated", [False, True])
def test_the_pprm_reads_solutions_as_it_was_trained_to(tok, model, rated, monkeypatch):
    """A rated judge reads each solution's effective thoughts with the verdicts of its own base
    model (`ratings.thought_ratings`, no adapter); an unrated one reads the bare thoughts."""
    from o1jax.search import pprm, ratings

    cfg, params = model
    journey = refine.solution_steps(
        longcot.render_chain(
            QUESTION,
            [
                *WRONG[:2],
                "<critic>9 * 2 is not 19",
                "<refine>9 * 2 = 18",
                "<conclusion>\\boxed{18}",
            ],
            ["<positive_rating>", "<negative_rating>"] + ["<positive_rating>"] * 3,
        )
    )[1:]
    calls, rate = [], ratings.thought_ratings
    monkeypatch.setattr(refine, "thought_ratings", lambda *a, **k: calls.append(a) or rate(*a))
    judge = refine.PPRMJudge(params, cfg, None, tok, rated=rated)
    texts = refine.pprm_texts(judge, [QUESTION, QUESTION], [journey, journey[:1]])
    effective = ["<expansion>4 + 5 = 9", "<expansion>9 * 2 = 18", "<conclusion>\\boxed{18}"]
    if not rated:
        assert calls == [] and texts == [pprm.solution_text(effective), effective[0]]
        return
    (call,) = calls
    assert call[0] is judge.params and call[3] == [(QUESTION, effective), (QUESTION, effective[:1])]
    verdicts = rate(params, cfg, tok, call[3])
    assert texts == [
        pprm.solution_text(effective, verdicts[0]),
        pprm.solution_text(effective[:1], verdicts[1]),
    ]


# ----------------------------------------------------------------------------- review 9b fixes
def _rewrite_case(tok, rest: str, config):
    """A one-node tree whose root (a 6-step solution) is refined at its weakest step (step 3),
    with `rest` as the rewrite: (fmt, tree, child [1, W], its length, truncated, the journey's
    full length, the root's step statistics)."""
    question = "Start with 4, add 5, multiply by 2, add 1."
    parent_steps = [
        "<expansion>4 + 5 = 9",
        "<expansion>9 * 2 = 18",
        "<expansion>18 + 1 = 20",
        "<expansion>so the result is 20",
        "<expansion>check: 20 is an integer",
        "<conclusion>\\boxed{20}",
    ]
    s = config.solution_length
    fmt = refine.make_refine_format(tok, config)
    ids, _ = encode_chain(tok, question, parent_steps)
    plen = int(encode_prompts(tok, [question])[1][0])
    prompt, sol = ids[:plen], ids[plen:]
    assert len(sol) <= s
    sor = np.nonzero(sol == fmt.step.start_of_rating)[0]
    positive = np.full((fmt.node_length,), 0.9, np.float32)
    positive[sor] = [0.9, 0.9, 0.1, 0.9, 0.9, 0.9]  # step 3 is the weakest
    w = fmt.node_length
    stats = refine._step_stats_one(
        jnp.asarray(_padded(sol, w)), len(sol), jnp.asarray(positive), fmt, config
    )
    tree = refine.init_tree(1, 3, w)
    tree = refine.add_children(
        tree,
        jnp.asarray([-1]),
        jnp.asarray(_padded(sol, w)[None]),
        jnp.asarray([len(sol)]),
        jax.tree.map(lambda x: x[None], stats),
    )
    prompts, plens = jnp.asarray(prompt[None]), jnp.asarray([plen], jnp.int32)
    node = jnp.asarray([0])
    prefix, l1 = refine.critique_prefixes(tree, node, prompts, plens, fmt)
    critique = _sample(tok, ["18 + 1 is not 20<end_of_thought>"], config.critique_length, [True])
    prefix2, l2 = refine.rewrite_prefixes(prefix, l1, tree, node, critique, fmt)
    rewrite = _sample(tok, [rest], s, [True])  # stopped on EOS within its S-token budget
    assert int(rewrite.lengths[0]) < s
    child, child_len, cut = refine.child_solutions(prefix2, l2, plens, rewrite, fmt)
    journey = int(l2[0]) - plen + int(rewrite.lengths[0])
    return fmt, tree, child, child_len, cut, journey, stats


_RATED = "<start_of_rating><positive_rating><end_of_rating>\n"


def test_a_rewrite_about_as_long_as_what_it_replaces_fits_its_node_slot(tok):
    """Review 9b #1: a finished rewrite kept whole, though the journey is longer than S."""
    config = refine.RefineConfig(rollouts=1, solution_length=S)  # C = 24
    rest = (
        "18 + 1 = 19<end_of_thought>" + _RATED + longcot.step_header(5, 6)
        + "<expansion>so the result is 19<end_of_thought>" + _RATED + longcot.step_header(6, 7)
        + "<expansion>check: 19 is an integer<end_of_thought>" + _RATED + longcot.step_header(7, 8)
        + "<conclusion>\\boxed{19}<end_of_thought>" + _RATED + "<eos>"
    )  # fmt: skip
    fmt, _, child, child_len, cut, journey, _ = _rewrite_case(tok, rest, config)
    h, w = fmt.step.headers.shape[1], fmt.step.suffixes.shape[1]
    assert fmt.node_length == S + config.critique_length + 2 * (h + w) + 2
    assert fmt.max_steps >= fmt.node_length // 8 + 2
    assert S < journey <= fmt.node_length and child.shape == (1, fmt.node_length)
    assert not bool(cut[0]) and int(child_len[0]) == journey
    text = tok.decode(np.asarray(child[0])[: int(child_len[0])].tolist(), skip_special_tokens=False)
    assert text.endswith("<conclusion>\\boxed{19}<end_of_thought>" + _RATED + "<eos>")
    assert refine.solution_answer(refine.solution_steps(text)) == "19"


def test_a_cut_child_is_flagged_answerless_never_selected_and_counted(tok):
    """Review 9b #1: a journey longer than the node slot is reported, recorded in the tree,
    has no answer, is never refined, and is counted in the search result."""
    config = refine.RefineConfig(rollouts=2, solution_length=S, max_children=1)
    steps = "".join(
        f"<expansion>18 + 1 = 19 and 19 = 19 once more, step {k}<end_of_thought>"
        + _RATED
        + longcot.step_header(4 + k, 5 + k)
        for k in range(2)
    )
    rest = "18 + 1 = 19<end_of_thought>" + _RATED + longcot.step_header(4, 5) + steps
    rest += "<conclusion>\\boxed{19}<end_of_thought>" + _RATED + "<eos>"
    fmt, tree, child, child_len, cut, journey, stats = _rewrite_case(tok, rest, config)
    assert journey > fmt.node_length  # the rewrite fits its budget S, the journey its slot not
    assert bool(cut[0]) and int(child_len[0]) == fmt.node_length
    # Even were the step statistics to claim an answer, the cut child has none.
    claim = jax.tree.map(lambda x: x[None], stats.replace(has_answer=jnp.asarray(True)))
    tree = refine.add_children(tree, jnp.asarray([0]), child, child_len, claim, cut)
    assert tree.truncated.tolist() == [[False, True, False]]
    assert tree.has_answer.tolist() == [[True, False, False]]
    # Valued well above its parent, it would be the only candidate (its parent is fully
    # expanded and beaten); a cut child is never refined, so the root is.
    tree = refine.backup(tree, jnp.asarray([[0.0, 0.9, 0.0]]))
    assert int(refine.select(tree, config)[0]) == 0
    wide = refine.RefineConfig(rollouts=2, solution_length=S, max_children=2)
    assert int(refine.select(tree, wide)[0]) == 0
    result = refine.SearchResult(tree, [[[], []]], [["20", None]], None, None)
    assert result.truncated_children.tolist() == [1]


def test_a_step_without_a_real_rating_breaks_the_chain(tok):
    """Review 9b #3: <start_of_rating>/<end_of_rating> are not ratings, on host and device."""
    question = "Start with 4, add 5."
    ok = longcot.step_header(0, 1) + "<expansion>4 + 5 = 9" + longcot.step_suffix()
    bad = (
        longcot.step_header(1, 2) + "<conclusion>\\boxed{9}<end_of_thought>"
        "<start_of_rating><end_of_rating><end_of_rating>\n<eos>"
    )  # no rating token sampled
    steps = refine.solution_steps(ok + bad)
    assert steps == [("<expansion>4 + 5 = 9", longcot.POSITIVE_RATING)]
    assert refine.solution_answer(steps) is None
    tree = refine.init_tree(1, 1, 4).replace(num_nodes=jnp.asarray([1]))
    result = refine.SearchResult(tree, [[steps]], [[None]], None, None)
    nodes = refine.tree_to_longcot(result, 0, question, "9")
    assert [n.text for n in nodes] == ["<problem>" + question, "<expansion>4 + 5 = 9"]
    # The device's step statistics agree: the conclusion is no complete step, so no answer.
    config = refine.RefineConfig(solution_length=S)
    fmt = refine.make_refine_format(tok, config)
    w = fmt.node_length
    sol = np.asarray(tok.encode(ok + bad, add_special_tokens=False), np.int32)
    stats = refine._step_stats_one(
        jnp.asarray(_padded(sol, w)), len(sol), jnp.full((w,), 0.9, jnp.float32), fmt, config
    )
    assert not bool(stats.has_answer) and float(stats.self_reward) == -1.0
    assert np.isnan(np.asarray(stats.positive)[1])
    # Each real rating token still makes a complete step.
    for rating in longcot.RATINGS:
        text = ok + longcot.step_header(1, 2) + "<conclusion>\\boxed{9}"
        text += longcot.step_suffix(rating)
        assert refine.solution_steps(text)[1] == ("<conclusion>\\boxed{9}", rating)


def test_solution_steps_read_steps_back_to_back_and_stop_at_the_first_malformed_one():
    """Review 9b #4: a malformed step (or text between steps) ends the chain; it is not skipped."""
    header = longcot.step_header
    step = lambda k, thought: header(k - 1, k) + thought + longcot.step_suffix()
    no_start = header(0, 1)[: -len(longcot.START_OF_THOUGHT)] + "<expansion>4 + 5 = 10"
    no_start += longcot.step_suffix()
    conclusion = step(2, "<conclusion>\\boxed{10}")
    steps = refine.solution_steps(no_start + conclusion + "<eos>")
    assert steps == [] and refine.solution_answer(steps) is None
    first = step(1, "<expansion>4 + 5 = 9")
    assert len(refine.solution_steps(first + "junk" + conclusion)) == 1
    assert len(refine.solution_steps("junk" + first + conclusion)) == 0
    # What the renderers write parses whole: steps joined by "\n", with or without a last one,
    # and whatever follows the last step (EOS, a cut step) is not read.
    whole = first + conclusion
    assert [t for t, _ in refine.solution_steps(whole + "<eos>")] == [
        "<expansion>4 + 5 = 9",
        "<conclusion>\\boxed{10}",
    ]
    assert len(refine.solution_steps(whole[:-1])) == 2
    assert len(refine.solution_steps(whole + header(2, 3) + "<expansion>cut")) == 2
    nodes = longcot.chain(QUESTION, WRONG)
    assert len(refine.solution_steps(longcot.render_tree(nodes))) == 1 + len(WRONG)
    assert len(refine.solution_steps(longcot.render_chain(QUESTION, WRONG))) == 1 + len(WRONG)


def test_export_keeps_a_criticised_conclusion_negative_and_the_right_root_path():
    """Review 9b #2: with `truth`, a conclusion the next step criticises is not re-rated, so the
    child's copy does not merge with the parent's right answer."""
    body = lambda text: text[len(longcot.render_prompt(QUESTION)) :]
    root = body(longcot.render_chain(QUESTION, ["<conclusion>\\boxed{18}"]))  # right
    child = body(
        longcot.render_chain(
            QUESTION,
            [
                "<conclusion>\\boxed{18}",
                "<critic>the answer is not justified",
                "<refine>4 + 5 = 9, 9 * 2 = 19",
                "<conclusion>\\boxed{19}",
            ],
            ["<negative_rating>"] + ["<positive_rating>"] * 3,
        )
    )
    steps = [refine.solution_steps(root), refine.solution_steps(child)]
    tree = refine.init_tree(1, 2, 4).replace(num_nodes=jnp.asarray([2]))
    result = refine.SearchResult(tree, [steps], [["18", "19"]], None, None)
    nodes = refine.tree_to_longcot(result, 0, QUESTION, truth="18")
    paths = longcot.tree_to_paths(nodes)
    assert len(paths) == 2
    by_length = sorted(paths, key=len)
    assert [n.rating for n in by_length[0][1:]] == ["<positive_rating>"]
    assert [n.rating for n in by_length[1][1:]] == [
        "<negative_rating>",  # the criticised copy keeps the search's rating
        "<positive_rating>",
        "<positive_rating>",
        "<negative_rating>",  # 19 is wrong
    ]
    right = longcot.right_paths(nodes)
    assert [[n.text for n in p[1:]] for p in right] == [["<conclusion>\\boxed{18}"]]


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("c_uct", -1.0, r"c_uct must be >= 0, got -1.0"),
        ("temperature", -1.0, r"temperature must be >= 0, got -1.0"),
        ("root_temperature", -0.5, r"root_temperature must be >= 0, got -0.5"),
        ("top_k", -1, r"top_k must be >= 0, got -1"),
        ("top_p", 1.5, r"top_p must be in \(0, 1\], got 1.5"),
        ("eps", 0.0, r"eps must be a finite number > 0, got 0.0"),
        ("suppress_at", -100.0, r"suppress_at must be > -100, got -100.0"),
        ("suppressed_score", 101.0, r"suppressed_score must be in \[-100, 100\], got 101.0"),
        ("ebc_weight", 1.5, r"ebc_weight must be in \[0, 1\], got 1.5"),
        ("rollouts", 0, r"rollouts must be >= 1, got 0"),
        ("solution_length", 7, r"solution_length must be >= 8, got 7"),
        ("critique_length", 0, r"critique_length must be >= 1, got 0"),
        ("c_uct", float("nan"), r"c_uct must be a finite number, got nan"),
    ],
)
def test_config_fields_out_of_range_are_named(field, value, message):
    with pytest.raises(ValueError, match=r"RefineConfig\." + message):
        refine.RefineConfig(**{field: value})


def test_config_accepts_the_edges_of_its_ranges():
    refine.RefineConfig()
    refine.RefineConfig(c_uct=0.0, temperature=0.0, ebc_weight=1.0, suppress_at=float("inf"))


# ----------------------------------------------------------------------------- review 14 fixes
def test_a_node_that_repeats_an_earlier_solution_ties_with_it(tok, model):
    """SR-MCTS: a rewrite whose effective solution is its parent's again is the same PPRM prompt
    in both orders, so P = 1/2 exactly and neither outranks the other; each pair sums to 1
    exactly. ((x + 1 - x) / 2 rounded to 0.49999997 for some x: the older copy beat the newer.)"""
    cfg, params = model
    judge = refine.PPRMJudge(params, cfg, None, tok)
    texts = [
        ["<expansion>4 + 5 = 9; <conclusion>\\boxed{9}"] * 2 + ["<conclusion>\\boxed{8}"],
        ["<conclusion>\\boxed{18}", "<conclusion>\\boxed{19}", "<conclusion>\\boxed{18}"],
        ["<expansion>9 * 2 = 18", "<expansion>7 - 3 = 4", "<expansion>9 * 2 = 18"],
    ]
    twins = [(0, 1), (0, 2), (0, 2)]
    b, n = len(texts), 3
    questions = [QUESTION, QUESTION, "Start with 7, subtract 3."]
    has = np.ones((b, n), bool)
    pref = np.full((b, n, n), np.nan, np.float32)
    for new in range(1, n):
        refine._pprm_update(judge, questions, texts, has, pref, new, b)
    off = ~np.eye(n, dtype=bool)
    for t, (i, j) in enumerate(twins):
        assert ((pref[t] + pref[t].T)[off] == 1.0).all()
        assert pref[t, i, j] == 0.5 and pref[t, j, i] == 0.5
    parent = np.asarray([[-1, 0, 0]] * b)
    _, global_value = refine.pprm_values(parent, has, pref, weight=0.5)
    for t, (i, j) in enumerate(twins):
        assert global_value[t, i] == global_value[t, j]


def _planted_generate(tok, texts):
    """A stand-in for `generate` that returns `texts` in turn (one per call, every row alike)."""
    calls = iter(texts)

    def generate(params, cfg, prompts, lengths, *, max_new_tokens, **_):
        ids = tok.encode(next(calls), add_special_tokens=False)[:max_new_tokens]
        b = prompts.shape[0]
        row = _padded(ids, max_new_tokens)
        return SampleOutput(
            tokens=jnp.asarray(np.stack([row] * b)),
            lengths=jnp.full((b,), len(ids), jnp.int32),
            logprobs=jnp.zeros((b, max_new_tokens), jnp.float32),
            stopped=jnp.ones((b,), bool),
            scores=jnp.zeros((b, 0), jnp.float32),
            entropy=jnp.zeros((b, 0), jnp.float32),
            varentropy=jnp.zeros((b, 0), jnp.float32),
        )

    return generate


def test_an_answer_is_only_read_from_a_chain_the_host_parses_whole(tok, model, monkeypatch):
    """Text between two steps breaks the host's parse (`solution_steps`) after the first
    conclusion, while the device reads every rated step: the node was valued as a solution
    ending in 18 but reported the answer 9. Such a chain is malformed: no answer, value -1."""
    cfg, params = model
    step = lambda k, thought: longcot.step_header(k - 1, k) + thought + longcot.step_suffix()
    root = step(1, "<expansion>4 + 5 = 9") + step(2, "<conclusion>\\boxed{9}") + "oops"
    root += step(3, "<expansion>9 * 2 = 18") + step(4, "<conclusion>\\boxed{18}") + "<eos>"
    whole = step(1, "<expansion>4 + 5 = 9") + step(2, "<conclusion>\\boxed{9}") + "<eos>"
    config = refine.RefineConfig(rollouts=1, solution_length=S, critique_length=8)
    prompts, plens = encode_prompts(tok, [QUESTION, QUESTION])
    for text, answer in ((root, None), (whole, "9")):
        generate = _planted_generate(tok, [text, "not 9<end_of_thought>", "<eos>"])
        monkeypatch.setattr(refine, "generate", generate)
        result = refine.run(
            params, cfg, tok, [QUESTION] * 2, prompts, plens, config, jax.random.key(0)
        )
        assert [result.answers[b][0] for b in range(2)] == [answer] * 2
        assert np.asarray(result.tree.has_answer[:, 0]).tolist() == [answer is not None] * 2
        if answer is None:
            assert len(result.steps[0][0]) == 2  # the host stopped at "oops"
            np.testing.assert_array_equal(result.tree.value[:, 0], -1.0)
        else:
            assert (np.asarray(result.tree.value[:, 0]) > -1.0).all()


def test_trees_that_only_pad_a_batch_are_neither_read_nor_judged(tok, model, monkeypatch):
    """An evaluation's last batch repeats a problem to fill its compiled shape. Those trees grow
    on device like the others, but their solutions are not decoded, hold no answers and never
    reach the PPRM (they were judged in full: wasted pair forwards)."""
    cfg, params = model
    step = lambda k, thought: longcot.step_header(k - 1, k) + thought + longcot.step_suffix()
    whole = step(1, "<expansion>4 + 5 = 9") + step(2, "<conclusion>\\boxed{9}") + "<eos>"
    critique = "9?<end_of_thought>"  # of step 1, the weakest by the random model's ratings
    rewrite = "4 + 5 = 9<end_of_thought>" + _RATED + longcot.step_header(3, 4)
    rewrite += "<conclusion>\\boxed{9}<end_of_thought>" + _RATED + "<eos>"
    questions = [QUESTION, QUESTION]  # the second only pads the batch when live = 1
    prompts, plens = encode_prompts(tok, questions)
    config = refine.RefineConfig(rollouts=1, solution_length=S, critique_length=8, value="pprm")
    judge = refine.PPRMJudge(params, cfg, None, tok)
    judged = []  # one entry per pair prompt the PPRM reads
    encode_pair = refine.pprm.encode_pair
    monkeypatch.setattr(
        refine.pprm, "encode_pair", lambda *args: judged.append(1) or encode_pair(*args)
    )
    for live in (None, 1):
        judged.clear()
        monkeypatch.setattr(refine, "generate", _planted_generate(tok, [whole, critique, rewrite]))
        result = refine.run(
            params,
            cfg,
            tok,
            questions,
            prompts,
            plens,
            config,
            jax.random.key(0),
            judge=judge,
            live=live,
        )
        assert result.answers[0] == ["9", "9"]
        assert len(judged) == 2 * (live or 2)  # node 1 against node 0, in both orders
        if live == 1:
            assert result.answers[1] == [None, None] and result.steps[1] == [[], []]
            assert not np.asarray(result.tree.has_answer[1]).any()
    with pytest.raises(ValueError, match="live must be in"):
        refine.run(params, cfg, tok, questions, prompts, plens, config, jax.random.key(0), live=3)
