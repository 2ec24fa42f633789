"""The arithmetic-chain task (correct, deterministic, disjoint splits), solutions, journeys,
and the JSONL / HF-disk loaders."""

import dataclasses
import importlib.util
import json
import os
import re
import warnings

import numpy as np
import pytest

from o1jax.data import longcot, tasks
from o1jax.data.answers import extract_answer, is_correct
from o1jax.data.longcot import CONCLUSION, CRITIC, EXPANSION, NEGATIVE_RATING, REFINE
from o1jax.data.tasks import ArithmeticTask, DataError, Problem

TASK = ArithmeticTask()
OPS = {"add": lambda a, b: a + b, "subtract": lambda a, b: a - b, "multiply": lambda a, b: a * b}
SYM = {"+": "add", "-": "subtract", "*": "multiply"}


def _replay(problem: Problem, task: ArithmeticTask) -> None:
    """Recomputes a problem from its question alone and checks every step against it."""
    m = re.fullmatch(
        r"Start with (\d+)((?:, (?:add|subtract|multiply by) \d+)+)\.", problem.question
    )
    assert m, problem.question
    value = int(m.group(1))
    assert 1 <= value <= task.max_operand
    ops = re.findall(r", (add|subtract|multiply) (?:by )?(\d+)", m.group(2))
    assert task.num_ops[0] <= len(ops) <= task.num_ops[1]
    assert len(problem.steps) == len(ops) + 1
    for (op, operand), step in zip(ops, problem.steps, strict=False):
        operand = int(operand)
        if op == "multiply":
            assert 2 <= operand <= task.max_multiplier
        else:
            assert 1 <= operand <= task.max_operand
        result = OPS[op](value, operand)
        assert 0 <= result <= task.max_value
        sym = next(s for s, name in SYM.items() if name == op)
        assert step == f"{EXPANSION}{value} {sym} {operand} = {result}"
        value = result
    assert problem.steps[-1] == f"{CONCLUSION}\\boxed{{{value}}}"
    assert problem.answer == str(value)


def test_generate_correct_and_deterministic():
    problems = tasks.generate_problems(TASK, 200, seed=3)
    for p in problems:
        _replay(p, TASK)
    assert problems == tasks.generate_problems(TASK, 200, seed=3)
    assert problems != tasks.generate_problems(TASK, 200, seed=4)
    assert len({p.question for p in problems}) == len({p.id for p in problems}) == 200
    assert {len(p.steps) for p in problems} == {3, 4}  # 2 or 3 operations


def test_difficulty_knobs():
    task = ArithmeticTask(
        num_ops=(4, 4), max_operand=9, max_multiplier=3, max_value=99, ops=("add", "multiply")
    )
    for p in tasks.generate_problems(task, 50, seed=0):
        _replay(p, task)
        assert "subtract" not in p.question


def test_splits_are_disjoint():
    train = {p.question for s in (0, 1) for p in tasks.generate_problems(TASK, 400, s, "train")}
    test = {p.question for s in (0, 1) for p in tasks.generate_problems(TASK, 100, s, "test")}
    assert not train & test
    assert len(test) > 100  # different seeds give different test problems
    assert all(tasks.question_split(q, TASK.test_fraction) == "test" for q in test)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_ops=(3, 2)), "num_ops"),
        (dict(ops=("divide",)), "ops"),
        (dict(max_operand=1000), "max_operand"),
        (dict(max_multiplier=1), "max_multiplier"),
        (dict(test_fraction=0.0), "test_fraction"),
    ],
)
def test_task_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ArithmeticTask(**kwargs)


def test_too_small_task_is_an_error():
    tiny = ArithmeticTask(num_ops=(1, 1), max_operand=1, ops=("add",), test_fraction=0.5)
    with pytest.raises(ValueError, match="too small"):
        split = tasks.question_split("Start with 1, add 1.", 0.5)
        tasks.generate_problems(tiny, 3, seed=0, split=split)


