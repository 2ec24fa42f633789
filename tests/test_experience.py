"""Trees -> experiences: sequences match the search's prefixes; advantages match a NumPy GAE."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_mcts import CONCLUSION, EOT, L, synthetic_expand_fn

from o1jax.rl.experience import experience_width, tree_to_experiences
from o1jax.rl.gae import gae
from o1jax.search import mcts
from o1jax.search.mcts import MCTSConfig, StepFormat
from o1jax.train.config import ConfigError, load_config

GAMMA, LAM = 0.9, 0.8
START_RATING = 60


def _fmt(max_depth):
    headers = np.zeros((max_depth + 2, 2), np.int32)
    headers[1:, 0] = 50
    headers[1:, 1] = np.arange(1, max_depth + 2)
    return StepFormat(
        headers=jnp.asarray(headers),
        header_lengths=jnp.asarray([0] + [2] * (max_depth + 1)),
        suffixes=jnp.asarray([[START_RATING, 61, 62], [START_RATING, 63, 62]]),
        suffix_lengths=jnp.asarray([3, 3]),
        end_of_thought=EOT,
        start_of_rating=START_RATING,
        positive_rating=63,
        negative_rating=61,
        conclusion=CONCLUSION,
    )


def _numpy_gae(rewards, values, gamma, lam):
    adv = np.zeros(len(rewards))
    last = 0.0
    for t in reversed(range(len(rewards))):
        delta = rewards[t] + gamma * values[t + 1] - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv, adv + np.asarray(values[:-1])


def test_gae_equals_a_numpy_loop_on_ragged_masks():
    rng = np.random.default_rng(0)
    b, t = 6, 9
    rewards = rng.normal(size=(b, t)).astype(np.float32)
    values = rng.normal(size=(b, t + 1)).astype(np.float32)
    lengths = rng.integers(1, t + 1, b)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
    for i, n in enumerate(lengths):  # value after the path's end: bootstrap at n, 0 beyond
        values[i, n + 1 :] = 0.0
    adv, ret = gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), 0.97, 0.9)
    for i, n in enumerate(lengths):
        ref_adv, ref_ret = _numpy_gae(rewards[i, :n], values[i, : n + 1], 0.97, 0.9)
        np.testing.assert_allclose(np.asarray(adv[i, :n]), ref_adv, atol=1e-6, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(ret[i, :n]), ref_ret, atol=1e-6, rtol=1e-6)
        assert np.all(np.asarray(adv[i, n:]) == 0)


def test_gae_reads_the_mask_as_a_flag_and_checks_gamma_and_lam():
    """A mask of 2 once doubled each advantage, compounding down the path; gamma 1.5, lam
    -0.1 and NaN were accepted."""
    rewards = jnp.asarray([[0.0, 0.0, 1.0]])
    values = jnp.asarray([[0.5, 0.5, 0.5, 0.0]])
    mask = jnp.asarray([[1.0, 1.0, 0.0]])
    ref = gae(rewards, values, mask, 0.99, 0.95)
    for flags in (2 * mask, mask > 0, (3 * mask).astype(jnp.int32)):
        for got, want in zip(gae(rewards, values, flags, 0.99, 0.95), ref, strict=True):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    for gamma, lam in ((1.5, 0.95), (0.99, -0.1), (float("nan"), 0.95), (0.99, 1.01)):
        with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
            gae(rewards, values, mask, gamma, lam)
    traced = jax.jit(lambda gamma, lam: gae(rewards, values, mask, gamma, lam))(0.99, 0.95)
    for got, want in zip(traced, ref, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


def test_experiences_match_prefixes_and_path_gae():
    config = MCTSConfig(
        num_simulations=7, num_children=2, max_depth=4, thought_length=L, noise=0.05
    )
    expand = synthetic_expand_fn(config, answer_depth=3)
    targets = np.array([7, 12])
    tree = mcts.run(
        expand,
        2,
        config,
        jax.random.key(3),
        reward_fn=lambda b, tok, n: (tok[:, 1] == targets[b]).astype(np.float32),
    )
    fmt = _fmt(config.max_depth)
    prompts = jnp.asarray([[10, 11, 12, 0], [13, 14, 0, 0]])
    plens = jnp.asarray([3, 2])
    width = experience_width(fmt, prompts.shape[1], config)
    exps = tree_to_experiences(tree, prompts, plens, fmt, config, GAMMA, LAM, width)
    t = jax.tree.map(np.asarray, tree)
    n = tree.capacity
    prefix_width = fmt.max_prefix_length(prompts.shape[1], config.max_depth, L)
    for b in range(2):
        used = int(t.num_nodes[b])
        rows = slice(b * (n - 1), (b + 1) * (n - 1))
        valid = np.asarray(exps.valid[rows])
        assert valid.sum() == used - 1 and valid[: used - 1].all()
        # Sequence of node i = the search's prefix at its parent + thought + <start_of_rating>.
        for i in range(1, used):
            row = b * (n - 1) + i - 1
            parent = np.full((2,), 0)
            parent[b] = t.parent[b, i]
            prefix, plen = mcts.build_prefixes(
                tree, jnp.asarray(parent), prompts, plens, fmt, config.max_depth, prefix_width
            )
            plen = int(plen[b])
            thought = t.tokens[b, i, : t.lengths[b, i]]
            expected = np.concatenate([np.asarray(prefix[b, :plen]), thought, [START_RATING]])
            assert int(exps.length[row]) == len(expected)
            assert int(exps.action_start[row]) == plen
            np.testing.assert_array_equal(np.asarray(exps.tokens[row, : len(expected)]), expected)
        # Advantages: NumPy GAE along every root-to-leaf path, averaged per node.
        expected_adv, _, expected_target = _reference_advantages(t, b, terminal_only=False)
        np.testing.assert_allclose(
            np.asarray(exps.advantage[rows])[: used - 1], expected_adv, atol=1e-5
        )
        np.testing.assert_allclose(
            np.asarray(exps.value_target[rows])[: used - 1], expected_target, atol=1e-5
        )

    # terminal_only: only paths that end in an outcome count; nodes without one are dropped.
    exps = tree_to_experiences(tree, prompts, plens, fmt, config, GAMMA, LAM, width, True)
    dropped = 0
    for b in range(2):
        used = int(t.num_nodes[b])
        rows = slice(b * (n - 1), (b + 1) * (n - 1))
        expected_adv, counts, expected_target = _reference_advantages(t, b, terminal_only=True)
        valid = np.asarray(exps.valid[rows])[: used - 1]
        np.testing.assert_array_equal(valid, counts > 0)
        np.testing.assert_allclose(
            np.asarray(exps.advantage[rows])[: used - 1][valid], expected_adv[valid], atol=1e-5
        )
        np.testing.assert_allclose(
            np.asarray(exps.value_target[rows])[: used - 1][valid],
            expected_target[valid],
            atol=1e-5,
        )
        dropped += int((~valid).sum())
    assert dropped > 0  # the frontier of a 7-simulation search is not all terminal


def test_a_rating_is_trained_toward_what_follows_its_thought_not_toward_itself():
    """root -> a (rated 0.3) -> b (a right answer): a's rating, the value after a (before b),
    must move toward b's reward (1) at every gamma and lambda; b's toward its reward."""
    from o1jax.search.tree import init_tree

    config = MCTSConfig(num_simulations=1, num_children=1, max_depth=3, thought_length=L)
    tokens = np.zeros((1, 4, L), np.int32)
    tokens[0, 1, :2], tokens[0, 2, :2] = [7, EOT], [CONCLUSION, EOT]
    tree = init_tree(1, 4, L).replace(
        parent=jnp.asarray([[-1, 0, 1, -1]]),
        num_children=jnp.asarray([[1, 1, 0, 0]]),
        depth=jnp.asarray([[0, 1, 2, 0]]),
        visits=jnp.asarray([[2, 2, 1, 0]]),
        value_sum=jnp.asarray([[1.3, 1.3, 1.0, 0.0]]),
        rating=jnp.asarray([[0.0, 0.3, 0.8, 0.0]]),
        terminal=jnp.asarray([[False, False, True, False]]),
        is_answer=jnp.asarray([[False, False, True, False]]),
        reward=jnp.asarray([[0.0, 0.0, 1.0, 0.0]]),
        tokens=jnp.asarray(tokens),
        lengths=jnp.asarray([[0, 2, 2, 0]]),
        num_nodes=jnp.asarray([3]),
    )
    fmt = _fmt(config.max_depth)
    prompts, plens = jnp.asarray([[10, 11]]), jnp.asarray([2])
    width = experience_width(fmt, 2, config)
    for gamma, lam in ((1.0, 0.0), (1.0, 0.5), (0.9, 0.0), (0.99, 0.95)):
        exps = tree_to_experiences(tree, prompts, plens, fmt, config, gamma, lam, width, True)
        np.testing.assert_allclose(np.asarray(exps.value_target[:2]), [1.0, 1.0], atol=1e-6)


def _reference_advantages(t, b, terminal_only):
    """Per-node mean GAE advantage [used - 1] over root-to-leaf paths, path counts, and the
    mean target of the value after each thought: the reward of a terminal thought, else the
    return of the next step on the path, else (a frontier leaf) its own rating; in [0, 1]."""
    n, used = t.parent.shape[1], int(t.num_nodes[b])
    sums, counts, target_sums = np.zeros(n), np.zeros(n), np.zeros(n)
    paths = []
    for leaf in range(1, used):
        if t.num_children[b, leaf] > 0 or (terminal_only and not t.terminal[b, leaf]):
            continue
        path = []
        node = leaf
        while node > 0:
            path.append(node)
            node = t.parent[b, node]
        paths.append(path[::-1])
    # V(root): the mean over the paths of what follows their first thought.
    first = [p[0] for p in paths]
    after = [t.reward[b, c] if t.terminal[b, c] else GAMMA * t.rating[b, c] for c in first]
    root_value = float(np.mean(after)) if paths else 0.0
    for path in paths:
        rewards = [t.reward[b, p] if t.terminal[b, p] else 0.0 for p in path]
        after = [0.0 if t.terminal[b, p] else t.rating[b, p] for p in path]
        adv, ret = _numpy_gae(rewards, [root_value, *after], GAMMA, LAM)
        for i, (p, a) in enumerate(zip(path, adv, strict=True)):
            sums[p] += a
            counts[p] += 1
            if t.terminal[b, p]:
                target_sums[p] += rewards[i]
            else:
                target_sums[p] += ret[i + 1] if i + 1 < len(path) else t.rating[b, p]
    mean = lambda x: x[1:used] / np.maximum(counts[1:used], 1)
    return mean(sums), counts[1:used], np.clip(mean(target_sums), 0.0, 1.0)


def test_outcome_values_give_the_change_in_success_rate_below_each_node():
    """values='outcome', lam=0, gamma=1: advantage(node) = V(node) - V(parent), where V is the
    mean reward of the terminal leaves below a node (the root: of the whole tree), by a loop."""
    config = MCTSConfig(
        num_simulations=12, num_children=2, max_depth=4, thought_length=L, noise=0.05
    )
    tree = mcts.run(
        synthetic_expand_fn(config, answer_depth=2),
        2,
        config,
        jax.random.key(5),
        reward_fn=lambda b, tok, n: (tok[:, 1] % 2 == b).astype(np.float32),
    )
    fmt = _fmt(config.max_depth)
    prompts = jnp.asarray([[10, 11, 12, 0], [13, 14, 0, 0]])
    plens = jnp.asarray([3, 2])
    width = experience_width(fmt, prompts.shape[1], config)
    exps = tree_to_experiences(
        tree, prompts, plens, fmt, config, 1.0, 0.0, width, True, values="outcome"
    )
    t = jax.tree.map(np.asarray, tree)
    n = tree.capacity
    informative = 0
    for b in range(2):
        used = int(t.num_nodes[b])
        rows = slice(b * (n - 1), (b + 1) * (n - 1))
        adv = np.asarray(exps.advantage[rows])[: used - 1]
        valid = np.asarray(exps.valid[rows])[: used - 1]
        for i in range(1, used):
            below = _terminal_rewards_below(t, b, i)
            assert valid[i - 1] == bool(below)
            if valid[i - 1]:
                expected = np.mean(below) - np.mean(_terminal_rewards_below(t, b, t.parent[b, i]))
                np.testing.assert_allclose(adv[i - 1], expected, atol=1e-6)
                informative += expected != 0
    assert informative > 0  # the trees hold both right and wrong answers


def _terminal_rewards_below(t, b, node):
    """Rewards of the terminal leaves in `node`'s subtree (node included), by walking up."""
    rewards = []
    for leaf in range(1, int(t.num_nodes[b])):
        if t.num_children[b, leaf] > 0 or not t.terminal[b, leaf]:
            continue
        x = leaf
        while x != node and x > 0:
            x = t.parent[b, x]
        if x == node:
            rewards.append(float(t.reward[b, leaf]))
    return rewards


