"""OpenLongCoT format: exact rendering, strict round-tripping parser, paths, journeys."""

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from o1jax.data import longcot
from o1jax.data.longcot import (
    ACTIONS,
    CONCLUSION,
    CRITIC,
    EXPANSION,
    NEGATIVE_RATING,
    POSITIVE_RATING,
    PROBLEM,
    RATINGS,
    REFINE,
    SPECIAL_TOKENS,
    UNKNOWN_RATING,
    LongCoTParseError,
    Node,
)

POS, NEG, UNK = POSITIVE_RATING, NEGATIVE_RATING, UNKNOWN_RATING


def test_special_tokens():
    llama_o1 = {
        "<start_of_rating>",
        "<unknown_rating>",
        "<end_of_rating>",
        "<positive_rating>",
        "<negative_rating>",
        "<critic>",
        "<conclusion>",
        "<start_of_thought>",
        "<end_of_thought>",
        "<problem>",
        "<refine>",
        "<start_of_father_id>",
        "<end_of_father_id>",
        "<start_of_local_id>",
        "<end_of_local_id>",
    }
    assert len(SPECIAL_TOKENS) == len(set(SPECIAL_TOKENS)) == 16
    assert set(SPECIAL_TOKENS) == llama_o1 | {"<expansion>"}
    assert set(ACTIONS) | set(RATINGS) <= set(SPECIAL_TOKENS)


def test_render_exact():
    node = Node(3, 5, "17 + 25 = 42", NEG, EXPANSION)
    assert longcot.render_node(node) == (
        "<start_of_father_id>3<end_of_father_id><start_of_local_id>5<end_of_local_id>"
        "<start_of_thought><expansion>17 + 25 = 42<end_of_thought>"
        "<start_of_rating><negative_rating><end_of_rating>"
    )
    assert longcot.render_prompt("What is 2+2?") == (
        "<start_of_father_id>-1<end_of_father_id><start_of_local_id>0<end_of_local_id>"
        "<start_of_thought><problem>What is 2+2?<end_of_thought>"
        "<start_of_rating><positive_rating><end_of_rating>\n"
    )
    assert longcot.step_header(0, 1) == (
        "<start_of_father_id>0<end_of_father_id><start_of_local_id>1<end_of_local_id>"
        "<start_of_thought>"
    )


def _tree():
    return [
        Node(-1, 0, "Q\nwith two lines é", POS, PROBLEM),
        Node(0, 1, "step a", NEG, EXPANSION),
        Node(1, 2, "a is wrong", POS, CRITIC),
        Node(0, 7, "step b", POS, EXPANSION),
        Node(7, 3, "no action tag", UNK, None),
        Node(7, 4, "\\boxed{4}", POS, CONCLUSION),
    ]


def test_round_trip():
    nodes = _tree()
    text = longcot.render_tree(nodes)
    assert text.count("\n") == 1 + len(nodes) - 1  # one inside the question
    assert longcot.parse_tree(text) == nodes
    assert longcot.render_tree(longcot.parse_tree(text)) == text
    assert longcot.parse_tree(text + "\n") == nodes  # render_chain's trailing newline


def test_chain_is_render_chain():
    thoughts = ["<expansion>1 + 1 = 2", "<critic>fine", "<conclusion>\\boxed{2}"]
    ratings = [POS, UNK, NEG]
    text = longcot.render_chain("Start with 1, add 1.", thoughts, ratings)
    nodes = longcot.chain("Start with 1, add 1.", thoughts, ratings)
    assert text == longcot.render_tree(nodes) + "\n"
    assert longcot.parse_tree(text) == nodes
    assert [(n.father_id, n.local_id) for n in nodes] == [(-1, 0), (0, 1), (1, 2), (2, 3)]
    assert text.startswith(longcot.render_prompt("Start with 1, add 1."))
    assert text.endswith(longcot.step_suffix(NEG))
    assert longcot.render_chain("Q", thoughts[:1]) == longcot.render_chain("Q", thoughts[:1], [POS])


_GOOD = longcot.render_tree(
    [Node(-1, 0, "Q", POS, PROBLEM), Node(0, 1, "step a", NEG, EXPANSION), Node(0, 2, "b", POS)]
)
_HDR0, _HDR1, _HDR2 = (longcot.step_header(f, i) for f, i in ((-1, 0), (0, 1), (0, 2)))
_NL = _GOOD.index("\n")


