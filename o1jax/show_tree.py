"""Draw a search tree as a self-contained HTML page (inline SVG, no scripts, no network).

    python -m o1jax.show_tree runs/tiny/trees_sft/<problem id>.json -o tree.html

The input is what `o1jax.search.export.tree_to_json` writes (`python -m o1jax.evaluate
--search mcts --trees DIR`, and `train.py` for the first held-out problems). Each node shows the
start of its thought, its visits, value (backed-up Q) and rating; hovering shows the whole
thought. Answer nodes are green when the answer checks against the truth, red when it does not;
other nodes are shaded by value. Edge width grows with the child's visits.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import re
import sys

BOX_W, BOX_H = 190, 66  # px
GAP_X, GAP_Y = 16, 40  # px between boxes
LINE_CHARS = 30
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class TreeFileError(ValueError):
    """A tree file that cannot be drawn; the message names the file and what is wrong."""


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an int beyond any float (JSON integers have no bound)
        return False


def _is_count(x) -> bool:
    # Bounded: a JSON integer can be arbitrarily large, and the drawing takes its log as a float.
    return _is_int(x) and 0 <= x < 2**63


# field: (check, what it must be); "rating" is optional (tree_to_json always writes it)
NODE_FIELDS = {
    "id": (_is_int, "an integer"),
    "parent": (_is_int, "an integer"),
    "text": (lambda x: isinstance(x, str), "a string"),
    "visits": (_is_count, "an integer in [0, 2**63)"),
    "value": (_is_number, "a finite number"),
    "rating": (_is_number, "a finite number"),
}


def load_tree(path: str) -> dict:
    """The tree dict in `path`, checked for the fields the drawing needs and their types."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as e:
        raise TreeFileError(f"{path}: no such file") from e
    except json.JSONDecodeError as e:
        raise TreeFileError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from e
    except UnicodeDecodeError as e:
        raise TreeFileError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from e
    except ValueError as e:  # after its subclasses: an integer of more digits than Python reads
        raise TreeFileError(f"{path}: unreadable JSON value ({e})") from e
    except RecursionError as e:
        raise TreeFileError(f"{path}: JSON nested too deeply") from e
    except OSError as e:
        raise TreeFileError(f"{path}: cannot read ({e.strerror or e})") from e
    nodes = data.get("nodes") if isinstance(data, dict) else None
    if not isinstance(nodes, list) or not nodes:
        raise TreeFileError(f"{path}: expected an object with a non-empty 'nodes' list")
    for i, node in enumerate(nodes):
        if not isinstance(node, dict):
            raise TreeFileError(f"{path}: node {i} is {type(node).__name__}, not an object")
        for field, (ok, kind) in NODE_FIELDS.items():
            if field not in node:
                if field == "rating":
                    continue
                raise TreeFileError(f"{path}: node {i} has no {field!r}")
            if not ok(node[field]):
                got = repr(node[field])
                got = got if len(got) <= 40 else got[:37] + "..."
                raise TreeFileError(f"{path}: node {i} field {field!r} is {got}, expected {kind}")
        if node["id"] != i:
            raise TreeFileError(f"{path}: node {i} has id {node['id']} (ids must be 0..N-1)")
        if i and not 0 <= node["parent"] < i:
            raise TreeFileError(
                f"{path}: node {i} has parent {node['parent']} (not an earlier node)"
            )
    return data


def layout(nodes: list[dict]) -> dict[int, tuple[float, int]]:
    """(x slot, depth) per node: leaves take consecutive slots, parents centre over children."""
    children: dict[int, list[int]] = {n["id"]: [] for n in nodes}
    for n in nodes[1:]:
        children[n["parent"]].append(n["id"])
    pos: dict[int, tuple[float, int]] = {}
    next_slot = 0.0
    # Iterative post-order walk (trees can be deeper than Python's recursion limit allows).
    stack = [(0, 0, False)]
    while stack:
        node, depth, visited = stack.pop()
        kids = children[node]
        if not kids:
            pos[node] = (next_slot, depth)
            next_slot += 1
        elif visited:
            pos[node] = ((pos[kids[0]][0] + pos[kids[-1]][0]) / 2, depth)
        else:
            stack.append((node, depth, True))
            stack.extend((k, depth + 1, False) for k in reversed(kids))
    return pos


