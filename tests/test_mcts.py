"""MCTS: tree invariants, backup arithmetic, a planted problem, prefixes, no recompiles."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from o1jax.search import mcts
from o1jax.search.mcts import Expansion, MCTSConfig, StepFormat
from o1jax.search.tree import NO_NODE, ROOT, first_children, init_tree

CONCLUSION, EOT = 3, 4
L = 6


def synthetic_expand_fn(config: MCTSConfig, answer_depth: int, seed: int = 0):
    """A stand-in policy: random priors and ratings; thoughts at `answer_depth` are conclusions.

    Token 1 of a thought encodes its branch code (parent code * K + j + 1), so a reward function
    can plant one correct path.
    """
    k = config.num_children

    @jax.jit
    def expand(tree, leaf, key):
        b = tree.batch_size
        rows = jnp.arange(b)
        depth = tree.depth[rows, leaf] + 1  # [B]
        parent_code = tree.tokens[rows, leaf, 1]
        code = parent_code[:, None] * k + jnp.arange(1, k + 1)[None, :]  # [B, K]
        first = jnp.where(depth[:, None] >= answer_depth, CONCLUSION, 7)
        tokens = jnp.zeros((b, k, L), jnp.int32)
        tokens = tokens.at[:, :, 0].set(jnp.broadcast_to(first, (b, k)))
        tokens = tokens.at[:, :, 1].set(code).at[:, :, 2].set(EOT)
        k1, k2 = jax.random.split(jax.random.fold_in(key, seed))
        logprobs = jnp.where(
            jnp.arange(L) < 3, jax.random.uniform(k1, (b, k, L), minval=-3, maxval=0), 0.0
        )
        rating = jax.random.uniform(k2, (b, k))
        return Expansion(
            tokens=tokens,
            lengths=jnp.full((b, k), 3),
            logprobs=logprobs,
            stopped=jnp.ones((b, k), bool),
            is_answer=tokens[:, :, 0] == CONCLUSION,
            rating=rating,
            reward=jnp.zeros((b, k)),
        )

    return expand


def _check_invariants(tree, leaves, config):
    """Structure and visit-count identities of every tree (numpy)."""
    t = jax.tree.map(np.asarray, tree)
    k = config.num_children
    most = max(1, -(-config.max_children // k)) * k  # the first multiple of K >= max_children
    for b in range(t.parent.shape[0]):
        n_used = t.num_nodes[b]
        assert (n_used - 1) % k == 0
        assert np.all(t.parent[b, n_used:] == NO_NODE)
        assert np.all(t.num_children[b, n_used:] == 0)
        for node in range(1, n_used):
            p = t.parent[b, node]
            assert 0 <= p < node
            assert t.depth[b, node] == t.depth[b, p] + 1 <= config.max_depth
        for block in range(1, n_used, k):  # each expansion's K children are one block
            assert len(set(t.parent[b, block : block + k])) == 1
        for node in range(n_used):
            kids = [c for c in range(1, n_used) if t.parent[b, c] == node]
            assert t.num_children[b, node] == len(kids) <= most
            assert len(kids) % k == 0
            firsts = t.first_child[b, node]  # the index selection reads: every block, in order
            indexed = [f + i for f in firsts if f != NO_NODE for i in range(k)]
            assert indexed == kids and np.all(firsts[len(kids) // k :] == NO_NODE)
            assert not (t.terminal[b, node] and kids), "terminal nodes never expand"
            times_leaf = sum(1 for step in leaves if step[b] == node)
            base = 0 if node == 0 else 1
            expected = base + times_leaf + sum(t.visits[b, c] - 1 for c in kids)
            assert t.visits[b, node] == expected
        assert t.visits[b, 0] == len(leaves)


@pytest.mark.parametrize("max_children", [0, 5])
@pytest.mark.parametrize("seed", range(4))
def test_tree_invariants_hold_after_every_simulation(seed, max_children):
    config = MCTSConfig(
        num_simulations=10, num_children=3, max_children=max_children, max_depth=4,
        thought_length=L, noise=0.05,
    )  # fmt: skip
    expand = synthetic_expand_fn(config, answer_depth=3, seed=seed)
    tree = init_tree(5, config.capacity, L, config.expansions_per_node)
    key = jax.random.key(seed)
    leaves = []
    for _ in range(config.num_simulations):
        key, k1, k2 = jax.random.split(key, 3)
        leaf = mcts.select(tree, k1, config)
        leaves.append(np.asarray(leaf))
        tree = mcts.insert_and_backup(tree, leaf, expand(tree, leaf, k2), config, False)
        _check_invariants(tree, leaves, config)
    assert np.asarray(tree.terminal).any()  # terminals were reached and re-selected
    if max_children:  # some node was widened: it has two blocks of children
        assert (np.asarray(tree.num_children) == 6).any()


def _rated_expand_fn(ratings):
    """One tree's expansions: two children rated by the next pair of `ratings`."""
    ratings = iter(ratings)

    def expand(tree, leaf, key):
        return Expansion(
            tokens=jnp.full((1, 2, L), 7),
            lengths=jnp.full((1, 2), 2),
            logprobs=jnp.full((1, 2, L), -1.0),
            stopped=jnp.ones((1, 2), bool),
            is_answer=jnp.zeros((1, 2), bool),
            rating=jnp.asarray([next(ratings)], jnp.float32),
            reward=jnp.zeros((1, 2)),
        )

    return expand


