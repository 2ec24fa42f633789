"""Answer extraction and equivalence: markers only, exact numbers, math-verify under a limit."""

import re
import threading
import time

import numpy as np
import pytest

from o1jax.data import answers
from o1jax.data.answers import extract_answer, is_correct, is_equivalent

LIMIT_S = 1.0
# For a verdict that needs math-verify: it answers long before this, but a loaded machine (three
# pytest workers on two cores) once took more than 1 s to expand (x+1)^2, and a timeout is False.
VERDICT_S = 10.0


@pytest.fixture(scope="module", autouse=True)
def math_verify_worker():
    assert answers.start_math_verify()  # its start-up is not part of any call's time limit
    yield


EQUIVALENT = [
    ("86", "86"),
    ("0.5", "\\frac{1}{2}"),
    ("\\dfrac{1}{2}", "\\frac12"),
    ("\\tfrac{3}{4}", "0.75"),
    ("-\\frac{3}{4}", "-0.75"),
    ("\\frac{-3}{4}", "-.75"),
    ("2/4", "1/2"),
    ("1,234", "1234"),
    ("1,234,567.5", "1234567.5"),
    ("5 cm", "5"),
    ("12 square feet", "12"),
    ("5\\text{ cm}", "5"),
    ("\\text{5}", "5"),
    ("\\$5", "5"),
    ("$5$", "5"),
    ("50\\%", "50"),
    ("50%", "0.5"),
    ("90^\\circ", "90"),
    ("x = 5", "5"),
    ("\\boxed{7}", "7"),
    ("$\\boxed{\\{1, 2\\}}$", "\\{1,2\\}"),
    ("7" * 3000, "7" * 3000),
    ("7.", "7"),
    ("3.0", "3"),
    ("(A)", "A"),
    ("0.333333", "\\frac{1}{3}"),  # math-verify's 6-decimal comparison
    ("\\{1, 2\\}", "\\{2,1\\}"),  # sets
    ("(0,1]", "(0, 1]"),  # intervals
    ("[0, \\infty)", "[0,\\infty)"),
    ("\\left( 0, 1 \\right)", "(0,1)"),
    ("(x+1)^2", "x^2+2x+1"),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"),
    ("2\\sqrt{3}", "\\sqrt{12}"),
]

NOT_EQUIVALENT = [
    ("86", "68"),  # digits swapped
    ("1/2", "2/1"),
    ("\\frac{1}{2}", "\\frac{2}{1}"),
    ("0.5", "0.4"),
    ("0.33", "\\frac{1}{3}"),
    ("1/3", "2/3"),
    ("-5", "5"),
    ("50%", "5"),
    ("12", "123"),
    ("1,23", "123"),  # not a thousands separator
    ("2 or 3", "2"),
    ("\\{1, 2\\}", "\\{1, 3\\}"),
    ("(0,1)", "[0,1]"),  # open vs closed interval
    ("(x+1)^2", "x^2+1"),
    ("", "5"),
    (None, "5"),
    ("\\boxed{1}+\\boxed{2}", "2"),  # not one box around the whole answer
    ("9" * 5000, "9" * 4999),  # too long to parse: strings only
]


@pytest.mark.parametrize("pred, truth", EQUIVALENT)
def test_equivalent(pred, truth):
    assert is_equivalent(pred, truth, timeout_s=VERDICT_S)
    assert is_equivalent(truth, pred, timeout_s=VERDICT_S)


@pytest.mark.parametrize("pred, truth", NOT_EQUIVALENT)
def test_not_equivalent(pred, truth):
    assert not is_equivalent(pred, truth, timeout_s=LIMIT_S)


def test_exact_numbers_need_no_math_verify():
    # timeout_s=0 disables math-verify: plain numbers are still decided exactly.
    assert is_equivalent("\\dfrac{6}{8}", "0.75", timeout_s=0)
    assert not is_equivalent("86", "68", timeout_s=0)
    assert not is_equivalent("\\{1,2\\}", "\\{2,1\\}", timeout_s=0)


