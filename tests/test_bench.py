"""bench/: the commands bench/RESULTS.md (and the scripts' own docstrings) give parse with the
scripts as they are, and the pieces of the scripts whose numbers a test can check cheaply."""

import argparse
import ast
import importlib.util
import os
import re
import shlex
import sys
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from o1jax.model import Gemma2Config, init_params, sampler
from o1jax.train import pprm

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
SCRIPTS = sorted(BENCH.glob("*.py")) + sorted((BENCH / "probes").glob("*.py"))
# A command a RESULTS section ran on code it then threw away says so in its comment.
LOCAL_PATCH = "local patch"


def _commands() -> list[tuple[str, str, list[str]]]:
    """(where, script, argv) of every `python bench/....py ...` command of the results files,
    the README and the scripts' docstrings, continuation lines joined; `[...]` options and
    `a | b` alternatives are all passed at once."""
    texts = [
        (p.name, p.read_text()) for p in (BENCH / "RESULTS.md", BENCH / "RESULTS_attention.md")
    ]
    texts.append(("README.md", (ROOT / "README.md").read_text()))
    texts += [(p.name, ast.get_docstring(ast.parse(p.read_text())) or "") for p in SCRIPTS]
    out = []
    for where, text in texts:
        text = text.replace("\\\n", " ")
        for m in re.finditer(r"python (bench/[\w/]+\.py)([^`\n]*)", text):
            script, rest = m.groups()
            rest, _, comment = rest.partition(" #")
            if LOCAL_PATCH in comment:
                continue
            argv = [a for a in shlex.split(rest.replace("[", " ").replace("]", " ")) if a]
            argv = [a for a in argv if a not in ("|", "...")]
            if (script, argv) not in [(s, v) for _, s, v in out]:
                out.append((where, script, argv))
    return out


_MODULES: dict[str, object] = {}


def _module(script: str):
    """bench/<script> loaded as a module. torch and transformers are stubbed while it loads
    (only forward.py and sample.py use them, and no test here runs them); the scripts' own
    sys.path additions are undone."""
    if script not in _MODULES:
        path = ROOT / script
        stubs = {name: mock.MagicMock() for name in ("torch", "transformers")}
        with mock.patch.dict(sys.modules, stubs), mock.patch.object(sys, "path", [*sys.path]):
            spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        sys.modules.pop("common", None)  # bench/probes/common.py, imported by the probes
        _MODULES[script] = module
    return _MODULES[script]


class _Parsed(Exception):
    pass


def test_every_script_is_documented_with_a_command():
    documented = {script for _, script, _ in _commands()}
    assert documented == {str(p.relative_to(ROOT)) for p in SCRIPTS if p.name != "common.py"}


@pytest.mark.parametrize(
    ("where", "script", "argv"),
    _commands(),
    ids=lambda x: x if isinstance(x, str) else " ".join(x)[:60],
)
def test_documented_command_parses(where, script, argv, monkeypatch, capsys):
    if "ArgumentParser(" not in (ROOT / script).read_text():
        pytest.fail(f"{script} parses no arguments: `--help` would run it")
    module = _module(script)
    parse = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        raise _Parsed(parse(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    monkeypatch.setattr(sys, "argv", [script, *argv])
    try:
        module.main()
    except _Parsed:
        return
    except SystemExit:
        pytest.fail(f"{where}: python {script} {shlex.join(argv)}: {capsys.readouterr().err}")
    pytest.fail(f"{script}: main() returned without parsing its arguments")


def test_sample_flops_count_every_forward_generate_runs(monkeypatch):
    """bench/sample.py's FLOP/s counts the work `generate` does: the prefill and one decode
    forward per new token, the last one's logits unused (it counted one decode step short)."""
    sample = _module("bench/sample.py")
    # A config of this test alone, so `generate` traces anew with the counting forward.
    cfg = Gemma2Config.tiny(
        vocab_size=37, num_layers=1, d_model=16, num_heads=2, head_dim=8, ffn_dim=32
    )
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    params = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)  # init_params: 5 s
    calls = []  # (positions forwarded, position of the last): one per forward run
    real = sampler.forward

    def counting(params, cfg, tokens, *args, positions=None, **kwargs):
        record = lambda p: calls.append((p.shape[1], int(p[0, -1])))
        jax.debug.callback(record, positions)
        return real(params, cfg, tokens, *args, positions=positions, **kwargs)

    monkeypatch.setattr(sampler, "forward", counting)
    prompt, new = 5, 3
    out = sampler.generate(
        params, cfg, jnp.ones((1, prompt), jnp.int32), jnp.array([prompt]),
        key=jax.random.key(0), max_new_tokens=new,
    )  # fmt: skip
    jax.block_until_ready(out.tokens)
    assert sorted(calls) == [(1, prompt + i) for i in range(new)] + [(prompt, prompt - 1)]
    # The prefill unembeds its last position; a decode step attends to its position + 1 slots.
    ran = sample.prefill_flops(cfg, prompt) + sum(
        sample.decode_flops_per_token(cfg, last + 1) for _, last in calls
    )
    assert sample.generate_flops(cfg, prompt, new) == ran


def test_sr_mcts_trains_on_task_pairs_when_none_were_mined():
    """bench/probes/sr_mcts.py --pairs both fell over (None.tokens) when the policy's samples
    gave no pair; --pairs policy then says why instead."""
    sr_mcts = _module("bench/probes/sr_mcts.py")
    task = pprm.Pairs(np.zeros((2, 3), np.int32), np.full(2, 3), np.array([1, 0]))
    mined = pprm.Pairs(np.ones((2, 5), np.int32), np.full(2, 5), np.array([0, 1]))
    assert sr_mcts.training_pairs("both", None, task, 0) is task
    assert sr_mcts.training_pairs("task", None, task, 0) is task
    with pytest.raises(SystemExit, match="mined no pair"):
        sr_mcts.training_pairs("policy", None, task, 0)
    assert sr_mcts.training_pairs("policy", mined, task, 0) is mined
    both = sr_mcts.training_pairs("both", mined, task, 0)
    assert both.tokens.shape == (4, 5) and both.lengths.tolist() == [5, 5, 3, 3]


def test_memory_sample_compiles_the_sampler_search_calls(monkeypatch):
    """bench/memory.py --step sample lowers `generate`'s program with the meta-action first
    tokens and the entropy `mcts.make_lm_expand_fn` asks for when the search section turns them
    on (it lowered the plain program)."""
    memory = _module("bench/memory.py")
    lowered = {}

    class Lowering:
        def lower(self, *args, **kwargs):
            lowered.update(args=args, kwargs=kwargs)
            raise _Parsed()

    monkeypatch.setattr(sampler, "_generate", Lowering())
    for name in ("XLA_FLAGS", "JAX_PLATFORMS"):  # main sets them for its own process
        monkeypatch.setenv(name, os.environ.get(name, ""))
    argv = ["--config", str(ROOT / "configs/tiny.yaml"), "--layers", "1", "--step", "sample"]
    with pytest.raises(_Parsed):
        memory.main([*argv, "search.entropy_prior=true", "search.meta_action_prob=0.5"])
    rows = 32 * 2  # rl.problems_per_iteration leaves, search.num_children samples each
    assert lowered["args"][5].shape == (rows,) and lowered["kwargs"]["return_entropy"]
    with pytest.raises(_Parsed):
        memory.main(argv)
    assert lowered["args"][5] is None and not lowered["kwargs"]["return_entropy"]
