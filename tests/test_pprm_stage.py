"""The PPRM stage of train.py: report, resume after SIGKILL, restore_pprm, pairs files."""

import json
import os
import warnings

import jax
import numpy as np
import pytest
from shared_runs import made_once
from test_train import (
    ROOT,
    SMOKE,
    _checkpoint_steps,
    _kill_when,
    _report,
    _train,
    _train_to_the_end,
)

from o1jax.data.longcot import NEGATIVE_RATING, POSITIVE_RATING
from o1jax.data.tasks import DataError, DataWarning
from o1jax.search import pprm
from o1jax.train.checkpoint import Checkpointer
from o1jax.train.config import ConfigError, dump_config, load_config
from o1jax.train.metrics import MetricsWriter

# S = 8 SFT steps, P = 24 PPRM steps, no RL iteration: checkpoints 1..8, eval 9, PPRM 10..33
# (every 8: 17, 25, then 33 with the accuracy), done 34. Small evaluations keep it fast.
S, P = 8, 24
VERDICTS = (POSITIVE_RATING, NEGATIVE_RATING)
CONTEXT = 1024  # the smoke model's max_position_embeddings
RUN = [
    f"sft.steps={S}",
    f"pprm.steps={P}",
    "pprm.batch_size=16",
    "rl.iterations=0",
    "eval.num_problems=2",
    "eval.search_simulations=1",
]


@pytest.fixture(scope="module")
def with_pprm(tmp_path_factory):
    return made_once(tmp_path_factory, "pprm_straight", lambda w: _train_to_the_end(w, *RUN))


def _pprm_of(workdir):
    from o1jax.train.pipeline import restore_policy, restore_pprm
    from o1jax.train.run_context import open_run

    ctx = open_run(str(workdir))
    try:
        base, adapter = restore_pprm(ctx)
        policy, _ = restore_policy(ctx)
    finally:
        ctx.checkpointer.close()
    return jax.tree.map(np.asarray, (base, adapter, policy))