def test_backup_matches_a_hand_computed_tree():
    config = MCTSConfig(
        num_simulations=3,
        num_children=2,
        max_depth=5,
        thought_length=L,
        discount=0.5,
        backup="max",
        noise=0.0,
        c_puct=1.0,
    )
    expand = _rated_expand_fn([[0.2, 0.6], [0.9, 0.1], [0.3, 0.4]])
    tree = mcts.run(expand, 1, config, jax.random.key(0))
    t = jax.tree.map(lambda x: np.asarray(x)[0], tree)
    # A value reaches the node k levels above the node it was measured at as 0.5^k of it.
    # sim 1: root -> children 1 (0.2), 2 (0.6); root gets 0.5 * max = 0.3.
    # sim 2: equal priors, Q 0.2 vs 0.6 -> node 2; children 3 (0.9), 4 (0.1); node 2 gets
    #        0.5 * 0.9 = 0.45 (Q 1.05 / 2), root 0.25 * 0.9 = 0.225.
    # sim 3: the root's children have 3 visits: node 1 score 0.2 + 0.5*sqrt3/2 = 0.633; node 2:
    #        0.525 + 0.5*sqrt3/3 = 0.814 -> node 2, whose children have 2 visits: node 3 Q
    #        0.9 + 0.5*sqrt2/2 beats node 4 -> expand node 3
    #        with children 5 (0.3), 6 (0.4): node 3 gets 0.5 * 0.4, node 2 0.25 * 0.4, root
    #        0.125 * 0.4.
    np.testing.assert_array_equal(t.parent[:7], [-1, 0, 0, 2, 2, 3, 3])
    np.testing.assert_array_equal(t.visits[:7], [3, 1, 3, 2, 1, 1, 1])
    np.testing.assert_allclose(
        t.value_sum[:7],
        [0.3 + 0.225 + 0.05, 0.2, 0.6 + 0.45 + 0.1, 0.9 + 0.2, 0.1, 0.3, 0.4],
        rtol=1e-6,
    )
    np.testing.assert_array_equal(t.depth[:7], [0, 1, 1, 2, 2, 3, 3])


def _built_tree(parent, q, visits, terminal=(), num_children=2, expansions=4):
    """One tree from its parents, Q values and visit counts (value_sum = Q * visits; equal
    priors; `terminal` lists terminal nodes; children in blocks of `num_children`)."""
    n = len(parent)
    parent = np.asarray(parent, np.int32)
    depth = np.zeros(n, np.int32)
    for i in range(1, n):
        depth[i] = depth[parent[i]] + 1
    children = np.bincount(parent[1:], minlength=n).astype(np.int32)
    visits = np.asarray(visits, np.int32)
    padded_parent = jnp.asarray(np.pad(parent, (0, 4), constant_values=-1))[None]
    return init_tree(1, n + 4, L).replace(
        parent=padded_parent,
        first_child=first_children(padded_parent, num_children, expansions),
        num_children=jnp.asarray(np.pad(children, (0, 4)))[None],
        depth=jnp.asarray(np.pad(depth, (0, 4)))[None],
        visits=jnp.asarray(np.pad(visits, (0, 4)))[None],
        value_sum=jnp.asarray(np.pad(np.asarray(q, np.float32) * visits, (0, 4)))[None],
        terminal=jnp.asarray(np.isin(np.arange(n + 4), terminal))[None],
        num_nodes=jnp.asarray([n]),
    )


WIDEN = dict(num_children=2, max_depth=5, thought_length=L, noise=0.0, c_puct=1.0)


def test_a_node_whose_children_disappoint_widens_up_to_max_children():
    """max_children 3, discount 0.5. The root is full (4 children); PUCT picks node 2 (Q 0.55,
    score 0.703 against 0.506 for node 1). Its children pass up at most 0.5 * 0.4 = 0.2 < 0.55,
    so node 2 itself is selected to widen. With 4 children it has no room: the descent goes on."""
    config = MCTSConfig(max_children=3, discount=0.5, **WIDEN)
    parent = [-1, 0, 0, 0, 0, 2, 2]
    q = [0.4, 0.2, 0.55, 0.1, 0.1, 0.3, 0.4]
    tree = _built_tree(parent, q, [6, 1, 3, 1, 1, 1, 1])
    assert int(mcts.select(tree, jax.random.key(1), config)[0]) == 2
    full = _built_tree([*parent, 2, 2], [*q, 0.3, 0.3], [8, 1, 5, 1, 1, 1, 1, 1, 1])
    assert int(mcts.select(full, jax.random.key(1), config)[0]) == 6  # its best child


def test_children_that_pass_up_as_much_as_their_parent_stop_the_widening():
    """Discount 1: node 2's best child passes up 0.9 > its Q 0.55, so the descent goes past it.
    At discount 0.5 a child passing up exactly node 2's Q (0.5 * 0.4 = 0.2) is a tie, and a tie
    never widens, whatever float32 rounding does to the two sides."""
    tree = _built_tree([-1, 0, 0, 0, 0, 2, 2], [0.4, 0.2, 0.55, 0.1, 0.1, 0.3, 0.9],
                       [6, 1, 3, 1, 1, 1, 1])  # fmt: skip
    config = MCTSConfig(max_children=4, discount=1.0, **WIDEN)  # the root is full
    assert int(mcts.select(tree, jax.random.key(1), config)[0]) == 6
    tie = _built_tree([-1, 0, 0, 0, 0, 0, 0, 2, 2],
                      [0.1, 0.05, 0.6 / 3, 0.05, 0.05, 0.05, 0.05, 0.3, 0.4],
                      [9, 1, 3, 1, 1, 1, 1, 1, 1])  # fmt: skip
    config = MCTSConfig(max_children=6, discount=0.5, **WIDEN)  # the root is full
    assert int(mcts.select(tie, jax.random.key(1), config)[0]) == 8


def test_a_root_with_room_widens_even_when_its_children_all_failed():
    """The root has no value of its own (its Q is what its children pass up), so it widens
    whenever it has room: two wrong conclusions (Q 0) do not end the search."""
    tree = _built_tree([-1, 0, 0], [0.0, 0.0, 0.0], [3, 1, 1], terminal=(1, 2))
    assert int(mcts.select(tree, jax.random.key(0), MCTSConfig(max_children=5, **WIDEN))[0]) == 0
    # Expanded once (the default): the descent ends on a terminal child.
    assert int(mcts.select(tree, jax.random.key(0), MCTSConfig(**WIDEN))[0]) in (1, 2)