def test_correct_solution_is_the_sft_text():
    for p in tasks.generate_problems(TASK, 20, seed=0):
        nodes = tasks.correct_solution(p)
        text = tasks.sft_text(p)
        assert text == longcot.render_tree(nodes) + "\n"
        assert text == longcot.render_chain(p.question, p.steps)
        assert text.startswith(longcot.render_prompt(p.question))
        assert extract_answer(text) == p.answer and is_correct(text, p.answer)


def test_journey_solution():
    for i, p in enumerate(tasks.generate_problems(TASK, 40, seed=1)):
        nodes = tasks.journey_solution(p, i)
        assert nodes == tasks.journey_solution(p, np.random.default_rng(i))
        assert nodes == longcot.journey(tasks.journey_tree(p, i))
        assert [(n.father_id, n.local_id) for n in nodes] == [(k - 1, k) for k in range(len(nodes))]
        assert len(nodes) == len(p.steps) + 3  # root + steps + wrong + critic, refine for right
        k = next(j for j, n in enumerate(nodes) if n.rating == NEGATIVE_RATING)
        wrong, critic, refine = nodes[k : k + 3]
        lhs, wrong_value = wrong.thought.split(" = ")
        right = p.steps[k - 1]
        assert wrong.action == EXPANSION and right.startswith(f"{EXPANSION}{lhs} = ")
        assert wrong_value != right.split(" = ")[1]
        assert (critic.action, critic.thought) == (CRITIC, f"{lhs} is not {wrong_value}")
        assert refine.action == REFINE and REFINE + refine.thought == right.replace(
            EXPANSION, REFINE
        )
        assert [n.text for n in nodes[k + 3 :]] == list(p.steps[k:])  # then correctly on
        assert sum(n.rating == NEGATIVE_RATING for n in nodes) == 1
        text = tasks.journey_text(p, i)
        assert text == longcot.render_tree(nodes) + "\n"
        assert is_correct(text, p.answer)
        tree = tasks.journey_tree(p, i)
        assert len(longcot.tree_to_paths(tree)) == 2 and len(tree) == len(p.steps) + 2


def test_solutions_need_steps():
    bare = Problem("x", "What is 1?", "1")
    with pytest.raises(ValueError, match="no worked solution"):
        tasks.sft_text(bare)
    with pytest.raises(ValueError, match="no step stating a result"):
        tasks.journey_solution(Problem("y", "q", "1", ("<expansion>think", "<conclusion>1")), 0)


