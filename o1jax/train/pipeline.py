"""The main job: data and tokenizer, SFT, evaluation, PPRM, self-play RL, evaluation, report.

    report = run(load_config("configs/tiny.yaml"), "runs/tiny")

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

import dataclasses
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from o1jax.data import answers, longcot, tasks
from o1jax.data.tokenizer import (
    add_longcot_tokens,
    build_tiny_tokenizer,
    load_tokenizer,
    resize_embeddings,
)
from o1jax.model import Gemma2Config, init_params, load_hf, lora
from o1jax.parallel.mesh import make_mesh, maybe_initialize_distributed
from o1jax.rl import per
from o1jax.rl.experience import Experience, experience_width, tree_to_experiences
from o1jax.rl.ppo import PPOConfig, PPOTrainer
from o1jax.search import mcts
from o1jax.search.format import encode_chain, encode_prompts, make_step_format
from o1jax.search.ratings import thought_ratings
from o1jax.train import evaluate as ev
from o1jax.train import pprm_mining
from o1jax.train.checkpoint import Checkpointer, PreemptionFlag, config_fingerprint
from o1jax.train.config import (
    ConfigError,
    RunConfig,
    dump_config,
    load_config,
    require_batch_fits_mesh,
    to_dict,
)
from o1jax.train.metrics import MetricsWriter
from o1jax.train.pprm import (
    Pairs,
    PPRMConfig,
    PPRMTrainer,
    encode_pairs,
    load_pairs,
    pairwise_accuracy,
    task_pairs,
)
from o1jax.train.sft import Example, SFTConfig, SFTTrainer, nonfinite_count, pack

STAGE_SFT, STAGE_RL, STAGE_EVAL, STAGE_PPRM = 1, 2, 3, 4


class Preempted(Exception):
    """SIGTERM arrived; the last checkpoint is complete and the run can be resumed."""


class NonFiniteLoss(RuntimeError):
    """Too many non-finite losses; the run stopped (the last good checkpoint is intact)."""


@dataclasses.dataclass
class RunContext:
    config: RunConfig
    workdir: str
    mesh: object
    tokenizer: object
    cfg: Gemma2Config
    params: dict
    train: list
    test: list
    metrics: MetricsWriter
    checkpointer: Checkpointer
    preemption: PreemptionFlag
    key: jax.Array


# ----------------------------------------------------------------------------- set-up
def check_workdir(config: RunConfig, workdir: str) -> None:
    """A workdir belongs to one config: refuse (before writing anything) to mix two."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir {workdir}: is a file, not a directory")
    path = os.path.join(workdir, "config.yaml")
    if os.path.exists(path):
        import yaml

        try:
            with open(path, encoding="utf-8") as f:
                saved = yaml.safe_load(f) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: unreadable ({e}); use another --workdir") from None
        if not isinstance(saved, dict):
            raise ConfigError(f"{path}: not a config (a mapping); use another --workdir")
        try:  # sections added since the run started (e.g. pprm) take their defaults
            saved = to_dict(load_config(path))
        except ConfigError:
            pass
        if config_fingerprint(saved) != config_fingerprint(to_dict(config)):
            diff = _first_difference(saved, to_dict(config))
            raise ConfigError(
                f"{workdir}: holds a run of a different config ({diff}); use another --workdir"
            )


def _first_difference(a, b, prefix="") -> str:
    for k in sorted(set(a) | set(b)):
        if k == "checkpoint":
            continue
        key = f"{prefix}{k}"
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            d = _first_difference(va, vb, key + ".")
            if d:
                return d
        elif va != vb:
            return f"{key}: {va!r} in the workdir, {vb!r} now"
    return ""


def build_tokenizer(config: RunConfig, workdir: str):
    source = config.tokenizer_dir or config.model_dir
    if source:
        key = "tokenizer_dir" if config.tokenizer_dir else "model_dir"
        if not os.path.isdir(source):
            raise ConfigError(f"{key} {source}: no such directory")
        try:
            tokenizer = load_tokenizer(source)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{key} {source}: {e}") from None
        add_longcot_tokens(tokenizer)
        return tokenizer
    return build_tiny_tokenizer(os.path.join(workdir, "tokenizer"))


def load_problems(config: RunConfig) -> tuple[list, list]:
    """(train, held-out) problems: the built-in task, or a JSONL file split by question hash."""
    data = config.data
    if not data.path:
        t = data.task
        task = tasks.ArithmeticTask(
            num_ops=(t.min_ops, t.max_ops),
            max_operand=t.max_operand,
            max_multiplier=t.max_multiplier,
            max_value=t.max_value,
        )
        return (
            tasks.generate_problems(task, t.num_train, config.seed, "train"),
            tasks.generate_problems(task, t.num_test, config.seed, "test"),
        )
    problems = tasks.load_jsonl(data.path)
    if data.test_path:
        return problems, tasks.load_jsonl(data.test_path)
    train = [p for p in problems if tasks.question_split(p.question, data.test_fraction) == "train"]
    test = [p for p in problems if tasks.question_split(p.question, data.test_fraction) == "test"]
    if not train or not test:
        raise ConfigError(
            f"data.path {data.path}: {len(train)} train / {len(test)} held-out problems after "
            f"the split (test_fraction={data.test_fraction}); give data.test_path"
        )
    return train, test


