"""Final-answer extraction and equivalence checking, without eval().

`extract_answer` takes the answer only from an explicit final-answer marker: in long-CoT text the
last `<conclusion>` thought (an `<expansion>` that mentions a number is not an answer); in plain
text the last `\\boxed{}` / `\\fbox{}`, GSM8K's `#### N`, or "the answer is X".

`is_equivalent` decides in three stages:
1. normalised strings (LaTeX spacing, `\\dfrac`, `$`, units, degrees, a leading `x =` dropped);
   a value qualified by trailing words ("3 or more") is not a unit and equals only itself;
   number words scale the value ("3 million" is 3000000, "3 dozen" 36), "pi" is the constant
   ("2 pi" is `2\\pi`), "50 percent" is "50%"; whitespace between digits is a thousands
   separator only between groups of three ("1 000 000"), else it separates two numbers ("1 2"),
   and such an answer equals only itself; an inequality in one variable ("x \\le 3",
   "2 < x < 5") is written as its interval when the other side is an interval or the same
   variable's inequality;
2. exact rationals (fractions.Fraction from integers, decimals, `a/b`, `\\frac{a}{b}`, mixed
   numbers `1 1/2`, repeating decimals `0.1\\overline{6}`, thousands commas, a percent against
   a plain number read as either n or n/100, two percents compared as written); when both
   sides are exact numbers this decides;
3. math-verify (sets, intervals, expressions, 1/3 vs 0.333333) in a worker process, under a
   wall-clock limit. math-verify's own timeouts use SIGALRM, which works only in the main thread
   and cannot stop a computation stuck in C (`10^{10^{10^{10}}}` is one); the worker is killed
   instead, so the limit holds from any thread and for any input. A timeout or an error counts
   as "not equivalent".
"""

from __future__ import annotations

import atexit
import json
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

from o1jax.data.longcot import (
    ACTIONS,
    CONCLUSION,
    END_OF_THOUGHT,
    SPECIAL_TOKENS,
    START_OF_THOUGHT,
)

MAX_ANSWER_CHARS = 1000  # longer answers are compared as normalised strings only
WORKER_START_TIMEOUT_S = 60.0  # a fresh worker's import of math-verify (not counted in timeout_s)