def test_max_children_below_num_children_is_refused():
    with pytest.raises(ValueError, match="max_children must be 0 or >= num_children"):
        MCTSConfig(num_children=3, max_children=2)
    assert MCTSConfig(num_children=3).max_children == 0  # each node expanded once


def test_puct_is_llama_o1s_softmax_of_priors_over_summed_child_visits():
    """LLaMA-O1: prior = exp(length-normalised log-prob); score = Q + c softmax(priors)[child]
    sqrt(sum of the children's visits) / (1 + visits). Two children with mean log-probs log 0.9
    and log 0.1, valued 0.30 and 0.75: softmax(0.9, 0.1) = (0.69, 0.31) and sqrt(2) give 0.983
    and 1.057, so the second. (The softmax of the log-priors, (0.9, 0.1), would pick the first.)"""
    config = MCTSConfig(num_simulations=2, num_children=2, thought_length=L, noise=0.0)
    mean_logp = jnp.log(jnp.asarray([0.9, 0.1]))
    logprobs = jnp.zeros((1, 2, L)).at[0, :, :2].set(jnp.stack([mean_logp, mean_logp], -1))
    expansion = Expansion(
        tokens=jnp.full((1, 2, L), 7),
        lengths=jnp.full((1, 2), 2),
        logprobs=logprobs,
        stopped=jnp.ones((1, 2), bool),
        is_answer=jnp.zeros((1, 2), bool),
        rating=jnp.asarray([[0.30, 0.75]]),
        reward=jnp.zeros((1, 2)),
    )
    tree = init_tree(1, config.capacity, L)
    tree = mcts.insert_and_backup(tree, jnp.zeros(1, jnp.int32), expansion, config, False)
    np.testing.assert_allclose(tree.prior_logit[0, 1:3], mean_logp, rtol=1e-6)
    prior = np.exp([0.9, 0.1]) / np.exp([0.9, 0.1]).sum()
    score = np.asarray([0.30, 0.75]) + config.c_puct * prior * np.sqrt(2) / 2
    assert score[1] > score[0]
    assert int(mcts.select(tree, jax.random.key(0), config)[0]) == 2


@pytest.mark.parametrize(
    "entropy_prior, varentropy_bonus, expected",
    [(False, 0.0, 1), (True, 0.0, 2), (False, 0.1, 2), (False, 0.01, 1), (True, 0.1, 2)],
)
def test_llama_o1_entropy_prior_and_varentropy_bonus(entropy_prior, varentropy_bonus, expected):
    """LLaMA-O1's PUCT: Q + c softmax(priors) softmax(entropies) sqrt(sum visits) / (1 + visits)
    + lambda softmax(varentropies). Equal priors; Q 0.60 and 0.55; entropies 0.1 and 2.0;
    varentropies 0 and 3. Plain PUCT picks node 1 (0.60 + 0.495 against 0.55 + 0.495); the
    entropy factor (0.13, 0.87) gives 0.66 against 0.98; a bonus of 0.1 adds 0.005 and 0.095,
    enough for node 2; one of 0.01 adds 0.0005 and 0.0095, not enough."""
    config = MCTSConfig(
        num_simulations=2, num_children=2, thought_length=L, noise=0.0,
        entropy_prior=entropy_prior, varentropy_bonus=varentropy_bonus,
    )  # fmt: skip
    expansion = _rated_expand_fn([[0.60, 0.55]])(None, None, None).replace(
        entropy=jnp.asarray([[0.1, 2.0]]), varentropy=jnp.asarray([[0.0, 3.0]])
    )
    tree = init_tree(1, config.capacity, L)
    tree = mcts.insert_and_backup(tree, jnp.zeros(1, jnp.int32), expansion, config, False)
    np.testing.assert_allclose(tree.entropy[0, 1:3], [0.1, 2.0])
    np.testing.assert_allclose(tree.varentropy[0, 1:3], [0.0, 3.0])
    assert int(mcts.select(tree, jax.random.key(0), config)[0]) == expected


def test_entropy_terms_need_puct():
    with pytest.raises(ValueError, match="are terms of PUCT"):
        MCTSConfig(selection="uct", varentropy_bonus=0.1)


def _answer_below(tree, leaf, key):
    """Expansion stand-in: one child; below the root a right conclusion, at the root a thought."""
    at_root = (tree.depth[jnp.arange(tree.batch_size), leaf] == 0)[:, None]  # [B, 1]
    tokens = jnp.full((tree.batch_size, 1, L), 7).at[:, :, 1].set(EOT)
    tokens = tokens.at[:, :, 0].set(jnp.where(at_root, 7, CONCLUSION))
    return Expansion(
        tokens=tokens,
        lengths=jnp.full((tree.batch_size, 1), 2),
        logprobs=jnp.zeros((tree.batch_size, 1, L)),
        stopped=jnp.ones((tree.batch_size, 1), bool),
        is_answer=~at_root,
        rating=jnp.full((tree.batch_size, 1), 0.5),
        reward=jnp.where(at_root, 0.0, 1.0),
    )


def test_a_value_is_discounted_by_its_distance_however_it_is_backed_up():
    """root -> a -> a right answer c: c's reward reaches a as 0.9 when a expands and each time
    c is selected again, and the root as 0.81."""
    config = MCTSConfig(num_simulations=4, num_children=1, max_depth=4, thought_length=L)
    tree = init_tree(1, config.capacity, L)
    for _ in range(4):
        leaf = mcts.select(tree, jax.random.key(0), config)
        tree = mcts.insert_and_backup(tree, leaf, _answer_below(tree, leaf, None), config, True)
    t = jax.tree.map(lambda x: np.asarray(x)[0], tree)
    np.testing.assert_array_equal(t.visits[:3], [4, 4, 3])
    np.testing.assert_allclose(t.value_sum[2], 3.0)  # c: its reward, then itself twice
    np.testing.assert_allclose(t.value_sum[1], 0.5 + 3 * 0.9, rtol=1e-6)  # a: rated 0.5
    np.testing.assert_allclose(t.value_sum[0], 0.9 * 0.5 + 3 * 0.81, rtol=1e-6)


