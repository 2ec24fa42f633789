"""`python -m o1jax.show_tree`: a tree JSON in, a self-contained HTML drawing out."""

import json
import math
import re

import pytest
from test_export import _tree

from o1jax import show_tree
from o1jax.data.tokenizer import build_tiny_tokenizer
from o1jax.search.export import tree_to_json


@pytest.fixture(scope="module")
def tree_file(tmp_path_factory):
    tok = build_tiny_tokenizer()
    data = tree_to_json(_tree(tok), 0, tok, "Start with 3, add 4, multiply by 2.", truth="14")
    path = tmp_path_factory.mktemp("trees") / "tree.json"
    path.write_text(json.dumps(data))
    return path, data


def test_page_draws_every_node_with_its_numbers_and_verdict(tree_file, tmp_path):
    path, data = tree_file
    out = tmp_path / "tree.html"
    assert show_tree.main([str(path), "-o", str(out)]) == 0
    page = out.read_text()
    assert page.count("<rect") == len(data["nodes"]) == 6
    assert page.count("<line") == 5  # one edge per non-root node
    # Thoughts are escaped, not interpreted as tags, and each node states its visits and Q.
    assert "&lt;conclusion&gt;\\boxed{14}" in page and "<conclusion>" not in page
    assert "#2  N=3  Q=0.30  r=0.30" in page
    # The right answer is green, the two wrong ones red.
    assert page.count('fill="#b7e4b9"') == 1 and page.count('fill="#f4b6b0"') == 2
    assert "chosen answer: 14" in page and "truth: 14" in page
    # Self-contained: no scripts, no external resources.
    assert "<script" not in page and not re.search(r"(src|href)=", page)


def test_layout_centres_parents_and_never_overlaps():
    nodes = [{"id": 0, "parent": -1}] + [
        {"id": i, "parent": p} for i, p in enumerate([0, 0, 1, 1, 1, 2, 5], start=1)
    ]
    pos = show_tree.layout(nodes)
    assert [pos[i][1] for i in range(8)] == [0, 1, 1, 2, 2, 2, 2, 3]
    assert [pos[i][0] for i in (3, 4, 7, 6)] == [0, 1, 2, 3]  # leaves, depth-first order
    assert pos[5][0] == 2.0 and pos[1][0] == 1.0 and pos[2][0] == 3.0  # over their children
    assert pos[0][0] == 2.0
    by_row = {}
    for x, depth in pos.values():
        by_row.setdefault(depth, []).append(x)
    assert all(len(xs) == len(set(xs)) for xs in by_row.values())


def test_a_deep_chain_does_not_hit_the_recursion_limit():
    nodes = [{"id": 0, "parent": -1}] + [{"id": i, "parent": i - 1} for i in range(1, 3000)]
    assert show_tree.layout(nodes)[2999] == (0.0, 2999)


def _child(**fields) -> str:
    """A two-node tree (JSON text) whose second node has `fields` over valid ones."""
    root = {"id": 0, "parent": -1, "text": "q", "visits": 1, "value": 0}
    node = {"id": 1, "parent": 0, "text": "t", "visits": 1, "value": 0.5, "rating": 0.5}
    return json.dumps({"nodes": [root, node | fields]})


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not JSON"),
        ('{"nodes": []}', "non-empty 'nodes' list"),
        ('{"nodes": [{"id": 0, "parent": -1, "text": "q", "visits": 1}]}', "node 0 has no 'value'"),
        (
            '{"nodes": [{"id": 0, "parent": -1, "text": "q", "visits": 1, "value": 0},'
            ' {"id": 1, "parent": 4, "text": "t", "visits": 1, "value": 0}]}',
            "node 1 has parent 4",
        ),
        ('{"nodes": [1, 2]}', "node 0 is int, not an object"),
        (_child(parent="0"), "node 1 field 'parent' is '0', expected an integer"),
        (_child(value="abc"), "node 1 field 'value' is 'abc', expected a finite number"),
        (_child(value=None), "node 1 field 'value' is None, expected a finite number"),
        (_child(value=math.nan), "node 1 field 'value' is nan, expected a finite number"),
        (_child(value=True), "node 1 field 'value' is True, expected a finite number"),
        (_child(visits="x"), "node 1 field 'visits' is 'x', expected an integer"),
        (
            _child(visits=10**400),
            "node 1 field 'visits' is 1000000000000000000000000000000000000...",
        ),
        (_child(value=10**400), "node 1 field 'value' is 1000000000000000000000000000000000000"),
        (  # json.load's digit limit is a ValueError, not a JSONDecodeError: it was a traceback
            _child(visits=0).replace('"visits": 0', '"visits": 1' + "0" * 5000),
            "unreadable JSON value",
        ),
        (_child(visits=2**63), "expected an integer in [0, 2**63)"),
        (_child(visits=-1), "node 1 field 'visits' is -1, expected an integer in [0, 2**63)"),
        (_child(text=5), "node 1 field 'text' is 5, expected a string"),
        (_child(rating="pos"), "node 1 field 'rating' is 'pos', expected a finite number"),
    ],
)
def test_bad_files_exit_2_naming_the_file_and_fault(tmp_path, capsys, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    assert show_tree.main([str(path), "-o", str(tmp_path / "x.html")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and message in err
    assert not (tmp_path / "x.html").exists()


def test_unreadable_inputs_and_outputs_exit_2(tmp_path, tree_file, capsys):
    path, _ = tree_file
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00{")
    cases = [
        ([str(binary), "-o", str(tmp_path / "x.html")], f"{binary}: not UTF-8 text"),
        ([str(tmp_path), "-o", str(tmp_path / "x.html")], f"{tmp_path}: cannot read"),
        ([str(path), "-o", str(tmp_path / "no" / "x.html")], "no/x.html: cannot write"),
    ]
    for argv, message in cases:
        assert show_tree.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.html").exists()


def test_a_lone_surrogate_in_a_text_is_drawn_as_a_replacement_character(tmp_path, capsys):
    # Valid JSON ("\ud83d", half an emoji), which json.dumps writes for any str holding one.
    path = tmp_path / "half.json"
    path.write_text(_child(text="half an emoji \ud83d", answer="\udc00"))
    out = tmp_path / "half.html"
    assert show_tree.main([str(path), "-o", str(out)]) == 0
    page = out.read_bytes().decode("utf-8")  # strict: the page is valid UTF-8
    assert "half an emoji \ufffd" in page and "answer: \ufffd" in page
    assert capsys.readouterr().err == ""


def test_the_largest_visit_count_still_draws(tmp_path):
    path = tmp_path / "big.json"
    path.write_text(_child(visits=2**63 - 1))
    out = tmp_path / "big.html"
    assert show_tree.main([str(path), "-o", str(out)]) == 0
    assert f"N={2**63 - 1}" in out.read_text()
