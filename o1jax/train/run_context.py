"""What every stage of a run reads: the workdir check, tokenizer, problems, model, mesh and
checkpointer, gathered in a `RunContext` (nothing is trained here).

    ctx = build_context(load_config("configs/tiny.yaml"), "runs/tiny", MetricsWriter(...), flag)
    ctx = open_run("runs/tiny")    # an existing workdir, with its saved config
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from o1jax.data import tasks
from o1jax.data.tokenizer import (
    add_longcot_tokens,
    build_tiny_tokenizer,
    fit_embeddings,
    load_tokenizer,
)
from o1jax.model import Gemma2Config, init_params, load_hf, lora
from o1jax.parallel.mesh import make_mesh
from o1jax.search import mcts
from o1jax.train import metrics as run_metrics
from o1jax.train.checkpoint import (
    Checkpointer,
    PreemptionFlag,
    config_fingerprint,
    numbers_config,
)
from o1jax.train.config import (
    ConfigError,
    RunConfig,
    from_dict,
    load_config,
    to_dict,
)
from o1jax.train.metrics import MetricsWriter

STAGE_SFT, STAGE_RL, STAGE_EVAL, STAGE_PPRM = 1, 2, 3, 4


class Preempted(Exception):
    """SIGTERM arrived; the last checkpoint is complete and the run can be resumed."""


class NonFiniteLoss(RuntimeError):
    """Too many non-finite losses; the run stopped (the last good checkpoint is intact)."""


@dataclasses.dataclass
class RunContext:
    """Everything a stage reads: the validated config, the mesh, the tokenizer, the model
    (`cfg` and the frozen base `params`), the train and held-out problems, the metrics writer,
    the checkpointer, the SIGTERM flag and the run's root key (`seed`)."""

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
    # Wall time: when this process started the run (time.perf_counter()), and the seconds its
    # earlier segments had taken when the checkpoint it resumed from was written.
    started: float = dataclasses.field(default_factory=time.perf_counter)
    elapsed_before: float = 0.0

    def elapsed(self) -> float:
        """Seconds the run has taken: every earlier segment up to its last checkpoint (work
        redone after a kill counts once), plus this one so far."""
        return self.elapsed_before + time.perf_counter() - self.started


def save_checkpoint(ctx: RunContext, step: int, state, meta: dict) -> None:
    """Saves `state` at checkpoint `step` with `meta`, the number of metrics rows logged so far,
    which a resume keeps (later rows are logged again by the resumed stage), the run's config,
    which a resume must match (`require_same_config`), and the run's seconds so far."""
    meta = {**meta, "metrics_rows": ctx.metrics.num_rows(), "config": to_dict(ctx.config)}
    meta["elapsed_seconds"] = round(ctx.elapsed(), 1)
    ctx.checkpointer.save(step, state, meta)


def check_finite(ctx: RunContext, stage: str, done: int, metrics: dict, log_step: int) -> None:
    """After a train step whose `metrics` say its loss was not finite (the update was skipped):
    one line on stderr, the `{stage}/nonfinite_total` scalar at `log_step`, and `NonFiniteLoss`
    once the run's count reaches `max_nonfinite`. done: the stage's steps finished so far."""
    if bool(metrics["finite"]):
        return
    bad, limit = int(metrics["nonfinite_total"]), ctx.config.max_nonfinite
    line = f"{stage} step {done}: non-finite loss, update skipped ({bad} so far)"
    tqdm.write(line, file=sys.stderr)
    ctx.metrics.scalars(log_step, {f"{stage}/nonfinite_total": bad})
    if bad >= limit:
        raise NonFiniteLoss(
            f"{stage}: {bad} non-finite losses (max_nonfinite={limit}); stopped at step {done}"
        )


