"""Problems: the default synthetic task (arithmetic chains) and loaders for GSM8K / MATH / AIME.

The default task is verifiable and small enough for a tiny transformer on a CPU:

    Start with 17, add 25, multiply by 3, subtract 40.
    <expansion>17 + 25 = 42   <expansion>42 * 3 = 126   <expansion>126 - 40 = 86
    <conclusion>\\boxed{86}

Every problem carries its worked solution as long-CoT thoughts (`Problem.steps`); its SFT text is
`longcot.render_chain(question, steps)`, the very text the search renders for a correct path.
"""

from __future__ import annotations

import dataclasses
import decimal
import hashlib
import json
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from fractions import Fraction
from pathlib import Path

import numpy as np

from o1jax.data import longcot
from o1jax.data.answers import last_boxed
from o1jax.data.longcot import CONCLUSION, EXPANSION, NEGATIVE_RATING, POSITIVE_RATING, Node


class DataError(ValueError):
    """A data file or row that cannot be read as problems; the message names where and why."""


class DataWarning(UserWarning):
    """Rows that load, but not all of them: the message names the file, the count and the first
    few lines (e.g. worked solutions that conclude something else than their steps computed)."""


@dataclasses.dataclass(frozen=True)
class Problem:
    """A question, its ground-truth final answer, and its worked solution as thought texts
    (action tags included, the last one a `<conclusion>`; empty when no solution is known)."""

    id: str
    question: str
    answer: str
    steps: tuple[str, ...] = ()


# ----------------------------------------------------------------------------- arithmetic chains
OPS = ("add", "subtract", "multiply")
_SYMBOL = {"add": "+", "subtract": "-", "multiply": "*"}
_PHRASE = {"add": "add {}", "subtract": "subtract {}", "multiply": "multiply by {}"}


@dataclasses.dataclass(frozen=True)
class ArithmeticTask:
    """Difficulty of the arithmetic-chain task.

    num_ops: (min, max) operations per problem, inclusive.
    max_operand: the start value and add / subtract operands are drawn from [1, max_operand].
    max_multiplier: multiply only by 2..max_multiplier.
    max_value: every intermediate value stays in [0, max_value] (subtraction never goes negative).
    test_fraction: share of all questions (by a hash of the text) that belong to the test split.
    """

    num_ops: tuple[int, int] = (2, 3)
    max_operand: int = 99
    max_multiplier: int = 9
    max_value: int = 999
    ops: tuple[str, ...] = OPS
    test_fraction: float = 0.1

    def __post_init__(self):
        lo, hi = self.num_ops
        if not 1 <= lo <= hi:
            raise ValueError(
                f"ArithmeticTask.num_ops must be (min, max) with 1 <= min <= max, "
                f"got {self.num_ops}"
            )
        unknown = set(self.ops) - set(OPS)
        if not self.ops or unknown:
            raise ValueError(
                f"ArithmeticTask.ops must be a non-empty subset of {OPS}, got {self.ops}"
            )
        if not 1 <= self.max_operand <= self.max_value:
            raise ValueError(
                f"ArithmeticTask needs 1 <= max_operand <= max_value, got "
                f"{self.max_operand} and {self.max_value}"
            )
        if self.max_multiplier < 2:
            raise ValueError(
                f"ArithmeticTask.max_multiplier must be >= 2, got {self.max_multiplier}"
            )
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(
                f"ArithmeticTask.test_fraction must be in (0, 1), got {self.test_fraction}"
            )


def question_key(question: str) -> str:
    """A question with its whitespace collapsed: copies that differ only in spacing are one
    question (for the train / held-out split and every held-out filter)."""
    return " ".join(question.split())