@pytest.mark.parametrize(
    "text, offset, expected",
    [
        ("", 0, "'<start_of_father_id>', found end of text"),
        (_GOOD.replace("<end_of_thought>", "", 3), None, "'<end_of_thought>' closing"),
        (_GOOD.replace(NEG, "<bad>"), _GOOD.index(NEG), "expected a rating"),
        (_GOOD.replace(_HDR1, longcot.step_header(9, 1)), _GOOD.index(_HDR1), "father id 9"),
        (_GOOD.replace(_HDR2, longcot.step_header(0, 1)), _GOOD.index(_HDR2), "used twice"),
        (_GOOD.replace(_HDR1, longcot.step_header(1, 1)), _GOOD.index(_HDR1), "invalid father"),
        (_GOOD.replace(_HDR1, longcot.step_header(-1, 1)), _GOOD.index(_HDR1), "only the first"),
        (_GOOD.replace(_HDR0, longcot.step_header(1, 0)), 0, "must be the root"),
        (_GOOD.replace(_HDR0, "<start_of_father_id>x"), len("<start_of_father_id>"), "integer"),
        (_GOOD.replace(_HDR1, _HDR1.replace(">1<", ">01<")), None, "found '1<end_of_local_id>"),
        (_GOOD.replace("\n", "\n\n", 1), _NL + 1, "expected '<start_of_father_id>'"),
        (_GOOD.replace("\n", " \n", 1), _NL, "expected '\\n' or end of text"),
        (_GOOD.replace("step a", "step <critic> a"), _GOOD.index("step a") + 5, "'<critic>'"),
        (_GOOD + "\ntrailing", len(_GOOD) + 1, "found 'trailing'"),
    ],
)
def test_parse_errors(text, offset, expected):
    with pytest.raises(LongCoTParseError) as info:
        longcot.parse_tree(text)
    assert expected in str(info.value)
    if offset is not None:
        assert info.value.offset == offset
        assert f"offset {offset}:" in str(info.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(father_id=-1, local_id=0, thought="x", rating="<good>"), "rating"),
        (dict(father_id=-1, local_id=0, thought="x", rating=POS, action="<plan>"), "action"),
        (dict(father_id=-1, local_id=-2, thought="x", rating=POS), "local_id"),
        (dict(father_id=3, local_id=3, thought="x", rating=POS), "father_id"),
        (dict(father_id=-1, local_id=0, thought="<expansion>x", rating=POS), "<expansion>"),
        (dict(father_id=-1, local_id=0, thought="a<end_of_thought>b", rating=POS), "offset 1"),
    ],
)
def test_node_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Node(**kwargs)


def test_render_tree_checks_ids():
    with pytest.raises(ValueError, match="names no earlier node"):
        longcot.render_tree([Node(-1, 0, "q", POS), Node(5, 1, "x", POS)])
    with pytest.raises(ValueError, match=r"thought 1 contains the format token '<end_of_rating>'"):
        longcot.render_chain("q", ["<expansion>bad<end_of_rating>"])


def test_paths():
    nodes = _tree()
    paths = longcot.tree_to_paths(nodes)
    assert [[n.local_id for n in p] for p in paths] == [[0, 1, 2], [0, 7, 3], [0, 7, 4]]
    merged = longcot.paths_to_tree(paths)
    # Same tree, ids renumbered in depth-first order.
    assert [(n.father_id, n.local_id) for n in merged] == [
        (-1, 0),
        (0, 1),
        (1, 2),
        (0, 3),
        (3, 4),
        (3, 5),
    ]
    assert [n.text for n in merged] == [n.text for n in nodes]
    assert longcot.paths_to_tree(longcot.tree_to_paths(merged)) == merged
    with pytest.raises(ValueError, match="different root"):
        longcot.paths_to_tree([paths[0], [Node(-1, 0, "other", POS, PROBLEM)]])


_texts = st.text(alphabet=st.sampled_from("ab 1+=\n{}\\<>_é"), max_size=12).filter(
    lambda s: longcot._first_special(s) is None
)


@st.composite
def _trees(draw):
    n = draw(st.integers(1, 8))
    ids = draw(st.permutations(range(20)))[:n]
    nodes = []
    for i in range(n):
        father = -1 if i == 0 else ids[draw(st.integers(0, i - 1))]
        nodes.append(
            Node(
                father,
                ids[i],
                draw(_texts),
                draw(st.sampled_from(RATINGS)),
                draw(st.sampled_from((None, *ACTIONS))),
            )
        )
    return nodes


@settings(max_examples=60, deadline=None)
@given(_trees())
def test_round_trip_property(nodes):
    text = longcot.render_tree(nodes)
    assert longcot.parse_tree(text) == nodes
    assert longcot.render_tree(longcot.parse_tree(text + "\n")) == text
    # Merging paths loses nothing: every path is a prefix of a merged path, and merged paths are
    # original paths (equal siblings merge, so a leaf may become inner).
    content = lambda p: tuple((n.action, n.thought, n.rating) for n in p)
    before = {content(p) for p in longcot.tree_to_paths(nodes)}
    merged = longcot.paths_to_tree(longcot.tree_to_paths(nodes))
    after = {content(p) for p in longcot.tree_to_paths(merged)}
    assert after <= before
    assert all(any(a[: len(b)] == b for a in after) for b in before)
    assert [n.local_id for n in merged] == list(range(len(merged)))