def _fill(node: dict) -> str:
    if node.get("correct") is True:
        return "#b7e4b9"
    if node.get("correct") is False:
        return "#f4b6b0"
    v = min(max(float(node["value"]), 0.0), 1.0)
    shade = int(255 - 110 * v)  # white (value 0) to blue (value 1)
    return f"rgb({shade},{shade + (255 - shade) // 3},255)"


def _lines(text: str) -> list[str]:
    flat = " ".join(text.split())
    first, rest = flat[:LINE_CHARS], flat[LINE_CHARS:]
    second = rest[:LINE_CHARS] + ("..." if len(rest) > LINE_CHARS else "")
    return [first, second] if rest else [first]


def render_html(data: dict, title: str = "search tree") -> str:
    """The page for one tree dict (see `load_tree`)."""
    nodes = data["nodes"]
    pos = layout(nodes)
    width = int((max(x for x, _ in pos.values()) + 1) * (BOX_W + GAP_X) + GAP_X)
    height = int((max(d for _, d in pos.values()) + 1) * (BOX_H + GAP_Y) + GAP_Y)
    corner = {
        i: (GAP_X + x * (BOX_W + GAP_X), GAP_Y + d * (BOX_H + GAP_Y)) for i, (x, d) in pos.items()
    }
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">']
    for n in nodes[1:]:
        (px, py), (cx, cy) = corner[n["parent"]], corner[n["id"]]
        stroke = 1 + 1.5 * math.log1p(n["visits"])
        parts.append(
            f'<line x1="{px + BOX_W / 2}" y1="{py + BOX_H}" x2="{cx + BOX_W / 2}" y2="{cy}" '
            f'stroke="#888" stroke-width="{stroke:.1f}"/>'
        )
    for n in nodes:
        x, y = corner[n["id"]]
        stats = f"#{n['id']}  N={n['visits']}  Q={float(n['value']):.2f}"
        if "rating" in n:
            stats += f"  r={float(n['rating']):.2f}"
        tip = f"{n['text']}\n\n{stats}"
        if n.get("answer") is not None:
            tip += f"\nanswer: {n['answer']}  correct: {n.get('correct')}"
        border = "#333" if n.get("terminal") else "#999"
        parts.append(f"<g><title>{html.escape(tip)}</title>")
        parts.append(
            f'<rect x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="6" '
            f'fill="{_fill(n)}" stroke="{border}"/>'
        )
        for k, line in enumerate(_lines(n["text"])):
            parts.append(
                f'<text x="{x + 6}" y="{y + 16 + 15 * k}" font-size="12" '
                f'font-family="monospace">{html.escape(line)}</text>'
            )
        parts.append(
            f'<text x="{x + 6}" y="{y + BOX_H - 8}" font-size="11" fill="#333" '
            f'font-family="sans-serif">{html.escape(stats)}</text></g>'
        )
    parts.append("</svg>")
    facts = [f"question: {data.get('question', nodes[0]['text'])}"]
    if data.get("truth") is not None:
        facts.append(f"truth: {data['truth']}")
    if "chosen_answer" in data:
        facts.append(f"chosen answer: {data['chosen_answer']}")
    facts.append(f"{len(nodes)} nodes; green/red: answers right/wrong; blue: higher value")
    body = "".join(f"<p>{html.escape(f)}</p>" for f in facts)
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        "<style>body{font-family:sans-serif;margin:16px}p{margin:2px 0}"
        "div{overflow:auto;border:1px solid #ddd;margin-top:8px}</style></head>"
        f"<body>{body}<div>{''.join(parts)}</div></body></html>\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tree", help="a tree JSON file (tree_to_json)")
    parser.add_argument("-o", "--out", default="tree.html", help="the HTML file to write")
    args = parser.parse_args(argv)
    try:
        page = render_html(load_tree(args.tree), title=args.tree)
        # Encoded before the file is opened, so that no failure leaves an empty page behind. A
        # lone surrogate (valid JSON: "\ud83d") has no UTF-8 form: it becomes U+FFFD.
        data = _LONE_SURROGATE.sub("\ufffd", page).encode("utf-8")
        try:
            with open(args.out, "wb") as f:
                f.write(data)
        except OSError as e:
            raise TreeFileError(f"{args.out}: cannot write ({e.strerror or e})") from e
    except TreeFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