def build_model(config: RunConfig, tokenizer, mesh, key):
    """(cfg, params): an HF checkpoint (grown to the tokenizer's vocabulary) or the tiny model."""
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(config.model.dtype)
    if dtype is None:
        raise ConfigError(f"model.dtype: 'float32' or 'bfloat16', not {config.model.dtype!r}")
    vocab = len(tokenizer)
    if config.model_dir:
        cfg, params = load_hf(config.model_dir, dtype=dtype, mesh=mesh)
        if vocab > cfg.vocab_size:
            params = resize_embeddings(params, vocab)
            cfg = cfg.replace(vocab_size=vocab)
        return cfg.replace(attention_impl=config.model.attention_impl), params
    m = config.model
    if m.preset != "tiny":  # a full-size preset with random weights (for planning and tests)
        cfg = Gemma2Config.preset(m.preset, vocab_size=vocab, attention_impl=m.attention_impl)
        return cfg, init_params(cfg, key, dtype)
    cfg = tiny_model_config(config, vocab)
    return cfg, init_params(cfg, key, dtype)


def tiny_model_config(config: RunConfig, vocab_size: int) -> Gemma2Config:
    """The built-in model's architecture from the config's `model` section."""
    m = config.model
    return Gemma2Config.tiny(
        vocab_size=vocab_size,
        num_layers=m.num_layers,
        d_model=m.d_model,
        num_heads=m.num_heads,
        num_kv_heads=m.num_kv_heads,
        head_dim=m.head_dim,
        ffn_dim=m.ffn_dim,
        sliding_window=m.sliding_window,
        attn_logit_softcapping=m.attn_logit_softcapping,
        query_pre_attn_scalar=float(m.head_dim),
        attention_impl=m.attention_impl,
    )


def sft_examples(config: RunConfig, tokenizer, problems) -> list[Example]:
    """Correct chains, journeys with a fixed mistake (a `journey_fraction` of them), and extra
    wrong chains trained on their ratings only (`flawed_fraction`), which teach the rating
    tokens, the search's value function, to reject a wrong path. With `data.sft_trees`, also
    the right paths of those OpenLongCoT trees (search trees fed back as SFT data)."""
    rng = np.random.default_rng([config.seed, STAGE_SFT])
    task = config.data.task
    out = []

    def add(question, thoughts, ratings, train_thoughts=True):
        ids, mask = encode_chain(tokenizer, question, thoughts, ratings, train_thoughts)
        if len(ids) <= config.sft.seq_len:
            out.append(Example(ids, mask))

    for p in problems:
        if not p.steps:
            continue
        if rng.random() < task.journey_fraction:
            nodes = tasks.journey_solution(p, rng)[1:]
            add(p.question, [n.text for n in nodes], [n.rating for n in nodes])
        else:
            add(p.question, list(p.steps), None)
        if rng.random() < task.flawed_fraction:
            flawed = tasks.flawed_chain(p, rng)
            if flawed is not None:
                add(p.question, *flawed, train_thoughts=False)
    if config.data.sft_trees:
        for nodes in tasks.load_trees(config.data.sft_trees):
            for path in longcot.right_paths(nodes):
                add(nodes[0].thought, [n.text for n in path[1:]], [n.rating for n in path[1:]])
    if not out:
        raise ConfigError("sft: no training example has a worked solution that fits sft.seq_len")
    return out