def require_same_config(saved: dict, config: RunConfig, what: str) -> None:
    """Raises ConfigError when `config` differs from `saved` (the config a workdir's run was
    started with, as a dict) in anything but the keys that change no number (a run restarted
    on another number of devices may change its mesh or micro-batches;
    `checkpoint.LAYOUT_KEYS`); `what` names the run's record. Keys added since `saved` was
    written take their defaults."""
    try:
        saved = to_dict(from_dict(saved))
    except ConfigError:
        pass
    if config_fingerprint(saved) != config_fingerprint(to_dict(config)):
        diff = _first_difference(numbers_config(saved), numbers_config(to_dict(config)))
        raise ConfigError(f"{what} of a different config ({diff}); use another --workdir")


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
        require_same_config(saved, config, f"{workdir}: holds a run")


def _first_difference(a, b, prefix="") -> str:
    """The first key (dotted) whose value differs between two config dicts, as a message."""
    for k in sorted(set(a) | set(b)):
        key = f"{prefix}{k}"
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            d = _first_difference(va, vb, key + ".")
            if d:
                return d
        elif va != vb:
            return f"{key}: {va!r} in the workdir, {vb!r} now"
    return ""


def build_tokenizer(config: RunConfig, workdir: str, save: bool = True):
    """(tokenizer, first added id): the tokenizer of `tokenizer_dir` or `model_dir` with the
    long-CoT tokens added from that id on, or the built-in tiny one (saved under
    `workdir/tokenizer` by process 0 when `save`; nothing added: len(tokenizer))."""
    source = config.tokenizer_dir or config.model_dir
    if source:
        key = "tokenizer_dir" if config.tokenizer_dir else "model_dir"
        if not os.path.isdir(source):
            raise ConfigError(f"{key} {source}: no such directory")
        try:
            tokenizer = load_tokenizer(source)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{key} {source}: {e}") from None
        first_added = len(tokenizer)
        add_longcot_tokens(tokenizer)
        return tokenizer, first_added
    saved = os.path.join(workdir, "tokenizer") if save and run_metrics.is_primary() else None
    tokenizer = build_tiny_tokenizer(saved)
    return tokenizer, len(tokenizer)


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
            test_fraction=data.test_fraction,
        )
        split = {}
        for name, count in (("train", t.num_train), ("test", t.num_test)):
            try:
                split[name] = tasks.generate_problems(task, count, config.seed, name)
            except ValueError as e:  # the task has fewer distinct problems than asked for
                raise ConfigError(
                    f"data.task.num_{name}: {e}; ask for fewer problems, or widen the task "
                    "(data.task.max_operand, max_value, max_ops)"
                ) from None
        return split["train"], split["test"]
    problems = tasks.load_jsonl(data.path)
    if data.test_path:  # a question of the held-out file never trains
        test = tasks.load_jsonl(data.test_path)
        held_out = {tasks.question_key(p.question) for p in test}
        train = [p for p in problems if tasks.question_key(p.question) not in held_out]
        if not train:
            raise ConfigError(
                f"data.path {data.path}: every one of its {len(problems)} questions is also in "
                f"data.test_path {data.test_path}: nothing left to train on"
            )
        return train, test
    train = [p for p in problems if tasks.question_split(p.question, data.test_fraction) == "train"]
    test = [p for p in problems if tasks.question_split(p.question, data.test_fraction) == "test"]
    if not train or not test:
        raise ConfigError(
            f"data.path {data.path}: {len(train)} train / {len(test)} held-out problems after "
            f"the split (test_fraction={data.test_fraction}); give data.test_path"
        )
    return train, test


def build_model(config: RunConfig, tokenizer, mesh, key, first_added: int | None = None):
    """(cfg, params): an HF checkpoint, its embedding fitted to the tokenizer whose ids from
    `first_added` on are new (`fit_embeddings`; None: those past the table), or the tiny model."""
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(config.model.dtype)
    if dtype is None:
        raise ConfigError(f"model.dtype: 'float32' or 'bfloat16', not {config.model.dtype!r}")
    vocab = len(tokenizer)
    if config.model_dir:
        cfg, params = load_hf(config.model_dir, dtype=dtype, mesh=mesh)
        # Each new token starts at the mean of its name's pieces, past the table's end or over
        # the untrained rows of a table padded past its tokenizer.
        first = cfg.vocab_size if first_added is None else first_added
        params = fit_embeddings(params, tokenizer, first)
        cfg = cfg.replace(vocab_size=max(vocab, cfg.vocab_size))
        cfg = cfg.replace(attention_impl=config.model.attention_impl, remat=config.model.remat)
        return cfg, params
    require_weights(config)
    cfg = tiny_model_config(config, vocab)
    return cfg, init_params(cfg, key, dtype)