def test_journey():
    # root -> w1 (neg) -> w1a (neg) ; root -> w2 (neg) ; root -> r (pos) -> r2 (unk) -> c (pos)
    # r -> rw (neg, a wrong conclusion)
    nodes = [
        Node(-1, 0, "Q", POS, PROBLEM),
        Node(0, 1, "1 + 2 = 4", NEG, EXPANSION),
        Node(1, 2, "4 * 2 = 8", NEG, EXPANSION),
        Node(0, 3, "guess", NEG, None),
        Node(0, 4, "1 + 2 = 3", POS, EXPANSION),
        Node(4, 5, "\\boxed{7}", NEG, CONCLUSION),
        Node(4, 6, "3 * 2 = 6", UNK, EXPANSION),
        Node(6, 7, "\\boxed{6}", POS, CONCLUSION),
    ]
    j = longcot.journey(nodes)
    assert [(n.father_id, n.local_id) for n in j] == [(k - 1, k) for k in range(len(j))]
    assert [(n.text, n.rating) for n in j[1:]] == [
        ("<expansion>1 + 2 = 4", NEG),
        ("<expansion>4 * 2 = 8", NEG),  # the wrong branch is followed to its leaf
        ("<critic>1 + 2 is not 4", POS),
        ("guess", NEG),
        ("<critic>The previous step is wrong.", POS),
        ("<refine>1 + 2 = 3", POS),
        ("<conclusion>\\boxed{7}", NEG),
        ("<critic>The previous step is wrong.", POS),
        ("<refine>3 * 2 = 6", UNK),
        ("<conclusion>\\boxed{6}", POS),
    ]
    assert j[0] == nodes[0]
    short = longcot.journey(nodes, max_wrong=0)
    assert [n.text for n in short[1:]] == [n.text for n in (nodes[4], nodes[6], nodes[7])]
    custom = longcot.journey(nodes, critic=lambda w: f"{CRITIC}no: {w.thought}", max_wrong=1)
    assert custom[3].text == "<critic>no: 1 + 2 = 4" and custom[4].action == REFINE
    # A wrong conclusion next to a right one: the right conclusion is kept, not refined.
    two = [nodes[0], Node(0, 1, "1", NEG, CONCLUSION), Node(0, 2, "2", POS, CONCLUSION)]
    assert [n.text for n in longcot.journey(two)[1:]] == [
        "<conclusion>1",
        "<critic>The previous step is wrong.",
        "<conclusion>2",
    ]
    with pytest.raises(ValueError, match="only negative children"):
        longcot.journey([nodes[0], dataclasses.replace(nodes[3], father_id=0, local_id=1)])


def test_a_positive_conclusion_that_states_nothing_is_no_right_path():
    root = longcot.Node(-1, 0, "Start with 3, add 4.", longcot.POSITIVE_RATING, longcot.PROBLEM)
    step = longcot.Node(0, 1, "3 + 4 = 7", longcot.POSITIVE_RATING, longcot.EXPANSION)
    empty = longcot.Node(1, 2, " ", longcot.POSITIVE_RATING, longcot.CONCLUSION)
    stated = longcot.Node(1, 3, "\\boxed{7}", longcot.POSITIVE_RATING, longcot.CONCLUSION)
    paths = longcot.right_paths([root, step, empty, stated])
    assert [p[-1].local_id for p in paths] == [3]


@pytest.mark.parametrize(
    "thought, critic",
    [
        ("17 + 25 = 43", "17 + 25 is not 43"),
        (
            "He pays 1,000 + 72 = 1,073 dollars.",
            "1,000 + 72 is not 1,073",
        ),  # not "000 + 72 is not 1"
        ("Then 1,072 * 2 = 2,150 dollars.", "1,072 * 2 is not 2,150"),
        ("2.5 * 2 = 6.0", "2.5 * 2 is not 6.0"),
        ("1/2 + 1/4 = 11/4 of the pie.", "1/2 + 1/4 is not 11/4"),  # not "is not 11"
        # A journey flaws a step's last result ("= 28"): the right claim before it ("3 * 2 =
        # 6") is no error to quote, and "(6 + 4) * 2" no claim this critic reads.
        ("He spends 3 * 2 = 6, so (6 + 4) * 2 = 28 in all.", "The previous step is wrong."),
    ],
)
def test_default_critic_quotes_whole_numbers(thought, critic):
    assert longcot.default_critic(Node(0, 1, thought, NEG, EXPANSION)) == CRITIC + critic