def _metrics(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def test_pprm_stage_reports_accuracy_and_keeps_the_numbering(with_pprm):
    report = _report(with_pprm)
    assert 0.0 <= report["pprm_accuracy"] <= 1.0 and report["pprm_steps"] == P
    assert report["pprm_eval_pairs"] == 16  # one pair per flawable held-out problem
    assert _checkpoint_steps(with_pprm) == [S + 1 + P, S + P + 2]  # PPRM's last, done
    rows = _metrics(with_pprm)
    steps = [r["step"] for r in rows]
    assert steps == sorted(steps)
    loss_steps = [r["step"] for r in rows if "pprm/loss" in r]
    assert loss_steps == [S + 10, S + 20, S + P]
    assert all("pprm/accuracy" in r for r in rows if "pprm/loss" in r)
    (acc,) = [r for r in rows if "eval/pprm_accuracy" in r]
    assert acc["step"] == S + P and acc["eval/pprm_accuracy"] == report["pprm_accuracy"]


def test_sigkill_during_pprm_resumes_to_the_same_report_and_adapter(with_pprm, tmp_path):
    workdir = tmp_path / "killed"
    _kill_when(workdir, _train(workdir, *RUN, wait=False), step=S + 1 + 8)  # PPRM step 8 saved
    assert max(_checkpoint_steps(workdir)) < S + 1 + P  # stopped inside the PPRM stage
    result = _train(workdir, *RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _report(workdir) == _report(with_pprm)
    jax.tree.map(np.testing.assert_array_equal, _pprm_of(workdir), _pprm_of(with_pprm))
    pprm_rows = lambda w: [r for r in _metrics(w) if any(k.startswith("pprm/") for k in r)]
    assert pprm_rows(workdir) == pprm_rows(with_pprm)


def test_nonfinite_pprm_losses_skip_updates_then_stop_the_run(tmp_path):
    result = _train(tmp_path / "nan", *RUN, "pprm.learning_rate=1e30", "max_nonfinite=2")
    assert result.returncode == 3, result.stderr[-2000:]
    assert "non-finite loss, update skipped (1 so far)" in result.stderr
    assert "pprm: 2 non-finite losses (max_nonfinite=2)" in result.stderr
    assert any("pprm/nonfinite_total" in r for r in _metrics(tmp_path / "nan"))


def test_restore_pprm_gives_the_trained_adapter_over_the_sft_model(with_pprm):
    base, adapter, policy = _pprm_of(with_pprm)
    jax.tree.map(np.testing.assert_array_equal, base, policy)  # no RL: the SFT'd model
    bs = [
        ab["b"] for group in adapter.weights.values() for t in group.values() for ab in t.values()
    ]
    assert max(np.abs(b).max() for b in bs) > 0  # trained: every B starts at zero


def test_a_pprm_saved_without_the_skip_counters_still_restores(with_pprm, tmp_path):
    """Workdirs of o1jax before the PPRM's optimizer skipped non-finite updates hold its Adam
    state bare: restoring reads that layout and starts the counters at zero."""
    import shutil

    from o1jax.train import pipeline
    from o1jax.train.run_context import open_run

    work = tmp_path / "legacy"
    shutil.copytree(with_pprm, work)
    ctx = open_run(str(work))
    step, meta = pipeline._latest(ctx)
    state = pipeline._restore(ctx, step, meta["stage"])
    ctx.checkpointer.close()
    bare = state["pprm"].replace(opt_state=state["pprm"].opt_state.inner_state)
    shutil.rmtree(work / "checkpoints" / str(step))
    writer = Checkpointer(str(work / "checkpoints"), keep=5)
    writer.save(step, {**state, "pprm": bare}, meta)
    writer.close()
    jax.tree.map(np.testing.assert_array_equal, _pprm_of(work), _pprm_of(with_pprm))
    ctx = open_run(str(work))
    restored = pipeline._restore(ctx, step, meta["stage"])["pprm"].opt_state
    ctx.checkpointer.close()
    assert int(restored.total_notfinite) == 0 and bool(restored.last_finite)
    jax.tree.map(
        np.testing.assert_array_equal, restored.inner_state, state["pprm"].opt_state.inner_state
    )


def test_export_pprm_writes_the_sft_model_with_the_pprm_adapter_merged(with_pprm, tmp_path):
    from o1jax import export
    from o1jax.model import load_hf, lora

    base, adapter, _ = _pprm_of(with_pprm)
    out = tmp_path / "pprm_hf"
    assert export.main(["--workdir", str(with_pprm), "--out", str(out), "--pprm"]) == 0
    _, params = load_hf(str(out))
    want = jax.tree.map(np.asarray, lora.merge(base, adapter))
    # The export merges the run's sharded arrays: A @ B may round its last bit differently.
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), params, want)
    assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, params, base)))  # merged
    assert (out / "tokenizer.json").is_file()


def _context(tmp_path, *overrides):
    from o1jax.train.run_context import build_context

    config = load_config(SMOKE, list(overrides))
    os.makedirs(tmp_path, exist_ok=True)
    dump_config(config, os.path.join(tmp_path, "config.yaml"))
    return build_context(config, str(tmp_path), MetricsWriter(str(tmp_path), False), None)


def test_restore_pprm_errors_name_the_workdir(tmp_path):
    from o1jax.train.pipeline import restore_pprm
    from o1jax.train.run_context import open_run

    _context(tmp_path / "none").checkpointer.close()
    ctx = open_run(str(tmp_path / "none"))
    with pytest.raises(ConfigError, match=r"none: this run trained no PPRM \(pprm.steps is 0\)"):
        restore_pprm(ctx)
    ctx.checkpointer.close()
    _context(tmp_path / "early", "pprm.steps=4").checkpointer.close()
    ctx = open_run(str(tmp_path / "early"))
    with pytest.raises(ConfigError, match="early: this run has not finished its PPRM stage"):
        restore_pprm(ctx)
    ctx.checkpointer.close()


def _pair_rows(questions):
    return [{"question": q, "chosen": "<conclusion>\\boxed{1}", "rejected": "9"} for q in questions]


