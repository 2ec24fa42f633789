"""The pairwise preference reward model: symmetric by construction, one batched forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import full_forward_logits, random_tiny_model

from o1jax.data.tokenizer import build_tiny_tokenizer
from o1jax.model import lora
from o1jax.search import ebc, pprm

QUESTION = "Start with 4, add 5, multiply by 2."
SOLUTIONS = ["4 + 5 = 9, 9 * 2 = 18", "4 + 5 = 8, 8 * 2 = 16", "\\boxed{18}", "9 * 2 = 19"]


@pytest.fixture(scope="module")
def model():
    tok = build_tiny_tokenizer()
    cfg, params = random_tiny_model(len(tok), seed=2)
    return tok, cfg, params


def test_symmetrised_preferences_sum_to_one_though_the_raw_model_does_not(model):
    tok, cfg, params = model
    p = pprm.preferences(params, cfg, tok, QUESTION, SOLUTIONS)
    n = len(SOLUTIONS)
    off = ~np.eye(n, dtype=bool)
    assert np.isnan(p[~off]).all()
    np.testing.assert_allclose((p + p.T)[off], 1.0, atol=1e-6)
    assert ((p[off] > 0) & (p[off] < 1)).all()
    # Without symmetrising, P(i first wins) + P(j first wins) is not 1: a slot bias exists.
    (a, b), _ = pprm.answer_format(tok)
    rows = [
        pprm.encode_pair(tok, QUESTION, SOLUTIONS[i], SOLUTIONS[j]) for i, j in ((0, 1), (1, 0))
    ]
    width = max(map(len, rows))
    tokens = jnp.asarray([r + [0] * (width - len(r)) for r in rows], jnp.int32)
    raw = jax.nn.sigmoid(
        pprm.first_better_logit(
            params, cfg, tokens, jnp.asarray([len(r) for r in rows]), None, (a, b)
        )
    )
    assert abs(float(raw[0] + raw[1]) - 1.0) > 1e-3
    np.testing.assert_allclose(p[0, 1], 0.5 * (raw[0] + 1 - raw[1]), atol=1e-6)


def test_batched_pairs_equal_one_prompt_at_a_time_and_lora_is_applied(model):
    tok, cfg, params = model
    (a, b), _ = pprm.answer_format(tok)
    ids = pprm.encode_pair(tok, QUESTION, SOLUTIONS[2], SOLUTIONS[3])
    single = pprm.first_better_logit(
        params, cfg, jnp.asarray([ids]), jnp.asarray([len(ids)]), None, (a, b)
    )
    p = pprm.preferences(params, cfg, tok, QUESTION, SOLUTIONS)
    other = pprm.encode_pair(tok, QUESTION, SOLUTIONS[3], SOLUTIONS[2])
    back = pprm.first_better_logit(
        params, cfg, jnp.asarray([other]), jnp.asarray([len(other)]), None, (a, b)
    )
    expected = 0.5 * (jax.nn.sigmoid(single[0]) + 1 - jax.nn.sigmoid(back[0]))
    np.testing.assert_allclose(p[2, 3], expected, atol=1e-5)
    # ... and each logit is log P(a) - log P(b) at the prompt's last token of a plain forward
    # (every other check here builds its expected values from first_better_logit itself).
    for row, logit in ((ids, single[0]), (other, back[0])):
        last = full_forward_logits(params, cfg, row)[-1]  # [V]
        np.testing.assert_allclose(logit, last[a] - last[b], atol=1e-4)
    # The PPRM has its own adapter: a non-zero one changes its preferences.
    adapter = lora.init(cfg, jax.random.key(5), lora.LoRAConfig(rank=4, alpha=8.0))
    adapter = jax.tree.map(lambda x: x + 0.3, adapter)
    tuned = pprm.preferences(params, cfg, tok, QUESTION, SOLUTIONS, lora=adapter)
    assert np.nanmax(np.abs(tuned - p)) > 1e-3


def test_preferences_feed_the_borda_count(model):
    tok, cfg, params = model
    p = pprm.preferences(params, cfg, tok, QUESTION, SOLUTIONS)
    wins, values = ebc.enhanced_borda_count(jnp.asarray(p)[None], jnp.ones((1, len(p)), bool))
    # The counts of the PPRM's own preferences, by a plain transitive closure of P > 1/2
    # (a count of 1 - p, or of another matrix, differs).
    n = len(p)
    reach = [[i != j and p[i, j] > 0.5 for j in range(n)] for i in range(n)]
    for k in range(n):
        for i in range(n):
            for j in range(n):
                reach[i][j] = reach[i][j] or (reach[i][k] and reach[k][j])
    expected = [sum(reach[i][j] for j in range(n) if j != i) for i in range(n)]
    assert np.asarray(wins[0]).tolist() == expected and len(set(expected)) > 1
    soft = np.nansum(p, axis=1)  # every pair compared: no NaN off the diagonal
    best = max(range(n), key=lambda i: (expected[i], soft[i]))
    assert int(jnp.argmax(values[0])) == best and float(values[0, best]) == 1.0


def test_training_on_task_pairs_learns_them(model):
    """The pairwise logistic loss on (correct, flawed) pairs in both orders, on a LoRA adapter."""
    import numpy as np

    from o1jax.data import tasks
    from o1jax.parallel.mesh import make_mesh
    from o1jax.train import pprm as train_pprm

    tok, cfg, params = model
    task = tasks.ArithmeticTask(num_ops=(2, 2), max_operand=9, max_value=30)
    problems = tasks.generate_problems(task, 8, 0, "train")
    pairs = train_pprm.task_pairs(tok, problems, np.random.default_rng(0))
    assert len(pairs.lengths) == 16 and pairs.first_better.tolist() == [1, 0] * 8
    adapter = lora.init(cfg, jax.random.key(1), lora.LoRAConfig(rank=8, alpha=16.0))
    trainer = train_pprm.PPRMTrainer(
        cfg,
        params,
        adapter,
        train_pprm.PPRMConfig(learning_rate=1e-2),
        make_mesh(devices=jax.devices()[:1]),  # where a put would not copy the adapter
        tok,
    )
    before = train_pprm.pairwise_accuracy(params, cfg, trainer.lora, pairs, trainer.answer_tokens)
    kept = jax.tree.map(jnp.copy, adapter)  # (a NumPy view would pin the buffers)
    losses = [float(trainer.train_step(pairs.batch(s, 16, 0))["loss"]) for s in range(40)]
    # The step donates its state; the caller's adapter is a different buffer and survives.
    assert not any(x.is_deleted() for x in jax.tree.leaves(adapter))
    jax.tree.map(np.testing.assert_array_equal, kept, jax.tree.map(np.asarray, adapter))
    after = train_pprm.pairwise_accuracy(params, cfg, trainer.lora, pairs, trainer.answer_tokens)
    assert losses[-1] < 0.5 * losses[0]
    assert after == 1.0 and before < 1.0
    # A non-finite gradient skips the update and is counted (as SFT's and PPO's do).
    leaves, treedef = jax.tree.flatten(trainer.state.lora)
    leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(jnp.nan)
    trainer.state = trainer.state.replace(lora=jax.tree.unflatten(treedef, leaves))
    poisoned = jax.tree.map(np.asarray, trainer.state.lora)
    metrics = trainer.train_step(pairs.batch(40, 16, 0))
    assert not bool(metrics["finite"]) and int(metrics["nonfinite_total"]) == 1
    jax.tree.map(np.testing.assert_array_equal, poisoned, jax.tree.map(np.asarray, trainer.lora))


# ----------------------------------------------------------------------------- review 14 fixes
COPIES = [SOLUTIONS[0], SOLUTIONS[1], SOLUTIONS[0], SOLUTIONS[2], SOLUTIONS[1], SOLUTIONS[2]]


def test_a_copy_of_a_solution_ties_with_it_and_every_pair_sums_to_one_exactly(model):
    """Both orders of two copies are one prompt: P = 1/2 exactly, and no copy is preferred to
    its twin ((x + 1 - x) / 2 rounded to 0.49999997 for some x); all pairs sum to exactly 1."""
    tok, cfg, params = model
    p = pprm.preferences(params, cfg, tok, QUESTION, COPIES)
    off = ~np.eye(len(COPIES), dtype=bool)
    assert ((p + p.T)[off] == 1.0).all()
    for i, j in ((0, 2), (1, 4), (3, 5)):
        assert p[i, j] == 0.5 and p[j, i] == 0.5
    wins, values = ebc.enhanced_borda_count(jnp.asarray(p)[None], jnp.ones((1, len(p)), bool))
    for i, j in ((0, 2), (1, 4), (3, 5)):  # twins rank alike
        assert int(wins[0, i]) == int(wins[0, j]) and float(values[0, i]) == float(values[0, j])


def test_symmetrise_is_exact_and_order_free():
    rng = np.random.default_rng(0)
    a, b = rng.random(4096).astype(np.float32), rng.random(4096).astype(np.float32)
    ab, ba = pprm.symmetrise(a, b)
    assert ab.dtype == np.float32 and ((ab + ba) == 1.0).all()
    swapped = pprm.symmetrise(b, a)
    np.testing.assert_array_equal(swapped[0], ba)
    np.testing.assert_array_equal(swapped[1], ab)
    np.testing.assert_allclose(ab, 0.5 * (a + 1 - b), atol=1e-7)  # the mean of both orders
    same = pprm.symmetrise(a, a)
    assert (same[0] == 0.5).all() and (same[1] == 0.5).all()