def question_split(question: str, test_fraction: float) -> str:
    """The split a question belongs to, "test" or "train", fixed by the SHA-256 of its
    `question_key` (copies that differ only in spacing land in the same split)."""
    digest = hashlib.sha256(question_key(question).encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") < test_fraction * 2**64 else "train"


def _random_problem(task: ArithmeticTask, rng: np.random.Generator) -> Problem | None:
    value = int(rng.integers(1, task.max_operand + 1))
    phrases, steps = [f"Start with {value}"], []
    for _ in range(int(rng.integers(task.num_ops[0], task.num_ops[1] + 1))):
        feasible = [
            op
            for op in task.ops
            if (op == "add" and value + 1 <= task.max_value)
            or (op == "subtract" and value >= 1)
            or (op == "multiply" and 1 <= value <= task.max_value // 2)
        ]
        if not feasible:
            return None
        op = feasible[int(rng.integers(len(feasible)))]
        if op == "add":
            operand = int(rng.integers(1, min(task.max_operand, task.max_value - value) + 1))
            result = value + operand
        elif op == "subtract":
            operand = int(rng.integers(1, min(task.max_operand, value) + 1))
            result = value - operand
        else:
            top = min(task.max_multiplier, task.max_value // value)
            operand = int(rng.integers(2, top + 1))
            result = value * operand
        phrases.append(_PHRASE[op].format(operand))
        steps.append(f"{EXPANSION}{value} {_SYMBOL[op]} {operand} = {result}")
        value = result
    question = ", ".join(phrases) + "."
    steps.append(f"{CONCLUSION}\\boxed{{{value}}}")
    digest = hashlib.sha256(question.encode()).hexdigest()[:12]
    return Problem(f"arith-{digest}", question, str(value), tuple(steps))


def generate_problems(
    task: ArithmeticTask, n: int, seed: int, split: str = "train"
) -> list[Problem]:
    """`n` distinct problems of `split` ("train" or "test"), a pure function of (task, n, seed,
    split). The splits are disjoint for every seed: a question's split is fixed by its hash."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    problems: list[Problem] = []
    seen: set[str] = set()
    share = task.test_fraction if split == "test" else 1.0 - task.test_fraction
    max_tries = int((1000 + 20 * n) / share)
    for _ in range(max_tries):
        if len(problems) == n:
            return problems
        p = _random_problem(task, rng)
        if (
            p is None
            or p.question in seen
            or question_split(p.question, task.test_fraction) != split
        ):
            continue
        seen.add(p.question)
        problems.append(p)
    if len(problems) == n:
        return problems
    raise ValueError(
        f"generate_problems: found only {len(problems)} distinct {split} problems of "
        f"{n} in {max_tries} draws; the task {task} is too small"
    )


# ----------------------------------------------------------------------------- solutions
def _require_steps(problem: Problem) -> None:
    if not problem.steps:
        raise ValueError(f"problem {problem.id!r} has no worked solution (steps is empty)")


def correct_solution(problem: Problem) -> list[Node]:
    """The solution as a chain of nodes: the `<problem>` root, one node per step, all positive."""
    _require_steps(problem)
    return longcot.chain(problem.question, problem.steps)


def sft_text(problem: Problem) -> str:
    """The SFT text of the correct solution: `render_chain(question, steps)`, all positive."""
    _require_steps(problem)
    return longcot.render_chain(problem.question, problem.steps)


_THOUSANDS_RE = re.compile(r"-?\d{1,3}(,\d{3})+(\.\d+)?")
# "= 24", "= 24.", "= 1,072" (the whole number), not "= 2.4" or "= 1,072.5"
_RESULT_RE = re.compile(r"(?<=[\d)\s])=\s*(-?(?:\d{1,3}(?:,\d{3})+|\d+))(?!\d|[,.]\d)")


def _as_rng(rng: np.random.Generator | int) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def can_flaw(problem: Problem) -> bool:
    """Whether the problem has a non-conclusion step stating a result '... = N' (an integer),
    which journeys and flawed chains need. GSM8K steps that end in '= $0.2' have none."""
    return any(
        not s.startswith(CONCLUSION) and _RESULT_RE.search(s) is not None for s in problem.steps
    )


def _flawed_step(problem: Problem, rng: np.random.Generator) -> tuple[int, str]:
    """(index of a step, that step with a wrong result): the last `... = N` of a random
    non-conclusion step, N moved by 1..9 (upwards when N < 10, so it stays non-negative); a
    result written with thousands separators ("= 1,072") is moved whole and keeps them."""
    _require_steps(problem)
    candidates = [
        (i, m)
        for i, s in enumerate(problem.steps)
        if not s.startswith(CONCLUSION) and (m := list(_RESULT_RE.finditer(s)))
    ]
    if not candidates:
        raise ValueError(f"problem {problem.id!r} has no step stating a result '... = N' to flaw")
    index, matches = candidates[int(rng.integers(len(candidates)))]
    m = matches[-1]
    right = int(m.group(1).replace(",", ""))
    delta = int(rng.integers(1, 10)) * (1 if right < 10 or rng.random() < 0.5 else -1)
    wrong = f"{right + delta:,}" if "," in m.group(1) else str(right + delta)
    step = problem.steps[index]
    return index, f"{step[: m.start(1)]}{wrong}{step[m.end(1) :]}"


def journey_tree(problem: Problem, rng: np.random.Generator | int) -> list[Node]:
    """The solution tree with one wrong branch: at a random step, the parent gets first a child
    with a wrong result (rated negative, a leaf), then the right step, which goes on to the
    conclusion. Ids in depth-first order."""
    index, wrong = _flawed_step(problem, _as_rng(rng))
    q, steps = problem.question, problem.steps
    wrong_path = longcot.chain(
        q, [*steps[:index], wrong], [POSITIVE_RATING] * index + [NEGATIVE_RATING]
    )
    return longcot.paths_to_tree([wrong_path, longcot.chain(q, steps)])


def journey_solution(problem: Problem, rng: np.random.Generator | int) -> list[Node]:
    """A journey through `journey_tree`: the flawed step (negative), `<critic>` ("17 + 25 is not
    43"), `<refine>` with the right step, then the rest of the solution to the conclusion."""
    return longcot.journey(journey_tree(problem, rng))


def journey_text(problem: Problem, rng: np.random.Generator | int) -> str:
    """`journey_solution` rendered as the search renders a path (a chain, trailing newline)."""
    nodes = journey_solution(problem, rng)
    return longcot.render_chain(
        problem.question, [n.text for n in nodes[1:]], [n.rating for n in nodes[1:]]
    )


_ARITH_STEP_RE = re.compile(r"^<expansion>(\d+) ([-+*]) (\d+) = (\d+)$")
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def arithmetic_step_is_right(thought: str) -> bool | None:
    """Whether an arithmetic-chain thought `<expansion>a op b = c` has the right c; None for a
    thought of any other form."""
    match = _ARITH_STEP_RE.match(thought)
    if match is None:
        return None
    a, op, b, c = match.groups()
    return _APPLY[op](int(a), int(b)) == int(c)


def flawed_chain(problem: Problem, rng: np.random.Generator | int):
    """A wrong solution of an arithmetic-chain problem, for teaching the rating tokens to judge.

    One step's result is moved by 1..9; every later step computes correctly from the wrong
    value, so the conclusion is wrong too. Ratings are positive before the flaw and negative from
    it on. Returns (thoughts, ratings), or None for a problem whose steps are not arithmetic
    chain steps (e.g. loaded from JSONL), or whose flawed chain would go negative.
    """
    rng = _as_rng(rng)
    _require_steps(problem)
    parsed = [_ARITH_STEP_RE.match(step) for step in problem.steps[:-1]]
    if not parsed or not all(parsed):
        return None
    k = int(rng.integers(len(parsed)))
    thoughts, ratings = list(problem.steps[:k]), [POSITIVE_RATING] * k
    a, op, b, right = parsed[k].groups()
    delta = int(rng.integers(1, 10))
    value = int(right) + (delta if int(right) < 10 or rng.random() < 0.5 else -delta)
    thoughts.append(f"{EXPANSION}{a} {op} {b} = {value}")
    for m in parsed[k + 1 :]:
        _, op, b, _ = m.groups()
        result = _APPLY[op](value, int(b))
        if result < 0:
            return None
        thoughts.append(f"{EXPANSION}{value} {op} {b} = {result}")
        value = result
    thoughts.append(f"{CONCLUSION}\\boxed{{{value}}}")
    ratings += [NEGATIVE_RATING] * (len(thoughts) - k)
    return thoughts, ratings


# ----------------------------------------------------------------------------- loaders
_CALC_RE = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _field_str(row: Mapping, field: str, where: str) -> str:
    value = row[field]
    if isinstance(value, bool) or not isinstance(value, str | int | float | decimal.Decimal):
        raise DataError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    # A Decimal in positional notation as written ("2.50"), an exponent spelled out: 1e3 is
    # "1000", not str()'s "1E+3", which the SFT text would then teach as the answer.
    text = (format(value, "f") if isinstance(value, decimal.Decimal) else str(value)).strip()
    if not text:
        raise DataError(f"{where}: field {field!r} is empty")
    return text


def _lines_to_steps(lines: Iterable[str], answer: str) -> tuple[str, ...]:
    steps = [f"{EXPANSION}{line.strip()}" for line in lines if line.strip()]
    return (*steps, f"{CONCLUSION}\\boxed{{{answer}}}")


def problem_from_row(row: Mapping, where: str, default_id: str) -> Problem:
    """A Problem from one record in GSM8K (`question`, `answer` with `#### N`) or MATH / AIME
    (`problem`, `solution` with `\\boxed{}` and / or `answer`) form. `where` prefixes errors.

    A worked solution that concludes something else than it computed (`solution_conflict`) is
    left out: the Problem keeps its question and answer, with no steps (a DataWarning says so;
    the loaders warn once per file instead)."""
    problem, conflict = _read_row(row, where, default_id)
    if conflict is None:
        return problem
    warnings.warn(
        f"{where}: {conflict}; its worked solution is left out (no SFT text)",
        DataWarning,
        stacklevel=2,
    )
    return dataclasses.replace(problem, steps=())


def _read_row(row: Mapping, where: str, default_id: str) -> tuple[Problem, str | None]:
    """(`problem_from_row`'s Problem with its steps, `solution_conflict` of the row or None)."""
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    field = "question" if "question" in row else "problem" if "problem" in row else None
    if field is None:
        raise DataError(
            f"{where}: missing field 'question' (GSM8K) or 'problem' (MATH / AIME); "
            f"fields are {sorted(row)}"
        )
    question = _field_str(row, field, where)
    try:
        longcot.render_prompt(question)
    except ValueError as e:
        raise DataError(f"{where}: field {field!r}: {e}") from e
    solution_lines: list[str] = []
    source = "answer"
    has_solution = row.get("solution") not in (None, "")
    if row.get("answer") is not None and not (row["answer"] == "" and has_solution):
        raw = _field_str(row, "answer", where)
        if raw.count("####") > 1:
            raise DataError(f"{where}: field 'answer' has {raw.count('####')} '####' markers")
        if "####" in raw:  # GSM8K: reasoning lines, then "#### N"
            reasoning, _, final = raw.rpartition("####")
            answer = final.strip()
            if _THOUSANDS_RE.fullmatch(answer):  # "1,234" -> "1234"; "2,3" or "(1,2)" stay
                answer = answer.replace(",", "")
            solution_lines = _CALC_RE.sub("", reasoning).splitlines()
        else:
            boxed = last_boxed(raw)
            if boxed == "":
                raise DataError(f"{where}: field 'answer' has an empty \\boxed{{}}")
            if boxed is None and re.search(r"\\(?:boxed|fbox)\b", raw):
                raise DataError(f"{where}: field 'answer' has an unclosed \\boxed{{")
            answer = boxed or raw
            if "\n" in answer:
                raise DataError(
                    f"{where}: field 'answer' has no final answer "
                    f"('#### N', \\boxed{{}}, or a one-line answer)"
                )
        if not answer:
            raise DataError(f"{where}: field 'answer' has an empty final answer after '####'")
        if row.get("solution"):
            solution_lines = re.split(r"\n\s*\n", _field_str(row, "solution", where))
            source = "solution"
    elif "solution" in row and row["solution"] is not None:
        solution = _field_str(row, "solution", where)
        answer = last_boxed(solution)
        if not answer:
            raise DataError(f"{where}: field 'solution' has no \\boxed{{}} final answer")
        solution_lines = re.split(r"\n\s*\n", solution)
        source = "solution"
    else:
        raise DataError(f"{where}: missing field 'answer' or 'solution'")
    id_field = next((f for f in ("id", "unique_id", "idx") if row.get(f) is not None), None)
    pid = str(row[id_field]) if id_field else default_id
    steps = _lines_to_steps(solution_lines, answer) if solution_lines else ()
    try:
        longcot.chain(question, steps)
    except ValueError as e:
        raise DataError(f"{where}: field {source!r}: {e}") from e
    # An answer read from the solution's own \boxed{} agrees with it by construction.
    conflict = None
    if steps and (source == "answer" or row.get("answer") not in (None, "")):
        conflict = solution_conflict(steps[:-1], answer)
    return Problem(pid, question, answer, steps), conflict


_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_PLAIN_NUMBER_RE = re.compile(rf"\$?\s*({_NUMBER})\s*(%?)")
# What the last '=' of a step is followed by: a plain number ("= 72 clips", "= $1,072.50",
# "= 25%"), not the start of an expression ("= 5 * 3", "= 1/2", "= 2(3)") or a longer number.
_STATED_RE = re.compile(
    rf"\s*\$?\s*({_NUMBER})(?![\d,]\d|\.\d|\s*[-+*/×÷^(]\s*[\d($.]|\s*x\s*\d)\s*(%?)"
)


def _plain_number(match: re.Match) -> tuple[Fraction, bool]:
    return Fraction(match.group(1).replace(",", "")), match.group(2) == "%"


def _same_number(a: tuple[Fraction, bool], b: tuple[Fraction, bool]) -> bool:
    """Whether two plain numbers agree; a percent "25%" also reads as 0.25."""
    (x, x_pct), (y, y_pct) = a, b
    xs = {x, x / 100} if x_pct and not y_pct else {x}
    ys = {y, y / 100} if y_pct and not x_pct else {y}
    return bool(xs & ys)


def solution_conflict(thoughts: Iterable[str], answer: str) -> str | None:
    """Why a worked solution (its thoughts before the `<conclusion>`) disagrees with `answer`,
    or None when it agrees or the check cannot tell.

    The solution's own final answer is its last `\\boxed{}` (MATH), else the number after the
    last '=' of its last thought when no other number follows (GSM8K: "In all 48+24 = 72 clips."
    before "#### 72"). Only two plain numbers are compared (thousands separators, '$' and '%'
    allowed); an expression, a fraction or a last thought stating no result is no evidence.
    """
    thoughts = [t.split(">", 1)[1] if t.startswith("<") else t for t in thoughts]
    if not thoughts:
        return None
    boxed = next((b for t in reversed(thoughts) if (b := last_boxed(t)) is not None), None)
    if boxed is not None:
        said, what = boxed.strip(), "its solution boxes"
        stated = _PLAIN_NUMBER_RE.fullmatch(said)
    elif "=" in thoughts[-1]:
        tail = thoughts[-1].rsplit("=", 1)[1]
        stated = _STATED_RE.match(tail)
        if stated and re.search(r"\d", tail[stated.end() :]):  # "= 4, so 7 in all": no verdict
            return None
        said, what = (stated.group(1) if stated else ""), "its last step computes"
    else:
        return None
    truth = _PLAIN_NUMBER_RE.fullmatch(answer.strip())
    if stated is None or truth is None or _same_number(_plain_number(stated), _plain_number(truth)):
        return None
    return f"{what} {said}, its answer is {answer}"


def jsonl_rows(path: str | Path) -> Iterator[tuple[str, int, object]]:
    """(where = "file:line", line number, parsed value) of each non-blank line of a JSON-lines
    file. A missing file or a line that is not JSON raises DataError naming file and line."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a JSON-lines file")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        with path.open("rb") as f:
            lines = f.read().split(b"\n")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    for lineno, raw in enumerate(lines, start=1):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not UTF-8 text (byte {e.start + 1})") from None
        if not line.strip():
            continue
        try:
            # A number with a fraction or exponent is read exactly (a Decimal: "0.00001", not
            # str(1e-05)); NaN and Infinity, which JSON does not have, are refused.
            row = json.loads(line, parse_float=decimal.Decimal, parse_constant=_no_constant)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: broken JSON ({e.msg} at column {e.colno})") from e
        except ValueError as e:  # e.g. an integer of more digits than Python will convert
            raise DataError(f"{where}: unreadable JSON value ({e})") from None
        except RecursionError:
            raise DataError(f"{where}: JSON nested too deeply") from None
        yield where, lineno, row


def load_jsonl(path: str | Path) -> list[Problem]:
    """Problems from a JSON-lines file (GSM8K or MATH / AIME rows; blank lines skipped).

    Errors (DataError) name the file, the line number and the field. Rows whose worked solution
    concludes something else than its steps computed ("... = 72 clips. #### 73", or a boxed 72
    with an 'answer' of 73; `solution_conflict`) still load, as problems without steps: real
    data sets have a few, and one of them must not stop a run, but SFT on it would teach a
    solution whose conclusion does not follow from its steps. Their question and answer still
    serve evaluation and RL. One DataWarning gives their count, the file and the first lines.
    """
    stem = Path(path).stem
    rows = [
        (f"line {n}", _read_row(row, where, f"{stem}-{n}")) for where, n, row in jsonl_rows(path)
    ]
    return _without_conflicting_steps(rows, str(path))


def _without_conflicting_steps(rows, source: str) -> list[Problem]:
    """The problems of `rows` [(where, (problem, conflict))], those with a conflict without their
    steps, and one DataWarning naming `source`, the count and the first few of them."""
    bad = [(where, conflict) for where, (_, conflict) in rows if conflict is not None]
    if bad:
        first = "; ".join(f"{where}: {conflict}" for where, conflict in bad[:3])
        more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
        warnings.warn(
            f"{source}: {len(bad)} of {len(rows)} problems have a worked solution that concludes "
            f"something else than it computed ({first}{more}); their solutions are left out of "
            "SFT, the problems kept for evaluation and RL",
            DataWarning,
            stacklevel=3,
        )
    return [p if c is None else dataclasses.replace(p, steps=()) for _, (p, c) in rows]


def load_hf_disk(path: str | Path, split: str | None = None) -> list[Problem]:
    """Problems from a directory written by `datasets.save_to_disk` (a Dataset or DatasetDict).

    Needs the optional `datasets` package. split: required when the directory holds several.
    Rows whose worked solution contradicts their answer lose their steps, as in `load_jsonl`.
    """
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            "load_hf_disk needs the 'datasets' package, which o1jax does not depend on: "
            "`pip install datasets`, or convert the data to JSON lines and use load_jsonl"
        ) from e
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: no such directory")
    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        if split is None:
            if len(data) != 1:
                raise DataError(f"{path} holds the splits {sorted(data)}; pass split=")
            split = next(iter(data))
        if split not in data:
            raise DataError(f"{path} has no split {split!r}; it holds {sorted(data)}")
        data = data[split]
    elif split is not None:
        raise DataError(f"{path} holds a single Dataset, not splits; pass split=None")
    tag = split or "data"
    rows = [
        (f"row {i}", _read_row(row, f"{path}[{tag}] row {i}", f"{path.name}-{tag}-{i}"))
        for i, row in enumerate(data)
    ]
    return _without_conflicting_steps(rows, f"{path}[{tag}]")


def load_trees(path: str | Path) -> list[list[Node]]:
    """OpenLongCoT trees from a text file (one tree) or a directory (every `*.txt` in it or in its
    subdirectories, sorted by path), such as `python -m o1jax.evaluate --search ... --trees DIR`
    writes (`DIR/<search>/` for several searches). Errors (`DataError`) name the file and the
    character offset."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise DataError(f"{path}: no *.txt long-CoT tree files in this directory")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"{path}: no such file or directory")
    trees = []
    for file in files:
        # Files saved by editors: a UTF-8 BOM, Windows line ends (between nodes; a thought's
        # own text is kept), blank lines after the tree.
        try:
            text = file.read_bytes().decode("utf-8-sig")  # no newline translation
        except UnicodeDecodeError as e:
            raise DataError(f"{file}: not UTF-8 text (byte {e.start + 1})") from None
        except OSError as e:
            raise DataError(f"{file}: cannot read ({e.strerror or e})") from None
        end = longcot.END_OF_RATING
        text = text.replace(end + "\r\n", end + "\n").rstrip("\r\n")
        try:
            trees.append(longcot.parse_tree(text))
        except ValueError as e:  # LongCoTParseError names the offset
            raise DataError(f"{file}: {e}") from None
    return trees