TEXTS = [
    ("so the result is \\boxed{\\frac{1}{\\sqrt{2}}} and done", "\\frac{1}{\\sqrt{2}}"),
    ("\\boxed{1} first, then \\boxed{\\{1, \\{2\\}\\}}", "\\{1, \\{2\\}\\}"),  # nested braces
    ("\\fbox{42}", "42"),
    # A brace after a LaTeX line break "\\\\" is a brace (an even run of backslashes).
    ("\\boxed{\\begin{pmatrix}1\\\\{-2}\\end{pmatrix}}", "\\begin{pmatrix}1\\\\{-2}\\end{pmatrix}"),
    ("\\boxed{1\\\\}", "1\\\\"),
    ("\\boxed 7", "7"),
    ("\\boxed{3} then \\boxed{4", None),  # the last box is never closed: truncated
    ("Natalia sold 48/2 = 24 clips.\n#### 1,234", "1,234"),
    ("The answer is $\\frac{3}{4}$.", "\\frac{3}{4}"),
    ("So the final answer is 3.5.", "3.5"),
    ("Final answer: 12", "12"),
    ("the answer is 7 at first.\nAfter fixing it, the answer is: 24", "24"),
    ("I think it is 42", None),  # a number is not an answer
    ("", None),
    ("<start_of_thought><conclusion>\\boxed{86}<end_of_thought><start_of_rating>", "86"),
    ("<expansion>42 * 3 = 126<end_of_thought>...<conclusion>126<end_of_thought>", "126"),
    ("<conclusion>The answer is 7.", "7"),
    ("<conclusion>x = 5", "x = 5"),
    ("<conclusion>The value we get is 86 after all steps", None),  # prose, no marker
    ("<conclusion><end_of_thought>", None),
    ("<conclusion>\\boxed{1}<end_of_thought>\n<critic>no<end_of_thought>", "1"),
    # The stating sentence ends before the commentary (the rest of the line was the answer).
    ("The answer is 5. I hope it is correct.", "5"),
    ("So the answer is 12, since 3 * 4 = 12.", "12"),
    ("Answer: 12. Check: 3 * 4 = 12", "12"),
    ("the answer is -3.5, as shown", "-3.5"),
    ("The answer is 1, 2, 3.", "1, 2, 3"),  # a comma before a value: one answer
    ("the answer is 2, 3, and 4", "2, 3, and 4"),
    ("**Answer**: 5", "5"),  # Markdown emphasis between the marker and its colon
]


@pytest.mark.parametrize("text, expected", TEXTS)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_intermediate_step_is_not_an_answer():
    # An expansion that mentions (even boxes, or states) the true answer is not a final answer.
    for step in ["<expansion>17 + 25 = 42", "<expansion>so \\boxed{42}", "<expansion>answer is 42"]:
        text = f"<start_of_thought>{step}<end_of_thought><start_of_rating>"
        assert extract_answer(text) is None
        assert not is_correct(text, "42")
    assert is_correct("<start_of_thought><conclusion>\\boxed{42}<end_of_thought>", "42")


@pytest.mark.parametrize("pred", ["10^{10^{10^{10}}}", "9^{9^{9^{9^{9}}}}"])
def test_pathological_input_is_cut_off(pred):
    start = time.monotonic()
    assert not is_equivalent(pred, "1", timeout_s=LIMIT_S)
    assert time.monotonic() - start < 5 * LIMIT_S
    assert is_equivalent("\\{1,2\\}", "\\{2,1\\}")  # the worker was replaced and works


