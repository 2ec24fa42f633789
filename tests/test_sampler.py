"""The jitted sampler: greedy == repeated full forwards, exact log-probs, distribution, stops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from tiny_models import full_forward_logits, greedy_by_full_forwards

from o1jax.model import Gemma2Config, forward, init_params
from o1jax.model.sampler import (
    _choose,
    _generate,
    filter_logits,
    first_argmax,
    generate,
    gumbel_from_bits,
)

VOCAB = 48
STOP_CANDIDATES = (5, 6, 7)


@pytest.fixture(scope="module")
def model():
    cfg = Gemma2Config.tiny(
        vocab_size=VOCAB,
        num_layers=2,
        d_model=64,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        ffn_dim=128,
        sliding_window=4,
    )
    params = init_params(cfg, jax.random.key(3))
    # Larger weights and random norm gains give varied, non-repeating greedy continuations.
    keys = iter(jax.random.split(jax.random.key(4), 64))
    params = jax.tree.map(
        lambda x: jax.random.normal(next(keys), x.shape) * (0.7 if x.ndim == 1 else 0.25), params
    )
    return cfg, params


def _prompts(lengths, width=9, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(8, VOCAB, (len(lengths), width))
    for i, n in enumerate(lengths):
        tokens[i, n:] = 0
    return jnp.asarray(tokens), jnp.asarray(lengths)


def test_greedy_equals_repeated_full_forward_and_rows_are_independent(model):
    cfg, params = model
    tokens, lengths = _prompts([9, 3, 6])
    out = generate(
        params, cfg, tokens, lengths, key=jax.random.key(0), max_new_tokens=8, temperature=0.0
    )
    assert len({tuple(r) for r in np.asarray(out.tokens)}) == 3
    for i, n in enumerate([9, 3, 6]):
        expected = greedy_by_full_forwards(params, cfg, list(np.asarray(tokens[i, :n])), 8)
        assert list(np.asarray(out.tokens[i])) == expected
        alone = generate(  # the same row in a batch of one (same width: one compile)
            params,
            cfg,
            tokens[i : i + 1],
            lengths[i : i + 1],
            key=jax.random.key(9),
            max_new_tokens=8,
            temperature=0.0,
        )
        np.testing.assert_array_equal(alone.tokens[0], out.tokens[i])


def test_logprobs_equal_full_forward_log_softmax(model):
    cfg, params = model
    tokens, lengths = _prompts([7, 4])
    out = generate(
        params, cfg, tokens, lengths, key=jax.random.key(1), max_new_tokens=6, temperature=1.0
    )
    for i, n in enumerate([7, 4]):
        seq = jnp.concatenate([tokens[i, :n], out.tokens[i]])[None]
        logp = jax.nn.log_softmax(full_forward_logits(params, cfg, seq[0]))  # [n + 6, V]
        expected = logp[n - 1 + jnp.arange(6), out.tokens[i]]
        np.testing.assert_allclose(out.logprobs[i], expected, atol=1e-5)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 6, 1.0), (1.3, 0, 0.8)])
def test_samples_follow_the_filtered_softmax(model, temperature, top_k, top_p):
    cfg, params = model
    params = jax.tree.map(lambda x: 0.4 * x, params)  # a flatter next-token distribution
    tokens, lengths = _prompts([5])
    n = 6000
    out = generate(
        params,
        cfg,
        tokens,
        lengths,
        key=jax.random.key(2),
        max_new_tokens=1,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        num_samples=n,
    )
    logits = forward(params, cfg, tokens[:, :5])[:, -1]
    probs = np.asarray(jax.nn.softmax(filter_logits(logits, temperature, top_k, top_p))[0])
    counts = np.bincount(np.asarray(out.tokens[:, 0]), minlength=VOCAB)
    assert counts[probs == 0].sum() == 0  # filtered tokens are never drawn
    support = probs > 0
    if top_k:
        assert support.sum() == top_k
    if top_p < 1:
        assert support.sum() < VOCAB
    # Pool rare categories so every expected count is >= 5, then a chi-square test.
    expected = probs[support].astype(np.float64)
    expected = expected / expected.sum() * n
    observed = counts[support]
    order = np.argsort(expected)
    small = expected[order] < 5
    exp_pooled = np.append(expected[order][~small], expected[order][small].sum())
    obs_pooled = np.append(observed[order][~small], observed[order][small].sum())
    if exp_pooled[-1] == 0:
        exp_pooled, obs_pooled = exp_pooled[:-1], obs_pooled[:-1]
    assert stats.chisquare(obs_pooled, exp_pooled).pvalue > 1e-3


@pytest.mark.parametrize(
    "top_p, top_k, kept",
    [
        (0.7, 0, [0, 1]),  # 0.5 < 0.7: the token that crosses the threshold (0.3) is kept
        (0.49, 0, [0]),  # the mass before token 1 is 0.5
        (0.51, 0, [0, 1]),
        (0.81, 0, [0, 1, 2]),
        (0.2, 0, [0]),  # the first token always
        (1.0, 3, [0, 1, 2]),
        (0.9, 2, [0, 1]),  # top-k first, then the nucleus of what is left
    ],
)
def test_nucleus_and_top_k_keep_exactly_the_tokens_of_their_definition(top_p, top_k, kept):
    """Hand-computed supports: the sampling test builds its expected law from filter_logits
    itself, so it could not see a nucleus that dropped the token crossing top_p."""
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))  # [1, 4]
    filtered = np.asarray(filter_logits(logits, 1.0, top_k, top_p))[0]
    assert np.flatnonzero(np.isfinite(filtered)).tolist() == kept
    np.testing.assert_allclose(filtered[kept], np.log([0.5, 0.3, 0.15])[kept] - np.log(0.5), 1e-6)


def test_first_argmax_equals_argmax_with_ties_and_infinities():
    rng = np.random.default_rng(0)
    x = rng.integers(-3, 4, (64, 9)).astype(np.float32)  # many ties
    x[::5, 2] = -np.inf
    x[::7] = -np.inf
    x[::7, 4] = 0.0  # a row whose only finite entry is in the middle
    got = np.asarray(jax.jit(first_argmax)(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
    assert got.dtype == np.int32


def test_gumbel_noise_is_finite_for_every_bit_pattern():
    """float32 rounded the top 24-bit draw's u = 1 - 2^-25 up to 1: noise +inf, once per 2^24
    draws (~1.5% of steps at a 256k vocabulary), took its token however improbable, and on a
    filtered -inf logit made the max NaN and the token 0."""
    bits = jnp.asarray([0, 1 << 8, 1 << 31, 0xFFFFFE00, 0xFFFFFF00, 0xFFFFFFFF], jnp.uint32)
    noise = np.asarray(gumbel_from_bits(bits))
    assert np.all(np.isfinite(noise)) and np.all(np.diff(noise) >= 0), noise
    logits = jnp.asarray([[-40.0, 40.0, 0.0, -jnp.inf]])
    for hot, top_k in ((0, 0), (3, 0), (0, 2), (2, 2)):  # improbable, -inf, cut by top-k
        hot_bits = jnp.zeros((1, 4), jnp.uint32).at[0, hot].set(0xFFFFFFFF)
        for temperature in (1.0, 0.5):
            assert int(_choose(logits, hot_bits, temperature, top_k, 1.0)[0]) == 1


def test_stop_tokens_end_rows_independently(model):
    cfg, params = model
    tokens, lengths = _prompts([9, 3, 6, 8], seed=5)
    free = generate(
        params, cfg, tokens, lengths, key=jax.random.key(0), max_new_tokens=12, temperature=0.0
    )
    # Choose stop tokens that occur at different steps in different rows.
    first_tokens = np.asarray(free.tokens)
    stops = tuple(sorted({int(first_tokens[0, 2]), int(first_tokens[1, 5])}))
    out = generate(
        params,
        cfg,
        tokens,
        lengths,
        key=jax.random.key(0),
        max_new_tokens=12,
        temperature=0.0,
        stop_tokens=stops,
    )
    for row in range(4):
        hits = np.flatnonzero(np.isin(first_tokens[row], stops))
        length = hits[0] + 1 if hits.size else 12
        assert int(out.lengths[row]) == length
        assert bool(out.stopped[row]) == bool(hits.size)
        np.testing.assert_array_equal(out.tokens[row, :length], first_tokens[row, :length])
        assert np.all(np.asarray(out.tokens[row, length:]) == cfg.pad_token_id)
        assert np.all(np.asarray(out.logprobs[row, length:]) == 0.0)
    assert len(set(np.asarray(out.lengths).tolist())) > 1


def test_shared_prefix_samples_equal_separate_prefills(model):
    cfg, params = model
    tokens, lengths = _prompts([6, 4])
    shared = generate(
        params,
        cfg,
        tokens,
        lengths,
        key=jax.random.key(0),
        max_new_tokens=5,
        temperature=0.0,
        num_samples=3,
    )
    single = generate(
        params, cfg, tokens, lengths, key=jax.random.key(0), max_new_tokens=5, temperature=0.0
    )
    np.testing.assert_array_equal(shared.tokens, np.repeat(np.asarray(single.tokens), 3, axis=0))
    np.testing.assert_allclose(
        shared.logprobs, np.repeat(np.asarray(single.logprobs), 3, axis=0), atol=1e-6
    )


def test_first_tokens_replace_the_first_draw_of_their_rows_only(model):
    """Rows given a first token start with it, continue greedily as from the prompt plus that
    token, and log its probability under the model; rows given -1 are the same as without."""
    cfg, params = model
    tokens, lengths = _prompts([6, 4])
    kwargs = dict(key=jax.random.key(0), max_new_tokens=5, temperature=0.0, num_samples=2)
    free = generate(params, cfg, tokens, lengths, **kwargs)
    first = jnp.asarray([-1, 11, -1, 12])  # row b * 2 + j: sample j of prompt b
    forced = generate(params, cfg, tokens, lengths, first_tokens=first, **kwargs)
    np.testing.assert_array_equal(forced.tokens[::2], free.tokens[::2])
    np.testing.assert_array_equal(forced.logprobs[::2], free.logprobs[::2])
    for row, b, tag in ((1, 0, 11), (3, 1, 12)):
        prompt = list(np.asarray(tokens[b, : int(lengths[b])]))
        assert int(forced.tokens[row, 0]) == tag
        expected = greedy_by_full_forwards(params, cfg, [*prompt, tag], 4)
        assert list(np.asarray(forced.tokens[row, 1:])) == expected
        logp = jax.nn.log_softmax(full_forward_logits(params, cfg, prompt)[-1])
        np.testing.assert_allclose(forced.logprobs[row, 0], logp[tag], atol=1e-5)
    with pytest.raises(ValueError, match=r"first_tokens\[1\] = -2 is neither -1 nor in"):
        generate(params, cfg, tokens, lengths, first_tokens=[3, -2, 0, 0], **kwargs)


def test_entropy_and_varentropy_are_those_of_the_full_forward_distribution(model):
    cfg, params = model
    tokens, lengths = _prompts([7, 4])
    kwargs = dict(key=jax.random.key(1), max_new_tokens=6, temperature=1.0, stop_tokens=(5, 6))
    out = generate(params, cfg, tokens, lengths, return_entropy=True, **kwargs)
    plain = generate(params, cfg, tokens, lengths, **kwargs)
    np.testing.assert_array_equal(out.tokens, plain.tokens)  # the draws are unchanged
    assert plain.entropy.shape == (2, 0)
    for i, n in enumerate([7, 4]):
        m = int(out.lengths[i])
        seq = jnp.concatenate([tokens[i, :n], out.tokens[i]])
        logp = jax.nn.log_softmax(full_forward_logits(params, cfg, seq)[n - 1 : n - 1 + m])
        entropy = -jnp.sum(jnp.exp(logp) * logp, -1)  # [m]
        varentropy = jnp.sum(jnp.exp(logp) * (logp + entropy[:, None]) ** 2, -1)
        np.testing.assert_allclose(out.entropy[i, :m], entropy, atol=1e-4)
        np.testing.assert_allclose(out.varentropy[i, :m], varentropy, atol=1e-4)
        assert np.all(np.asarray(out.entropy[i, m:]) == 0)  # pad after the stop


def test_compiles_once_for_repeated_calls_of_the_same_shape(model):
    cfg, params = model
    kwargs = dict(max_new_tokens=4, temperature=1.0, top_k=5, stop_tokens=STOP_CANDIDATES)
    tokens, lengths = _prompts([5, 2])
    generate(params, cfg, tokens, lengths, key=jax.random.key(0), **kwargs)
    before = _generate._cache_size()
    for seed in range(3):
        tokens, lengths = _prompts([4, 7], seed=seed)
        generate(params, cfg, tokens, lengths, key=jax.random.key(seed), **kwargs)
    assert _generate._cache_size() == before


def test_bad_settings_are_rejected(model):
    cfg, params = model
    tokens, lengths = _prompts([3])
    with pytest.raises(ValueError, match="top_p"):
        generate(params, cfg, tokens, lengths, key=jax.random.key(0), max_new_tokens=2, top_p=0.0)


def test_the_pad_token_may_be_a_stop_token(model):
    """Checkpoints whose config sets pad = eos (transformers accepts them) were refused: pad
    only fills a row after its first stop, so the row ends there whatever pad is."""
    cfg, params = model
    tokens, lengths = _prompts([7, 4])
    kwargs = dict(key=jax.random.key(1), max_new_tokens=6, temperature=1.0)
    stop = int(generate(params, cfg, tokens, lengths, **kwargs).tokens[0, 2])  # drawn at step 2
    ref = generate(params, cfg, tokens, lengths, stop_tokens=(stop,), **kwargs)
    out = generate(params, cfg.replace(pad_token_id=stop), tokens, lengths, stop_tokens=(stop,),
                   **kwargs)  # fmt: skip
    assert out.stopped[0] and int(out.lengths[0]) <= 3
    np.testing.assert_array_equal(out.lengths, ref.lengths)
    np.testing.assert_array_equal(out.stopped, ref.stopped)
    for i, n in enumerate(np.asarray(out.lengths)):
        np.testing.assert_array_equal(out.tokens[i, :n], ref.tokens[i, :n])
        assert np.all(np.asarray(out.tokens[i, n:]) == stop)  # pad after the stop


@pytest.mark.parametrize(
    "lengths,kwargs,match",
    [
        ([0, 3], {}, r"prompt_lengths\[0\] = 0 is outside \[1, 9\]"),
        ([3, 10], {}, r"prompt_lengths\[1\] = 10 is outside \[1, 9\]"),
        ([3, 3], dict(num_samples=0), "num_samples=0"),
        ([3, 3], dict(temperature=float("nan")), "temperature=nan"),
        ([3, 3], dict(temperature=float("inf")), "temperature=inf"),
        ([3, 3], dict(score_suffix=(9,)), "must be given together"),
        ([3, 3], dict(score_tokens=(9,)), "must be given together"),
        ([3, 3], dict(stop_tokens=(VOCAB,)), rf"stop_tokens \({VOCAB},\) are not all in"),
        ([3, 3], dict(stop_tokens=(-1,)), r"stop_tokens \(-1,\) are not all in"),
    ],
)
def test_bad_lengths_and_token_ids_are_rejected(model, lengths, kwargs, match):
    cfg, params = model
    tokens, _ = _prompts([3, 3])
    with pytest.raises(ValueError, match=match):
        generate(
            params,
            cfg,
            tokens,
            jnp.asarray(lengths),
            key=jax.random.key(0),
            max_new_tokens=2,
            **kwargs,
        )


def test_prompt_ids_outside_the_vocabulary_are_refused_on_real_positions(model):
    cfg, params = model
    tokens, lengths = _prompts([3, 5])
    run = lambda t: generate(params, cfg, t, lengths, key=jax.random.key(0), max_new_tokens=2)
    run(tokens.at[0, 4].set(VOCAB + 2))  # past row 0's length: padding, never read
    for bad in (VOCAB, VOCAB + 3, -1):
        with pytest.raises(ValueError, match=rf"generate: prompt: token id {bad} is outside"):
            run(tokens.at[1, 4].set(bad))


def test_misshaped_prompts_and_a_bare_stop_id_are_refused_naming_them(model):
    """One prompt [P] (a notebook's first try), float ids and stop_tokens=5 failed deep in
    chex, an embedding gather or iteration, naming no argument."""
    cfg, params = model
    tokens, lengths = _prompts([3, 5])
    run = lambda t, n, **kw: generate(
        params, cfg, t, n, key=jax.random.key(0), max_new_tokens=2, **kw
    )
    shapes = r"prompt_tokens must be \[B, P\] with B, P >= 1 and prompt_lengths \[B\], got shapes"
    with pytest.raises(ValueError, match=shapes + r" \(9,\) and \(\)"):
        run(tokens[0], 3)
    with pytest.raises(ValueError, match=shapes + r" \(2, 9\) and \(1,\)"):
        run(tokens, lengths[:1])
    with pytest.raises(ValueError, match=shapes + r" \(0, 9\) and \(0,\)"):
        run(tokens[:0], lengths[:0])  # an empty batch (a ZeroDivisionError)
    with pytest.raises(ValueError, match="prompt_tokens must be integers, got float32"):
        run(tokens.astype(jnp.float32), lengths)
    with pytest.raises(TypeError, match="stop_tokens must be a tuple of token ids, got 5"):
        run(tokens, lengths, stop_tokens=5)


def test_counts_must_be_ints_and_lengths_may_be_a_list(model):
    cfg, params = model
    tokens, lengths = _prompts([3, 5])
    run = lambda lengths, **kw: generate(params, cfg, tokens, lengths, key=jax.random.key(0), **kw)
    for kwargs, name in (
        (dict(max_new_tokens=2.7), "max_new_tokens"),
        (dict(max_new_tokens=2, num_samples=2.5), "num_samples"),
        (dict(max_new_tokens=2, top_k=2.9), "top_k"),
    ):
        with pytest.raises(TypeError, match=f"generate: {name} must be an int"):
            run(lengths, **kwargs)
    with pytest.raises(ValueError, match="prompt_lengths must be integers, got float"):
        run(np.asarray([3.0, 5.7]), max_new_tokens=2)
    expected = run(lengths, max_new_tokens=2, num_samples=2)
    for lengths_ in ([3, 5], (3, 5), np.asarray([3, 5], np.int64)):
        out = run(lengths_, max_new_tokens=np.int64(2), num_samples=np.int32(2))
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(expected.tokens))


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_tiny_temperature_filters_to_the_max_without_overflow(top_p):
    logits = jnp.asarray([[29.0, 30.0, -5.0]])  # / 2e-38 would overflow to [inf, inf, -inf]
    filtered = np.asarray(filter_logits(logits, 2e-38, 0, top_p))[0]
    assert filtered[1] == 0.0 and np.all(filtered[[0, 2]] < -1e37)
    assert not np.isnan(filtered).any()


@pytest.mark.parametrize("temperature", [2e-38, 1e-44])  # 1e-44 is subnormal in float32
def test_tiny_temperature_is_greedy(model, temperature):
    cfg, params = model
    tokens, lengths = _prompts([7, 4])
    run = lambda t: generate(
        params, cfg, tokens, lengths, key=jax.random.key(0), max_new_tokens=4, temperature=t
    )
    greedy, tiny = run(0.0), run(temperature)
    np.testing.assert_array_equal(tiny.tokens, greedy.tokens)
    np.testing.assert_array_equal(tiny.logprobs, greedy.logprobs)


def test_suffix_scores_equal_a_full_forward_over_the_row(model):
    cfg, params = model
    tokens, lengths = _prompts([7, 4])
    suffix, scored = (9, 11), (5, 6, 30)
    out = generate(
        params,
        cfg,
        tokens,
        lengths,
        key=jax.random.key(5),
        max_new_tokens=6,
        temperature=1.0,
        stop_tokens=STOP_CANDIDATES,
        num_samples=2,
        score_suffix=suffix,
        score_tokens=scored,
    )
    assert out.scores.shape == (4, 3)
    for row in range(4):
        prompt = tokens[row // 2, : int(lengths[row // 2])]
        seq = jnp.concatenate(
            [prompt, out.tokens[row, : int(out.lengths[row])], jnp.asarray(suffix)]
        )[None]
        logp = jax.nn.log_softmax(full_forward_logits(params, cfg, seq[0])[-1])
        np.testing.assert_allclose(out.scores[row], logp[jnp.asarray(scored)], atol=1e-5)


def test_under_fsdp_each_device_prefills_and_decodes_only_its_own_rows():
    """fsdp splits the params' D over the devices that split the prompts. Left to itself, XLA
    contracted over the split D in the prefill: every device computed the whole batch's MLP
    activations (Gemma2-2B's self-play expansion: 25 GiB per device at 2 layers, against 11 with
    the rows pinned; bench/memory.py --step sample)."""
    from o1jax.model import lora
    from o1jax.parallel.mesh import batch_sharding, make_mesh, param_shardings

    cfg = Gemma2Config.tiny(
        vocab_size=512, num_layers=2, d_model=256, num_heads=4, num_kv_heads=2, head_dim=32,
        ffn_dim=1024, sliding_window=64,
    )  # fmt: skip
    b, p = 8, 64
    mesh = make_mesh({"fsdp": 8})
    params = init_params(cfg, jax.random.key(0))
    adapter = lora.init(cfg, jax.random.key(1), lora.LoRAConfig(rank=4, alpha=8))
    with jax.set_mesh(mesh):
        params = jax.device_put(params, param_shardings(params, mesh))
        adapter = jax.device_put(adapter, param_shardings(adapter, mesh))
        prompts = jax.device_put(jnp.ones((b, p), jnp.int32), batch_sharding(mesh, 2))
        lengths = jax.device_put(jnp.full((b,), p, jnp.int32), batch_sharding(mesh, 1))
        lowered = _generate.lower(
            params, prompts, lengths, jax.random.key(0), adapter, cfg=cfg, max_new_tokens=4,
            temperature=1.0, top_k=0, top_p=1.0, stop_tokens=(), num_samples=2,
            score_suffix=(3,), score_tokens=(4, 5),
        )  # fmt: skip
    text = lowered.compile().as_text()
    assert f"f32[1,{p},{cfg.ffn_dim}]" in text  # each device's own prompt through the MLP
    assert f"f32[{b},{p},{cfg.ffn_dim}]" not in text