def test_outcome_values_need_terminal_paths():
    config = MCTSConfig(num_simulations=2, num_children=2, max_depth=3, thought_length=L)
    tree = mcts.run(synthetic_expand_fn(config, answer_depth=2), 1, config, jax.random.key(0))
    fmt = _fmt(config.max_depth)
    prompts, plens = jnp.asarray([[10, 11]]), jnp.asarray([2])
    width = experience_width(fmt, 2, config)
    with pytest.raises(ValueError, match="terminal_only"):
        tree_to_experiences(tree, prompts, plens, fmt, config, 1.0, 0.0, width, False, "outcome")


def test_rl_values_config_is_checked():
    smoke = os.path.join(os.path.dirname(__file__), "..", "configs", "smoke.yaml")
    outcome = ["rl.values=outcome", "rl.terminal_paths_only=true"]
    assert load_config(smoke, overrides=outcome).rl.values == "outcome"
    with pytest.raises(ConfigError, match=r"rl\.values: must be 'rating' or 'outcome'"):
        load_config(smoke, overrides=["rl.values=ratings"])
    with pytest.raises(ConfigError, match=r"rl\.values: 'outcome' needs rl\.terminal_paths_only"):
        load_config(smoke, overrides=["rl.values=outcome", "rl.terminal_paths_only=false"])