# ----------------------------------------------------------------------------- stages
def run_sft(ctx: RunContext, start_state=None, start_step: int = 0):
    config = ctx.config
    s = config.sft
    sft_config = SFTConfig(
        steps=s.steps,
        batch_size=s.batch_size,
        seq_len=s.seq_len,
        learning_rate=s.learning_rate,
        warmup_steps=s.warmup_steps,
        weight_decay=s.weight_decay,
        max_grad_norm=s.max_grad_norm,
    )
    adapter = None
    if not s.full_finetune:
        adapter = lora.init(ctx.cfg, jax.random.fold_in(ctx.key, STAGE_SFT), _lora_config(config))
    trainer = SFTTrainer(ctx.cfg, ctx.params, sft_config, ctx.mesh, lora=adapter)
    if start_state is not None:
        trainer.state = start_state
    packed = pack(
        sft_examples(config, ctx.tokenizer, ctx.train),
        s.seq_len,
        pad_id=ctx.tokenizer.pad_token_id or 0,
    )
    bar = tqdm(range(start_step, s.steps), desc="sft", initial=start_step, total=s.steps)
    t0, tokens_seen = time.perf_counter(), 0

    def settle(done: int, metrics: dict) -> None:
        """Host-side logs and checks of a finished step (the only place that waits for it)."""
        if done % 10 == 0 or done == s.steps:
            loss = float(metrics["loss"])
            rate = tokens_seen / (time.perf_counter() - t0)
            ctx.metrics.scalars(
                done,
                {
                    "sft/loss": loss,
                    "sft/tokens_per_s": rate,
                    "sft/grad_norm": float(metrics["grad_norm"]),
                },
            )
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}")
        if not bool(metrics["finite"]):
            bad = int(metrics["nonfinite_total"])
            tqdm.write(
                f"sft step {done}: non-finite loss, update skipped ({bad} so far)", file=sys.stderr
            )
            ctx.metrics.scalars(done, {"sft/nonfinite_total": bad})
            if bad >= config.max_nonfinite:
                raise NonFiniteLoss(
                    f"sft: {bad} non-finite losses (max_nonfinite="
                    f"{config.max_nonfinite}); stopped at step {done}"
                )

    # Step s is settled after step s + 1 was dispatched, so the host prepares the next batch
    # while the device computes; a checkpoint settles its own step first, so nothing logged
    # can be lost by a kill.
    pending = None
    for step in bar:
        batch = packed.batch(step, s.batch_size, config.seed)
        metrics = trainer.train_step(batch)
        tokens_seen += int((batch["segment_ids"] > 0).sum())
        done = step + 1
        if pending is not None:
            settle(*pending)
        pending = (done, metrics)
        if done % config.checkpoint.every == 0 or done == s.steps or ctx.preemption.requested:
            settle(*pending)
            pending = None
            ctx.checkpointer.save(done, {"sft": trainer.state}, {"stage": "sft", "step": done})
            if ctx.preemption.requested:
                raise Preempted(f"SIGTERM: saved SFT step {done}")
    bar.close()
    return trainer


def _lora_config(config: RunConfig) -> lora.LoRAConfig:
    return lora.LoRAConfig(
        rank=config.lora.rank, alpha=config.lora.alpha, targets=config.lora.targets
    )


def policy_params(ctx: RunContext, sft_state):
    """The SFT'd model as a plain params pytree (an SFT adapter is merged into the base)."""
    if ctx.config.sft.full_finetune:
        return sft_state.trainable
    return lora.merge(ctx.params, sft_state.trainable)


def _step_rater(ctx: RunContext, base_params):
    """None, or what writes the SFT'd model's verdicts into the PPRM's texts (`pprm.rated`)."""
    if not ctx.config.pprm.rates_steps:
        return None
    return functools.partial(
        thought_ratings, base_params, ctx.cfg, ctx.tokenizer, progress="pprm verdicts"
    )


def pprm_pairs(ctx: RunContext, base_params=None) -> tuple[Pairs, Pairs] | None:
    """(training, held-out) preference pairs of the PPRM stage: the `pprm.pairs_path` file split
    by question (`data.test_fraction`), or (correct, flawed) solutions of the train and the
    held-out problems. The held-out set is cut to `pprm.eval_pairs` pairs. None when the pairs
    need the SFT'd model `base_params` and it is not given: `pprm.source: policy`
    (`policy_pprm_pairs`), or task pairs with the model's verdicts (`pprm.rated`)."""
    config, p = ctx.config, ctx.config.pprm
    if p.pairs_path:
        triples = load_pairs(p.pairs_path)
        frac = config.data.test_fraction
        train = [t for t in triples if tasks.question_split(t[0], frac) == "train"]
        test = [t for t in triples if tasks.question_split(t[0], frac) == "test"]
        if not train or not test:
            raise ConfigError(
                f"pprm.pairs_path {p.pairs_path}: {len(train)} train / {len(test)} held-out "
                f"pairs after the split by question (data.test_fraction={frac}); both must "
                f"be non-empty"
            )
        return encode_pairs(ctx.tokenizer, train), encode_pairs(ctx.tokenizer, test[: p.eval_pairs])
    if p.source == "policy" or (p.rates_steps and base_params is None):
        return None  # made from the SFT'd policy in the PPRM stage
    rate = _step_rater(ctx, base_params)
    try:
        train = task_pairs(
            ctx.tokenizer, ctx.train, np.random.default_rng([config.seed, STAGE_PPRM, 0]), rate
        )
        test = task_pairs(
            ctx.tokenizer, ctx.test, np.random.default_rng([config.seed, STAGE_PPRM, 1]), rate
        )
    except ValueError as e:
        raise ConfigError(
            f"pprm: cannot make (correct, flawed) pairs from the problems ({e}); "
            f"give pprm.pairs_path"
        ) from None
    return train, test.head(p.eval_pairs)