def _write(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_load_jsonl(tmp_path):
    rows = [
        {
            "question": "Natalia sold 48 clips...",
            "answer": "She sold 48/2 = <<48/2=24>>24.\n"
            "In all 1000+72 = <<1000+72=1072>>1,072 clips.\n#### 1,072",
        },
        {"problem": "Find x.", "solution": "We get $x = \\frac{1}{2}$.\n\nSo $\\boxed{\\frac12}$."},
        {"problem": "AIME 1", "answer": 204, "id": "aime-1"},
        {"problem": "MATH 2", "solution": "Long \\boxed{3}", "answer": "\\boxed{3}"},
        {"question": "Simple", "answer": "42"},
    ]
    path = _write(tmp_path, [rows[0], "", *rows[1:]])  # a blank line is skipped
    p = tasks.load_jsonl(path)
    assert [x.answer for x in p] == ["1072", "\\frac12", "204", "3", "42"]
    blank = _write(
        tmp_path, [{"problem": "q", "answer": "", "solution": "so \\boxed{7}"}], "b.jsonl"
    )
    assert tasks.load_jsonl(blank)[0].answer == "7"  # an empty answer defers to the solution
    assert [x.id for x in p[:3]] == ["data-1", "data-3", "aime-1"]  # file stem, line; or "id"
    assert p[0].steps == (
        "<expansion>She sold 48/2 = 24.",
        "<expansion>In all 1000+72 = 1,072 clips.",
        "<conclusion>\\boxed{1072}",
    )
    assert p[1].steps[-1] == "<conclusion>\\boxed{\\frac12}" and len(p[1].steps) == 3
    assert p[2].steps == () and p[4].steps == ()
    assert tasks.sft_text(p[0]).count("<expansion>") == 2
    assert len(tasks.journey_solution(p[0], 0)) == len(p[0].steps) + 3


def test_solutions_that_conclude_what_they_did_not_compute_load_without_steps(tmp_path):
    """A worked solution whose last result disagrees with the row's answer would teach SFT to
    conclude what the steps did not compute: such rows load without steps (kept for evaluation
    and RL), and one warning names the file, their count and the first lines."""
    gsm = lambda last, final: {
        "question": f"q{last}{final}",
        "answer": f"a = {last}.\n#### {final}",
    }
    rows = [
        gsm(72, 72),
        gsm(72, 73),  # line 2: GSM8K's "... = 72 #### 73"
        {"problem": "m", "solution": "So $x = 3$.\n\nThus $\\boxed{4}$.", "answer": "5"},
        gsm("$1,072", "1,072"),  # agrees, written with '$' and a thousands separator
        {"problem": "p", "solution": "x = 2 * 3.\n\nSo \\boxed{6}.", "answer": "6"},
        gsm("5 * 3", 16),  # an expression after the last '=': no verdict
        gsm(10, 11),
        gsm(20, 21),
    ]
    path = _write(tmp_path, rows)
    with pytest.warns(tasks.DataWarning) as caught:
        problems = tasks.load_jsonl(path)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert message.startswith(f"{path}: 4 of 8 problems have a worked solution that concludes")
    assert "line 2: its last step computes 72, its answer is 73" in message
    assert "line 3: its solution boxes 4, its answer is 5" in message
    assert "line 7" in message and "line 8" not in message and "and 1 more" in message
    assert [p.answer for p in problems] == ["72", "73", "5", "1072", "6", "16", "11", "21"]
    assert [bool(p.steps) for p in problems] == [True, False, False, True, True, True, False, False]
    with pytest.warns(tasks.DataWarning, match=r"^row 1: its last step computes 72, its answer"):
        assert tasks.problem_from_row(rows[1], "row 1", "r1").steps == ()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(tasks.load_jsonl(_write(tmp_path, [rows[0], rows[3]], "clean.jsonl"))) == 2


def test_gsm8k_commas_go_only_from_thousands_separators(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"so.\n#### {a}"}
            for i, a in enumerate(["1,072", "-12,345.5", "2,3", "(1,2)", "1, 2, 3"])]  # fmt: skip
    answers = [p.answer for p in tasks.load_jsonl(_write(tmp_path, rows))]
    assert answers == ["1072", "-12345.5", "2,3", "(1,2)", "1, 2, 3"]