def test_ppo_scores_exactly_the_tokens_the_search_sampled():
    """An LM search's experiences, scored by PPO's forward, give back the sampler's own
    log-probs token for token: the policy term trains the sampled thought at the positions the
    search sampled it, with the prefix the search conditioned on."""
    from tiny_models import random_tiny_model

    from o1jax.data.tokenizer import build_tiny_tokenizer
    from o1jax.model.gemma2 import forward
    from o1jax.rl.ppo import sequence_logprobs
    from o1jax.search.format import encode_prompts, make_step_format

    tok = build_tiny_tokenizer()
    cfg, params = random_tiny_model(len(tok), seed=5)
    config = MCTSConfig(num_simulations=4, num_children=2, max_depth=3, thought_length=12)
    fmt = make_step_format(tok, config.max_depth)
    prompts, plens = encode_prompts(tok, ["Start with 4, add 5.", "Start with 7, add 1."], 24)
    expand = mcts.make_lm_expand_fn(params, cfg, prompts, plens, fmt, config)
    tree = mcts.run(expand, 2, config, jax.random.key(1))
    width = experience_width(fmt, prompts.shape[1], config)
    exps = tree_to_experiences(tree, prompts, plens, fmt, config, GAMMA, LAM, width)
    e = jax.tree.map(lambda x: x[np.flatnonzero(np.asarray(exps.valid))], exps)
    mask = jnp.arange(width)[None, :] < e.length[:, None]
    logits = forward(params, cfg, e.tokens, attention_mask=mask)
    logp, _ = sequence_logprobs(logits, e.tokens, e.action_start, config.thought_length)
    act = np.arange(config.thought_length)[None, :] < np.asarray(e.action_length)[:, None]
    assert act.sum() > 20
    np.testing.assert_allclose(
        np.asarray(logp)[act], np.asarray(e.behaviour_logprobs)[act], atol=1e-4
    )