def policy_pprm_pairs(ctx: RunContext, base_params) -> tuple[Pairs, Pairs]:
    """Pairs mined from the SFT'd policy's own solutions: right against wrong final answers
    among `pprm.samples` samples per train problem (and per held-out problem for the accuracy).
    Deterministic in the seed, so a resumed stage mines the same pairs."""
    config, p = ctx.config, ctx.config.pprm
    key = jax.random.fold_in(ctx.key, STAGE_PPRM)
    mine = lambda problems, part: pprm_mining.policy_triples(
        base_params,
        ctx.cfg,
        ctx.tokenizer,
        problems,
        key=jax.random.fold_in(key, part),
        samples=p.samples,
        max_new_tokens=config.eval.max_new_tokens,
        batch_size=_eval_batch(config, len(problems)) * p.samples,
        seed=(config.seed, STAGE_PPRM, part),
        progress=f"pprm pairs ({'train' if part == 0 else 'held-out'})",
        rate=_step_rater(ctx, base_params),
    )
    train = mine(ctx.train[: p.mine_problems], 0)
    test = mine(ctx.test[: config.eval.num_problems], 1)
    if not train or not test:
        raise ConfigError(
            f"pprm.source policy: the SFT'd policy's samples gave {len(train)} train / "
            f"{len(test)} held-out (right, wrong) pairs; both must be non-empty (more "
            f"pprm.samples or pprm.mine_problems, or pprm.source: task)"
        )
    return encode_pairs(ctx.tokenizer, train), encode_pairs(ctx.tokenizer, test).head(p.eval_pairs)


def _pprm_trainer(ctx: RunContext, base_params) -> PPRMTrainer:
    """The PPRM: the frozen SFT'd model with its own LoRA adapter (and its optimizer)."""
    config, p = ctx.config, ctx.config.pprm
    adapter = lora.init(ctx.cfg, jax.random.fold_in(ctx.key, STAGE_PPRM), _lora_config(config))
    pprm_config = PPRMConfig(
        learning_rate=p.learning_rate, max_grad_norm=p.max_grad_norm, weight_decay=p.weight_decay
    )
    return PPRMTrainer(ctx.cfg, base_params, adapter, pprm_config, ctx.mesh, ctx.tokenizer)


def run_pprm(
    ctx: RunContext,
    base_params,
    pairs: Pairs,
    held_out: Pairs,
    sft_state,
    results: dict,
    start_state=None,
    start_step: int = 0,
):
    """Trains the PPRM for `pprm.steps` steps, then measures its held-out pairwise accuracy.

    Returns (PPRM state, results + pprm_accuracy). Checkpoints every `checkpoint.every` steps;
    the stage's last checkpoint is written after the accuracy and holds it.
    """
    config, p = ctx.config, ctx.config.pprm
    s_steps, eval_step = config.sft.steps, config.sft.steps + 1
    trainer = _pprm_trainer(ctx, base_params)
    if start_state is not None:
        trainer.state = start_state
    bar = tqdm(range(start_step, p.steps), desc="pprm", initial=start_step, total=p.steps)
    for step in bar:
        metrics = trainer.train_step(pairs.batch(step, p.batch_size, (config.seed, STAGE_PPRM)))
        done = step + 1
        save = done < p.steps and (done % config.checkpoint.every == 0 or ctx.preemption.requested)
        if done % 10 == 0 or done == p.steps or save:
            loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
            if not (np.isfinite(loss) and np.isfinite(grad_norm)):
                # No update is skipped here: stop before a poisoned adapter is saved.
                raise NonFiniteLoss(f"pprm: non-finite loss or gradient at step {done}")
        if done % 10 == 0 or done == p.steps:
            accuracy = float(metrics["accuracy"])
            ctx.metrics.scalars(
                s_steps + done,
                {"pprm/loss": loss, "pprm/accuracy": accuracy, "pprm/grad_norm": grad_norm},
            )
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{accuracy:.2f}")
        if save:
            ctx.checkpointer.save(
                eval_step + done,
                {"sft": sft_state, "pprm": trainer.state},
                {"stage": "pprm", "step": done, "results": results},
            )
            if ctx.preemption.requested:
                raise Preempted(f"SIGTERM: saved PPRM step {done}")
    bar.close()
    accuracy = pairwise_accuracy(
        trainer.params, ctx.cfg, trainer.lora, held_out, trainer.answer_tokens
    )
    results = {**results, "pprm_accuracy": accuracy, "pprm_eval_pairs": held_out.num_pairs}
    ctx.metrics.scalars(s_steps + p.steps, {"eval/pprm_accuracy": accuracy})
    ctx.checkpointer.save(
        eval_step + p.steps,
        {"sft": sft_state, "pprm": trainer.state},
        {"stage": "pprm", "step": p.steps, "results": results},
    )
    if ctx.preemption.requested:
        raise Preempted(f"SIGTERM: saved the finished PPRM stage (step {p.steps})")
    return trainer.state, results