# ----------------------------------------------------------------------------- extraction
_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*(\{|[^\s{$])")
_GSM8K_RE = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS_RE = re.compile(
    r"(?:\bthe\s+)?(?:final\s+)?(answer|result)\**\s*(?:is|:)\s*:?\s*", re.IGNORECASE
)
# Where the sentence that states an answer ends and commentary begins: a sentence break before a
# capital ("5. I hope it is correct", "12. Check: ..."), or a comma before a word that gives a
# reason ("12, since 3 * 4 = 12"). Not a comma before a value: "1, 2, 3" is one answer.
_ANSWER_END_RE = re.compile(
    r"[.;!?]\s+(?=[A-Z])"
    r"|,\s+(?=(?i:since|because|as|so|which|where|from|by|using|giving|then|thus|hence)\b)"
)
_PROSE_RE = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{3,}")
_LONGCOT_MARKERS = (*ACTIONS, START_OF_THOUGHT, END_OF_THOUGHT)
# One maths span: $$...$$, $...$ (escaped dollars inside), \(...\), \[...\].
_MATH_SPAN_RE = re.compile(r"\$\$(.+?)\$\$|\$((?:[^$\\]|\\.)+)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]")
_MORE_MATH_RE = re.compile(r"[\d$]|\\[(\[]")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` (nested braces), or of `\\boxed 5`.

    None when there is none, or when the last one is never closed (a truncated generation).
    """
    matches = list(_BOX_RE.finditer(text))
    if not matches:
        return None
    m = matches[-1]
    if m.group(1) != "{":
        return m.group(1) + re.match(r"[^\s$]*", text[m.end() :]).group()
    close = _closing_brace(text, m.end())
    return None if close is None else text[m.end() : close].strip()


def _closing_brace(text: str, start: int) -> int | None:
    """Index of the `}` closing a group opened just before `start` (`\\{`, `\\}` skipped; a
    brace after a line break `\\\\` is a brace: only an odd run of backslashes escapes)."""
    depth = 1
    for i in range(start, len(text)):
        c = text[i]
        if c in "{}":
            j = i
            while j > 0 and text[j - 1] == "\\":
                j -= 1
            if (i - j) % 2:  # an odd run of backslashes before it
                continue
            depth += 1 if c == "{" else -1
            if depth == 0:
                return i
    return None


def _trim(answer: str) -> str:
    """Drops surrounding whitespace, dollars, Markdown emphasis (`**5**`) and a sentence's final
    period."""
    before = None
    while answer != before:
        before = answer
        answer = answer.strip().strip("$").strip("*").removesuffix(".")
    return answer


def _answer_is(text: str) -> str | None:
    """The rest of the line after the last "answer is" marker ("result is" only when no
    "answer" marker is present), up to the next marker: one marker's answer never swallows a
    later one ("the result is 12, so the answer is 24" gives 24). When it opens with a maths
    span and the rest of the line holds no other number or maths, the span alone ("The final
    answer is $\\frac{1}{2}$. I hope it is correct." gives `\\frac{1}{2}`; "$5$ or $6$" stays
    whole, an answer equal to neither). Otherwise the line up to where its sentence ends
    (`_ANSWER_END_RE`: "12, since 3 * 4 = 12" gives 12, "5. I hope it is correct." 5)."""
    marks = list(_ANSWER_IS_RE.finditer(text))
    if not marks:
        return None
    answers = [i for i, m in enumerate(marks) if m.group(1).lower() == "answer"]
    i = answers[-1] if answers else len(marks) - 1
    end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
    line = text[marks[i].end() : end].split("\n", 1)[0]
    lead = line.lstrip("* \t")
    span = _MATH_SPAN_RE.match(lead)
    if span and not _MORE_MATH_RE.search(lead[span.end() :]):
        return _trim(next(g for g in span.groups() if g is not None)) or None
    end = _ANSWER_END_RE.search(line)
    return _trim(line[: end.start()] if end else line) or None


def _marked_answer(text: str) -> str | None:
    """The answer of a final-answer marker in `text`: boxed, then `####`, then "answer is".

    A box that is present but whose last one is never closed (a truncated generation) gives
    None: the other markers are not consulted, since they would credit an earlier, abandoned box.
    """
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed or None
    if _BOX_RE.search(text):
        return None
    found = _GSM8K_RE.findall(text)
    if found:
        return _trim(found[-1]) or None
    return _answer_is(text)


def extract_answer(text: str) -> str | None:
    """The final answer stated in `text`, or None (see the module docstring for the rules).

    Long-CoT text (any action tag or thought delimiter in it): only the last `<conclusion>`
    thought counts: a marker inside it, else the whole thought when it is short maths (no prose
    word of 3+ letters, at most 64 characters). No conclusion: None.
    """
    if not isinstance(text, str):
        raise TypeError(f"extract_answer expects a str, got {type(text).__name__}")
    if any(m in text for m in _LONGCOT_MARKERS):
        at = text.rfind(CONCLUSION)
        if at < 0:
            return None
        thought = text[at + len(CONCLUSION) :]
        ends = [i for t in SPECIAL_TOKENS if (i := thought.find(t)) >= 0]
        thought = thought[: min(ends)] if ends else thought
        answer = _marked_answer(thought)
        if answer is not None or _BOX_RE.search(thought):
            return answer
        bare = _trim(thought)
        if bare and len(bare) <= 64 and not _PROSE_RE.search(bare):
            return bare
        return None
    return _marked_answer(text)


# ----------------------------------------------------------------------------- normalisation
_DELIMS = ((r"\(", r"\)"), (r"\[", r"\]"), ("$$", "$$"), ("$", "$"))
_TEXT_RE = re.compile(r"\\(?:text|textbf|mbox|mathrm)\s*\{([^{}]*)\}")
_UNIT_SUFFIX_RE = re.compile(r"^(.*?\S)\s*\\(?:text|mbox|mathrm)\s*\{([^{}]*)\}$")
_WORD_UNIT_RE = re.compile(
    r"^([+-]?[\d.,]*\d)\s+([A-Za-z]{2,}(?:[\sA-Za-z./]*[A-Za-z.])?(?:\^\{?[23]\}?)?)$"
)
# Words that make a trailing phrase a qualification ("3 or more", "5 at least"), not a unit.
_HEDGE_WORDS = frozenset(
    "or and nor to not than more less fewer greater least most at between plus minus "
    "above below over under about approximately".split()
)
# Leading words of a "unit" that change the value: multipliers scale it, "percent" is "%",
# a constant is kept as its LaTeX command. The words after them are the unit proper.
_MULTIPLIERS = {
    "dozen": Fraction(12),
    "hundred": Fraction(100),
    "thousand": Fraction(10**3),
    "million": Fraction(10**6),
    "billion": Fraction(10**9),
    "trillion": Fraction(10**12),
    "tenth": Fraction(1, 10),
    "hundredth": Fraction(1, 100),
    "thousandth": Fraction(1, 1000),
    "millionth": Fraction(1, 10**6),
    "half": Fraction(1, 2),
    "halves": Fraction(1, 2),
    "third": Fraction(1, 3),
    "quarter": Fraction(1, 4),
    "fourth": Fraction(1, 4),
    "fifth": Fraction(1, 5),
    "sixth": Fraction(1, 6),
    "seventh": Fraction(1, 7),
    "eighth": Fraction(1, 8),
    "ninth": Fraction(1, 9),
}
# A power written out right after the value ("4 squared" is 16): kept whole, never a unit.
# After a unit word it belongs to the unit ("5 meters squared" is 5).
_POWER_WORDS = frozenset({"squared", "cubed"})
_CONSTANTS = {"pi": r"\pi"}
# Digit groups of three split by single spaces ("1 000 000", "12 345.5"): one number.
# LaTeX spacing between two digits ("1\\,000", "1\\ 2"): read as a space, so that it joins only
# digit groups of three, as a space does.
_DIGIT_SPACING_RE = re.compile(r"(?<=\d)(?:\s*(?:\\[,;:! ]|~)\s*)+(?=\d)")
_SPACED_THOUSANDS_RE = re.compile(r"(?<![\d.])(?<!\d\s)\d{1,3}(?:\s\d{3})+(?!\d|\s\.?\d)")
_ASSIGN_RE = re.compile(r"^[A-Za-z]\s*=\s*(?=\S)")
_SPACING = (r"\left", r"\right", r"\displaystyle", r"\!", r"\,", r"\;", r"\:", r"\ ", "~")
# A degree mark, with the C / F of a temperature after it ("20^\\circ C", "68°F").
_DEGREES_RE = re.compile(
    r"\s*(?:\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|°|\\degree)(?:\s*[CF](?![A-Za-z]))?"
)


def _is_hedge(words: str) -> bool:
    return any(w in _HEDGE_WORDS for w in re.findall(r"[a-z]+", words.lower()))


def _hedged(cleaned: str) -> bool:
    """Whether a cleaned answer is a value qualified by trailing words ("3 or more",
    "5\\text{ or more}"), which `_clean` keeps: not one exact value."""
    for pattern in (_UNIT_SUFFIX_RE, _WORD_UNIT_RE):
        m = pattern.match(cleaned)
        if m and _is_hedge(m.group(2)):
            return True
    return False


def _multiplier(word: str) -> Fraction | None:
    return _MULTIPLIERS.get(word) or _MULTIPLIERS.get(word.removesuffix("s"))


def _format(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def _without_unit(value: str, words: str) -> str | None:
    """`value` followed by the trailing `words`, with the unit dropped; None to keep it all.

    Leading multiplier words scale the value ("3 million" -> "3000000", "3 halves" -> "3/2";
    kept whole when the value is not a plain number), then "percent" / "per cent" becomes "%"
    and a constant its command ("2 pi" -> "2\\pi"); the remaining words are the unit. Kept
    whole when a word is a logical or comparative one (`_HEDGE_WORDS`): "3 or more" is no
    unit; so is a power right after the value ("4 squared")."""
    if _is_hedge(words):
        return None
    tokens = re.findall(r"[a-z]+", words.lower())
    if tokens[:1] and tokens[0] in _POWER_WORDS:
        return None
    scale, i = Fraction(1), 0
    while i < len(tokens) and (factor := _multiplier(tokens[i])) is not None:
        scale, i = scale * factor, i + 1
    if i:
        number = _numbers(value)
        if number is None or number[1]:
            return None
        value = _format(number[0] * scale)
    if tokens[i : i + 1] == ["percent"] or tokens[i : i + 2] == ["per", "cent"]:
        value += "%"
    elif i < len(tokens) and tokens[i] in _CONSTANTS:
        value += _CONSTANTS[tokens[i]]
    return value


def _clean(answer: str) -> str:
    """Light clean-up that keeps spaces: delimiters, box, dollars, units, `x =`.

    Trailing words are dropped as a unit only when none of them is a logical or comparative
    word (`_HEDGE_WORDS`): "5 cm" becomes "5", "3 or more" stays; number words, "percent" and
    "pi" among them are read, not dropped (`_without_unit`). Digit groups of three split by
    spaces are joined ("1 000 000" -> "1000000")."""
    s = answer.strip()
    for _ in range(3):  # nested wrappers such as $\boxed{...}$
        before = s
        for left, right in _DELIMS:
            if len(s) > len(left) + len(right) and s.startswith(left) and s.endswith(right):
                s = s[len(left) : len(s) - len(right)].strip()
        box = re.match(r"\\(?:boxed|fbox)\s*\{", s)
        if box and _closing_brace(s, box.end()) == len(s) - 1:
            s = s[box.end() : -1].strip()
        whole = _TEXT_RE.fullmatch(s)
        if whole:
            s = whole.group(1).strip()
        if s == before:
            break
    s = s.replace(r"\$", "").replace("$", "").strip()
    s = _DIGIT_SPACING_RE.sub(" ", s)
    s = _SPACED_THOUSANDS_RE.sub(lambda m: re.sub(r"\s", "", m.group()), s)
    for pattern in (_UNIT_SUFFIX_RE, _WORD_UNIT_RE):
        unit = pattern.match(s)
        if unit and (value := _without_unit(unit.group(1), unit.group(2))) is not None:
            s = value
    s = _ASSIGN_RE.sub("", s)
    s = _DEGREES_RE.sub("", s)
    return re.sub(r"\.$", "", s.strip()).strip()


def _compact(cleaned: str) -> str:
    """String form for comparison: no spacing commands, one `\\frac` spelling, no whitespace
    except one space between two digits, which separates two numbers ("1 2" is not "12"; the
    digit groups of "1 000" were joined by `_clean`)."""
    s = cleaned
    for sp in _SPACING:
        s = s.replace(sp, "")
    s = s.replace(r"\dfrac", r"\frac").replace(r"\tfrac", r"\frac").replace(r"\%", "%")
    s = _TEXT_RE.sub(r"\1", s)
    s = re.sub(r"(\\(?:frac|binom)\s*\d)\s+(?=\d)", r"\1", s)  # \frac 1 2 is \frac12
    s = re.sub(r"\s+", " ", s)
    s = re.sub(r"(?<!\d) | (?!\.?\d)", "", s)
    return re.sub(r"^\(([A-Za-z])\)$", r"\1", s)  # multiple choice: (A) -> A


_THOUSANDS_RE = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_DECIMAL_RE = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)$")
_SLASH_RE = re.compile(r"^([+-]?\d+)/([+-]?\d+)$")
_MIXED_RE = re.compile(r"^([+-]?)(\d+) (\d+)/(\d+)$")  # "1 1/2" (compacted): 3/2
_FRAC_RE = re.compile(r"^([+-]?)\\frac(?:\{([+-]?\d+)\}|(\d))(?:\{([+-]?\d+)\}|(\d))$")
# "0.1\overline{6}" (compacted): 1/6. Groups: sign, whole part, plain decimals, repeating block.
_REPEATING_RE = re.compile(r"^([+-]?)(\d*)\.(\d*)\\overline(?:\{(\d+)\}|(\d))$")


def _repeating(m: re.Match) -> Fraction:
    whole, plain, block = m.group(2) or "0", m.group(3), m.group(4) or m.group(5)
    value = int(whole) + Fraction(int(plain or "0"), 10 ** len(plain))
    value += Fraction(int(block), (10 ** len(block) - 1) * 10 ** len(plain))
    return -value if m.group(1) == "-" else value


def _numbers(cleaned: str) -> tuple[Fraction, bool, bool] | None:
    """The exact value written (without its percent sign), whether it is a percent, and whether
    a decimal point was written; None when it is not a plain number."""
    s = cleaned.strip()
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    s = _compact(s)
    percent = s.endswith("%")
    s = s.removesuffix("%")
    value: Fraction | None = None
    if _DECIMAL_RE.match(s):
        value = Fraction(s)
    elif m := _SLASH_RE.match(s):
        if int(m.group(2)) != 0:
            value = Fraction(int(m.group(1)), int(m.group(2)))
    elif (m := _MIXED_RE.match(s)) and int(m.group(3)) < int(m.group(4)):
        value = (int(m.group(2)) + Fraction(int(m.group(3)), int(m.group(4)))) * (
            -1 if m.group(1) == "-" else 1
        )
    elif m := _FRAC_RE.match(s):
        num, den = int(m.group(2) or m.group(3)), int(m.group(4) or m.group(5))
        if den != 0:
            value = Fraction(num, den) * (-1 if m.group(1) == "-" else 1)
    elif m := _REPEATING_RE.match(s):
        return _repeating(m), percent, False  # exact, unlike a written-out decimal
    if value is None:
        return None
    return value, percent, "." in s


def _separate_numbers(cleaned: str) -> bool:
    """Whether a cleaned answer has two numbers side by side ("1 2"), not one mixed number
    ("1 1/2"): it equals only itself."""
    return re.search(r"\d \.?\d", _compact(cleaned)) is not None and _numbers(cleaned) is None


def _readings(value: Fraction, percent: bool) -> set[Fraction]:
    """Values a number may denote: a percent "n%" is read as n or n/100."""
    return {value, value / 100} if percent else {value}


def vote_key(answer: str) -> str:
    """A key under which equal answers are counted together: the exact value of a plain number
    ("14", "14.0", "x = 14" and "\\boxed{14}" share one), the interval of a one-variable
    inequality ("x \\le 3" and "(-\\infty, 3]"), else the compacted text."""
    cleaned = _clean(answer)
    numbers = _numbers(cleaned)
    if numbers is not None and len(readings := _readings(*numbers[:2])) == 1:
        return str(next(iter(readings)))
    inequality = _inequality(_compact(_relations_as_symbols(cleaned)))
    return inequality[1] if inequality else _compact(cleaned)


def vote(answers, weights=None) -> str | None:
    """The answer with the largest total weight (default: one per answer), equal answers written
    differently counted together (`vote_key`: "14", "14.0" and "x = 14" are one group). The
    first spelling seen stands for its group; the earliest group wins a tie. None answers are
    skipped; None when there is none.

    answers: a sequence of str / None (a single str is a TypeError); weights: one number per
    answer (another length is a ValueError). A non-finite weight (NaN, +-inf, e.g. the value of
    a diverged model) counts as 0: it neither wins nor vetoes its group."""
    if isinstance(answers, str | bytes):
        raise TypeError(f"vote: answers must be a sequence, not a {type(answers).__name__}")
    answers = list(answers)
    if weights is None:
        weights = [1.0] * len(answers)
    else:
        weights = [float(w) for w in weights]
        if len(weights) != len(answers):
            raise ValueError(
                f"vote: {len(weights)} weights for {len(answers)} answers (one per answer)"
            )
    scores: dict[str, float] = {}
    spelling: dict[str, str] = {}
    for answer, weight in zip(answers, weights, strict=True):
        if answer is not None:
            key = vote_key(answer)
            spelling.setdefault(key, answer)
            scores[key] = scores.get(key, 0.0) + (weight if math.isfinite(weight) else 0.0)
    return spelling[max(scores, key=scores.get)] if scores else None


def _terminates(x: Fraction, places: int = 6) -> bool:
    return (10**places) % x.denominator == 0


# ----------------------------------------------------------------------------- inequalities
# Relation commands as single symbols, before compaction joins "\ge x" into "\gex".
_RELATION_COMMAND_RE = re.compile(r"\\(le|ge|lt|gt)(?:qslant|q)?(?![A-Za-z])")
_SYMBOL = {"le": "≤", "ge": "≥", "lt": "<", "gt": ">", "<=": "≤", ">=": "≥"}
_RELATION_RE = re.compile(r"(≤|≥|<|>)")
_INTERVAL_RE = re.compile(r"^[\[(][^,]+,[^,]+[\])]$|\\cup")


def _relations_as_symbols(cleaned: str) -> str:
    s = _RELATION_COMMAND_RE.sub(lambda m: _SYMBOL[m.group(1)], cleaned)
    return re.sub(r"<=|>=", lambda m: _SYMBOL[m.group()], s)


def _relation(op: str) -> tuple[bool, bool]:
    """(whether `op` says "less", whether it includes equality)."""
    return op in "<≤", op in "≤≥"


def _inequality(compacted: str) -> tuple[str, str] | None:
    r"""(variable, interval) of a one-variable inequality in compacted text with relation
    symbols ("x≤3" -> ("x", "(-\infty,3]"), "2<x≤5" -> ("x", "(2,5]")); None if it is not one."""
    parts = _RELATION_RE.split(compacted)
    bound = lambda b: bool(b) and not re.search(r"[=,]", b)
    is_var = lambda v: re.fullmatch(r"[A-Za-z]", v) is not None
    if len(parts) == 3:
        left, op, right = parts
        less, closed = _relation(op)
        if is_var(left) and bound(right):
            var, value, upper = left, right, less  # x < a: a is an upper bound
        elif is_var(right) and bound(left):
            var, value, upper = right, left, not less  # a < x: a is a lower bound
        else:
            return None
        if upper:
            return var, "(-\\infty," + value + ("]" if closed else ")")
        return var, ("[" if closed else "(") + value + ",\\infty)"
    if len(parts) == 5 and is_var(parts[2]) and bound(parts[0]) and bound(parts[4]):
        (less1, closed1), (less2, closed2) = _relation(parts[1]), _relation(parts[3])
        if less1 != less2:
            return None
        (lo, lo_closed), (hi, hi_closed) = (parts[0], closed1), (parts[4], closed2)
        if not less1:  # a > x > b
            (lo, lo_closed), (hi, hi_closed) = (hi, hi_closed), (lo, lo_closed)
        return parts[2], ("[" if lo_closed else "(") + lo + "," + hi + ("]" if hi_closed else ")")
    return None


def _as_intervals(pred: str, truth: str) -> tuple[str, str]:
    r"""An inequality in one variable is written as its interval when the other side is an
    interval, or the same variable's inequality ("x \le 3" against "(-\infty, 3]"; math-verify
    reads an inequality only on the truth's side)."""
    p, t = _compact(_relations_as_symbols(pred)), _compact(_relations_as_symbols(truth))
    ip, it = _inequality(p), _inequality(t)
    if ip and it:
        return (ip[1], it[1]) if ip[0] == it[0] else (pred, truth)
    if ip and _INTERVAL_RE.search(t):
        return ip[1], truth
    if it and _INTERVAL_RE.search(p):
        return pred, it[1]
    return pred, truth


def _rational_verdict(pred: str, truth: str) -> bool | None:
    """True / False when both sides are plain numbers and exact arithmetic decides; else None.

    A decimal against a non-terminating rational (0.333333 vs 1/3) is left to math-verify,
    which compares to 6 decimal places.
    """
    a, b = _numbers(pred), _numbers(truth)
    if a is None or b is None:
        return None
    (xa, pct_a, dec_a), (xb, pct_b, dec_b) = a, b
    if pct_a and pct_b:  # both percents: compare as written ("1%" is not "100%")
        va, vb = {xa}, {xb}
    else:  # a percent against a plain number: either reading ("50%" is 50 or 0.5)
        va, vb = _readings(xa, pct_a), _readings(xb, pct_b)
    if va & vb:
        return True
    if (dec_a and not all(map(_terminates, vb))) or (dec_b and not all(map(_terminates, va))):
        return None
    return False


# ----------------------------------------------------------------------------- math-verify
class _MathVerifyWorker:
    """A child process running math-verify. Requests are JSON lines on its stdin; replies are
    lines on its stdout: "ready" once, then "1" (equivalent), "0" (not) or "error".

    Requests are serialised by a lock. A request that overruns its limit kills the process; a
    new one is started at once so that its import overlaps with the caller's next work.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._owner = os.getpid()  # a forked child must not share its parent's worker
        self._ready = False
        self._buffer = b""

    def _start(self) -> None:
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "o1jax.data.answers", "--math-verify-worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        self._owner = os.getpid()
        self._ready = False
        self._buffer = b""

    def stop(self) -> None:
        if self._proc is not None and self._owner == os.getpid():
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def _readline(self, deadline: float) -> bytes | None:
        """One reply line, or None at the deadline or if the worker died."""
        out = self._proc.stdout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([out], [], [], remaining)[0]:
                return None
            chunk = os.read(out.fileno(), 1 << 16)
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def start(self) -> bool:
        """Starts the worker if needed and waits until it has imported math-verify."""
        with self._lock:
            return self._ensure_ready()

    def _ensure_ready(self) -> bool:
        if self._owner != os.getpid():
            self._proc = None
        if self._proc is None or self._proc.poll() is not None:
            self._start()
        if not self._ready:
            line = self._readline(time.monotonic() + WORKER_START_TIMEOUT_S)
            self._ready = line == _READY
            if not self._ready:
                self.stop()
        return self._ready

    def verify(self, pred: str, truth: str, timeout_s: float) -> bool | None:
        """math-verify's verdict, or None on timeout or failure."""
        with self._lock:
            if not self._ensure_ready():
                return None
            request = json.dumps({"pred": pred, "truth": truth}).encode() + b"\n"
            try:
                self._proc.stdin.write(request)
                self._proc.stdin.flush()
            except (BrokenPipeError, OSError):
                self.stop()
                return None
            line = self._readline(time.monotonic() + timeout_s)
            if line is None:
                self.stop()
                self._start()
                return None
            return {b"1": True, b"0": False}.get(line)


_READY = b"ready"
_WORKER = _MathVerifyWorker()
atexit.register(_WORKER.stop)


def start_math_verify() -> bool:
    """Starts math-verify's worker now (about a second, once per process) so that the first
    `is_equivalent` that needs it is not delayed. Returns whether it is ready."""
    return _WORKER.start()


def _worker_main() -> None:
    """Entry point of the worker process: reads requests, answers with math-verify's verdict."""
    import logging

    import math_verify

    logging.disable(logging.CRITICAL)  # its "timeout disabled" warnings: the parent times out
    # Replies go to a private copy of stdout; anything else printed lands on stderr (discarded).
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    def reply(line: bytes) -> None:
        out.write(line + b"\n")
        out.flush()

    reply(_READY)
    for line in sys.stdin.buffer:
        try:
            request = json.loads(line)
            gold = math_verify.parse(f"${request['truth']}$", parsing_timeout=None)
            pred = math_verify.parse(f"${request['pred']}$", parsing_timeout=None)
            reply(b"1" if math_verify.verify(gold, pred, timeout_seconds=None) else b"0")
        except Exception:  # any failure is "not equivalent"; keep serving
            reply(b"error")


# ----------------------------------------------------------------------------- equivalence
def is_equivalent(pred: str | None, truth: str, timeout_s: float = 1.0) -> bool:
    """Whether the answer `pred` equals the ground truth `truth` (stages in the module doc).

    timeout_s: wall-clock limit of the math-verify stage, from any thread; <= 0 skips it. The
    worker's start (about a second, once per process, see `start_math_verify`) is not counted.
    """
    if pred is None:
        return False
    if not isinstance(pred, str) or not isinstance(truth, str):
        raise TypeError(
            f"is_equivalent expects str answers, got {type(pred).__name__} and "
            f"{type(truth).__name__}"
        )
    p, t = _clean(pred), _clean(truth)
    if not p or not t:
        return False
    p, t = _as_intervals(p, t)
    if _compact(p) == _compact(t):
        return True
    if _hedged(p) or _hedged(t):  # math-verify would read "3 or more" as 3
        return False
    if _separate_numbers(p) or _separate_numbers(t):  # math-verify reads "1 2" as 3
        return False
    if max(len(p), len(t)) > MAX_ANSWER_CHARS:
        return False
    verdict = _rational_verdict(p, t)
    if verdict is not None:
        return verdict
    if timeout_s <= 0:
        return False
    return bool(_WORKER.verify(p, t, timeout_s))


def is_correct(text: str, truth: str, timeout_s: float = 1.0) -> bool:
    """`is_equivalent(extract_answer(text), truth)`: the reward check of a generated solution."""
    return is_equivalent(extract_answer(text), truth, timeout_s)


if __name__ == "__main__" and sys.argv[1:] == ["--math-verify-worker"]:
    _worker_main()