def _empty_tree_inputs(config, batch=2):
    from o1jax.search.tree import init_tree

    tree = init_tree(batch, config.capacity, config.thought_length)
    prompts, plens = jnp.zeros((batch, 4), jnp.int32), jnp.full((batch,), 3)
    return tree, prompts, plens


def test_a_step_format_built_for_a_shallower_search_is_rejected():
    config = MCTSConfig(num_simulations=2, num_children=2, max_depth=4, thought_length=L)
    tree, prompts, plens = _empty_tree_inputs(config)
    fmt = _fmt(1)
    width = experience_width(_fmt(4), 4, config)
    with pytest.raises(ValueError, match=r"headers for max_depth 1, but max_depth is 4"):
        tree_to_experiences(tree, prompts, plens, fmt, config, GAMMA, LAM, width)


def test_a_width_below_experience_width_is_rejected():
    """Rows longer than `width` would be cut, their <start_of_rating> lost."""
    config = MCTSConfig(num_simulations=2, num_children=2, max_depth=3, thought_length=L)
    tree, prompts, plens = _empty_tree_inputs(config)
    fmt = _fmt(config.max_depth)
    width = experience_width(fmt, 4, config)
    with pytest.raises(ValueError, match=rf"width {width - 1} < experience_width\(.*\) = {width}"):
        tree_to_experiences(tree, prompts, plens, fmt, config, GAMMA, LAM, width - 1)
    exps = tree_to_experiences(tree, prompts, plens, fmt, config, GAMMA, LAM, width)
    assert exps.tokens.shape == (2 * (config.capacity - 1), width)