def search_config(config: RunConfig, simulations: int | None = None) -> mcts.MCTSConfig:
    s = config.search
    return mcts.MCTSConfig(
        num_simulations=simulations or s.num_simulations,
        num_children=s.num_children,
        max_depth=s.max_depth,
        thought_length=s.thought_length,
        selection=s.selection,
        c_puct=s.c_puct,
        discount=s.discount,
        backup=s.backup,
        patience=s.patience,
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p,
    )


def evaluate_policy(ctx: RunContext, params, adapter, tag: str, with_search: bool) -> dict:
    """Held-out greedy pass@1 (and search accuracy), with per-problem JSONL in the workdir."""
    config = ctx.config
    problems = ctx.test[: config.eval.num_problems]
    key = jax.random.fold_in(ctx.key, STAGE_EVAL)
    batch = _eval_batch(config, len(problems))
    greedy = ev.evaluate(
        params,
        ctx.cfg,
        ctx.tokenizer,
        problems,
        key=key,
        max_new_tokens=config.eval.max_new_tokens,
        batch_size=batch,
        lora=adapter,
        progress=f"eval {tag}",
    )
    ev.write_records(os.path.join(ctx.workdir, f"eval_{tag}.jsonl"), greedy.records)
    out = {"greedy_pass1": greedy.pass1}
    if with_search:
        found = ev.search_evaluate(
            params,
            ctx.cfg,
            ctx.tokenizer,
            problems,
            search_config(config, config.eval.search_simulations),
            key=key,
            batch_size=batch,
            lora=adapter,
            progress=f"search {tag}",
            tree_dir=os.path.join(ctx.workdir, f"trees_{tag}"),
            max_trees=8,
        )
        ev.write_records(os.path.join(ctx.workdir, f"search_{tag}.jsonl"), found.records)
        out["search_accuracy"] = found.pass1
    return out


def _eval_batch(config: RunConfig, n: int) -> int:
    shards = 1  # evaluation runs replicated; batch only bounds memory
    return max(shards, min(32, n))


def run_rl(
    ctx: RunContext,
    base_params,
    start_iteration: int,
    rl_state=None,
    per_state=None,
    on_iteration=None,
):
    config = ctx.config
    r = config.rl
    adapter = lora.init(ctx.cfg, jax.random.fold_in(ctx.key, STAGE_RL), _lora_config(config))
    setup = self_play_setup(ctx)
    ppo_config = PPOConfig(
        clip_eps=r.clip_eps,
        value_coef=r.value_coef,
        kl_coef=r.kl_coef,
        entropy_coef=r.entropy_coef,
        learning_rate=r.learning_rate,
        max_grad_norm=r.max_grad_norm,
        epochs=r.epochs,
    )
    trainer = PPOTrainer(
        ctx.cfg,
        base_params,
        adapter,
        ppo_config,
        ctx.mesh,
        rating_tokens=(setup.fmt.positive_rating, setup.fmt.negative_rating),
    )
    if rl_state is not None:
        trainer.state = rl_state
    if per_state is None:
        example = _experience_item(setup.width, setup.search.thought_length)
        per_state = per.init(r.buffer_capacity, example, alpha=r.alpha)
    bar = tqdm(
        range(start_iteration, r.iterations), desc="rl", initial=start_iteration, total=r.iterations
    )
    for it in bar:
        key = _rl_iteration_key(ctx, it)
        t0 = time.perf_counter()
        stats = mcts.SearchStats()
        problems, tree, exps = self_play(ctx, setup, trainer.params, trainer.lora, it, stats)
        valid = np.flatnonzero(np.asarray(exps.valid))
        items = {k: np.asarray(v)[valid] for k, v in _strip_valid(exps).items()}
        per_state = _add_to_buffer(per_state, items, np.abs(items["advantage"]) + 1e-6)
        selfplay_s = time.perf_counter() - t0

        ppo_metrics = []
        # Nothing to learn from until some search has reached an outcome.
        updates = r.updates_per_iteration if int(per_state.size) > 0 else 0
        for u in range(updates):
            step = it * r.updates_per_iteration + u
            beta = per.beta_schedule(step * r.batch_size, r.beta0, 1.0, r.beta_steps)
            sample, indices, weights = per.sample(
                per_state, jax.random.fold_in(key, 1 + u), r.batch_size, beta
            )
            metrics, priorities = trainer.update(_as_experience(sample), weights)
            # The buffer lives on one device; the batch's priorities come back from the mesh.
            per_state = per.update(per_state, indices, np.asarray(priorities))
            ppo_metrics.append(jax.tree.map(float, metrics))
        found = np.asarray(tree.is_answer & (tree.reward > 0.5)).any(axis=1).mean()
        answer_reward = np.asarray(tree.reward)[np.asarray(tree.is_answer)]
        scalars = {
            "rl/selfplay_success": float(found),
            "rl/answer_reward_mean": float(answer_reward.mean()) if answer_reward.size else 0.0,
            "rl/nodes_per_tree": float(np.asarray(tree.num_nodes).mean()),
            "rl/experiences": float(len(valid)),
            "rl/buffer_size": float(per_state.size),
            "rl/selfplay_seconds": selfplay_s,
            "rl/simulations_per_s": stats.simulations
            * len(problems)
            / max(stats.total_seconds, 1e-9),
        }
        for k in (
            "loss",
            "policy_loss",
            "value_loss",
            "kl",
            "entropy",
            "clip_fraction",
            "ratio_mean",
            "grad_norm",
        ):
            if ppo_metrics:
                scalars[f"ppo/{k}"] = float(np.mean([m[k] for m in ppo_metrics]))
        bad = nonfinite_count(trainer.state.opt_state)
        if not all(np.isfinite(m["loss"]) for m in ppo_metrics):
            tqdm.write(
                f"rl iteration {it + 1}: non-finite PPO loss, updates skipped ({bad} so far)",
                file=sys.stderr,
            )
            scalars["ppo/nonfinite_total"] = float(bad)
        if bad >= config.max_nonfinite:
            raise NonFiniteLoss(
                f"rl: {bad} non-finite PPO updates (max_nonfinite={config.max_nonfinite}); "
                f"stopped at iteration {it + 1}"
            )
        every = config.eval.every
        if every and (it + 1) % every == 0 and it + 1 < r.iterations:
            periodic = evaluate_policy(ctx, trainer.params, trainer.lora, f"rl{it + 1}", False)
            scalars["eval/rl_greedy_pass1"] = periodic["greedy_pass1"]
        ctx.metrics.scalars(config.sft.steps + config.pprm.steps + it + 1, scalars)
        bar.set_postfix(success=f"{found:.2f}", kl=f"{scalars.get('ppo/kl', 0.0):.4f}")
        if on_iteration is not None:
            on_iteration(it + 1, trainer, per_state)
        if ctx.preemption.requested:
            raise Preempted(f"SIGTERM: saved RL iteration {it + 1}")
    bar.close()
    return trainer, per_state