def test_gsm8k_steps_with_dollar_results_train_as_plain_chains(tmp_path):
    """A step's result written '= $0.2' gives a journey nothing to flaw: SFT keeps such a
    problem's plain chain instead of stopping the run."""
    from o1jax.data.tokenizer import build_tiny_tokenizer
    from o1jax.train.config import load_config
    from o1jax.train.sft_stage import sft_examples

    answer = (
        "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n"
        "Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"
    )
    rows = [{"question": f"Weng earns $12 an hour ({i})", "answer": answer} for i in range(20)]
    problems = tasks.load_jsonl(_write(tmp_path, rows))
    assert not tasks.can_flaw(problems[0]) and tasks.can_flaw(tasks.load_jsonl(_write(
        tmp_path, [{"question": "q", "answer": "3 + 4 = 7.\n#### 7"}], "ok.jsonl"))[0])  # fmt: skip
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tiny = os.path.join(root, "configs", "tiny.yaml")
    config = load_config(tiny, ["data.task.journey_fraction=1"])
    examples = sft_examples(config, build_tiny_tokenizer(), problems)
    assert len(examples) == 20


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"question": "q", "answer": "#### 1"', "data.jsonl:2: broken JSON"),
        ('{"prompt": "q", "answer": "1"}', "data.jsonl:2: missing field 'question'"),
        ('{"problem": "q"}', "data.jsonl:2: missing field 'answer' or 'solution'"),
        ('{"problem": "q", "solution": "no box"}', "data.jsonl:2: field 'solution' has no"),
        ('{"question": "q", "answer": "two\\nlines"}', "data.jsonl:2: field 'answer' has no"),
        ('{"question": "q", "answer": "x ####  "}', "data.jsonl:2: field 'answer' has an empty"),
        ('{"question": 3.5, "answer": []}', "data.jsonl:2: field 'answer' must be a string"),
        ('{"question": "q", "answer": "<critic>\\n#### 1"}', "field 'answer': thought 1 contains"),
        ('{"question": "", "answer": "1"}', "data.jsonl:2: field 'question' is empty"),
        ('{"question": "q", "answer": "\\\\boxed{ }"}', "field 'answer' has an empty \\boxed{}"),
        ('{"question": "q", "answer": "#### 1\\n#### 2"}', "has 2 '####' markers"),
        ("[1, 2]", "data.jsonl:2: expected a JSON object"),
        ('{"question": "q", "answer": NaN}', "data.jsonl:2: unreadable JSON value (NaN is not"),
        ('{"question": "q", "answer": "\\\\boxed{5"}', "field 'answer' has an unclosed \\boxed{"),
        ("[" * 100_000, "data.jsonl:2: JSON nested too deeply"),  # was a RecursionError
        (  # a tokenizer reads it as the EOS id: SFT would train on an EOS mid-question
            '{"question": "Is <eos> a tag?", "answer": "1"}',
            "data.jsonl:2: field 'question': question contains the control token '<eos>'",
        ),
        (
            '{"question": "<end_of_thought>", "answer": "1"}',
            "data.jsonl:2: field 'question': question contains",
        ),
    ],
)
def test_load_jsonl_errors(tmp_path, line, message):
    path = _write(tmp_path, [{"question": "fine", "answer": "#### 1"}, line])
    with pytest.raises(DataError) as info:
        tasks.load_jsonl(path)
    assert message in str(info.value) and str(tmp_path) in str(info.value)


def test_numeric_answers_keep_their_literal_digits(tmp_path):
    """str(float) wrote 0.00001 as '1e-05' and lost the digits of long numbers."""
    rows = [{"question": "a", "answer": 0}, '{"question": "b", "answer": 0.00001}',
            '{"question": "c", "answer": 123456789012345678.0}',
            '{"question": "d", "answer": 1e3}', '{"question": "e", "answer": 1E-7}',
            '{"question": "f", "answer": 2.50}']  # fmt: skip
    got = [p.answer for p in tasks.load_jsonl(_write(tmp_path, rows))]
    # An exponent is spelled out: str(Decimal) wrote 1e3 as "1E+3", which SFT then taught.
    assert got == ["0", "0.00001", "123456789012345678.0", "1000", "0.0000001", "2.50"]


def test_a_decimal_result_is_no_step_to_flaw(tmp_path):
    """The result pattern matched the "1" of "= 12.5" (it backtracked into the number), so a
    journey flawed a digit in the middle: "= 92.5", not a result off by 1..9."""
    rows = [
        {"question": "q", "answer": "He pays 25 / 2 = 12.5 dollars.\n#### 12.5"},
        {"question": "r", "answer": "It is 1,000 + 72 = 1,072.5 - 0.5.\n#### 1072"},
        {"question": "s", "answer": "It is 1,000 + 72 = 1,072 in all.\n#### 1072"},
    ]
    problems = tasks.load_jsonl(_write(tmp_path, rows))
    assert [tasks.can_flaw(p) for p in problems] == [False, False, True]


def test_load_jsonl_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        tasks.load_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}: is a directory, not a JSON-lines")):
        tasks.load_jsonl(tmp_path)