def test_a_full_arena_adds_no_children_and_backs_the_leaf_up():
    """A tree sized by hand with room for fewer nodes than the simulations ask for: it stops
    growing at its capacity, and every index stays inside it."""
    config = MCTSConfig(num_simulations=4, num_children=2, max_depth=6, thought_length=L)
    expand = synthetic_expand_fn(config, answer_depth=99)
    tree = init_tree(2, 4, L)  # the root and one expansion; a second does not fit
    leaves = []
    for step in range(4):
        leaf = mcts.select(tree, jax.random.key(step), config)
        leaves.append(np.asarray(leaf))
        tree = mcts.insert_and_backup(
            tree, leaf, expand(tree, leaf, jax.random.key(9)), config, False
        )
        assert np.all(np.asarray(leaf) < tree.capacity)
        assert np.all(np.asarray(tree.num_nodes) == 3)
        _check_invariants(tree, leaves, config)
    assert np.all(np.asarray(tree.num_children)[:, 1:] == 0)


@pytest.mark.parametrize("leaves_per_tree", [1, 2])
def test_search_finds_the_one_planted_correct_branch(leaves_per_tree):
    """With V = 2 the answer checks of a [B, V, K] expansion reach each tree's own answers."""
    config = MCTSConfig(
        num_simulations=14, num_children=2, leaves_per_tree=leaves_per_tree, max_depth=4,
        thought_length=L, noise=0.01,
    )  # fmt: skip
    expand = synthetic_expand_fn(config, answer_depth=3)
    if leaves_per_tree > 1:
        expand = _columns_expand_fn(expand)
    # Codes at depth 3 run 7..14; only one, different per tree, is correct.
    targets = np.array([7, 10, 14, 12])

    def reward_fn(tree_idx, tokens, lengths):
        return (tokens[:, 1] == targets[tree_idx]).astype(np.float32)

    tree = mcts.run(expand, 4, config, jax.random.key(1), reward_fn=reward_fn)
    t = jax.tree.map(np.asarray, tree)
    for b in range(4):
        found = t.is_answer[b] & (t.reward[b] == 1.0)
        assert found.any(), f"tree {b} never found its correct branch"
        best = np.argmax(np.where(t.is_answer[b], t.value_sum[b] / np.maximum(t.visits[b], 1), -1))
        assert t.tokens[b, best, 1] == targets[b]
        assert np.all(t.reward[b][t.is_answer[b] & (t.tokens[b, :, 1] != targets[b])] == 0)


def test_patience_stops_a_tree_after_enough_successes():
    config = MCTSConfig(
        num_simulations=12, num_children=2, max_depth=3, thought_length=L, patience=1
    )
    expand = synthetic_expand_fn(config, answer_depth=1)
    tree = mcts.run(
        expand,
        2,
        config,
        jax.random.key(0),
        reward_fn=lambda b, tok, ln: np.ones(len(b), np.float32),
    )
    assert np.asarray(tree.done).all()
    assert np.asarray(tree.num_nodes).tolist() == [3, 3]  # stopped after the first expansion


def _step_format(max_depth):
    """A StepFormat whose header table has rows for depths 0..max_depth + 1: depth d's header is
    [50, d] (a padded column of 0 beside it); suffixes: negative [60, 61, 62], positive [60, 63,
    62]."""
    headers = np.zeros((max_depth + 2, 3), np.int32)
    headers[1:, :2] = [[50, d] for d in range(1, max_depth + 2)]
    return StepFormat(
        headers=jnp.asarray(headers),
        header_lengths=jnp.asarray([0] + [2] * (max_depth + 1)),
        suffixes=jnp.asarray([[60, 61, 62], [60, 63, 62]]),
        suffix_lengths=jnp.asarray([3, 3]),
        end_of_thought=EOT,
        start_of_rating=60,
        positive_rating=63,
        negative_rating=61,
        conclusion=CONCLUSION,
    )


def test_prefixes_render_the_path_with_headers_and_ratings():
    fmt = _step_format(2)
    tree = init_tree(1, 7, L)
    tree = tree.replace(
        parent=jnp.asarray([[-1, 0, 0, 2, 2, -1, -1]]),
        depth=jnp.asarray([[0, 1, 1, 2, 2, 0, 0]]),
        tokens=jnp.zeros((1, 7, L), jnp.int32)
        .at[0, 2, :3]
        .set(jnp.asarray([20, 21, EOT]))
        .at[0, 4, :2]
        .set(jnp.asarray([22, EOT])),
        lengths=jnp.asarray([[0, 1, 3, 1, 2, 0, 0]]),
        rating=jnp.asarray([[0.0, 0.9, 0.8, 0.1, 0.3, 0, 0]]),
        num_nodes=jnp.asarray([5]),
    )
    prompt = jnp.asarray([[10, 11, 12, 0]])
    prefix, length = mcts.build_prefixes(
        tree, jnp.asarray([4]), prompt, jnp.asarray([3]), fmt, max_depth=2, width=24
    )
    expected = [10, 11, 12, 50, 1, 20, 21, EOT, 60, 63, 62, 50, 2, 22, EOT, 60, 61, 62, 50, 3]
    assert int(length[0]) == len(expected)
    assert np.asarray(prefix[0, : len(expected)]).tolist() == expected
    assert np.all(np.asarray(prefix[0, len(expected) :]) == 0)