@dataclasses.dataclass(frozen=True)
class SelfPlaySetup:
    """What every RL iteration's self-play shares: the step format, the search settings, the
    prompt width and the experience width (tokens)."""

    fmt: mcts.StepFormat
    search: mcts.MCTSConfig
    prompt_width: int
    width: int


def self_play_setup(ctx: RunContext) -> SelfPlaySetup:
    fmt = make_step_format(ctx.tokenizer, ctx.config.search.max_depth)
    search = search_config(ctx.config)
    prompt_width = _prompt_width(ctx)
    return SelfPlaySetup(fmt, search, prompt_width, experience_width(fmt, prompt_width, search))


def _rl_iteration_key(ctx: RunContext, iteration: int) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(ctx.key, STAGE_RL), iteration)


def self_play(ctx: RunContext, setup: SelfPlaySetup, params, adapter, iteration: int, stats=None):
    """RL iteration `iteration`'s self-play: its training problems (drawn from the seed), their
    search trees (B = rl.problems_per_iteration) and the experiences built from them.

    Returns (problems, tree, experiences).
    """
    config, r = ctx.config, ctx.config.rl
    rng = np.random.default_rng([config.seed, STAGE_RL, iteration])
    picked = rng.choice(len(ctx.train), size=r.problems_per_iteration, replace=False)
    problems = [ctx.train[i] for i in picked]
    questions = [p.question for p in problems]
    prompts, plens = encode_prompts(ctx.tokenizer, questions, setup.prompt_width)
    expand = mcts.make_lm_expand_fn(
        params, ctx.cfg, prompts, plens, setup.fmt, setup.search, lora=adapter, stats=stats
    )
    tree = mcts.run(
        expand,
        len(problems),
        setup.search,
        jax.random.fold_in(_rl_iteration_key(ctx, iteration), 0),
        reward_fn=_reward_fn(ctx.tokenizer, problems),
        stats=stats,
    )
    exps = tree_to_experiences(
        tree,
        prompts,
        plens,
        setup.fmt,
        setup.search,
        r.gamma,
        r.lam,
        setup.width,
        r.terminal_paths_only,
        r.values,
    )
    return problems, tree, exps