def test_load_jsonl_bytes(tmp_path):
    """A BOM and CRLF line ends are read; text that is not UTF-8 is a DataError naming the line."""
    good = tmp_path / "bom.jsonl"
    good.write_bytes(
        b'\xef\xbb\xbf{"question": "q", "answer": "1"}\r\n{"question": "r", "answer": "2"}'
    )
    assert [p.answer for p in tasks.load_jsonl(good)] == ["1", "2"]
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"question": "q", "answer": "1"}\n{"question": "caf\xe9", "answer": "2"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not UTF-8 text"):
        tasks.load_jsonl(bad)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets installed")
def test_load_hf_disk_without_datasets(tmp_path):
    with pytest.raises(ImportError, match="needs the 'datasets' package"):
        tasks.load_hf_disk(tmp_path)


def test_load_hf_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"question": ["q1", "q2"], "answer": ["a\n#### 3", "b\n#### 4"]}
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(rows), "test": datasets.Dataset.from_dict(rows)}
    )
    dd.save_to_disk(str(tmp_path / "gsm8k"))
    got = tasks.load_hf_disk(tmp_path / "gsm8k", split="test")
    assert [p.answer for p in got] == ["3", "4"]
    with pytest.raises(DataError, match="pass split="):
        tasks.load_hf_disk(tmp_path / "gsm8k")


def test_load_trees_reads_the_per_search_subdirectories_evaluate_writes(tmp_path):
    # `evaluate --search mcts,mctsr --trees DIR` writes DIR/mcts/*.txt and DIR/mctsr/*.txt.
    problem = tasks.generate_problems(ArithmeticTask(), 1, seed=0)[0]
    tree = tasks.journey_tree(problem, 0)
    for search in ("mcts", "mctsr"):
        (tmp_path / search).mkdir()
        (tmp_path / search / "0000.txt").write_text(longcot.render_tree(tree), encoding="utf-8")
    trees = tasks.load_trees(tmp_path)
    assert trees == [tree, tree]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no \*.txt long-CoT tree files"):
        tasks.load_trees(tmp_path / "empty")
    # As an editor may save it: a byte-order mark, Windows line ends, blank lines at the end.
    edited = tmp_path / "edited.txt"
    text = "\ufeff" + longcot.render_tree(tree).replace("\n", "\r\n") + "\r\n\r\n"
    edited.write_bytes(text.encode("utf-8"))
    assert tasks.load_trees(edited) == [tree]
    # A thought's own CRLF is text, kept; a file that is not UTF-8 is named.
    crlf = [tree[0], dataclasses.replace(tree[1], thought=tree[1].thought + "\r\nmore"), *tree[2:]]
    (tmp_path / "crlf.txt").write_bytes(longcot.render_tree(crlf).encode("utf-8"))
    assert tasks.load_trees(tmp_path / "crlf.txt") == [crlf]
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    with pytest.raises(DataError, match=r"latin1\.txt: not UTF-8 text"):
        tasks.load_trees(tmp_path / "latin1.txt")


def test_questions_that_differ_only_in_spacing_share_a_split():
    questions = [f"What is {i} plus {i}?" for i in range(200)]
    for q in questions:
        split = tasks.question_split(q, 0.5)
        for variant in (q.replace(" ", "  "), f" {q}\n", q.replace(" ", "\t")):
            assert tasks.question_split(variant, 0.5) == split


def test_journey_of_a_gsm8k_step_with_thousands_separators_moves_the_whole_result():
    """'= 2,144' is flawed as 2,144 + d (1 <= |d| <= 9), not as 2 + d ('8,144', 6000 off), and the
    critic quotes the whole numbers ('1,072 * 2 is not 2,150', not '072 * 2 is not 8')."""
    row = {
        "question": "He pays $1,000 and $72, then twice that. How much?",
        "answer": "He pays 1,000 + 72 = 1,072 dollars.\nThen 1,072 * 2 = 2,144 dollars.\n#### 2144",
    }
    p = tasks.problem_from_row(row, "row", "id")
    for seed in range(12):
        nodes = tasks.journey_solution(p, seed)
        k = next(j for j, n in enumerate(nodes) if n.rating == NEGATIVE_RATING)
        wrong, critic = nodes[k], nodes[k + 1]
        lhs, rest = wrong.thought.split(" = ")
        value = rest.removesuffix(" dollars.")
        claim, right = {
            "He pays 1,000 + 72": ("1,000 + 72", 1072),
            "Then 1,072 * 2": ("1,072 * 2", 2144),
        }[lhs]
        assert (
            re.fullmatch(r"\d,\d{3}", value) and 1 <= abs(int(value.replace(",", "")) - right) <= 9
        )
        assert critic.thought == f"{claim} is not {value}"