def test_prompts_and_trees_must_agree():
    config = MCTSConfig(num_simulations=2, num_children=2, max_depth=3, thought_length=L)
    tree, prompts, plens = _empty_tree_inputs(config, batch=1)
    fmt = _fmt(config.max_depth)
    width = experience_width(fmt, 4, config)
    two, two_lens = jnp.concatenate([prompts, prompts]), jnp.concatenate([plens, plens])
    with pytest.raises(ValueError, match=r"B = 1 trees, got \(2, 4\) and \(2,\)"):
        tree_to_experiences(tree, two, two_lens, fmt, config, GAMMA, LAM, width)
    longer = MCTSConfig(num_simulations=2, num_children=2, max_depth=3, thought_length=L + 4)
    with pytest.raises(ValueError, match=rf"thoughts of {L} tokens, .*thought_length is {L + 4}"):
        tree_to_experiences(
            tree, prompts, plens, fmt, longer, GAMMA, LAM, experience_width(fmt, 4, longer)
        )


def test_first_thoughts_of_a_calibrated_tree_get_no_advantage_from_rating_values():
    """root -> a, b (each rated 0.5), each with one right and one wrong answer below: the
    ratings are exact, so neither first thought is better than the root, at any gamma and
    lambda (V(root) on the ratings' scale, not the search's backed-up Q of 0.69)."""
    from o1jax.search.tree import init_tree

    config = MCTSConfig(num_simulations=1, num_children=2, max_depth=3, thought_length=L)
    tokens = np.zeros((1, 8, L), np.int32)
    for i in (1, 2):
        tokens[0, i, :2] = [7, EOT]
    for i in (3, 4, 5, 6):
        tokens[0, i, :2] = [CONCLUSION, EOT]
    answers = [False, False, False, True, True, True, True, False]
    tree = init_tree(1, 8, L).replace(
        parent=jnp.asarray([[-1, 0, 0, 1, 1, 2, 2, -1]]),
        num_children=jnp.asarray([[2, 2, 2, 0, 0, 0, 0, 0]]),
        depth=jnp.asarray([[0, 1, 1, 2, 2, 2, 2, 0]]),
        visits=jnp.asarray([[7, 3, 3, 1, 1, 1, 1, 0]]),
        value_sum=jnp.asarray([[4.83, 1.5, 1.5, 1.0, 0.0, 1.0, 0.0, 0.0]]),
        rating=jnp.asarray([[0.0, 0.5, 0.5, 0.9, 0.9, 0.9, 0.9, 0.0]]),
        terminal=jnp.asarray([answers]),
        is_answer=jnp.asarray([answers]),
        reward=jnp.asarray([[0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0]]),
        tokens=jnp.asarray(tokens),
        lengths=jnp.asarray([[0, 2, 2, 2, 2, 2, 2, 0]]),
        num_nodes=jnp.asarray([7]),
    )
    fmt = _fmt(config.max_depth)
    prompts, plens = jnp.asarray([[10, 11]]), jnp.asarray([2])
    width = experience_width(fmt, 2, config)
    for gamma, lam in ((1.0, 1.0), (1.0, 0.0), (0.99, 0.95)):
        exps = tree_to_experiences(tree, prompts, plens, fmt, config, gamma, lam, width, True)
        np.testing.assert_allclose(np.asarray(exps.advantage[:2]), [0.0, 0.0], atol=1e-6)