def _prompt_width(ctx: RunContext) -> int:
    """Token width of the self-play prompts: the longest training question, rounded up to 8."""
    _, lengths = encode_prompts(ctx.tokenizer, [p.question for p in ctx.train])
    return -(-int(jnp.max(lengths)) // 8) * 8


def _experience_item(width: int, thought_length: int) -> dict:
    return {
        "tokens": np.zeros((width,), np.int32),
        "length": np.zeros((), np.int32),
        "action_start": np.zeros((), np.int32),
        "action_length": np.zeros((), np.int32),
        "behaviour_logprobs": np.zeros((thought_length,), np.float32),
        "advantage": np.zeros((), np.float32),
        "value_target": np.zeros((), np.float32),
        "reward": np.zeros((), np.float32),
    }


def _strip_valid(exps: Experience) -> dict:
    return {f.name: getattr(exps, f.name) for f in dataclasses.fields(exps) if f.name != "valid"}


def _as_experience(items: dict) -> Experience:
    return Experience(valid=jnp.ones(items["length"].shape, bool), **items)


def _add_to_buffer(state, items: dict, priorities: np.ndarray, chunk: int = 256):
    """Adds a variable number of items in fixed-size chunks (one compiled `add`). The last chunk
    is padded with copies that take no slot (`per.add`'s `count`)."""
    n = len(priorities)
    chunk = min(chunk, state.capacity)
    pad = (-n) % chunk
    idx = np.concatenate([np.arange(n), np.zeros(pad, np.int64)])
    prio = np.concatenate([priorities, np.zeros(pad, priorities.dtype)]).astype(np.float32)
    for start in range(0, n + pad, chunk):
        sel = idx[start : start + chunk]
        batch = jax.tree.map(lambda x, sel=sel: x[sel], items)
        count = np.int32(min(chunk, n - start))
        state = per.add(state, batch, prio[start : start + chunk], count)
    return state


def _reward_fn(tokenizer, problems):
    from o1jax.search.export import thought_text

    def reward(tree_index, tokens, lengths):
        out = np.zeros(len(tree_index), np.float32)
        for i, (b, tok, n) in enumerate(zip(tree_index, tokens, lengths, strict=True)):
            text = thought_text(tokenizer, tok, int(n))
            answer = answers.extract_answer(text)
            out[i] = float(answer is not None and answers.is_equivalent(answer, problems[b].answer))
        return out

    return reward


# ----------------------------------------------------------------------------- the run
def run(config: RunConfig, workdir: str) -> dict:
    """Runs (or resumes) the whole job in `workdir`; returns the report."""
    started = time.perf_counter()
    maybe_initialize_distributed()
    check_workdir(config, workdir)
    os.makedirs(workdir, exist_ok=True)
    with PreemptionFlag() as flag:
        ctx = build_context(config, workdir, MetricsWriter(workdir), flag)
        # Every stage's batch is split over the mesh: refuse one that does not fit now, not
        # after minutes of SFT.
        for key, size, used in (
            ("sft.batch_size", config.sft.batch_size, config.sft.steps > 0),
            ("pprm.batch_size", config.pprm.batch_size, config.pprm.steps > 0),
            ("rl.batch_size", config.rl.batch_size, config.rl.iterations > 0),
        ):
            if used:
                require_batch_fits_mesh(key, size, ctx.mesh)
        # Only a run that could start claims the workdir: a start that failed on its data or
        # model leaves it free for the corrected command.
        if not os.path.exists(os.path.join(workdir, "config.yaml")):
            dump_config(config, os.path.join(workdir, "config.yaml"))
        try:
            report = _run_stages(ctx)
        finally:
            ctx.metrics.close()
            ctx.checkpointer.close()
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    ctx.metrics.plot()
    return report


def _run_stages(ctx: RunContext) -> dict:
    config = ctx.config
    s_steps, p_steps, iters = config.sft.steps, config.pprm.steps, config.rl.iterations
    # Global checkpoint steps (the module docstring): SFT 1..S, post-SFT evaluation S + 1, PPRM
    # step p at S + 1 + p, RL iteration i at S + 1 + P + i, the final record at S + P + I + 2.
    eval_step = s_steps + 1
    rl_step = eval_step + p_steps
    latest = ctx.checkpointer.latest_step()
    meta = ctx.checkpointer.read_meta(latest) if latest is not None else {"stage": "new"}
    ctx.metrics.truncate_after(_logged_step(meta, s_steps, p_steps))
    pprm_pending = p_steps > 0 and (
        meta["stage"] in ("new", "sft", "eval")
        or (meta["stage"] == "pprm" and meta["step"] < p_steps)
    )
    # Before SFT, so that a broken pairs file stops the run at once.
    pairs = pprm_pairs(ctx) if pprm_pending else None

    # SFT, resumed from its own checkpoint when there is one.
    if meta["stage"] == "new":
        sft_state = run_sft(ctx).state
    elif meta["stage"] == "sft":
        state, _ = ctx.checkpointer.restore(latest, _checkpoint_like(ctx, "sft"))
        sft_state = run_sft(ctx, state["sft"], meta["step"]).state
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
        ctx.checkpointer.save(eval_step, {"sft": sft_state}, {"stage": "eval", "results": results})
        meta = {"stage": "eval", "results": results}
        latest = eval_step

    if meta["stage"] == "done":
        return dict(meta["report"])

    # Everything the latest checkpoint holds (the SFT state is still in memory if SFT just ran).
    pprm_state = rl_state = per_state = None
    if sft_state is None:
        state, _ = ctx.checkpointer.restore(latest, _checkpoint_like(ctx, meta["stage"]))
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
        ctx.checkpointer.save(
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
    ctx.checkpointer.save(
        rl_step + iters + 1,
        {"sft": sft_state, **kept, "rl": trainer.state},
        {"stage": "done", "report": report},
    )
    return report


def _logged_step(meta: dict, sft_steps: int, pprm_steps: int = 0) -> int:
    """The last metrics step a checkpoint covers (rows after it are logged again on resume)."""
    stage = meta["stage"]
    if stage == "new":
        return 0
    if stage == "sft":
        return meta["step"]
    if stage == "pprm":
        return sft_steps + meta["step"]
    if stage == "rl":
        return sft_steps + pprm_steps + meta["iteration"]
    return sft_steps if stage == "eval" else 1 << 62


def _checkpoint_like(ctx: RunContext, stage: str) -> dict:
    """Trainer states and buffer with the structure a checkpoint of `stage` of this run holds."""
    config = ctx.config
    adapter = (
        None
        if config.sft.full_finetune
        else lora.init(ctx.cfg, jax.random.fold_in(ctx.key, STAGE_SFT), _lora_config(config))
    )
    like = {
        "sft": SFTTrainer(
            ctx.cfg, ctx.params, SFTConfig(batch_size=config.sft.batch_size), ctx.mesh, lora=adapter
        ).state
    }
    if stage == "pprm" or (stage in ("rl", "done") and config.pprm.steps > 0):
        like["pprm"] = _pprm_trainer(ctx, ctx.params).state
    if stage in ("rl", "done"):
        trainer, per_like = _rl_structures(ctx, ctx.params)
        like["rl"] = trainer.state
        if stage == "rl":
            like["per"] = per_like
    return like


def _rl_structures(ctx: RunContext, base):
    """An RL trainer and an empty buffer with the shapes a checkpoint of this run holds."""
    config, r = ctx.config, ctx.config.rl
    fmt = make_step_format(ctx.tokenizer, config.search.max_depth)
    adapter = lora.init(ctx.cfg, jax.random.fold_in(ctx.key, STAGE_RL), _lora_config(config))
    trainer = PPOTrainer(
        ctx.cfg,
        base,
        adapter,
        PPOConfig(epochs=r.epochs),
        ctx.mesh,
        rating_tokens=(fmt.positive_rating, fmt.negative_rating),
    )
    search = search_config(config)
    width = experience_width(fmt, _prompt_width(ctx), search)
    return trainer, per.init(
        r.buffer_capacity, _experience_item(width, search.thought_length), alpha=r.alpha
    )


def open_run(workdir: str):
    """A RunContext for an existing workdir (its saved config), for evaluation and export."""
    config = load_config(os.path.join(workdir, "config.yaml"))
    return build_context(config, workdir, MetricsWriter(workdir, enabled=False), PreemptionFlag())


def build_context(config: RunConfig, workdir: str, metrics: MetricsWriter, preemption):
    """Mesh, tokenizer, problems, model and checkpointer of a run (nothing is trained here)."""
    m = config.mesh
    try:
        mesh = make_mesh({"data": m.data, "fsdp": m.fsdp, "tensor": m.tensor})
    except ValueError as e:  # a shape that does not fit this host's devices
        raise ConfigError(str(e)) from None
    key = jax.random.key(config.seed)
    tokenizer = build_tokenizer(config, workdir)
    train, test = load_problems(config)
    cfg, params = build_model(config, tokenizer, mesh, jax.random.fold_in(key, 0))
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep)
    return RunContext(
        config,
        workdir,
        mesh,
        tokenizer,
        cfg,
        params,
        train,
        test,
        metrics,
        checkpointer,
        preemption,
        key,
    )


def _latest(ctx: RunContext) -> tuple[int | None, dict]:
    latest = ctx.checkpointer.latest_step()
    return latest, ctx.checkpointer.read_meta(latest) if latest is not None else {"stage": "new"}


def restore_policy(ctx: RunContext):
    """(params, lora) of the latest checkpoint: the SFT'd model and, after RL, its adapter."""
    latest, meta = _latest(ctx)
    if latest is None:
        raise ConfigError(f"{ctx.workdir}: no checkpoint to evaluate")
    state, _ = ctx.checkpointer.restore(latest, _checkpoint_like(ctx, meta["stage"]))
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
    state, _ = ctx.checkpointer.restore(latest, _checkpoint_like(ctx, stage))
    return policy_params(ctx, state["sft"]), state["pprm"].lora