def test_a_prefix_is_token_for_token_the_chain_sft_trains_on():
    """With the real step format and tokenizer, the prefix that continues a path equals
    `encode_chain` of the path (each ancestor with its own verdict, EOS dropped) followed by
    the next step's header."""
    from o1jax.data import longcot
    from o1jax.data.tokenizer import build_tiny_tokenizer
    from o1jax.search.format import encode_chain, encode_prompts, encode_thought, make_step_format

    tok = build_tiny_tokenizer()
    question = "Start with 3, add 4."
    thoughts = ["<expansion>3 + 4 = 8", "<critic>3 + 4 is not 8", "<refine>3 + 4 = 7"]
    verdicts = [longcot.NEGATIVE_RATING, longcot.POSITIVE_RATING, longcot.POSITIVE_RATING]
    tokens = np.zeros((1, 6, 16), np.int32)
    lengths = np.zeros((1, 6), np.int32)
    for i, text in enumerate(thoughts, start=1):
        ids = encode_thought(tok, text)
        tokens[0, i, : len(ids)], lengths[0, i] = ids, len(ids)
    tree = init_tree(1, 6, 16).replace(
        parent=jnp.asarray([[-1, 0, 1, 2, -1, -1]]),
        depth=jnp.asarray([[0, 1, 2, 3, 0, 0]]),
        rating=jnp.asarray([[0.0, 0.2, 0.5, 0.9, 0, 0]]),
        tokens=jnp.asarray(tokens),
        lengths=jnp.asarray(lengths),
        num_nodes=jnp.asarray([4]),
    )
    fmt = make_step_format(tok, 4)
    prompts, plens = encode_prompts(tok, [question])
    width = fmt.max_prefix_length(prompts.shape[1], 4, 16)
    prefix, n = mcts.build_prefixes(tree, jnp.asarray([3]), prompts, plens, fmt, 4, width)
    chain, _ = encode_chain(tok, question, thoughts, verdicts)
    header = tok.encode(longcot.step_header(3, 4), add_special_tokens=False)
    assert np.asarray(prefix[0, : int(n[0])]).tolist() == chain[:-1].tolist() + list(header)


def test_no_recompilation_between_simulations_or_batches():
    config = MCTSConfig(num_simulations=5, num_children=2, max_depth=3, thought_length=L)
    expand = synthetic_expand_fn(config, answer_depth=2)
    mcts.run(expand, 3, config, jax.random.key(0))
    sizes = (mcts.select._cache_size(), mcts.insert_and_backup._cache_size())
    for seed in (1, 2):
        mcts.run(expand, 3, config, jax.random.key(seed))
    assert (mcts.select._cache_size(), mcts.insert_and_backup._cache_size()) == sizes


@pytest.mark.parametrize(
    "options,patience",
    [({}, 0), ({"leaves_per_tree": 2, "max_children": 4}, 1)],
    ids=["one_leaf", "two_leaves_widening_patience_device_rewards"],
)
def test_the_compiled_search_grows_the_tree_the_host_loop_grows(options, patience):
    """`run_compiled` (one while_loop) against `run` (a jitted call per step): the same tree for
    the same keys, with virtual loss and widening, and with answers rewarded on the device
    (against the same rewards from the host) and trees stopped by patience."""
    config = MCTSConfig(
        num_simulations=9, num_children=2, max_depth=4, thought_length=L, patience=patience,
        **options,
    )  # fmt: skip
    expand = synthetic_expand_fn(config, answer_depth=3)
    rewarded = patience > 0
    if rewarded:  # answers whose branch code is even are right: on the device, or on the host
        expand = jax.jit(
            lambda tree, leaf, key: (e := synthetic_expand_fn(config, 3)(tree, leaf, key)).replace(
                reward=(e.is_answer & (e.tokens[..., 1] % 2 == 0)).astype(jnp.float32)
            )
        )
    if config.leaves_per_tree > 1:
        expand = _columns_expand_fn(expand)
    host_rewards = lambda b, tokens, lengths: (tokens[:, 1] % 2 == 0).astype(np.float32)
    key = jax.random.key(4)
    loop = mcts.run(expand, 3, config, key, reward_fn=host_rewards if rewarded else None)
    compiled = mcts.run_compiled(expand, 3, config, key, use_rewards=rewarded)
    if rewarded:
        assert bool(jnp.all(compiled.done))  # patience stopped every tree
    for name, a in vars(loop).items():
        if a is not None:
            np.testing.assert_allclose(getattr(compiled, name), a, rtol=1e-6, err_msg=name)
    assert rewarded or int(jnp.min(loop.num_nodes)) > 1 + 2 + 4  # past depth 2