def _hash_test(questions, fraction=0.1):
    """Those of `questions` in the test split of the question hash (data.test_fraction)."""
    from o1jax.data.tasks import question_split

    return [q for q in questions if question_split(q, fraction) == "test"]


def test_pairs_file_is_split_by_question_and_bad_lines_are_named(tmp_path):
    from o1jax.train.pprm_stage import pprm_pairs

    path = tmp_path / "pairs.jsonl"
    held = _context(tmp_path / "probe").test  # the run's held-out problems
    others = [f"Start with {i}, add 2." for i in range(40)]
    rows = _pair_rows(others) + _pair_rows([p.question for p in held[:3]])
    # A repeated row is read once; a pair longer than the model's context is left out.
    long = {"question": others[0], "chosen": "1 + 1 = 2; " * 60, "rejected": "2 + 2 = 5; " * 60}
    lines = [*map(json.dumps, rows), json.dumps(rows[0]), json.dumps(long)]
    path.write_text("\n".join(lines) + "\n\n")
    ctx = _context(tmp_path / "w", f"pprm.pairs_path={path}", "pprm.eval_pairs=2", "pprm.steps=1")
    with pytest.warns(DataWarning, match=rf"1 of 44 pairs are longer than the PPRM's {CONTEXT}-"):
        train, held_out = pprm_pairs(ctx)
    ctx.checkpointer.close()
    hashed = _hash_test(others)
    assert 0 < len(hashed) < 40  # the file's own hash split holds some out too
    assert held_out.num_pairs == 2 and train.num_pairs == 40 - len(hashed)
    assert max(train.lengths) < 100  # no batch is padded to the long pair
    # No pair held out either way: no held-out accuracy, an error that says why.
    kept = [r for r in rows[:40] if r["question"] not in hashed]
    path.write_text("\n".join(json.dumps(r) for r in kept) + "\n")
    ctx = _context(tmp_path / "w4", f"pprm.pairs_path={path}", "pprm.steps=1")
    with pytest.raises(ConfigError, match=rf"{len(kept)} train / 0 held-out pairs .* 16 held-out"):
        pprm_pairs(ctx)
    ctx.checkpointer.close()

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"question": "q", "chosen": "a"}))
    with pytest.raises(DataError, match=f"pprm.pairs_path: {bad}:2: field 'rejected' is missing"):
        pprm_pairs(_context(tmp_path / "w2", f"pprm.pairs_path={bad}", "pprm.steps=1"))
    bad.write_text('{"question": "q", "chosen": "a", "rejected": 3}\n')
    with pytest.raises(DataError, match=f"{bad}:1: field 'rejected' must be a non-empty string"):
        pprm_pairs(_context(tmp_path / "w3", f"pprm.pairs_path={bad}", "pprm.steps=1"))


