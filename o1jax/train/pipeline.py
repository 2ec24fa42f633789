"""The main job: data and tokenizer, SFT, evaluation, PPRM, self-play RL, evaluation, report.

    report = run(load_config("configs/tiny.yaml"), "runs/tiny")

Each stage lives in a module of its own (`run_context`, `sft_stage`, `eval_stage`, `pprm_stage`,
`rl_loop`); this one runs them in order, checkpoints between them and resumes a killed run.

Stages and what a checkpoint holds (`o1jax.train.checkpoint`; S SFT steps, P PPRM steps, which
may be 0, I RL iterations; E = S + 1):

    stage  checkpoint steps   metrics steps   holds
    sft    1..S               1..S            SFT state (trainable params or LoRA, optimizer)
    eval   E                  S               + the post-SFT evaluation results
    pprm   E+1..E+P           S+1..S+P        + the PPRM state (its LoRA, optimizer); the last
                                              also holds its held-out pairwise accuracy
    rl     E+P+1..E+P+I       S+P+1..S+P+I    + the RL state (LoRA, optimizer), the replay buffer
    done   E+P+I+1            S+P+I           + the final results

Checkpoints after the PPRM stage keep its state (the "pprm" entry, see `restore_pprm`).

Every random draw is a function of (seed, stage, step), so a run killed at any moment and
started again on its workdir ends with the same report and parameters as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp

from o1jax.model import lora
from o1jax.parallel.mesh import maybe_initialize_distributed
from o1jax.train import metrics as run_metrics
from o1jax.train.checkpoint import CheckpointError, PreemptionFlag, abstract_like
from o1jax.train.config import (
    ConfigError,
    RunConfig,
    dump_config,
    require_batch_fits_mesh,
    require_problems_per_iteration,
)
from o1jax.train.eval_stage import evaluate_policy
from o1jax.train.files import write_atomically
from o1jax.train.metrics import MetricsWriter
from o1jax.train.pprm_stage import policy_pprm_pairs, pprm_pairs, pprm_trainer, run_pprm
from o1jax.train.rl_loop import rl_structures, run_rl
from o1jax.train.run_context import (
    STAGE_SFT,
    Preempted,
    RunContext,
    build_context,
    check_workdir,
    lora_config,
    require_same_config,
    run_mesh,
    save_checkpoint,
)
from o1jax.train.sft import SFTConfig, SFTTrainer
from o1jax.train.sft_stage import policy_params, run_sft, sft_examples


def run(config: RunConfig, workdir: str) -> dict:
    """Runs (or resumes) the whole job in `workdir`; returns the report."""
    started = time.perf_counter()
    maybe_initialize_distributed()
    check_workdir(config, workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:  # a parent that is a file, no permission, a read-only filesystem
        raise ConfigError(f"--workdir {workdir}: cannot create it ({e.strerror})") from None
    # Every stage's batch is split over the mesh: refuse one that does not fit now, before the
    # weights are loaded, not after minutes of SFT.
    mesh = run_mesh(config)
    micro_batches = config.sft.steps > 0 and config.sft.micro_batch_size > 0
    for key, size, used in (
        ("sft.batch_size", config.sft.batch_size, config.sft.steps > 0),
        ("sft.micro_batch_size", config.sft.micro_batch_size, micro_batches),
        ("pprm.batch_size", config.pprm.batch_size, config.pprm.steps > 0),
        ("rl.batch_size", config.rl.batch_size, config.rl.iterations > 0),
        ("rl.micro_batch_size", config.rl.micro_batch_size,
         config.rl.iterations > 0 and config.rl.micro_batch_size > 0),
    ):  # fmt: skip
        if used:
            require_batch_fits_mesh(key, size, mesh)
    with PreemptionFlag() as flag:
        ctx = build_context(config, workdir, MetricsWriter(workdir), flag)
        ctx.started = started
        try:
            require_problems_per_iteration(config, len(ctx.train))  # self-play draws them
        except ConfigError:
            ctx.metrics.close()
            ctx.checkpointer.close()  # (its threads would print a traceback at exit)
            raise

        def claim() -> None:
            """Only a run that could start claims the workdir: a start that failed on its data
            or model leaves it free for the corrected command. A resume writes its own config:
            it may differ in `checkpoint.LAYOUT_KEYS` (a new mesh), which the workdir's CLIs
            (evaluate, generate) must then build."""
            if run_metrics.is_primary():
                dump_config(config, os.path.join(workdir, "config.yaml"))

        try:
            report = _run_stages(ctx, claim)
        finally:
            ctx.metrics.close()
            ctx.checkpointer.close()
    report["wall_seconds"] = round(ctx.elapsed(), 1)  # all segments of a resumed run
    if not run_metrics.is_primary():  # process 0 writes the report and the curves
        return report
    report_path = os.path.join(workdir, "report.json")
    previous = _read_report(report_path)  # a finished run started again: keep its wall time
    if {k: v for k, v in previous.items() if k != "wall_seconds"} == {
        k: v for k, v in report.items() if k != "wall_seconds"
    }:
        report["wall_seconds"] = previous.get("wall_seconds", report["wall_seconds"])
    write_atomically(report_path, json.dumps(report, indent=2))
    ctx.metrics.plot()
    return report


def _read_report(path: str) -> dict:
    """The report a finished run wrote ({} if none, or one that cannot be read: it is rewritten)."""
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


def _run_stages(ctx: RunContext, claim=lambda: None) -> dict:
    """Runs the stages the latest checkpoint has not finished (all of them on a new workdir)
    and returns the report. `claim()` is called once the data every stage needs up front (the
    SFT examples, a pairs file) has been read, before any training."""
    config = ctx.config
    s_steps, p_steps, iters = config.sft.steps, config.pprm.steps, config.rl.iterations
    # Global checkpoint steps (the module docstring): SFT 1..S, post-SFT evaluation S + 1, PPRM
    # step p at S + 1 + p, RL iteration i at S + 1 + P + i, the final record at S + P + I + 2.
    eval_step = s_steps + 1
    rl_step = eval_step + p_steps
    latest = ctx.checkpointer.latest_step()
    meta = ctx.checkpointer.read_meta(latest) if latest is not None else {"stage": "new"}
    if "config" in meta:  # the config that wrote it (config.yaml may be gone, or another's)
        where = os.path.join(ctx.checkpointer.directory, str(latest))
        require_same_config(meta["config"], config, f"{where}: a checkpoint")
    ctx.elapsed_before = float(meta.get("elapsed_seconds", 0.0))  # earlier segments' seconds
    if "metrics_rows" in meta:  # the rows logged when that checkpoint was written
        ctx.metrics.keep_rows(meta["metrics_rows"])
    else:  # a checkpoint from before the count was kept, or none
        ctx.metrics.truncate_after(_logged_step(meta, s_steps, p_steps))
    pprm_pending = p_steps > 0 and (
        meta["stage"] in ("new", "sft", "eval")
        or (meta["stage"] == "pprm" and meta["step"] < p_steps)
    )
    # Before SFT, so that a broken pairs file or data without a worked solution stops the run at
    # once, before it claims the workdir.
    pairs = pprm_pairs(ctx) if pprm_pending else None
    examples = None
    if meta["stage"] in ("new", "sft") and config.sft.steps > 0:  # 0: RL straight from the base
        examples = sft_examples(config, ctx.tokenizer, ctx.train, [p.question for p in ctx.test])
    claim()

    # SFT, resumed from its own checkpoint when there is one.
    if meta["stage"] == "new":
        sft_state = run_sft(ctx, examples=examples).state
    elif meta["stage"] == "sft":
        state, _ = ctx.checkpointer.restore(latest, _checkpoint_like(ctx, "sft"))
        sft_state = run_sft(ctx, state["sft"], meta["step"], examples).state
    else:
        sft_state = None  # restored below together with the later stages

    results = meta.get("results", {})
    if meta["stage"] in ("new", "sft"):
        params = policy_params(ctx, sft_state)
        sft_eval = evaluate_policy(ctx, params, None, "sft", with_search=True)
        results = {
            "sft_pass1": sft_eval["greedy_pass1"],
            "greedy_pass1": sft_eval["greedy_pass1"],
            "search_accuracy": sft_eval["search_accuracy"],
        }
        ctx.metrics.scalars(
            s_steps,
            {
                "eval/sft_pass1": results["sft_pass1"],
                "eval/search_accuracy": results["search_accuracy"],
            },
        )
        save_checkpoint(ctx, eval_step, {"sft": sft_state}, {"stage": "eval", "results": results})
        meta = {"stage": "eval", "results": results}
        latest = eval_step
        if ctx.preemption.requested:  # SIGTERM during the evaluation's last batch
            raise Preempted("SIGTERM: saved the post-SFT evaluation")

    if meta["stage"] == "done":
        return dict(meta["report"])

    # Everything the latest checkpoint holds (the SFT state is still in memory if SFT just ran).
    pprm_state = rl_state = per_state = None
    if sft_state is None:
        state = _restore(ctx, latest, meta["stage"])
        sft_state = state["sft"]
        pprm_state, rl_state, per_state = state.get("pprm"), state.get("rl"), state.get("per")
    base = policy_params(ctx, sft_state)

    # PPRM: its own adapter over the frozen SFT'd model, resumed from its own checkpoint.
    if pprm_pending:
        start = meta["step"] if meta["stage"] == "pprm" else 0
        if pairs is None:
            mined = config.pprm.source == "policy"
            pairs = policy_pprm_pairs(ctx, base) if mined else pprm_pairs(ctx, base)
        pprm_state, results = run_pprm(
            ctx, base, *pairs, sft_state, results, start_state=pprm_state, start_step=start
        )
    kept = {} if pprm_state is None else {"pprm": pprm_state}  # carried to the end

    # RL, resumed with its state and buffer when the latest checkpoint is mid-RL.
    def save_iteration(done_iters, trainer, per_state):
        save_checkpoint(
            ctx,
            rl_step + done_iters,
            {"sft": sft_state, **kept, "rl": trainer.state, "per": per_state},
            {"stage": "rl", "iteration": done_iters, "results": results},
        )

    start_it = meta["iteration"] if meta["stage"] == "rl" else 0
    trainer, _ = run_rl(ctx, base, start_it, rl_state, per_state, on_iteration=save_iteration)
    if iters:
        final = evaluate_policy(ctx, base, trainer.lora, "rl", with_search=True)
    else:  # no RL: the policy is the SFT'd one, evaluated above (a zero adapter changes nothing)
        final = {k: results[k] for k in ("greedy_pass1", "search_accuracy")}
    report = {
        **results,
        "rl_pass1": final["greedy_pass1"],
        "rl_search_accuracy": final["search_accuracy"],
        "train_problems": len(ctx.train),
        "test_problems": min(len(ctx.test), config.eval.num_problems),
        "sft_steps": s_steps,
        "rl_iterations": iters,
    }
    if p_steps:
        report["pprm_steps"] = p_steps
    ctx.metrics.scalars(
        s_steps + p_steps + iters,
        {
            "eval/rl_pass1": report["rl_pass1"],
            "eval/rl_search_accuracy": report["rl_search_accuracy"],
        },
    )
    save_checkpoint(
        ctx,
        rl_step + iters + 1,
        {"sft": sft_state, **kept, "rl": trainer.state},
        {"stage": "done", "report": report},
    )
    return report


def _logged_step(meta: dict, sft_steps: int, pprm_steps: int = 0) -> int:
    """The last metrics step a checkpoint covers (rows after it are logged again on resume)."""
    stage = meta["stage"]
    if stage == "new":  # none: even step 0's rows (sft.steps 0: the post-SFT evaluation's)
        return -1
    if stage == "sft":
        return meta["step"]
    if stage == "pprm":
        return sft_steps + meta["step"]
    if stage == "rl":
        return sft_steps + pprm_steps + meta["iteration"]
    return sft_steps if stage == "eval" else 1 << 62


def _checkpoint_like(ctx: RunContext, stage: str) -> dict:
    """The shapes, dtypes and shardings (no arrays) of the trainer states and buffer a
    checkpoint of `stage` of this run holds. Each state is built and reduced to its abstract
    form before the next, so a restore holds only the restored state in device memory, not a
    second, freshly initialised one beside it (Adam moments, a replay buffer)."""
    config = ctx.config
    adapter = (
        None
        if config.sft.full_finetune
        else lora.init(ctx.cfg, jax.random.fold_in(ctx.key, STAGE_SFT), lora_config(config))
    )
    sft_config = SFTConfig(steps=config.sft.steps, batch_size=config.sft.batch_size)
    like = {
        "sft": abstract_like(
            SFTTrainer(ctx.cfg, ctx.params, sft_config, ctx.mesh, lora=adapter).state
        )
    }
    if stage == "pprm" or (stage in ("rl", "done") and config.pprm.steps > 0):
        like["pprm"] = abstract_like(pprm_trainer(ctx, ctx.params).state)
    if stage in ("rl", "done"):
        trainer, per_like = rl_structures(ctx, ctx.params)
        like["rl"] = abstract_like(trainer.state)
        if stage == "rl":
            like["per"] = abstract_like(per_like)
    return like


def _restore(ctx: RunContext, step: int, stage: str) -> dict:
    """The trainer states (and buffer) of checkpoint `step` of `stage`.

    A PPRM state saved before the PPRM's optimizer skipped non-finite updates (o1jax before
    2026-12-01: no `optax.apply_if_finite` counters around its Adam state) is read in that
    layout and given fresh counters, so those workdirs still evaluate and resume."""
    like = _checkpoint_like(ctx, stage)
    try:
        return ctx.checkpointer.restore(step, like)[0]
    except CheckpointError as error:
        if "pprm" not in like or "does not match" not in str(error):
            raise
        pprm_like = like["pprm"]
        legacy = {**like, "pprm": pprm_like.replace(opt_state=pprm_like.opt_state.inner_state)}
        try:
            state = ctx.checkpointer.restore(step, legacy)[0]
        except CheckpointError:
            raise error from None
    counters = pprm_like.opt_state._replace(inner_state=None)  # [] int32 / bool, replicated
    fresh = jax.tree.map(
        lambda x: jax.device_put(jnp.zeros(x.shape, x.dtype), x.sharding), counters
    )._replace(last_finite=jax.device_put(jnp.asarray(True), counters.last_finite.sharding))
    opt_state = fresh._replace(inner_state=state["pprm"].opt_state)
    return {**state, "pprm": state["pprm"].replace(opt_state=opt_state)}


def _latest(ctx: RunContext) -> tuple[int | None, dict]:
    """(latest checkpoint step or None, its metadata; stage "new" without one)."""
    latest = ctx.checkpointer.latest_step()
    return latest, ctx.checkpointer.read_meta(latest) if latest is not None else {"stage": "new"}


def restore_policy(ctx: RunContext):
    """(params, lora) of the latest checkpoint: the SFT'd model and, after RL, its adapter."""
    latest, meta = _latest(ctx)
    if latest is None:
        raise ConfigError(f"{ctx.workdir}: no checkpoint yet (run train.py on it first)")
    state = _restore(ctx, latest, meta["stage"])
    adapter = state["rl"].lora if "rl" in state else None
    return policy_params(ctx, state["sft"]), adapter


def restore_pprm(ctx: RunContext):
    """(base params, PPRM adapter): the SFT'd model, which the PPRM runs with its own LoRA
    adapter (`o1jax.search.pprm.preferences(base, ..., lora=adapter)`), from the latest
    checkpoint of a run whose PPRM stage has finished."""
    p_steps = ctx.config.pprm.steps
    if p_steps == 0:
        raise ConfigError(f"{ctx.workdir}: this run trained no PPRM (pprm.steps is 0)")
    latest, meta = _latest(ctx)
    stage = meta["stage"]
    if not (stage in ("rl", "done") or (stage == "pprm" and meta["step"] == p_steps)):
        at = {"new": "no checkpoint yet", "pprm": f"PPRM step {meta.get('step')} of {p_steps}"}
        raise ConfigError(
            f"{ctx.workdir}: this run has not finished its PPRM stage "
            f"({at.get(stage, f'stage {stage}')}); run train.py on it again to go on"
        )
    state = _restore(ctx, latest, stage)
    return policy_params(ctx, state["sft"]), state["pprm"].lora