@pytest.mark.parametrize("on_mesh", [False, True])
def test_lm_search_compiles_one_sampler_per_prefix_bucket_and_reuses_them(on_mesh, monkeypatch):
    """The LM expansion prefills prefixes cut to a multiple of PREFIX_BUCKET: one sampler
    program per bucket the search reaches, compiled once and reused by later simulations and
    batches. On a data mesh (as self-play and evaluation run) the first simulation's tree, and
    so its prefixes, were replicated and the later ones split over the rows: each bucket the
    first simulation used compiled twice."""
    import contextlib

    from tiny_models import random_tiny_model

    from o1jax.data.tokenizer import build_tiny_tokenizer
    from o1jax.model import sampler
    from o1jax.parallel.mesh import make_mesh, replicated
    from o1jax.search.format import encode_prompts, make_step_format

    tok = build_tiny_tokenizer()
    cfg, params = random_tiny_model(len(tok), seed=3)
    config = MCTSConfig(num_simulations=6, num_children=2, max_depth=3, thought_length=12)
    fmt = make_step_format(tok, config.max_depth)
    b = 8  # rows split evenly over the mesh's 8 devices
    questions = [f"Start with {i}, add 5." for i in range(1, b + 1)]
    prompts, lengths = encode_prompts(tok, questions, 24)
    width = fmt.max_prefix_length(24, config.max_depth, config.thought_length)
    mesh = make_mesh({"data": 8}) if on_mesh else None
    if on_mesh:
        params = jax.device_put(params, replicated(mesh))
    widths, trim = set(), mcts.trim_to_bucket

    def trim_and_record(prefixes, lengths):
        out = trim(prefixes, lengths)
        widths.add(out.shape[1])  # the prefix widths the search compiled the sampler for
        return out

    monkeypatch.setattr(mcts, "trim_to_bucket", trim_and_record)

    def run(seed):
        with jax.set_mesh(mesh) if on_mesh else contextlib.nullcontext():
            expand = mcts.make_lm_expand_fn(params, cfg, prompts, lengths, fmt, config)
            return mcts.run(expand, b, config, jax.random.key(seed))

    # Other tests in this process may have compiled the same shapes already: start empty.
    sampler._generate.clear_cache()
    run(0)
    compiled = sampler._generate._cache_size()
    assert compiled == len(widths) and compiled <= -(-width // mcts.PREFIX_BUCKET)
    run(0)  # the same shapes again: nothing new to compile
    assert sampler._generate._cache_size() == compiled


def _columns_expand_fn(expand):
    """An expand_fn for V nodes per tree ([B, V] -> Expansion [B, V, K]) from one for [B]."""

    def many(tree, nodes, key):
        columns = [
            expand(tree, nodes[:, j], jax.random.fold_in(key, j)) for j in range(nodes.shape[1])
        ]
        return jax.tree.map(lambda *xs: jnp.stack(xs, axis=1), *columns)

    return many


@pytest.mark.parametrize("seed", range(3))
def test_tree_invariants_hold_with_several_leaves_per_tree(seed):
    config = MCTSConfig(
        num_simulations=6, num_children=2, leaves_per_tree=3, max_depth=4, thought_length=L,
        noise=0.05,
    )  # fmt: skip
    expand = _columns_expand_fn(synthetic_expand_fn(config, answer_depth=3, seed=seed))
    tree = init_tree(4, config.capacity, L)
    key = jax.random.key(seed)
    leaves = []
    for _ in range(config.num_simulations):
        key, k1, k2 = jax.random.split(key, 3)
        nodes, fresh = mcts.select_with_virtual_loss(tree, k1, config)
        leaves.extend(np.asarray(nodes).T)  # every selection is backed up once
        tree = mcts.insert_and_backup_many(tree, nodes, fresh, expand(tree, nodes, k2), config,
                                           False)  # fmt: skip
        _check_invariants(tree, leaves, config)
    assert int(np.asarray(tree.num_nodes).max()) > 1 + config.num_simulations * 2  # V > 1 paid


def test_virtual_loss_sends_the_second_leaf_of_a_simulation_elsewhere():
    """root -> children 1 (rated 0.6) and 2 (0.5): one selection takes node 1; a second one,
    after node 1's virtual loss (Q 0.6 -> 0.3), takes node 2. Both are fresh."""
    config = MCTSConfig(
        num_simulations=2, num_children=2, leaves_per_tree=2, max_depth=4, thought_length=L,
        noise=0.0, c_puct=0.1,
    )  # fmt: skip
    expand = _rated_expand_fn([[0.6, 0.5]])
    tree = mcts.insert_and_backup(
        init_tree(1, config.capacity, L), jnp.asarray([0]), expand(None, None, None), config,
        False,
    )  # fmt: skip
    assert int(mcts.select(tree, jax.random.key(0), config)[0]) == 1
    nodes, fresh = mcts.select_with_virtual_loss(tree, jax.random.key(0), config)
    np.testing.assert_array_equal(np.asarray(nodes), [[1, 2]])
    np.testing.assert_array_equal(np.asarray(fresh), [[True, True]])
    np.testing.assert_array_equal(np.asarray(tree.visits)[0, :3], [1, 1, 1])  # no lasting loss


def test_a_node_picked_twice_in_one_simulation_is_expanded_once():
    """A fresh tree holds only its root, so all V = 3 selections take it: the root gets K
    children once, and each selection is backed up (3 visits)."""
    config = MCTSConfig(
        num_simulations=1, num_children=2, leaves_per_tree=3, max_depth=4, thought_length=L
    )
    tree = init_tree(2, config.capacity, L)
    nodes, fresh = mcts.select_with_virtual_loss(tree, jax.random.key(0), config)
    np.testing.assert_array_equal(np.asarray(nodes), [[0, 0, 0]] * 2)
    np.testing.assert_array_equal(np.asarray(fresh), [[True, False, False]] * 2)
    expand = _columns_expand_fn(synthetic_expand_fn(config, answer_depth=9))
    tree = mcts.insert_and_backup_many(
        tree, nodes, fresh, expand(tree, nodes, jax.random.key(1)), config, False
    )
    np.testing.assert_array_equal(np.asarray(tree.num_nodes), [3, 3])
    np.testing.assert_array_equal(np.asarray(tree.num_children)[:, 0], [2, 2])
    np.testing.assert_array_equal(np.asarray(tree.visits)[:, 0], [3, 3])


def test_the_lm_expansion_of_several_leaves_per_tree_is_one_sampler_call_per_simulation(
    monkeypatch,
):
    """V = 2 nodes per tree: one `generate` call of B * V * K rows, and (greedy) the same
    children as expanding each column of nodes on its own."""
    from tiny_models import random_tiny_model

    from o1jax.data.tokenizer import build_tiny_tokenizer
    from o1jax.model import sampler
    from o1jax.search.format import encode_prompts, make_step_format

    tok = build_tiny_tokenizer()
    cfg, params = random_tiny_model(len(tok), seed=3)
    config = MCTSConfig(
        num_simulations=3, num_children=2, leaves_per_tree=2, max_depth=3, thought_length=12,
        temperature=0.0,
    )  # fmt: skip
    fmt = make_step_format(tok, config.max_depth)
    prompts, lengths = encode_prompts(tok, ["Start with 4, add 5.", "Start with 7, add 1."], 24)
    calls = []
    original = sampler.generate

    def counting_generate(*args, **kwargs):
        calls.append(args[2].shape[0] * kwargs["num_samples"])  # rows
        return original(*args, **kwargs)

    monkeypatch.setattr(sampler, "generate", counting_generate)
    expand = mcts.make_lm_expand_fn(params, cfg, prompts, lengths, fmt, config)
    tree = mcts.run(expand, 2, config, jax.random.key(0))
    assert calls == [2 * 2 * 2] * config.num_simulations
    nodes = jnp.asarray([[1, 2], [2, 0]])
    both = expand(tree, nodes, jax.random.key(5))
    for j in range(2):
        one = expand(tree, nodes[:, j], jax.random.key(5))
        np.testing.assert_array_equal(np.asarray(both.tokens[:, j]), np.asarray(one.tokens))
        np.testing.assert_allclose(np.asarray(both.rating[:, j]), np.asarray(one.rating), atol=1e-5)


def test_meta_actions_drawn_by_the_search_start_the_thoughts():
    """meta_action_prob 1: every thought starts with a tag drawn from the weights (here only
    <critic> and <conclusion>, both drawn); a <conclusion> thought that stopped is an answer."""
    from tiny_models import random_tiny_model

    from o1jax.data.tokenizer import build_tiny_tokenizer
    from o1jax.search.format import encode_prompts, make_step_format

    tok = build_tiny_tokenizer()
    cfg, params = random_tiny_model(len(tok), seed=3)
    config = MCTSConfig(
        num_simulations=1, num_children=8, max_depth=3, thought_length=12,
        meta_action_prob=1.0, meta_action_weights=(0.0, 1.0, 0.0, 1.0),
    )  # fmt: skip
    fmt = make_step_format(tok, config.max_depth)
    _, critic, _, conclusion = fmt.meta_actions
    prompts, lengths = encode_prompts(tok, ["Start with 4, add 5.", "Start with 7, add 1."], 24)
    expand = mcts.make_lm_expand_fn(params, cfg, prompts, lengths, fmt, config)
    out = expand(init_tree(2, config.capacity, 12), jnp.asarray([0, 0]), jax.random.key(0))
    first = np.asarray(out.tokens[:, :, 0])
    assert set(first.ravel()) == {critic, conclusion}
    np.testing.assert_array_equal(
        np.asarray(out.is_answer), (first == conclusion) & np.asarray(out.stopped)
    )
    # The tags are marked forced, and a child's prior is the mean log-prob of the tokens the
    # policy chose after its tag.
    assert np.asarray(out.forced).all()
    tree = mcts.insert_and_backup(init_tree(2, config.capacity, 12), jnp.asarray([0, 0]), out,
                                  config, False)  # fmt: skip
    logp, n = np.asarray(out.logprobs), np.asarray(out.lengths)
    want = [[logp[b, c, 1 : n[b, c]].mean() for c in range(8)] for b in range(2)]
    np.testing.assert_allclose(np.asarray(tree.prior_logit[:, 1:9]), want, rtol=1e-5)
    assert np.asarray(tree.forced[:, 1:9]).all() and not np.asarray(tree.forced[:, 0]).any()
    off = mcts.make_lm_expand_fn(
        params, cfg, prompts, lengths, fmt, dataclasses.replace(config, meta_action_prob=0.0)
    )(init_tree(2, config.capacity, 12), jnp.asarray([0, 0]), jax.random.key(0))
    assert not np.isin(np.asarray(off.tokens[:, :, 0]), [critic, conclusion]).all()
    assert off.forced is None


def test_meta_action_draws_follow_the_probability_and_weights():
    fmt = _step_format(2).replace(meta_actions=(101, 102, 103, 104))
    config = MCTSConfig(num_children=4, meta_action_prob=0.5, meta_action_weights=(1, 0, 3, 0))
    first = np.asarray(mcts.draw_meta_actions(jax.random.key(0), 4000, fmt, config))
    by_node = first.reshape(4000, 4)
    assert np.all((by_node == -1).all(1) | (by_node != -1).all(1))  # a node's K all or none
    assert abs((by_node[:, 0] != -1).mean() - 0.5) < 0.03
    drawn = first[first != -1]
    assert set(drawn) == {101, 103} and abs((drawn == 103).mean() - 0.75) < 0.02
    with pytest.raises(ValueError, match="meta_action_weights must be 4 weights"):
        MCTSConfig(meta_action_weights=(1.0, 1.0))
    with pytest.raises(ValueError, match="meta_action_prob must be in"):
        MCTSConfig(meta_action_prob=1.5)


def test_a_step_format_built_for_a_shallower_search_is_rejected():
    """A header table too short for max_depth would be gathered clamped (wrong step ids)."""
    config = MCTSConfig(num_simulations=2, num_children=2, max_depth=4, thought_length=L)
    tree = init_tree(1, config.capacity, L)
    prompt, plen = jnp.asarray([[10, 11, 12, 0]]), jnp.asarray([3])
    shallow = _step_format(1)
    width = shallow.max_prefix_length(4, config.max_depth, L)
    match = r"headers for max_depth 1, but max_depth is 4"
    with pytest.raises(ValueError, match="build_prefixes: .*" + match):
        mcts.build_prefixes(tree, jnp.asarray([0]), prompt, plen, shallow, 4, width)
    with pytest.raises(ValueError, match="make_lm_expand_fn: .*" + match):
        mcts.make_lm_expand_fn(None, None, prompt, plen, shallow, config)
    for fmt in (_step_format(4), _step_format(6)):  # as deep, or deeper: fine
        mcts.build_prefixes(tree, jnp.asarray([0]), prompt, plen, fmt, 4, width)


def test_prefixes_need_one_prompt_per_tree():
    tree = init_tree(2, 5, L)
    fmt = _step_format(2)
    with pytest.raises(ValueError, match=r"B = 2 trees, got \(1, 4\) and \(1,\)"):
        mcts.build_prefixes(
            tree, jnp.asarray([0, 0]), jnp.zeros((1, 4), jnp.int32), jnp.asarray([3]), fmt, 2, 32
        )


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("thought_length", 0, r"thought_length must be >= 1, got 0"),
        ("num_simulations", 2.5, r"num_simulations must be an int, got 2.5"),
        ("discount", 0.0, r"discount must be in \(0, 1\], got 0.0"),
        ("discount", 2.0, r"discount must be in \(0, 1\], got 2.0"),
        ("discount", float("nan"), r"discount must be in \(0, 1\], got nan"),
        ("temperature", -1.0, r"temperature must be >= 0, got -1.0"),
        ("noise", -1.0, r"noise must be >= 0, got -1.0"),
        ("c_puct", -0.5, r"c_puct must be >= 0, got -0.5"),
        ("c_puct", float("inf"), r"c_puct must be a finite number, got inf"),
        ("patience", -1, r"patience must be >= 0, got -1"),
        ("top_k", -1, r"top_k must be >= 0, got -1"),
        ("top_p", 0.0, r"top_p must be in \(0, 1\], got 0.0"),
    ],
)
def test_config_fields_out_of_range_are_named(field, value, message):
    with pytest.raises(ValueError, match=r"MCTSConfig\." + message):
        MCTSConfig(**{field: value})