def require_weights(config: RunConfig) -> None:
    """A full-size preset trains only from its weights: raises ConfigError without `model_dir`.

    (Training a random 2B-27B model on the built-in task is never what was meant; `o1jax.plan`
    sizes a preset without weights.)
    """
    if not config.model_dir and config.model.preset != "tiny":
        raise ConfigError(
            f"model_dir: model.preset {config.model.preset} needs its weights; give "
            "model_dir=DIR, an HF Gemma2 directory"
        )


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
        remat=m.remat,
    )


def lora_config(config: RunConfig) -> lora.LoRAConfig:
    """The adapters' shape (`lora` section), shared by the SFT, PPRM and RL adapters."""
    return lora.LoRAConfig(
        rank=config.lora.rank, alpha=config.lora.alpha, targets=config.lora.targets
    )


def ppo_config(config: RunConfig):
    """The `rl` section's PPO settings as a PPOConfig."""
    from o1jax.rl.ppo import PPOConfig

    r = config.rl
    return PPOConfig(
        clip_eps=r.clip_eps,
        value_coef=r.value_coef,
        kl_coef=r.kl_coef,
        entropy_coef=r.entropy_coef,
        learning_rate=r.learning_rate,
        max_grad_norm=r.max_grad_norm,
        epochs=r.epochs,
        loss_chunk=r.loss_chunk,
        micro_batch_size=r.micro_batch_size,
    )


def search_config(config: RunConfig, simulations: int | None = None) -> mcts.MCTSConfig:
    """The `search` section as an MCTSConfig; `simulations` overrides its simulation count."""
    s = config.search
    return mcts.MCTSConfig(
        num_simulations=simulations or s.num_simulations,
        num_children=s.num_children,
        max_children=s.max_children,
        leaves_per_tree=s.leaves_per_tree,
        meta_action_prob=s.meta_action_prob,
        meta_action_weights=s.meta_action_weights,
        max_depth=s.max_depth,
        thought_length=s.thought_length,
        selection=s.selection,
        c_puct=s.c_puct,
        entropy_prior=s.entropy_prior,
        varentropy_bonus=s.varentropy_bonus,
        discount=s.discount,
        backup=s.backup,
        patience=s.patience,
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p,
    )


def run_mesh(config: RunConfig):
    """The run's `jax.sharding.Mesh` from its `mesh` section (a ConfigError if it does not fit
    this host's devices)."""
    m = config.mesh
    try:
        return make_mesh({"data": m.data, "fsdp": m.fsdp, "tensor": m.tensor})
    except ValueError as e:
        raise ConfigError(str(e)) from None


def build_context(
    config: RunConfig, workdir: str, metrics: MetricsWriter, preemption, read_only: bool = False
):
    """Mesh, tokenizer, problems, model and checkpointer of a run (nothing is trained here).
    read_only: a reader of the workdir (it writes nothing there, and leaves a save in flight
    alone)."""
    mesh = run_mesh(config)
    key = jax.random.key(config.seed)
    tokenizer, first_added = build_tokenizer(config, workdir, save=not read_only)
    train, test = load_problems(config)
    cfg, params = build_model(config, tokenizer, mesh, jax.random.fold_in(key, 0), first_added)
    checkpointer = Checkpointer(
        os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep, read_only=read_only
    )
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


def open_run(workdir: str):
    """A RunContext for an existing workdir (its saved config), for evaluation and export: it
    only reads the workdir, which a training run may be writing at the same time."""
    config = load_config(os.path.join(workdir, "config.yaml"))
    return build_context(
        config, workdir, MetricsWriter(workdir, enabled=False), PreemptionFlag(), read_only=True
    )
