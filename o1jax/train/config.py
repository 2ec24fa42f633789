"""The run configuration: YAML -> nested frozen dataclasses, strictly validated.

    config = load_config("configs/tiny.yaml", overrides=["sft.steps=10", "seed=3"])

Unknown keys and values of the wrong type are errors that name the key (`ConfigError`). The
resolved config is saved as `workdir/config.yaml`; a resumed run must match it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import yaml

from o1jax.model.lora import ALL_TARGETS
from o1jax.rl.experience import VALUE_SOURCES


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and key at fault."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    preset: str = "tiny"  # used when model_dir is empty
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
    # CPU the tanh over [B, H, T, T] scores is a quarter of an SFT step). HF models keep theirs.
    attn_logit_softcapping: float | None = 50.0


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


@dataclasses.dataclass(frozen=True)
class DataConfig:
    path: str = ""  # JSONL problem file; empty: the built-in task
    test_path: str = ""  # held-out JSONL; empty: a held-out split of `path` or of the task
    test_fraction: float = 0.1
    # OpenLongCoT trees (a .txt file, or a directory of them, as `evaluate --trees` writes) whose
    # right paths (ending in a positive <conclusion>) are added to the SFT data.
    sft_trees: str = ""
    task: TaskConfig = TaskConfig()


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class LoRASection:
    rank: int = 32
    alpha: float = 16.0
    targets: tuple[str, ...] = ALL_TARGETS  # every projection of every layer


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


@dataclasses.dataclass(frozen=True)
class SearchSection:
    num_simulations: int = 16
    num_children: int = 2
    max_depth: int = 6
    thought_length: int = 24
    selection: str = "puct"
    c_puct: float = 1.4
    discount: float = 0.9
    backup: str = "max"
    patience: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


@dataclasses.dataclass(frozen=True)
class RLSection:
    iterations: int = 8
    problems_per_iteration: int = 32
    buffer_capacity: int = 16384
    alpha: float = 0.6
    beta0: float = 0.4
    beta_steps: int = 100_000
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

    def __post_init__(self):
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
    # JSONL of {"question", "chosen", "rejected"} rows, split into train / held-out by question
    # (data.test_fraction); empty: pairs from `source`.
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
        _require(self.learning_rate > 0, "pprm.learning_rate", self.learning_rate, "must be > 0")
        _require(self.weight_decay >= 0, "pprm.weight_decay", self.weight_decay, "must be >= 0")
        _require(self.max_grad_norm > 0, "pprm.max_grad_norm", self.max_grad_norm, "must be > 0")
        _require(self.eval_pairs >= 1, "pprm.eval_pairs", self.eval_pairs, "must be >= 1")
        _require(self.source in ("task", "policy"), "pprm.source", self.source,
                 "must be 'task' or 'policy'")  # fmt: skip
        _require(self.mine_problems >= 1, "pprm.mine_problems", self.mine_problems, "must be >= 1")
        _require(self.samples >= 2, "pprm.samples", self.samples, "must be >= 2")


def _require(ok: bool, key: str, value, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {rule}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class EvalSection:
    num_problems: int = 200
    max_new_tokens: int = 160  # free-running greedy generation budget
    search_simulations: int = 16
    every: int = 0  # RL iterations between evaluations (0: only at the end)


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    every: int = 100  # SFT and PPRM steps between checkpoints (RL: after every iteration)
    keep: int = 2


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
    max_nonfinite: int = 3  # non-finite losses (skipped updates) before the run stops


# ----------------------------------------------------------------------------- parsing
def _convert(value: Any, annotation: Any, key: str) -> Any:
    """Checks `value` against a field's type; returns it converted (lists -> tuples)."""
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
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {annotation}")


def _build(cls, raw: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
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
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {p} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """`a.b=value` strings (values parsed as YAML scalars) -> a nested dict."""
    raw: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: cannot parse {text!r} ({e})") from None
        _set_path(raw, key.strip(), value)
    return raw


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | None, overrides: list[str] = ()) -> RunConfig:
    """Reads YAML (None: defaults only), applies overrides, validates."""
    raw: dict = {}
    if path:
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: malformed YAML ({e})") from None
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


def to_dict(config) -> dict:
    def plain(x):
        if isinstance(x, tuple):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    return plain(dataclasses.asdict(config))


def dump_config(config: RunConfig, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(config), f, sort_keys=False)