def test_config_accepts_the_edges_of_its_ranges():
    MCTSConfig()
    MCTSConfig(thought_length=1, discount=1.0, temperature=0.0, noise=0.0, c_puct=0.0, top_k=0)
    MCTSConfig(num_simulations=np.int64(3), discount=np.float32(0.5))  # NumPy scalars are fine


def test_insert_and_backup_donates_the_tree_says_so_and_names_a_misfit_expansion():
    """A notebook reading its old tree after the call found it deleted, undocumented; an
    expand_fn of another thought length failed deep in a scatter."""
    config = MCTSConfig(num_simulations=2, num_children=2, max_depth=3, thought_length=L)
    tree = init_tree(2, config.capacity, L)
    leaf = mcts.select(tree, jax.random.key(0), config)
    expansion = synthetic_expand_fn(config, answer_depth=3)(tree, leaf, jax.random.key(1))
    short = expansion.replace(tokens=expansion.tokens[..., :-2])
    with pytest.raises(ValueError, match=rf"Expansion.tokens has shape \(2, 2, {L - 2}\)"):
        mcts.insert_and_backup(tree, leaf, short, config, False)
    mcts.insert_and_backup(tree, leaf, expansion, config, False)
    assert tree.visits.is_deleted()
    for fn in (mcts.insert_and_backup, mcts.insert_and_backup_many):
        assert "Donates `tree`" in fn.__doc__


