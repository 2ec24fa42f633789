"""PPRM pairs mined from the policy's own solutions: verdicts by answer check, pairing."""

from o1jax.data import longcot, tasks
from o1jax.train import evaluate, pprm_mining

QUESTION = "Start with 4, add 5, multiply by 2."


def _text(thoughts, ratings=None):
    """A decoded continuation: the chain after the prompt, as the sampler writes it."""
    return longcot.render_chain(QUESTION, thoughts, ratings)[len(longcot.render_prompt(QUESTION)) :]


RIGHT = _text(["<expansion>4 + 5 = 9", "<expansion>9 * 2 = 18", "<conclusion>\\boxed{18}"])
JOURNEY_RIGHT = _text(
    [
        "<expansion>4 + 5 = 8",
        "<critic>4 + 5 is not 8",
        "<refine>4 + 5 = 9",
        "<expansion>9 * 2 = 18",
        "<conclusion>\\boxed{18}",
    ],
    ["<negative_rating>"] + ["<positive_rating>"] * 4,
)
WRONG = _text(["<expansion>4 + 5 = 9", "<expansion>9 * 2 = 19", "<conclusion>\\boxed{19}"])
NO_ANSWER = _text(["<expansion>4 + 5 = 9"])
BROKEN = "<start_of_thought>4 + <start_of_father_id>"


def test_verdicts_split_by_the_final_answer_and_drop_duplicates_and_answerless_chains():
    right, wrong = pprm_mining.solution_verdicts(
        [RIGHT, WRONG, RIGHT, NO_ANSWER, BROKEN, JOURNEY_RIGHT], "18"
    )
    # The journey amounts to the same solution as RIGHT once its criticised step is dropped.
    assert right == ["<expansion>4 + 5 = 9; <expansion>9 * 2 = 18; <conclusion>\\boxed{18}"]
    # Without a final answer a sample is skipped, not counted wrong: SR-MCTS never asks the
    # PPRM about such a solution.
    assert wrong == ["<expansion>4 + 5 = 9; <expansion>9 * 2 = 19; <conclusion>\\boxed{19}"]


def test_verdicts_skip_chains_that_break_and_keep_steps_rated_negative():
    """A chain that breaks after its first step has no answer (skipped, not a wrong one); steps
    the policy rated negative stay in the text, as search reads them (none becomes '')."""
    broken = _text(["<expansion>4 + 5 = 9"]) + "<start_of_father_id>1<end_of_father_id>oops<eos>"
    neg = ["<negative_rating>"] * 2
    all_negative = _text(["<expansion>4 + 5 = 8", "<conclusion>\\boxed{16}"], neg)
    critiqued = _text(
        ["<conclusion>\\boxed{16}", "<critic>4 + 5 is not 8"],
        ["<negative_rating>", "<positive_rating>"],
    )
    right, wrong = pprm_mining.solution_verdicts([RIGHT, broken, all_negative, critiqued], "18")
    assert len(right) == 1
    assert wrong == ["<expansion>4 + 5 = 8; <conclusion>\\boxed{16}"]
    _, as_thoughts = pprm_mining.solution_verdicts([broken, all_negative], "18", as_thoughts=True)
    assert as_thoughts == [("<expansion>4 + 5 = 8", "<conclusion>\\boxed{16}")]


def test_policy_triples_pair_right_against_wrong_deterministically(monkeypatch):
    problems = [
        tasks.Problem(id="a", question=QUESTION, answer="18"),
        tasks.Problem(id="b", question=QUESTION, answer="7"),  # nothing right: no pair
    ]
    samples = {"a": [RIGHT, WRONG, NO_ANSWER, RIGHT], "b": [RIGHT, WRONG, RIGHT, WRONG]}

    def fake_generate_texts(params, cfg, tokenizer, questions, *, num_samples, **kw):
        assert num_samples == 4
        return [samples[p.id] for p in problems]

    monkeypatch.setattr(evaluate, "generate_texts", fake_generate_texts)
    triples = lambda seed, n: pprm_mining.policy_triples(
        None, None, None, problems, key=None, samples=4, pairs_per_problem=n, seed=seed
    )
    one = triples(0, 1)
    assert len(one) == 1 and one[0][1].endswith("\\boxed{18}")
    both = triples(0, 5)
    # The answerless sample is no rejected solution: RIGHT pairs with WRONG alone.
    assert [t[2] for t in both] == [
        "<expansion>4 + 5 = 9; <expansion>9 * 2 = 19; <conclusion>\\boxed{19}"
    ]
    assert triples(3, 5) == triples(3, 5)


def test_a_chain_that_breaks_before_a_later_rated_step_is_skipped():
    """Text between two steps stops the host's parse after the first conclusion: that node has
    no answer in SR-MCTS (whose device reads every rated step), so it is no mined pair either.
    Whatever follows the last step unrated (EOS, a cut step) does not matter."""
    oops = _text(["<expansion>4 + 5 = 9", "<conclusion>\\boxed{19}"]) + "oops" + WRONG
    right, wrong = pprm_mining.solution_verdicts([oops], "18")
    assert right == [] and wrong == []
    cut = RIGHT + "<start_of_father_id>3<end_of_father_id>junk<eos>"
    assert pprm_mining.solution_verdicts([cut], "18")[0] == [
        "<expansion>4 + 5 = 9; <expansion>9 * 2 = 18; <conclusion>\\boxed{18}"
    ]