def test_safe_from_other_threads():
    results = {}

    def work(name, pred, truth, timeout_s):
        start = time.monotonic()
        results[name] = (is_equivalent(pred, truth, timeout_s=timeout_s), time.monotonic() - start)

    # A slow (cut off) check and two normal ones, at once, none in the main thread.
    jobs = [
        ("hang", "10^{10^{10^{10}}}", "1", LIMIT_S),
        ("set", "\\{1,2\\}", "\\{2,1\\}", VERDICT_S),
        ("expr", "(x+1)^2", "x^2+2x+2", LIMIT_S),
    ]
    threads = [threading.Thread(target=work, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results["hang"][0] is False and results["set"][0] is True and results["expr"][0] is False
    # Calls are serialised: the slowest waits for the others, within a generous bound.
    assert max(r[1] for r in results.values()) < 5 * (LIMIT_S + 1.0)


PERCENT_PAIRS = [("1\\%", "100\\%"), ("0.5%", "50%"), ("100%", "1\\%"), ("0.25\\%", "25%")]


@pytest.mark.parametrize("pred, truth", PERCENT_PAIRS)
@pytest.mark.parametrize("timeout_s", [0, LIMIT_S])
def test_two_percents_compare_as_written(pred, truth, timeout_s):
    # n% reads as n or n/100 only against a plain number; two percents compare n with m.
    assert not is_equivalent(pred, truth, timeout_s=timeout_s)
    assert not is_equivalent(truth, pred, timeout_s=timeout_s)
    assert not is_correct(f"so \\boxed{{{pred}}}", truth, timeout_s=timeout_s)
    assert is_equivalent("12.5%", "\\frac{25}{2}\\%", timeout_s=timeout_s)
    assert is_equivalent("50%", "0.5", timeout_s=timeout_s)


HEDGED = [
    ("3 or more", "3"),
    ("7 or fewer", "7"),
    ("5\\text{ or more}", "5"),
    ("10 at least", "10"),
    ("5 or less", "5"),
]


@pytest.mark.parametrize("pred, truth", HEDGED)
@pytest.mark.parametrize("timeout_s", [0, LIMIT_S])
def test_hedged_answer_is_not_its_number(pred, truth, timeout_s):
    # Trailing words with a logical / comparative word are a qualification, not a unit.
    assert not is_equivalent(pred, truth, timeout_s=timeout_s)
    assert not is_equivalent(truth, pred, timeout_s=timeout_s)
    assert is_equivalent(pred, pred, timeout_s=timeout_s)
    assert is_equivalent("12 square feet", "12", timeout_s=timeout_s)


@pytest.mark.parametrize(
    "text",
    [
        "The answer is \\boxed{3}. Wait, let me redo this: \\boxed{4",
        "#### 3\nso \\boxed{3} or rather \\boxed{4",
        "<conclusion>The answer is \\boxed{3}, no: \\boxed{4",
    ],
)
def test_truncated_last_box_is_no_answer(text):
    # The last box is never closed: no other marker stands in for it.
    assert extract_answer(text) is None
    assert not is_correct(text, "3", timeout_s=LIMIT_S)


@pytest.mark.parametrize(
    "text",
    [
        "The result is 12 before doubling, so the answer is 24.",
        "The answer is 24. The result is consistent with the check.",
        "<conclusion>The result is 12, so the final answer is 24<end_of_thought>",
    ],
)
def test_last_answer_marker_wins(text):
    # One marker's answer never runs over a later marker on the same line.
    assert extract_answer(text) == "24"
    assert answers.vote_key(extract_answer(text)) == answers.vote_key("24")
    assert is_correct(text, "24", timeout_s=0)


def test_bad_types():
    with pytest.raises(TypeError):
        is_equivalent(5, "5")
    with pytest.raises(TypeError):
        extract_answer(None)


def test_vote_weights_and_groups():
    assert answers.vote(["14", "x = 14", "3"], [0.3, 0.3, 0.5]) == "14"
    assert answers.vote(["3", None, "4"], np.asarray([1.0, 9.0, 2.0])) == "4"
    assert answers.vote([None]) is None


def test_vote_counts_a_non_finite_weight_as_zero():
    """A NaN weight first must not win (max over NaN scores keeps the first key)."""
    assert answers.vote(["1", "2"], [float("nan"), 1.0]) == "2"
    assert answers.vote(["1", "1", "2"], [float("inf"), 0.5, 0.7]) == "2"
    assert answers.vote(["1", "2"], [float("-inf"), -1.0]) == "1"  # 0 beats -1


def test_vote_rejects_a_str_and_mismatched_weights():
    with pytest.raises(TypeError, match="answers must be a sequence, not a str"):
        answers.vote("12")
    with pytest.raises(ValueError, match="2 weights for 1 answers"):
        answers.vote(["1"], [1.0, 9.0])
    with pytest.raises(ValueError, match="1 weights for 2 answers"):
        answers.vote(["1", "2"], [1.0])


NUMBER_WORDS_EQUAL = [
    ("3 million", "3000000"),
    ("3 \\text{ million}", "3000000"),
    ("2.5 billion dollars", "2500000000"),
    ("5 hundred", "500"),
    ("3 hundred thousand", "300000"),
    ("3 dozen", "36"),
    ("2 thousand", "2,000"),
    ("\\frac{1}{2}\\text{ million}", "500000"),
    ("2 pi", "2\\pi"),
    ("50 percent", "0.5"),
    ("50 percent", "50\\%"),
    ("50\\text{ percent}", "0.5"),
    ("12.5 per cent", "\\frac{1}{8}"),
    ("3 halves", "3/2"),
    ("2 fifths", "0.4"),
    ("1 quarter", "0.25"),
    ("5 meters squared", "5"),  # after a unit word, "squared" is the unit's
]
NUMBER_WORDS_UNEQUAL = [
    ("3 million", "3"),
    ("3 \\text{ million}", "3"),
    ("5 hundred", "5"),
    ("3 dozen", "3"),
    ("2 thousand", "2"),
    ("2 pi", "2"),
    ("1 percent", "100\\%"),  # two percents compare as written, as "1%" vs "100%" does
    ("3 halves", "3"),
    ("4 squared", "4"),  # a power right after the value was dropped as a unit: "4" == "4 squared"
    ("2 cubed", "2"),
]


@pytest.mark.parametrize("pred, truth", NUMBER_WORDS_EQUAL)
@pytest.mark.parametrize("timeout_s", [0, LIMIT_S])
def test_number_words_are_read_not_dropped(pred, truth, timeout_s):
    # "million", "dozen" scale the number; "percent" is "%" (so "50 percent" is 50 or 0.5, as
    # "50%" is); "pi" is the constant. Decided without math-verify.
    assert is_equivalent(pred, truth, timeout_s=timeout_s)
    assert is_equivalent(truth, pred, timeout_s=timeout_s)
    if "cent" not in pred:  # percent, per cent
        assert answers.vote_key(pred) == answers.vote_key(truth)
    else:
        number = re.match(r"[\d.]+", pred).group()
        assert answers.vote_key(pred) == answers.vote_key(f"{number}%")


@pytest.mark.parametrize("pred, truth", NUMBER_WORDS_UNEQUAL)
@pytest.mark.parametrize("timeout_s", [0, LIMIT_S])
def test_number_words_are_not_units(pred, truth, timeout_s):
    assert not is_equivalent(pred, truth, timeout_s=timeout_s)
    assert not is_equivalent(truth, pred, timeout_s=timeout_s)
    assert answers.vote_key(pred) != answers.vote_key(truth)


@pytest.mark.parametrize("timeout_s", [0, LIMIT_S])
def test_spaces_between_digit_groups_of_three_are_thousands_separators(timeout_s):
    for spaced in ["1 000 000", "\\boxed{1 000 000}", "1 000 000 people"]:
        assert is_equivalent(spaced, "1000000", timeout_s=timeout_s)
        assert is_equivalent("1,000,000", spaced, timeout_s=timeout_s)
    assert answers.vote_key("12 345") == answers.vote_key("12345")
    assert is_equivalent("1 1/2", "3/2", timeout_s=timeout_s)  # a mixed number is one value
    assert not is_equivalent("1 1/2", "11/2", timeout_s=timeout_s)
    assert is_equivalent("\\frac 1 2", "\\frac12", timeout_s=timeout_s)  # one-digit arguments


@pytest.mark.parametrize("pred, truth", [("1 2", "12"), ("3 5", "35"), ("1 000 12", "100012")])
@pytest.mark.parametrize("timeout_s", [0, LIMIT_S])
def test_other_spaces_between_digits_separate_numbers(pred, truth, timeout_s):
    # Such an answer equals only itself (math-verify would read "1 2" as 1 + 2).
    assert not is_equivalent(pred, truth, timeout_s=timeout_s)
    assert not is_equivalent(truth, pred, timeout_s=timeout_s)
    assert answers.vote_key(pred) != answers.vote_key(truth)
    assert is_equivalent(pred, pred, timeout_s=timeout_s)
    assert not is_equivalent(pred, str(sum(map(int, pred.split()))), timeout_s=timeout_s)


@pytest.mark.parametrize(
    "pred, truth", [("1\\,2", "12"), ("1\\ 2", "12"), ("1~2", "12"), ("3\\;5", "35")]
)
@pytest.mark.parametrize("timeout_s", [0, LIMIT_S])
def test_latex_spacing_between_digits_is_a_space(pred, truth, timeout_s):
    # "1\,2" is "1 2", two numbers, not 12; between digit groups of three it still joins them.
    assert not is_equivalent(pred, truth, timeout_s=timeout_s)
    assert not is_equivalent(truth, pred, timeout_s=timeout_s)
    assert answers.vote_key(pred) != answers.vote_key(truth)
    for spaced in ["1\\,000", "1\\!000", "1~000", "1\\ 000"]:
        assert is_equivalent(spaced, "1000", timeout_s=timeout_s)
    assert is_equivalent("10\\,000\\,000", "10^7", timeout_s=VERDICT_S)


MINERVA = "Final Answer: The final answer is ${}$. I hope it is correct."


@pytest.mark.parametrize(
    "text, expected, truth",
    [
        (MINERVA.format("\\frac{1}{2}"), "\\frac{1}{2}", "0.5"),  # MATH's few-shot format
        (MINERVA.format("(1,2)"), "(1,2)", "(1, 2)"),
        ("The answer is $$\\frac12$$", "\\frac12", "0.5"),
        ("So the answer is \\(\\frac{3}{4}\\) of the cake.", "\\frac{3}{4}", "0.75"),
        ("The answer is **$\\frac{1}{2}$**.", "\\frac{1}{2}", "1/2"),
        ("The answer is **5**.", "5", "5"),  # Markdown emphasis
    ],
)
def test_answer_is_a_maths_span(text, expected, truth):
    assert extract_answer(text) == expected
    assert is_correct(text, truth, timeout_s=VERDICT_S)


@pytest.mark.parametrize("text", ["The answer is $5$ and $6$.", "The answer is $5$, not $6$."])
def test_answer_is_a_maths_span_only_when_alone(text):
    # Several maths spans after the marker: the whole line, an answer equal to neither.
    assert not is_correct(text, "5", timeout_s=LIMIT_S)
    assert not is_correct(text, "6", timeout_s=LIMIT_S)


@pytest.mark.parametrize("timeout_s", [0, LIMIT_S])
def test_degrees_of_a_temperature(timeout_s):
    for pred in ["20^\\circ C", "20°C", "20^{\\circ}F", "20^\\circ \\text{C}"]:
        assert is_equivalent(pred, "20", timeout_s=timeout_s)
        assert not is_equivalent(pred, "21", timeout_s=timeout_s)


# An inequality in one variable against an interval, either way round (math-verify reads an
# inequality only as the truth; these were false negatives as the prediction).
INEQUALITY_INTERVAL = [
    ("x \\le 3", "(-\\infty, 3]"),
    ("x \\leq 3", "(-\\infty,3]"),
    ("3 \\ge x", "(-\\infty, 3]"),
    ("x > 2", "(2, \\infty)"),
    ("x \\geqslant -1", "[-1, \\infty)"),
    ("x ≥ 3", "[3,\\infty)"),
    ("x >= 3", "[3,\\infty)"),
    ("2 < x \\le 5", "(2, 5]"),
    ("5 > x \\ge 2", "[2, 5)"),
    ("x < 3", "3 > x"),  # two inequalities in the same variable
]


@pytest.mark.parametrize("pred, truth", INEQUALITY_INTERVAL)
@pytest.mark.parametrize("timeout_s", [0, LIMIT_S])
def test_an_inequality_equals_its_interval(pred, truth, timeout_s):
    assert is_equivalent(pred, truth, timeout_s=timeout_s)
    assert is_equivalent(truth, pred, timeout_s=timeout_s)
    assert answers.vote_key(pred) == answers.vote_key(truth)  # counted together in maj@k


@pytest.mark.parametrize(
    "pred, truth",
    [
        ("x < 3", "(-\\infty, 3]"),  # open against closed
        ("x \\le 3", "(-\\infty, 4]"),
        ("2 < x < 3", "[2, 3)"),
        ("x < 3", "y < 3"),  # another variable
        ("x < 3", "x \\le 3"),
    ],
)
def test_an_inequality_equals_no_other_interval(pred, truth):
    assert not is_equivalent(pred, truth, timeout_s=LIMIT_S)
    assert not is_equivalent(truth, pred, timeout_s=LIMIT_S)


@pytest.mark.parametrize(
    "pred, truth",
    [
        ("0.\\overline{3}", "\\frac{1}{3}"),
        ("0.1\\overline{6}", "1/6"),
        ("0.\\overline{142857}", "\\frac{1}{7}"),
        ("2.\\overline{45}", "\\frac{27}{11}"),
        ("-1.\\overline{3}", "-\\frac{4}{3}"),
        ("0.\\overline{9}", "1"),
    ],
)
def test_a_repeating_decimal_is_its_exact_fraction(pred, truth):
    # Decided exactly, without math-verify (which read \overline as no number at all).
    assert is_equivalent(pred, truth, timeout_s=0)
    assert is_equivalent(truth, pred, timeout_s=VERDICT_S)
    assert not is_equivalent(pred, "0.3", timeout_s=0)
    assert answers.vote_key(pred) == answers.vote_key(truth)