def test_an_lm_expansion_for_another_number_of_trees_is_refused():
    """run(expand, 2, ...) over one prompt failed in a reshape, naming neither."""
    config = MCTSConfig(num_simulations=1, num_children=2, max_depth=2, thought_length=L)
    prompt, plen = jnp.zeros((1, 4), jnp.int32), jnp.asarray([3])
    expand = mcts.make_lm_expand_fn(None, None, prompt, plen, _step_format(2), config)
    with pytest.raises(ValueError, match="2 trees, but the prompts are for 1"):
        mcts.run(expand, 2, config, jax.random.key(0))


def test_a_tree_without_room_for_the_configs_expansions_is_refused():
    """max_children 5 with K = 2 lets a node expand 3 times; a tree indexed for one expansion
    per node would lose the later children from selection, so it is an error, not a quiet drop."""
    config = MCTSConfig(num_children=2, max_children=5, thought_length=L)
    assert config.expansions_per_node == 3
    with pytest.raises(ValueError, match=r"room for 1 expansion.*needs 3.*init_tree"):
        mcts.select(init_tree(1, config.capacity, L), jax.random.key(0), config)


def test_first_children_indexes_hand_built_trees_by_expansion_block():
    parent = jnp.asarray([[-1, 0, 0, 0, 0, 2, 2, -1]])  # the root expanded twice, node 2 once
    got = np.asarray(first_children(parent, num_children=2, expansions=3))
    assert got[0, 0].tolist() == [1, 3, NO_NODE] and got[0, 2].tolist() == [5, NO_NODE, NO_NODE]
    assert np.all(np.delete(got[0], [0, 2], axis=0) == NO_NODE)
    # Children selection could not see are named: a block past E, a part block, a gap.
    for bad, e in (([-1, 0, 0, 0, 0, 0, 0], 2), ([-1, 0, 0, 0], 3), ([-1, 0, 1, 0], 3)):
        with pytest.raises(ValueError, match=r"tree 0, node 0 has children at slots"):
            first_children(jnp.asarray([bad]), num_children=2, expansions=e)


def test_select_ends_at_a_hand_built_node_whose_children_were_not_indexed():
    """num_children set without first_child (trees built with .replace(parent=...)): the loop
    read no child, went back to the root and never ended."""
    import threading

    tree = init_tree(1, 8, L).replace(
        parent=jnp.asarray([[-1, 0, 0, -1, -1, -1, -1, -1]]),
        num_children=jnp.asarray([[2, 0, 0, 0, 0, 0, 0, 0]]),
        visits=jnp.asarray([[2, 1, 1, 0, 0, 0, 0, 0]]),
        num_nodes=jnp.asarray([3]),
    )
    chosen = []
    config = MCTSConfig(num_children=2, thought_length=L)
    run = lambda: chosen.append(int(mcts.select(tree, jax.random.key(0), config)[0]))
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(120)
    assert chosen == [ROOT]
