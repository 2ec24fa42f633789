"""train.py end to end on configs/smoke.yaml: resume after SIGKILL, 1 vs 8 devices, bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from shared_runs import TRAIN_CACHE_ENV, made_once

from o1jax.data import longcot
from o1jax.train.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")


def _train(workdir, *overrides, devices=8, config=SMOKE, wait=True):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    if os.environ.get(TRAIN_CACHE_ENV):  # set by conftest: one compilation cache per session
        env["JAX_COMPILATION_CACHE_DIR"] = os.environ[TRAIN_CACHE_ENV]
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        "--config",
        config,
        "--workdir",
        str(workdir),
        *overrides,
    ]
    if not wait:
        return subprocess.Popen(
            cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


def _train_killed_before_save(workdir, step):
    """train.py on the smoke config, SIGKILLed as it starts to write checkpoint `step` (after
    everything that checkpoint covers has been logged)."""
    code = (
        "import os, runpy, signal, sys\n"
        "from o1jax.train import checkpoint\n"
        "save = checkpoint.Checkpointer.save\n"
        "def killed(self, step, state, meta):\n"
        f"    if step == {step}:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return save(self, step, state, meta)\n"
        "checkpoint.Checkpointer.save = killed\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    if os.environ.get(TRAIN_CACHE_ENV):
        env["JAX_COMPILATION_CACHE_DIR"] = os.environ[TRAIN_CACHE_ENV]
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    train = os.path.join(ROOT, "train.py")
    cmd = [sys.executable, "-c", code, train, "--config", SMOKE, "--workdir", str(workdir)]
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]


def _metrics_rows(workdir):
    """metrics.jsonl without the wall-clock rates, which differ between runs."""
    timing = ("tokens_per_s", "seconds", "per_s")
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if not any(t in k for t in timing)} for r in rows]


def _checkpoint_steps(workdir):
    path = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(path):
        return []
    return sorted(int(d) for d in os.listdir(path) if d.isdigit())


def _kill_when(workdir, proc, step, timeout=300):
    """SIGKILL the run as soon as a checkpoint at `step` or later is committed."""
    start = time.time()
    while time.time() - start < timeout:
        if any(s >= step for s in _checkpoint_steps(workdir)):
            time.sleep(0.3)  # land somewhere inside the next piece of work
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no checkpoint at step {step} within {timeout}s")


def _report(workdir):
    with open(os.path.join(workdir, "report.json")) as f:
        report = json.load(f)
    report.pop("wall_seconds")
    return report


def _final_params(workdir):
    from o1jax.train.pipeline import restore_policy
    from o1jax.train.run_context import open_run

    ctx = open_run(str(workdir))
    params, adapter = restore_policy(ctx)
    ctx.checkpointer.close()
    return jax.tree.map(np.asarray, (params, adapter))


def test_a_reader_of_a_workdir_writes_nothing_and_leaves_a_save_in_flight_alone(
    uninterrupted, tmp_path
):
    """evaluate / export / generate open a workdir that may be training: a reader that cleaned
    up orbax's tmp directories deleted the trainer's half-written checkpoint under it, and the
    tokenizer was saved again."""
    from o1jax.train.run_context import open_run

    work = tmp_path / "w"
    shutil.copytree(uninterrupted, work)
    in_flight = work / "checkpoints" / "999.orbax-checkpoint-tmp"
    in_flight.mkdir()
    before = {p: p.stat().st_mtime_ns for p in work.rglob("*")}
    ctx = open_run(str(work))
    assert ctx.checkpointer.read_only
    _final_params(work)
    assert {p: p.stat().st_mtime_ns for p in work.rglob("*")} == before  # in_flight included
    ctx.checkpointer.close()


def _sft_losses(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["sft/loss"] for r in rows if "sft/loss" in r}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return made_once(tmp_path_factory, "smoke_straight", _train_to_the_end)


def _train_to_the_end(workdir, *overrides):
    result = _train(workdir, *overrides)
    assert result.returncode == 0, result.stderr[-3000:]


def test_smoke_run_writes_report_curves_and_tensorboard(uninterrupted):
    report = _report(uninterrupted)
    for key in (
        "sft_pass1",
        "greedy_pass1",
        "search_accuracy",
        "rl_pass1",
        "train_problems",
        "test_problems",
    ):
        assert key in report
    assert os.path.getsize(os.path.join(uninterrupted, "learning_curves.png")) > 10_000
    assert os.listdir(os.path.join(uninterrupted, "tensorboard"))
    names = set().union(
        *(json.loads(line).keys() for line in open(os.path.join(uninterrupted, "metrics.jsonl")))
    )
    for name in (
        "sft/loss",
        "sft/tokens_per_s",
        "ppo/kl",
        "ppo/clip_fraction",
        "rl/selfplay_success",
        "rl/buffer_size",
        "eval/sft_pass1",
        "eval/rl_pass1",
    ):
        assert name in names


def test_sigkill_and_resume_ends_like_an_uninterrupted_run(uninterrupted, tmp_path):
    workdir = tmp_path / "killed"
    # Killed mid-SFT; then as the post-SFT evaluation's checkpoint is written, its scalars
    # logged; then during RL; then run to the end. S=24: eval 25, RL 26..
    _kill_when(workdir, _train(workdir, wait=False), step=8)
    _train_killed_before_save(workdir, step=25)
    _kill_when(workdir, _train(workdir, wait=False), step=26)
    # The last segment keeps more checkpoints: a key that changes no number may change on a
    # resume (`checkpoint.LAYOUT_KEYS`), and the workdir's config.yaml then says so.
    result = _train(workdir, "checkpoint.keep=3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_config(os.path.join(workdir, "config.yaml")).checkpoint.keep == 3
    assert _report(workdir) == _report(uninterrupted)
    jax.tree.map(
        np.testing.assert_array_equal, _final_params(workdir), _final_params(uninterrupted)
    )
    assert _metrics_rows(workdir) == _metrics_rows(uninterrupted)  # each row once, in order


def test_first_sft_losses_match_on_1_and_8_devices(uninterrupted, tmp_path):
    result = _train(
        tmp_path / "one",
        "rl.iterations=0",
        "eval.num_problems=2",
        "eval.search_simulations=1",
        devices=1,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    one, eight = _sft_losses(tmp_path / "one"), _sft_losses(uninterrupted)
    assert sorted(one) == sorted(eight)
    np.testing.assert_allclose(
        [one[s] for s in sorted(one)], [eight[s] for s in sorted(one)], atol=1e-4
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (["--config", "/nope.yaml"], "/nope.yaml: config file not found"),
        (["sft.stepz=3"], "unknown key sft.stepz"),
        (["sft.steps=many"], "sft.steps: expected an integer, got 'many'"),
        (["model_dir=/no/such/dir"], "model_dir /no/such/dir: no such directory"),
        (["model.preset=gemma2_2b"], "model_dir: model.preset gemma2_2b needs its weights"),
        # found before the weights are loaded (orbax's threads printed a traceback after it)
        (["sft.micro_batch_size=4"], "sft.micro_batch_size: must be a multiple of the mesh's"),
        (["model.head_dim=3"], "model.head_dim: must be even"),  # was a RoPE shape traceback
        (  # a task with fewer distinct problems than asked for: was a ValueError traceback
            ["data.task.num_train=500", "data.task.max_operand=2", "data.task.max_value=3"],
            "data.task.num_train: generate_problems: found only",
        ),
    ],
)
def test_bad_input_exits_nonzero_with_one_clear_line(tmp_path, args, message):
    if args[0] == "--config":
        result = _train(tmp_path / "w", config=args[1])
    else:
        result = _train(tmp_path / "w", *args)
    assert result.returncode == 2
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]


def test_malformed_yaml_and_broken_problem_file(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("seed: [1, 2\nsft: {")
    result = _train(tmp_path / "w1", config=str(bad_yaml))
    assert result.returncode == 2 and "malformed YAML" in result.stderr
    problems = tmp_path / "p.jsonl"
    problems.write_text('{"question": "1+1?", "answer": "#### 2"}\n{"question": oops}\n')
    result = _train(tmp_path / "w2", f"data.path={problems}")
    assert result.returncode == 2 and f"{problems}:2: broken JSON" in result.stderr


def test_workdir_of_another_config_is_refused_and_left_untouched(uninterrupted):
    before = {
        p: os.path.getmtime(os.path.join(uninterrupted, p)) for p in ("config.yaml", "report.json")
    }
    steps = _checkpoint_steps(uninterrupted)
    result = _train(uninterrupted, "seed=7")
    assert result.returncode == 2
    assert "holds a run of a different config (seed: 0 in the workdir, 7 now)" in result.stderr
    assert _checkpoint_steps(uninterrupted) == steps
    assert before == {p: os.path.getmtime(os.path.join(uninterrupted, p)) for p in before}


def test_a_finished_run_started_again_keeps_its_report(uninterrupted, tmp_path):
    """Nothing is left to run: the same report, its wall time included (it was the no-op's)."""
    import shutil

    workdir = tmp_path / "again"
    shutil.copytree(uninterrupted, workdir)
    read = lambda: json.loads((workdir / "report.json").read_text())
    before = read()
    result = _train(workdir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert read() == before
    # A kill while the report was written left a cut file: it is written again, not read.
    text = (workdir / "report.json").read_text()
    (workdir / "report.json").write_text(text[:40])
    result = _train(workdir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert {k: v for k, v in read().items() if k != "wall_seconds"} == {
        k: v for k, v in before.items() if k != "wall_seconds"
    }


def test_nonfinite_losses_skip_updates_then_stop_the_run(tmp_path):
    result = _train(tmp_path / "nan", "sft.learning_rate=1e30", "max_nonfinite=2")
    assert result.returncode == 3, result.stderr[-2000:]
    assert "non-finite loss, update skipped" in result.stderr
    assert "2 non-finite losses (max_nonfinite=2)" in result.stderr


def test_a_ppo_update_skipped_for_its_gradient_alone_is_reported(tmp_path):
    """At lr 1e30 the first PPO update's loss is finite and its gradient is not: the update is
    skipped, and that is logged as a loss would be (it went unreported)."""
    workdir = tmp_path / "nan_grad"
    result = _train(  # the smoke run's shapes: its programs come from the compilation cache
        workdir, "sft.steps=3", "sft.learning_rate=1e30", "rl.learning_rate=1e30",
        "max_nonfinite=3", "rl.iterations=1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]  # 2 skipped, under max_nonfinite
    assert "rl iteration 1: non-finite PPO loss or gradient, updates skipped" in result.stderr
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert any("ppo/nonfinite_total" in r for r in rows)


def test_clis_on_a_trained_workdir(uninterrupted, tmp_path, capsys, monkeypatch):
    """evaluate (greedy, pass@k, search with tree export), show_tree and generate on a real run."""
    from o1jax import evaluate, generate, show_tree
    from o1jax.train import evaluate as ev

    meshes = []  # evaluate runs under the run's mesh: each device decodes its share of the rows
    for name in ("evaluate", "search_evaluate", "refine_evaluate"):
        real = getattr(ev, name)
        spy = lambda *a, real=real, **k: (
            meshes.append(jax.sharding.get_abstract_mesh().shape) or (real(*a, **k))
        )
        monkeypatch.setattr(ev, name, spy)
    trees = tmp_path / "trees"
    argv = ["--workdir", str(uninterrupted), "--limit", "4", "--samples", "2", "--out"]
    argv += [str(tmp_path), "--search", "mcts,mctsr", "--simulations", "3", "--rollouts", "2"]
    assert evaluate.main([*argv, "--trees", str(trees)]) == 0
    assert meshes == [{"data": 8, "fsdp": 1, "tensor": 1}] * 3
    summary = json.load(open(tmp_path / "eval_summary.json"))
    assert summary["problems"] == 4 and 0 <= summary["pass@2"] <= 1
    assert summary["maj@2"] <= summary["pass@2"] and "mcts accuracy (3 sims)" in summary
    refined = summary["mctsr accuracy (2 rollouts)"]
    assert 0 <= refined <= summary["mctsr any solution right"] <= 1
    assert 0 <= summary["mctsr refinements cut for room"] <= 1
    assert len(open(tmp_path / "eval_outputs.jsonl").readlines()) == 4
    records = [json.loads(line) for line in open(tmp_path / "mctsr_outputs.jsonl")]
    assert [len(r["answers"]) for r in records] == [3] * 4  # the first answer + 2 refinements
    for name in sorted(os.listdir(trees / "mctsr")):  # OpenLongCoT text, parsed strictly
        longcot.parse_tree((trees / "mctsr" / name).read_text())
    files = sorted(f for f in os.listdir(trees / "mcts") if f.endswith(".json"))
    assert len(files) == 4 and len(os.listdir(trees / "mcts")) == 8  # and OpenLongCoT text
    trees = trees / "mcts"
    tree = json.load(open(trees / files[0]))
    n = len(tree["nodes"])  # the root + K = 2 children per expanding simulation
    assert n in (3, 5, 7) and tree["truth"] is not None
    assert show_tree.main([str(trees / files[0]), "-o", str(tmp_path / "t.html")]) == 0
    assert (tmp_path / "t.html").read_text().count("<rect") == n
    # The run's own trees of its first held-out problems are written beside its report.
    assert len(os.listdir(os.path.join(uninterrupted, "trees_sft"))) == 16  # JSON and text
    capsys.readouterr()
    prompt = tree["question"]
    assert generate.main(["--workdir", str(uninterrupted), "--prompt", prompt, "--longcot"]) == 0
    assert "--- prompt 0, sample 0" in capsys.readouterr().out


def test_export_writes_the_policy_transformers_loads_with_the_same_logits(
    uninterrupted, tmp_path, capsys
):
    """`python -m o1jax.export`: the run's final policy (SFT'd model + RL adapter, merged) and its
    tokenizer in an HF directory; transformers' logits equal ours with the adapter applied."""
    import torch
    import transformers

    from o1jax import export
    from o1jax.model import forward
    from o1jax.train.run_context import open_run

    out = tmp_path / "models" / "policy"
    assert export.main(["--workdir", str(uninterrupted), "--out", str(out)]) == 0
    assert oct(os.stat(out).st_mode & 0o777) != "0o700"  # not mkdtemp's private mode
    assert sorted(f for f in os.listdir(tmp_path / "models")) == ["policy"]  # no staging left
    params, adapter = _final_params(uninterrupted)
    assert adapter is not None  # the smoke run did RL: the export must merge its adapter
    ctx = open_run(str(uninterrupted))
    ctx.checkpointer.close()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    text = longcot.render_prompt(ctx.test[0].question)
    ids = tokenizer(text)["input_ids"]
    assert ids == ctx.tokenizer(text)["input_ids"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager")
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits.float().numpy()
    ours = np.asarray(forward(params, ctx.cfg, jax.numpy.asarray([ids]), lora=adapter))
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)

    # An --out in use, a run with no PPRM, a run with no checkpoint yet, a directory that is no
    # run: one line, status 2.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copy(os.path.join(uninterrupted, "config.yaml"), fresh)
    for argv, message in [
        (["--workdir", str(uninterrupted), "--out", str(out)], "exists and is not an empty"),
        (["--workdir", str(fresh), "--out", str(tmp_path / "p")], "no checkpoint yet"),
        (["--workdir", str(uninterrupted), "--out", str(tmp_path / "p"), "--pprm"], "no PPRM"),
        (["--workdir", str(tmp_path), "--out", str(tmp_path / "q")], "not a train.py run"),
    ]:
        capsys.readouterr()
        assert export.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "p").exists() and not (tmp_path / "q").exists()


def test_self_play_with_every_llama_o1_search_option(uninterrupted):
    """The RL stage's self-play on a trained run with widening (max_children 4), V = 2 nodes per
    tree and simulation, search-drawn tags (all <refine>) and PUCT's entropy terms (each node's
    mean entropy and varentropy recorded): the options reach the search
    through the config, and the trees and experiences stay consistent. (The smoke model's
    thoughts mostly run out of tokens, so its trees stay small.)"""
    import dataclasses

    import numpy as np

    from o1jax.search.format import make_step_format
    from o1jax.train import pipeline, rl_loop, run_context

    ctx = run_context.open_run(str(uninterrupted))
    params, _ = pipeline.restore_policy(ctx)
    overrides = ["search.max_children=4", "search.leaves_per_tree=2", "search.num_simulations=4"]
    overrides += ["search.meta_action_prob=1", "search.meta_action_weights=[0, 0, 1, 0]"]
    overrides += ["search.entropy_prior=true", "search.varentropy_bonus=0.1"]
    config = load_config(os.path.join(uninterrupted, "config.yaml"), overrides)
    ctx = dataclasses.replace(ctx, config=config)
    setup = rl_loop.self_play_setup(ctx)
    assert setup.search.capacity == 1 + 4 * 2 * 2
    _, tree, exps = rl_loop.self_play(ctx, setup, params, None, 0)
    t = jax.tree.map(np.asarray, tree)
    refine = make_step_format(ctx.tokenizer, 1).meta_actions[2]
    for b in range(t.parent.shape[0]):
        used = int(t.num_nodes[b])
        assert used >= 1 + 2  # the root was expanded
        assert np.all(t.tokens[b, 1:used, 0] == refine)  # every thought starts with the drawn tag
        kids = np.bincount(t.parent[b, 1:used], minlength=used)
        np.testing.assert_array_equal(t.num_children[b, :used], kids)
        assert np.all(t.entropy[b, 1:used] > 0) and np.all(t.varentropy[b, 1:used] > 0)
    valid = np.asarray(exps.valid)
    assert valid.sum() <= int(np.sum(t.num_nodes - 1))  # one experience per non-root node at most


def test_sigterm_during_an_evaluation_stops_before_the_next_batch(tmp_path, monkeypatch, capsys):
    """A preemption notice that arrives while the post-SFT evaluation runs must not wait for the
    evaluation, a PPRM stage or an RL iteration to finish: it stops before the next batch (exit
    143), and the workdir holds only SFT's checkpoint, which a resumed run evaluates again."""
    monkeypatch.syspath_prepend(ROOT)
    import o1jax.train.pipeline as pipeline
    import o1jax.train.rl_loop as rl_loop
    import train

    original = pipeline.evaluate_policy

    def evaluate_after_sigterm(ctx, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(ctx, *args, **kwargs)

    self_play = []
    monkeypatch.setattr(pipeline, "evaluate_policy", evaluate_after_sigterm)
    monkeypatch.setattr(rl_loop, "self_play", lambda *a, **k: self_play.append(a))
    overrides = ["sft.steps=1", "eval.num_problems=4", "eval.max_new_tokens=8",
                 "rl.iterations=1"]  # fmt: skip
    workdir = tmp_path / "w"
    assert train.main(["--config", SMOKE, "--workdir", str(workdir), *overrides]) == 143
    assert "SIGTERM during the sft evaluation" in capsys.readouterr().err
    assert self_play == []
    assert _checkpoint_steps(workdir) == [1]  # SFT's last step; no evaluation checkpoint