def test_pairs_file_rows_without_a_preference_or_that_fit_no_context_are_named(tmp_path):
    from o1jax.data.tokenizer import build_tiny_tokenizer
    from o1jax.train.pprm import load_pairs

    tok, path = build_tiny_tokenizer(), tmp_path / "pairs.jsonl"
    row = lambda chosen, rejected: json.dumps(
        {"question": "q", "chosen": chosen, "rejected": rejected}
    )
    path.write_text(row("4", "5") + "\n" + row("4", "5") + "\n" + row("4", "4 ") + "\n")
    with pytest.raises(DataError, match=f"{path}:3: 'chosen' and 'rejected' are the same text"):
        load_pairs(path)
    path.write_text(row("4", "5") + "\n" + row("4", "5") + "\n" + row("5", "4") + "\n")
    reverses = r"1 row\(s\) reverse an earlier row's preference \(.*; line 3 reverses 1\)"
    with pytest.warns(DataWarning, match=reverses):
        # An exact repeat is read once; a reversed row is kept (and named).
        assert load_pairs(path) == [("q", "4", "5"), ("q", "5", "4")]
    width = len(pprm.encode_pair(tok, "q", "4", "5"))  # either order: 38 tokens
    too_long = r"2 of 2 pairs are longer than the PPRM's 37-token context \(longest 38 tokens\)"
    with (  # rows left out reverse nothing: one warning
        pytest.warns(DataWarning, match=too_long + r" and are left out \(lines 1, 3\)") as caught,
        pytest.raises(DataError, match=f"{path}: holds no preference pairs that fit 37 tok"),
    ):
        load_pairs(path, tok, width - 1)
    assert len(caught) == 1
    with pytest.warns(DataWarning, match=reverses):
        assert load_pairs(path, tok, width) == [("q", "4", "5"), ("q", "5", "4")]
    path.write_text(row("4", "5") + "\n" + row("4", "6") + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no reversed row, nothing too long: no warning
        assert load_pairs(path, tok, width + 8) == [("q", "4", "5"), ("q", "4", "6")]
    path.write_text('{"question": null, "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(DataError, match=f"{path}:1: field 'question' is missing or null"):
        load_pairs(path)


@pytest.mark.parametrize("test_fraction", [0.05, 0.5])
def test_pairs_file_never_trains_on_the_runs_held_out_problems(tmp_path, test_fraction):
    """Pairs on a problem the searches are evaluated on (the built-in task's test split; with
    data.test_path, that file's) are held out, and so are those in the file's own
    data.test_fraction hash split; all others train."""
    from o1jax.train.pprm_stage import pprm_pairs

    probe = _context(tmp_path / "probe", f"data.test_fraction={test_fraction}")
    held = [p.question for p in probe.test]
    seen = [p.question for p in probe.train[:20]]
    probe.checkpointer.close()
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _pair_rows(held + seen)) + "\n")
    overrides = [f"pprm.pairs_path={path}", "pprm.steps=1", "pprm.eval_pairs=1000"]
    ctx = _context(tmp_path / "w", f"data.test_fraction={test_fraction}", *overrides)
    train, held_out = pprm_pairs(ctx)
    ctx.checkpointer.close()
    hashed = set(_hash_test(seen, test_fraction))
    assert held_out.num_pairs == len(held) + len(hashed)
    assert train.num_pairs == len(seen) - len(hashed)

    # Each held-out row is on a held-out question, no training row is.
    def questions(pairs):
        rows = zip(pairs.tokens, pairs.lengths, strict=True)
        return {
            ctx.tokenizer.decode(r[:n], skip_special_tokens=True).split("\n")[0] for r, n in rows
        }

    assert questions(held_out) == set(held) | hashed and questions(train) == set(seen) - hashed


def test_task_pairs_carry_the_sft_models_verdicts_unless_rated_is_off(tmp_path, monkeypatch):
    from o1jax.train import pprm_stage
    from o1jax.train.pprm_stage import pprm_pairs

    ctx = _context(tmp_path / "w", "pprm.steps=1", "pprm.eval_pairs=3")
    assert ctx.config.pprm.rated and pprm_pairs(ctx) is None  # needs the SFT'd model first
    meshes, rate = [], pprm_stage.thought_ratings
    monkeypatch.setattr(
        pprm_stage,
        "thought_ratings",
        lambda *a, **k: meshes.append(jax.sharding.get_abstract_mesh().shape) or rate(*a, **k),
    )
    rated = pprm_pairs(ctx, ctx.params)
    assert meshes and all(m == dict(ctx.mesh.shape) for m in meshes)  # rows split over the mesh
    ctx.checkpointer.close()
    plain_ctx = _context(tmp_path / "w2", "pprm.steps=1", "pprm.eval_pairs=3", "pprm.rated=false")
    plain = pprm_pairs(plain_ctx)
    plain_ctx.checkpointer.close()
    verdict_ids = [ctx.tokenizer.convert_tokens_to_ids(t) for t in VERDICTS]
    count = lambda pairs: np.isin(pairs[0].tokens, verdict_ids).sum(axis=1)
    assert rated[0].num_pairs == plain[0].num_pairs and rated[1].num_pairs == 3
    assert (count(rated) >= 4).all() and (count(plain) == 0).all()  # a verdict per thought
    assert rated[0].first_better.tolist() == plain[0].first_better.tolist()