def test_a_meta_action_tag_the_search_forced_is_no_action_of_the_policy():
    """meta_action_prob 1: every thought starts with a tag the search drew; PPO's actions are
    the tokens after it, with the behaviour log-probs of those tokens."""
    from tiny_models import random_tiny_model

    from o1jax.data.tokenizer import build_tiny_tokenizer
    from o1jax.search.format import encode_prompts, make_step_format

    tok = build_tiny_tokenizer()
    cfg, params = random_tiny_model(len(tok), seed=5)
    config = MCTSConfig(
        num_simulations=3, num_children=2, max_depth=3, thought_length=8, meta_action_prob=1.0
    )
    fmt = make_step_format(tok, config.max_depth)
    prompts, plens = encode_prompts(tok, ["Start with 4, add 5.", "Start with 7, add 1."], 24)
    tree = mcts.run(
        mcts.make_lm_expand_fn(params, cfg, prompts, plens, fmt, config), 2, config,
        jax.random.key(1),
    )  # fmt: skip
    width = experience_width(fmt, prompts.shape[1], config)
    exps = tree_to_experiences(tree, prompts, plens, fmt, config, 0.99, 0.95, width)
    valid = np.flatnonzero(np.asarray(exps.valid))
    assert valid.size > 0
    tokens, start = np.asarray(exps.tokens)[valid], np.asarray(exps.action_start)[valid]
    rows = np.arange(valid.size)
    assert np.isin(tokens[rows, start - 1], fmt.meta_actions).all()  # the tag: just before
    n = tree.capacity
    nodes = valid % (n - 1) + 1  # experience i of tree b is node i + 1
    trees = valid // (n - 1)
    lengths = np.asarray(tree.lengths)[trees, nodes]
    np.testing.assert_array_equal(np.asarray(exps.action_length)[valid], lengths - 1)
    np.testing.assert_array_equal(
        np.asarray(exps.behaviour_logprobs)[valid, :-1], np.asarray(tree.logprobs)[trees, nodes, 1:]
    )
