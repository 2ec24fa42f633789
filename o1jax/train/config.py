"""The run configuration: YAML -> nested frozen dataclasses, strictly validated.

    config = load_config("configs/tiny.yaml", overrides=["sft.steps=10", "seed=3"])

Unknown keys and values of the wrong type are errors that name the key (`ConfigError`). The
resolved config is saved as `workdir/config.yaml`; a resumed run must match it.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

import yaml

from o1jax.model.lora import ALL_TARGETS
from o1jax.rl.experience import VALUE_SOURCES
from o1jax.train.files import write_atomically


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and key at fault."""


PRESETS = ("tiny", "gemma2_2b", "gemma2_9b", "gemma2_27b")  # Gemma2Config.preset's names


def _require(ok: bool, key: str, value, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {rule}, got {value!r}")


def _require_number(key: str, value: float, low: float, *, above: bool = False) -> None:
    """A finite number >= `low` (> `low` with `above`): NaN and infinities fail too."""
    ok = math.isfinite(value) and (value > low if above else value >= low)
    _require(ok, key, value, f"must be {'>' if above else '>='} {low:g} and finite")


def require_batch_fits_mesh(key: str, batch_size: int, mesh) -> None:
    """A batch is split over the mesh's data x fsdp devices: its size must divide evenly."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    _require(batch_size % shards == 0, key, batch_size,
             f"must be a multiple of the mesh's data x fsdp size {shards}")  # fmt: skip


def require_problems_per_iteration(config: RunConfig, num_train: int) -> None:
    """Self-play draws `rl.problems_per_iteration` distinct training problems an iteration."""
    r = config.rl
    _require(r.iterations == 0 or r.problems_per_iteration <= num_train,
             "rl.problems_per_iteration", r.problems_per_iteration,
             f"must be <= the number of training problems ({num_train})")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    preset: str = "tiny"  # no model_dir: "tiny" trains the built-in model; others only plan
    dtype: str = "float32"  # params dtype of the (frozen) base: float32 or bfloat16
    attention_impl: str = "xla"  # "xla" or "pallas" (kernels/)
    num_layers: int = 4
    d_model: int = 128
    num_heads: int = 4
    num_kv_heads: int = 1
    head_dim: int = 32
    ffn_dim: int = 512
    sliding_window: int = 128
    # Gemma2 caps attention logits at 50; null turns the cap off (the tiny default does: on a
    # CPU the tanh over [B, H, T, T] scores costs 4-13% of an SFT step, bench/RESULTS.md). HF
    # models keep theirs.
    attn_logit_softcapping: float | None = 50.0
    # Recompute each decoder layer's activations in the backward pass (Gemma2Config.remat): a
    # training step then keeps one layer's activations instead of every layer's.
    remat: bool = False

    def __post_init__(self):
        _require(self.preset in PRESETS, "model.preset", self.preset, f"must be one of {PRESETS}")
        _require(self.dtype in ("float32", "bfloat16"), "model.dtype", self.dtype,
                 "must be 'float32' or 'bfloat16'")  # fmt: skip
        _require(self.attention_impl in ("xla", "pallas"), "model.attention_impl",
                 self.attention_impl, "must be 'xla' or 'pallas'")  # fmt: skip
        for name in ("num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim", "ffn_dim",
                     "sliding_window"):  # fmt: skip
            _require(getattr(self, name) >= 1, f"model.{name}", getattr(self, name), "must be >= 1")
        _require(self.num_heads % self.num_kv_heads == 0, "model.num_heads", self.num_heads,
                 f"must be a multiple of model.num_kv_heads ({self.num_kv_heads})")  # fmt: skip
        _require(self.head_dim % 2 == 0, "model.head_dim", self.head_dim,
                 "must be even (RoPE rotates pairs of dimensions)")  # fmt: skip
        cap = self.attn_logit_softcapping
        _require(cap is None or (math.isfinite(cap) and cap > 0), "model.attn_logit_softcapping",
                 cap, "must be > 0 and finite, or null")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """The built-in arithmetic-chain task (see o1jax.data.tasks)."""

    min_ops: int = 2
    max_ops: int = 3
    max_operand: int = 9
    max_multiplier: int = 3
    max_value: int = 30
    num_train: int = 4000
    num_test: int = 200
    journey_fraction: float = 0.3  # share of SFT examples written as journeys (errors + fixes)
    flawed_fraction: float = 0.3  # extra wrong chains per problem, trained on ratings only

    def __post_init__(self):
        _require(1 <= self.min_ops <= self.max_ops, "data.task.min_ops", self.min_ops,
                 f"must be >= 1 and <= data.task.max_ops ({self.max_ops})")  # fmt: skip
        top = f"must be >= 1 and <= data.task.max_value ({self.max_value})"
        _require(1 <= self.max_operand <= self.max_value, "data.task.max_operand",
                 self.max_operand, top)  # fmt: skip
        _require(self.max_multiplier >= 2, "data.task.max_multiplier", self.max_multiplier,
                 "must be >= 2")  # fmt: skip
        _require(self.num_train >= 1, "data.task.num_train", self.num_train, "must be >= 1")
        _require(self.num_test >= 1, "data.task.num_test", self.num_test, "must be >= 1")
        for name in ("journey_fraction", "flawed_fraction"):
            value = getattr(self, name)
            _require(0.0 <= value <= 1.0, f"data.task.{name}", value, "must be in [0, 1]")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    path: str = ""  # JSONL problem file; empty: the built-in task
    test_path: str = ""  # held-out JSONL; empty: a held-out split of `path` or of the task
    test_fraction: float = 0.1  # the share of questions (by a hash of the text) held out
    # OpenLongCoT trees (a .txt file, or a directory of them and of subdirectories of them, as
    # `evaluate --trees` writes) whose right paths (ending in a positive <conclusion>) are added
    # to the SFT data.
    sft_trees: str = ""
    task: TaskConfig = TaskConfig()

    def __post_init__(self):
        _require(0.0 < self.test_fraction < 1.0, "data.test_fraction", self.test_fraction,
                 "must be in (0, 1)")  # fmt: skip
        _require(not self.test_path or self.path, "data.test_path", self.test_path,
                 "needs data.path (the built-in task makes its own held-out problems)")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        for axis, size in sizes.items():
            _require(
                size == -1 or size >= 1, f"mesh.{axis}", size, "must be >= 1, or -1 (the rest)"
            )
        free = [axis for axis, size in sizes.items() if size == -1]
        _require(len(free) <= 1, "mesh", sizes, "may have at most one axis of -1")


@dataclasses.dataclass(frozen=True)
class LoRASection:
    rank: int = 32
    alpha: float = 16.0
    targets: tuple[str, ...] = ALL_TARGETS  # every projection of every layer

    def __post_init__(self):
        _require(self.rank >= 1, "lora.rank", self.rank, "must be >= 1")
        _require_number("lora.alpha", self.alpha, 0, above=True)
        unknown = [t for t in self.targets if t not in ALL_TARGETS]
        _require(bool(self.targets) and not unknown, "lora.targets", list(self.targets),
                 f"must be a non-empty subset of {list(ALL_TARGETS)}")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class SFTSection:
    steps: int = 650
    batch_size: int = 16
    seq_len: int = 256
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    full_finetune: bool = True  # False: train a LoRA adapter on the frozen base
    # Memory, not numbers (the same loss and gradient up to float rounding; o1jax.train.sft):
    # positions whose logits the loss computes at a time (0: all T), and rows per micro-batch
    # of gradient accumulation (0: the whole batch in one pass; a multiple of the mesh's
    # data x fsdp size that divides batch_size). `python bench/memory.py` sizes them.
    loss_chunk: int = 0
    micro_batch_size: int = 0

    def __post_init__(self):
        _require(self.steps >= 0, "sft.steps", self.steps, "must be >= 0")
        _require(self.batch_size >= 1, "sft.batch_size", self.batch_size, "must be >= 1")
        _require(self.loss_chunk >= 0, "sft.loss_chunk", self.loss_chunk,
                 "must be >= 0 (0: all positions at once)")  # fmt: skip
        _require(self.micro_batch_size >= 0, "sft.micro_batch_size", self.micro_batch_size,
                 "must be >= 0 (0: the whole batch at once)")  # fmt: skip
        _require(self.micro_batch_size == 0 or self.batch_size % self.micro_batch_size == 0,
                 "sft.micro_batch_size", self.micro_batch_size,
                 f"must divide sft.batch_size ({self.batch_size})")  # fmt: skip
        _require(self.seq_len >= 2, "sft.seq_len", self.seq_len, "must be >= 2")
        _require_number("sft.learning_rate", self.learning_rate, 0, above=True)
        _require(self.warmup_steps >= 0, "sft.warmup_steps", self.warmup_steps, "must be >= 0")
        _require_number("sft.weight_decay", self.weight_decay, 0)
        # <= 0 scales every update by a negative or zero factor: gradient ascent, or no step at
        # all (inf: no clipping).
        _require(self.max_grad_norm > 0, "sft.max_grad_norm", self.max_grad_norm, "must be > 0")


@dataclasses.dataclass(frozen=True)
class SearchSection:
    num_simulations: int = 16
    num_children: int = 2
    # A node is expanded again, K more children, while it has fewer than this many and its best
    # child passes up less than its own value (LLaMA-O1: 5). 0: every node is expanded once.
    max_children: int = 0
    # Nodes selected per tree and simulation (virtual loss between them), all expanded in one
    # sampler call: more rows per call when there are few problems (an accelerator's case).
    leaves_per_tree: int = 1
    # LLaMA-O1's meta-actions: the chance that an expansion's thoughts start with tags the
    # search draws by these weights over (<expansion>, <critic>, <refine>, <conclusion>)
    # (LLaMA-O1: 0.5); 0: the policy writes every tag.
    meta_action_prob: float = 0.0
    meta_action_weights: tuple[float, ...] = (0.2, 0.4, 0.4, 0.3)
    max_depth: int = 6
    thought_length: int = 24
    selection: str = "puct"  # "puct" (priors from length-normalised log-probs) or "uct"
    c_puct: float = 1.4
    # LLaMA-O1's PUCT extras (it had both on: true, 0.1): the prior times the softmax of the
    # siblings' mean next-token entropies, and this weight times the softmax of their
    # varentropies added to the score.
    entropy_prior: bool = False
    varentropy_bonus: float = 0.0
    discount: float = 0.9  # a value k levels below a node reaches it as discount**k of it
    backup: str = "max"  # a leaf's value from its new children: "max" or "mean"
    patience: int = 0  # self-play: stop a tree after this many right answers (0: never)
    # The thoughts' sampling, in self-play and in the held-out search evaluation alike
    # (LLaMA-O1: 1.5 and 64-token thoughts, as configs/gemma2-*.yaml set; these defaults are
    # the small model's).
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        for name in (
            "num_simulations", "num_children", "leaves_per_tree", "max_depth", "thought_length"
        ):  # fmt: skip
            value = getattr(self, name)
            _require(value >= 1, f"search.{name}", value, "must be >= 1")
        least = f"must be 0 or >= search.num_children ({self.num_children})"
        _require(self.max_children == 0 or self.max_children >= self.num_children,
                 "search.max_children", self.max_children, least)  # fmt: skip
        _require(self.selection in ("puct", "uct"), "search.selection", self.selection,
                 "must be 'puct' or 'uct'")  # fmt: skip
        _require_number("search.varentropy_bonus", self.varentropy_bonus, 0)
        _require_number("search.c_puct", self.c_puct, 0)
        _require(0 < self.discount <= 1, "search.discount", self.discount, "must be in (0, 1]")
        _require(self.patience >= 0, "search.patience", self.patience,
                 "must be >= 0 (0: never stop a tree early)")  # fmt: skip
        _require(self.selection == "puct" or not (self.entropy_prior or self.varentropy_bonus),
                 "search.selection", self.selection,
                 "must be 'puct' with search.entropy_prior or search.varentropy_bonus")  # fmt: skip
        _require(self.backup in ("max", "mean"), "search.backup", self.backup,
                 "must be 'max' or 'mean'")  # fmt: skip
        _require_number("search.temperature", self.temperature, 0)
        _require(0 < self.top_p <= 1, "search.top_p", self.top_p, "must be in (0, 1]")
        _require(0 <= self.meta_action_prob <= 1, "search.meta_action_prob",
                 self.meta_action_prob, "must be in [0, 1]")  # fmt: skip
        weights = self.meta_action_weights
        _require(len(weights) == 4 and min(weights) >= 0 and sum(weights) > 0
                 and all(map(math.isfinite, weights)), "search.meta_action_weights", list(weights),
                 "must be 4 weights >= 0 and finite with a positive sum")  # fmt: skip
        _require(self.top_k >= 0, "search.top_k", self.top_k, "must be >= 0")


@dataclasses.dataclass(frozen=True)
class RLSection:
    iterations: int = 8
    problems_per_iteration: int = 32
    buffer_capacity: int = 16384  # LLaMA-O1: 100 000 (configs/gemma2-*.yaml)
    alpha: float = 0.6
    beta0: float = 0.4
    beta_steps: int = 100_000  # samples drawn over which beta anneals to 1 (0: 1 throughout)
    batch_size: int = 32  # experiences per PPO update
    updates_per_iteration: int = 4
    epochs: int = 2
    gamma: float = 0.99
    lam: float = 0.95
    # Advantages from paths that end in an outcome only (see o1jax.rl.experience).
    terminal_paths_only: bool = True
    # What GAE uses as values: "rating" (the model's ratings) or "outcome" (the mean answer
    # reward of the terminal leaves below each node, measured by the search; see
    # o1jax.rl.experience). With lam = 0 and gamma = 1, "outcome" gives V(node) - V(parent).
    values: str = "rating"
    clip_eps: float = 0.2
    kl_coef: float = 0.05
    value_coef: float = 1.0
    entropy_coef: float = 0.0
    learning_rate: float = 3e-4
    max_grad_norm: float = 1.0
    # Thought positions unembedded at a time in the PPO loss (0: all at once); changes no number.
    # At a 256k vocabulary the [batch, thought_length, V] float32 logits are the step's largest
    # arrays (bench/memory.py --step ppo).
    loss_chunk: int = 0
    # Experiences per gradient-accumulation pass of a PPO update (0: the whole batch at once;
    # a divisor of rl.batch_size and a multiple of the mesh's data x fsdp size); changes no
    # number. One GPU and Gemma2-2B: bench/memory.py --step ppo.
    micro_batch_size: int = 0

    def __post_init__(self):
        _require(self.loss_chunk >= 0, "rl.loss_chunk", self.loss_chunk, "must be >= 0")
        _require(self.micro_batch_size >= 0, "rl.micro_batch_size", self.micro_batch_size,
                 "must be >= 0")  # fmt: skip
        _require(self.micro_batch_size == 0 or self.batch_size % self.micro_batch_size == 0,
                 "rl.micro_batch_size", self.micro_batch_size,
                 f"must divide rl.batch_size ({self.batch_size})")  # fmt: skip
        for name in ("problems_per_iteration", "buffer_capacity", "batch_size", "epochs"):
            value = getattr(self, name)
            _require(value >= 1, f"rl.{name}", value, "must be >= 1")
        _require(self.iterations >= 0, "rl.iterations", self.iterations, "must be >= 0")
        _require(self.updates_per_iteration >= 0, "rl.updates_per_iteration",
                 self.updates_per_iteration, "must be >= 0")  # fmt: skip
        _require_number("rl.alpha", self.alpha, 0)
        _require(0 <= self.beta0 <= 1, "rl.beta0", self.beta0, "must be in [0, 1]")
        _require(self.beta_steps >= 0, "rl.beta_steps", self.beta_steps, "must be >= 0")
        for name in ("gamma", "lam"):
            value = getattr(self, name)
            _require(0 <= value <= 1, f"rl.{name}", value, "must be in [0, 1]")
        _require(self.clip_eps > 0, "rl.clip_eps", self.clip_eps, "must be > 0")
        for name in ("kl_coef", "value_coef", "entropy_coef"):
            _require_number(f"rl.{name}", getattr(self, name), 0)
        _require_number("rl.learning_rate", self.learning_rate, 0, above=True)
        # <= 0 scales every update by a negative or zero factor (inf: no clipping).
        _require(self.max_grad_norm > 0, "rl.max_grad_norm", self.max_grad_norm, "must be > 0")
        _require(self.values in VALUE_SOURCES, "rl.values", self.values,
                 "must be 'rating' or 'outcome'")  # fmt: skip
        _require(self.terminal_paths_only or self.values != "outcome", "rl.values", self.values,
                 "'outcome' needs rl.terminal_paths_only: true")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class PPRMSection:
    """LLaMA-Berry's pairwise preference reward model, trained after SFT on its own LoRA adapter
    over the frozen SFT'd model (o1jax.train.pprm). steps 0: no PPRM stage."""

    steps: int = 0
    batch_size: int = 32  # ordered pairs per step (each pair is stored in both orders)
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # JSONL of {"question", "chosen", "rejected"} rows; a pair is held out when its question is
    # one of the run's held-out problems or in the data.test_fraction hash split, else it trains;
    # a repeated row is read once, a reversed one is kept (one warning), a pair longer than the
    # model's context is left out (one warning), and chosen == rejected is an error
    # (o1jax.train.pprm.load_pairs); empty: pairs from `source`.
    pairs_path: str = ""
    # "task": (correct, flawed) worked solutions of the built-in task's problems; "policy":
    # right against wrong final answers among `samples` solutions the SFT'd policy writes for
    # each of the first `mine_problems` train problems (o1jax.train.pprm_mining).
    source: str = "task"
    mine_problems: int = 1024
    samples: int = 8
    eval_pairs: int = 200  # held-out pairs for the pairwise accuracy in the report
    # The SFT'd policy's verdict on each step (its rating token, read as search reads it) is
    # written beside the step in the PPRM's texts, in training and in SR-MCTS alike
    # (o1jax.search.ratings). Pairs from a `pairs_path` file are plain texts, read as given.
    rated: bool = True

    @property
    def rates_steps(self) -> bool:
        """Whether the PPRM's texts carry the policy's verdicts (see `rated`)."""
        return self.rated and not self.pairs_path

    def __post_init__(self):
        _require(self.steps >= 0, "pprm.steps", self.steps, "must be >= 0 (0: no PPRM stage)")
        _require(self.batch_size >= 1, "pprm.batch_size", self.batch_size, "must be >= 1")
        _require_number("pprm.learning_rate", self.learning_rate, 0, above=True)
        _require_number("pprm.weight_decay", self.weight_decay, 0)
        _require(self.max_grad_norm > 0, "pprm.max_grad_norm", self.max_grad_norm, "must be > 0")
        _require(self.eval_pairs >= 1, "pprm.eval_pairs", self.eval_pairs, "must be >= 1")
        _require(self.source in ("task", "policy"), "pprm.source", self.source,
                 "must be 'task' or 'policy'")  # fmt: skip
        _require(self.mine_problems >= 1, "pprm.mine_problems", self.mine_problems, "must be >= 1")
        _require(self.samples >= 2, "pprm.samples", self.samples, "must be >= 2")


@dataclasses.dataclass(frozen=True)
class EvalSection:
    num_problems: int = 200
    max_new_tokens: int = 160  # free-running greedy generation budget
    search_simulations: int = 16
    every: int = 0  # RL iterations between evaluations (0: only at the end)

    def __post_init__(self):
        _require(self.num_problems >= 1, "eval.num_problems", self.num_problems, "must be >= 1")
        _require(self.max_new_tokens >= 1, "eval.max_new_tokens", self.max_new_tokens,
                 "must be >= 1")  # fmt: skip
        _require(self.search_simulations >= 1, "eval.search_simulations",
                 self.search_simulations, "must be >= 1")  # fmt: skip
        _require(self.every >= 0, "eval.every", self.every, "must be >= 0 (0: only at the end)")


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    every: int = 100  # SFT and PPRM steps between checkpoints (RL: after every iteration)
    keep: int = 2

    def __post_init__(self):
        _require(self.every >= 1, "checkpoint.every", self.every, "must be >= 1")
        _require(self.keep >= 1, "checkpoint.keep", self.keep, "must be >= 1")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    seed: int = 0
    model_dir: str = ""  # HF Gemma2 directory; empty: the built-in tiny model
    tokenizer_dir: str = ""  # empty: model_dir's tokenizer, or the built-in tiny tokenizer
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    mesh: MeshConfig = MeshConfig()
    lora: LoRASection = LoRASection()
    sft: SFTSection = SFTSection()
    search: SearchSection = SearchSection()
    rl: RLSection = RLSection()
    pprm: PPRMSection = PPRMSection()
    eval: EvalSection = EvalSection()
    checkpoint: CheckpointSection = CheckpointSection()
    # A stage stops the run at this many skipped updates (a non-finite loss or gradient; 1: at
    # the first), counted per stage: SFT's optimizer steps, the PPRM's, then PPO's (one per
    # epoch of an update).
    max_nonfinite: int = 3

    def __post_init__(self):
        # numpy's generators take seeds >= 0, jax.random.key seeds < 2**63.
        _require(0 <= self.seed < 2**63, "seed", self.seed, "must be in [0, 2**63)")
        _require(self.max_nonfinite >= 1, "max_nonfinite", self.max_nonfinite,
                 "must be >= 1 (the run stops at this many non-finite losses)")  # fmt: skip
        if not self.data.path:  # the built-in task's training problems are known now
            require_problems_per_iteration(self, self.data.task.num_train)


# ----------------------------------------------------------------------------- parsing
class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping with the same key twice (safe_load keeps the
    last one silently). Keys brought in by a `<<` merge may still be overridden."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            lines: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                line = key_node.start_mark.line + 1
                try:
                    first = lines.get(key)
                except TypeError:  # an unhashable key: SafeLoader's own error says so
                    continue
                if first is not None:
                    raise ConfigError(f"duplicate key {key} (line {line}; first at line {first})")
                lines[key] = line
        return super().construct_mapping(node, deep=deep)


@dataclasses.dataclass(frozen=True)
class _Override:
    """A command-line scalar: its text, and that text read as YAML. A string field takes the
    text as typed (a path may hold "#", or be "2024" or "yes"); other fields the YAML value."""

    text: str
    value: Any
    error: str = ""  # why the text is not YAML


def _convert(value: Any, annotation: Any, key: str) -> Any:
    """Checks `value` against a field's type; returns it converted (lists -> tuples)."""
    if isinstance(value, _Override):
        if annotation is str:
            return value.text
        if value.error:
            raise ConfigError(f"{key}: cannot parse {value.text!r} ({value.error})")
        value = value.value
    if isinstance(value, dict) and not dataclasses.is_dataclass(annotation):
        dotted = _override_below(value, key)
        if dotted:  # e.g. sft.steps.x=5: the overrides cannot know which keys are sections
            raise ConfigError(f"override {dotted}: {key} is not a section")
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(annotation, value, key)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        (item,) = {a for a in typing.get_args(annotation) if a is not Ellipsis}
        return tuple(_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _convert(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} matches none of {annotation}")
    if annotation is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null")
        return None
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except OverflowError:  # an integer past float's range
            raise ConfigError(f"{key}: {value} is too large for a number") from None
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {annotation}")


def _override_below(value: dict, key: str) -> str:
    """The dotted key of the first command-line override inside `value`, or ''."""
    for k, v in value.items():
        if isinstance(v, _Override):
            return f"{key}.{k}"
        if isinstance(v, dict) and (found := _override_below(v, f"{key}.{k}")):
            return found
    return ""


def _build(cls, raw: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(raw) - names))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {
        name: _convert(value, hints[name], f"{prefix}.{name}" if prefix else name)
        for name, value in raw.items()
    }
    return cls(**kwargs)


def _set_path(raw: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if isinstance(node, _Override) and isinstance(node.value, dict):  # a section given whole
            node = node.value
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {p} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """`a.b=value` strings -> a nested dict. Values are read as YAML (a mapping may override a
    whole section); a string field takes its text verbatim."""
    raw: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, text = item.split("=", 1)
        try:
            value = _Override(text, yaml.load(text, Loader=_UniqueKeyLoader) if text else "")
        except yaml.YAMLError as e:
            value = _Override(text, None, str(e).splitlines()[0])
        except ConfigError as e:  # a duplicate key (a string field still takes the text)
            value = _Override(text, None, str(e))
        _set_path(raw, key.strip(), value)
    return raw


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        section = v.value if isinstance(v, _Override) and isinstance(v.value, dict) else v
        if isinstance(section, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], section)
        else:
            out[k] = v
    return out


def load_config(path: str | None, overrides: list[str] = ()) -> RunConfig:
    """Reads YAML (None: defaults only), applies overrides, validates."""
    raw: dict = {}
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                raw = yaml.load(f, Loader=_UniqueKeyLoader)
        except ConfigError as e:  # a duplicate key
            raise ConfigError(f"{path}: {e}") from None
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read the config ({e})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: malformed YAML ({e})") from None
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    raw = _merge(raw, parse_overrides(list(overrides)))
    try:
        config = _build(RunConfig, raw)
    except ConfigError as e:
        raise ConfigError(f"{path or 'config'}: {e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path or 'config'}: {e}") from None
    return config


def from_dict(raw: dict) -> RunConfig:
    """A RunConfig from a plain dict (a saved run's config), validated; missing keys take their
    defaults. Raises ConfigError as `load_config` does."""
    try:
        return _build(RunConfig, raw)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


def to_dict(config) -> dict:
    def plain(x):
        if isinstance(x, tuple):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    return plain(dataclasses.asdict(config))


def dump_config(config: RunConfig, path: str) -> None:
    """Writes the config as YAML, atomically: a kill mid-write leaves no partial file (which the
    next start would take for a run of another config)."""
    write_atomically(path, yaml.safe_dump(to_dict(config), sort_keys=False))