def test_policy_source_mines_pairs_from_the_sft_policy_after_sft(tmp_path, monkeypatch):
    from o1jax.train import pprm_mining, pprm_stage

    ctx = _context(tmp_path / "w", "pprm.source=policy", "pprm.steps=1", "pprm.eval_pairs=1",
                   "pprm.mine_problems=5", "pprm.samples=3")  # fmt: skip
    assert pprm_stage.pprm_pairs(ctx) is None  # nothing to mine before SFT
    calls = []

    def fake_triples(params, cfg, tokenizer, problems, *, key, samples, seed, **kw):
        calls.append((len(problems), samples, seed, jax.sharding.get_abstract_mesh().shape))
        return [(p.question, "right", "wrong") for p in problems]

    monkeypatch.setattr(pprm_mining, "policy_triples", fake_triples)
    train, held_out = pprm_stage.policy_pprm_pairs(ctx, ctx.params)
    assert train.num_pairs == 5 and held_out.num_pairs == 1
    assert calls[0][:2] == (5, 3) and calls[0][2] != calls[1][2]  # train and held-out draws
    assert calls[0][3] == dict(ctx.mesh.shape)  # under the run's mesh: rows split over it
    monkeypatch.setattr(pprm_mining, "policy_triples", lambda *a, **k: [])
    with pytest.raises(ConfigError, match=r"pprm\.source policy: .* 0 train / 0 held-out"):
        pprm_stage.policy_pprm_pairs(ctx, ctx.params)
    ctx.checkpointer.close()
    with pytest.raises(ConfigError, match=r"pprm\.source: must be 'task' or 'policy'"):
        load_config(SMOKE, overrides=["pprm.source=trees"])


def test_a_broken_pairs_file_stops_train_py_before_sft(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(ROOT)
    import train

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "chosen": "a", "rejected": "b"}\n{"question": oops}\n')
    argv = ["--config", SMOKE, "--workdir", str(tmp_path / "w"), f"pprm.pairs_path={bad}"]
    assert train.main([*argv, "pprm.steps=2"]) == 2
    err = capsys.readouterr().err
    assert f"error: pprm.pairs_path: {bad}:2: broken JSON" in err
    assert _checkpoint_steps(tmp_path / "w") == []  # nothing trained
    assert train.main([*argv, "pprm.steps=-1"]) == 2
    assert "pprm.steps: must be >= 0 (0: no PPRM stage), got -1" in capsys.readouterr().err


def test_berry_config_adds_only_the_pprm_stage_to_the_default():
    tiny = load_config(os.path.join(ROOT, "configs", "tiny.yaml"))
    berry = load_config(os.path.join(ROOT, "configs", "berry.yaml"))
    assert tiny.pprm.steps == 0 and berry.pprm.steps > 0
    assert berry.pprm.pairs_path == ""
    assert {k: v for k, v in vars(berry).items() if k != "pprm"} == {
        k: v for k, v in vars(tiny).items() if k != "pprm"
    }


def test_a_pair_batch_always_has_batch_size_rows():
    """Fewer rows than a batch repeat, so a batch always splits evenly over the mesh (the
    stage once crashed on 8 devices with 37 pairs and batches of 128)."""
    from o1jax.train.pprm import Pairs

    m = 6
    pairs = Pairs(np.arange(m)[:, None].repeat(3, 1), np.full(m, 3), np.arange(m) % 2)
    for step in range(3):
        batch = pairs.batch(step, 16, (0, 1))
        assert batch["tokens"].shape == (16, 3)
        assert sorted(set(batch["tokens"][:, 0].tolist())) == list(range(m))
    full = Pairs(np.arange(40)[:, None], np.ones(40), np.zeros(40))
    seen = np.concatenate([full.batch(s, 8, 0)["tokens"][:, 0] for s in range(5)])
    assert sorted(seen.tolist()) == list(range(40))  # an epoch still covers every row once
