"""LLaMA-O1's long chain-of-thought format (OpenLongCoT): a reasoning tree flattened to text.

One node is one line (no newline between its parts):

    <start_of_father_id>P<end_of_father_id><start_of_local_id>I<end_of_local_id>
    <start_of_thought>TEXT<end_of_thought><start_of_rating>R<end_of_rating>

The root has P = -1; R is one of the three rating tokens; TEXT may open with one meta-action tag
(`<problem>`, `<expansion>`, `<critic>`, `<refine>`, `<conclusion>`) and contains no other format
token. A tree is its nodes joined by "\\n", every father named before its children.

Policy, search, SFT and PPO all see one rendering of a reasoning path, `render_chain`: the
problem as the root (`render_prompt`), then per step k >= 1 a header with father k-1 and local id
k (`step_header`), the thought, and its rating (`step_suffix`), each line ending in "\\n".
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

START_OF_FATHER_ID = "<start_of_father_id>"
END_OF_FATHER_ID = "<end_of_father_id>"
START_OF_LOCAL_ID = "<start_of_local_id>"
END_OF_LOCAL_ID = "<end_of_local_id>"
START_OF_THOUGHT = "<start_of_thought>"
END_OF_THOUGHT = "<end_of_thought>"
START_OF_RATING = "<start_of_rating>"
END_OF_RATING = "<end_of_rating>"

POSITIVE_RATING = "<positive_rating>"
NEGATIVE_RATING = "<negative_rating>"
UNKNOWN_RATING = "<unknown_rating>"
RATINGS = (POSITIVE_RATING, NEGATIVE_RATING, UNKNOWN_RATING)

PROBLEM = "<problem>"
EXPANSION = "<expansion>"
CRITIC = "<critic>"
REFINE = "<refine>"
CONCLUSION = "<conclusion>"
ACTIONS = (PROBLEM, EXPANSION, CRITIC, REFINE, CONCLUSION)

# LLaMA-O1's 15 added tokens in its order, then <expansion>, which it forgot.
SPECIAL_TOKENS = (
    START_OF_RATING,
    UNKNOWN_RATING,
    END_OF_RATING,
    POSITIVE_RATING,
    NEGATIVE_RATING,
    CRITIC,
    CONCLUSION,
    START_OF_THOUGHT,
    END_OF_THOUGHT,
    PROBLEM,
    REFINE,
    START_OF_FATHER_ID,
    END_OF_FATHER_ID,
    START_OF_LOCAL_ID,
    END_OF_LOCAL_ID,
    EXPANSION,
)

# Gemma's control tokens (the tiny tokenizer has the first four): a tokenizer reads each as one
# id wherever it stands in a text, so a question or thought that writes one out would silently
# train or prompt on an EOS, a pad or a turn marker. Text must not hold them either.
CONTROL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>")
_RESERVED_TOKENS = SPECIAL_TOKENS + CONTROL_TOKENS

ROOT_FATHER_ID = -1
_INT_RE = re.compile(r"-?(?:0|[1-9][0-9]*)")


class LongCoTParseError(ValueError):
    """Malformed long-CoT text; `offset` is the character offset at fault."""

    def __init__(self, offset: int, message: str):
        super().__init__(f"long-CoT text, offset {offset}: {message}")
        self.offset = offset


def _first_special(text: str) -> tuple[int, str] | None:
    """(offset, token) of the first long-CoT or control token inside `text`, or None."""
    hits = [(i, t) for t in _RESERVED_TOKENS if (i := text.find(t)) >= 0]
    return min(hits) if hits else None


def strip_format_tokens(text: str) -> str:
    """`text` without any long-CoT or control token, including those that removing one would form
    ("<start_of_<critic>rating>" -> "", not "<start_of_rating>")."""
    while (hit := _first_special(text)) is not None:
        text = text.replace(hit[1], "")
    return text


def split_action(text: str) -> tuple[str | None, str]:
    """Splits a thought's text into its leading meta-action tag (or None) and the rest."""
    for action in ACTIONS:
        if text.startswith(action):
            return action, text[len(action) :]
    return None, text


@dataclasses.dataclass(frozen=True)
class Node:
    """One thought of a reasoning tree.

    father_id: local id of the parent, -1 for the root. local_id: >= 0, unique in its tree.
    thought: the text after the action tag. rating: one of RATINGS. action: one of ACTIONS or None.
    """

    father_id: int
    local_id: int
    thought: str
    rating: str
    action: str | None = None

    def __post_init__(self):
        for name in ("father_id", "local_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"Node.{name} must be an int, got {value!r}")
        if self.local_id < 0:
            raise ValueError(f"Node.local_id must be >= 0, got {self.local_id}")
        if self.father_id < ROOT_FATHER_ID or self.father_id == self.local_id:
            raise ValueError(
                f"Node.father_id must be -1 or another node's id, got {self.father_id} "
                f"(local_id {self.local_id})"
            )
        if self.rating not in RATINGS:
            raise ValueError(f"Node.rating must be one of {RATINGS}, got {self.rating!r}")
        if self.action is not None and self.action not in ACTIONS:
            raise ValueError(f"Node.action must be None or one of {ACTIONS}, got {self.action!r}")
        # Also rejects a thought that starts with an action tag: that goes in `action`.
        _check_thought(self.thought, f"Node {self.local_id} thought", allow_action=False)

    @property
    def text(self) -> str:
        """The thought as rendered: action tag (if any) followed by the thought."""
        return (self.action or "") + self.thought

    @classmethod
    def from_text(cls, father_id: int, local_id: int, text: str, rating: str) -> Node:
        """A node from a thought's full text (leading action tag included)."""
        action, thought = split_action(text)
        return cls(father_id, local_id, thought, rating, action)


def _check_thought(text: str, what: str, allow_action: bool) -> None:
    """Raises ValueError if `text` is not a str or holds a format or control token (bar a
    leading action)."""
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, got {type(text).__name__}")
    body = split_action(text)[1] if allow_action else text
    hit = _first_special(body)
    if hit is not None:
        offset = hit[0] + len(text) - len(body)
        kind = "format" if hit[1] in SPECIAL_TOKENS else "control"
        raise ValueError(f"{what} contains the {kind} token {hit[1]!r} at offset {offset}")


def check_thought(text: str, what: str = "thought") -> None:
    """Raises ValueError if a thought (leading action tag allowed) holds a format or control
    token."""
    _check_thought(text, what, allow_action=True)


def _check_rating(rating: str, what: str) -> None:
    if rating not in RATINGS:
        raise ValueError(f"{what} must be one of {RATINGS}, got {rating!r}")


# ----------------------------------------------------------------------------- rendering
def step_header(father_id: int, local_id: int) -> str:
    """The text before a thought: ids, then `<start_of_thought>`."""
    return (
        f"{START_OF_FATHER_ID}{father_id}{END_OF_FATHER_ID}"
        f"{START_OF_LOCAL_ID}{local_id}{END_OF_LOCAL_ID}{START_OF_THOUGHT}"
    )


def step_suffix(rating: str = POSITIVE_RATING) -> str:
    """The text after a thought in a chain: `<end_of_thought>`, the rating, and "\\n"."""
    _check_rating(rating, "rating")
    return f"{END_OF_THOUGHT}{START_OF_RATING}{rating}{END_OF_RATING}\n"


def render_node(node: Node) -> str:
    """One node as one line, without the trailing newline."""
    return (
        step_header(node.father_id, node.local_id)
        + f"{node.text}{END_OF_THOUGHT}{START_OF_RATING}{node.rating}{END_OF_RATING}"
    )


def render_tree(nodes: Sequence[Node]) -> str:
    """A tree as text: nodes joined by "\\n" (no trailing newline). Checks the ids first."""
    _check_tree(nodes)
    return "\n".join(render_node(n) for n in nodes)


def render_prompt(question: str) -> str:
    """What the policy conditions on: the root `<problem>` node, positive, then "\\n"."""
    _check_thought(question, "question", allow_action=False)
    return render_node(Node(ROOT_FATHER_ID, 0, question, POSITIVE_RATING, PROBLEM)) + "\n"


def chain(
    question: str, thoughts: Sequence[str], ratings: Sequence[str] | None = None
) -> list[Node]:
    """A path as nodes: the `<problem>` root (id 0), then thought k with father k-1, local id k.

    thoughts: full thought texts, leading action tag included. ratings: one per thought
    (default: all positive).
    """
    ratings = _chain_ratings(thoughts, ratings)
    _check_thought(question, "question", allow_action=False)
    nodes = [Node(ROOT_FATHER_ID, 0, question, POSITIVE_RATING, PROBLEM)]
    for k, (text, rating) in enumerate(zip(thoughts, ratings, strict=True), start=1):
        _check_thought(text, f"thought {k}", allow_action=True)
        nodes.append(Node.from_text(k - 1, k, text, rating))
    return nodes


def render_chain(
    question: str, thoughts: Sequence[str], ratings: Sequence[str] | None = None
) -> str:
    """A path as the search and training see it: equals `render_tree(chain(...)) + "\\n"`.

    prompt + for each step k: step_header(k-1, k) + thought + step_suffix(rating).
    """
    ratings = _chain_ratings(thoughts, ratings)
    parts = [render_prompt(question)]
    for k, (text, rating) in enumerate(zip(thoughts, ratings, strict=True), start=1):
        _check_thought(text, f"thought {k}", allow_action=True)
        parts.append(step_header(k - 1, k) + text + step_suffix(rating))
    return "".join(parts)


def _chain_ratings(thoughts: Sequence[str], ratings: Sequence[str] | None) -> Sequence[str]:
    if isinstance(thoughts, str):
        raise TypeError("thoughts must be a sequence of str, not one str")
    if ratings is None:
        return [POSITIVE_RATING] * len(thoughts)
    if len(ratings) != len(thoughts):
        raise ValueError(f"{len(thoughts)} thoughts but {len(ratings)} ratings")
    for k, r in enumerate(ratings, start=1):
        _check_rating(r, f"rating of thought {k}")
    return ratings


# ----------------------------------------------------------------------------- parsing
def _check_tree(nodes: Sequence[Node]) -> None:
    """Unique local ids, fathers named earlier, one root and it comes first."""
    if not nodes:
        raise ValueError("a long-CoT tree needs at least its root node")
    seen: set[int] = set()
    for i, node in enumerate(nodes):
        if not isinstance(node, Node):
            raise TypeError(f"nodes[{i}] is a {type(node).__name__}, not a Node")
        problem = _tree_error(node, i, seen)
        if problem:
            raise ValueError(f"nodes[{i}] (local id {node.local_id}): {problem}")
        seen.add(node.local_id)


def _tree_error(node: Node, index: int, seen: set[int]) -> str | None:
    if index == 0 and node.father_id != ROOT_FATHER_ID:
        return f"the first node must be the root (father id -1), got father id {node.father_id}"
    if index > 0 and node.father_id == ROOT_FATHER_ID:
        return "only the first node may be a root (father id -1)"
    if node.local_id in seen:
        return f"local id {node.local_id} is used twice"
    if index > 0 and node.father_id not in seen:
        return f"father id {node.father_id} names no earlier node"
    return None


def parse_tree(text: str) -> list[Node]:
    """Parses long-CoT text into nodes; strict: `render_tree(parse_tree(x)) == x`.

    One trailing "\\n" (as `render_chain` writes) is accepted and dropped. Anything else that
    `render_tree` would not write raises LongCoTParseError naming the offset and what was expected.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_tree expects a str, got {type(text).__name__}")
    nodes: list[Node] = []
    seen: set[int] = set()
    pos = 0
    while True:
        start = pos
        pos = _expect(text, pos, START_OF_FATHER_ID)
        father_id, pos = _int_at(text, pos, "the father id")
        pos = _expect(text, pos, END_OF_FATHER_ID)
        pos = _expect(text, pos, START_OF_LOCAL_ID)
        id_pos = pos
        local_id, pos = _int_at(text, pos, "the local id")
        if local_id < 0:
            raise LongCoTParseError(id_pos, f"a local id must be >= 0, got {local_id}")
        pos = _expect(text, pos, END_OF_LOCAL_ID)
        pos = _expect(text, pos, START_OF_THOUGHT)
        end = text.find(END_OF_THOUGHT, pos)
        if end < 0:
            raise LongCoTParseError(pos, f"expected {END_OF_THOUGHT!r} closing this thought")
        action, thought = split_action(text[pos:end])
        body_pos = end - len(thought)
        hit = _first_special(thought)
        if hit is not None:
            raise LongCoTParseError(
                body_pos + hit[0], f"expected {END_OF_THOUGHT!r}, found the token {hit[1]!r}"
            )
        pos = _expect(text, end, END_OF_THOUGHT)
        pos = _expect(text, pos, START_OF_RATING)
        rating = next((r for r in RATINGS if text.startswith(r, pos)), None)
        if rating is None:
            raise LongCoTParseError(pos, f"expected a rating {RATINGS}, found {_found(text, pos)}")
        pos = _expect(text, pos + len(rating), END_OF_RATING)
        if father_id == local_id or father_id < ROOT_FATHER_ID:
            raise LongCoTParseError(start, f"node {local_id} has an invalid father id {father_id}")
        node = Node(father_id, local_id, thought, rating, action)
        problem = _tree_error(node, len(nodes), seen)
        if problem:
            raise LongCoTParseError(start, f"node {local_id}: {problem}")
        nodes.append(node)
        seen.add(local_id)
        if pos == len(text):
            return nodes
        if text[pos] != "\n":
            raise LongCoTParseError(
                pos, f"expected '\\n' or end of text, found {_found(text, pos)}"
            )
        pos += 1
        if pos == len(text):
            return nodes


def _found(text: str, pos: int) -> str:
    return "end of text" if pos >= len(text) else repr(text[pos : pos + 24])


def _expect(text: str, pos: int, token: str) -> int:
    if not text.startswith(token, pos):
        raise LongCoTParseError(pos, f"expected {token!r}, found {_found(text, pos)}")
    return pos + len(token)


def _int_at(text: str, pos: int, what: str) -> tuple[int, int]:
    m = _INT_RE.match(text, pos)
    if m is None or m.group() == "-0":
        raise LongCoTParseError(pos, f"expected {what} (an integer), found {_found(text, pos)}")
    return int(m.group()), m.end()


# ----------------------------------------------------------------------------- tree <-> paths
def _children(nodes: Sequence[Node]) -> dict[int, list[Node]]:
    _check_tree(nodes)
    kids: dict[int, list[Node]] = {n.local_id: [] for n in nodes}
    for n in nodes[1:]:
        kids[n.father_id].append(n)
    return kids


def tree_to_paths(nodes: Sequence[Node]) -> list[list[Node]]:
    """Every root-to-leaf path, in depth-first order (children in text order)."""
    kids = _children(nodes)
    paths: list[list[Node]] = []
    stack: list[list[Node]] = [[nodes[0]]]
    while stack:
        path = stack.pop()
        below = kids[path[-1].local_id]
        if not below:
            paths.append(path)
        stack.extend([*path, child] for child in reversed(below))
    return paths


def right_paths(nodes: Sequence[Node]) -> list[list[Node]]:
    """The root-to-leaf paths that end in a positively rated `<conclusion>` that states
    something: the solutions of a rated tree worth imitating, journeys through a criticised
    step included."""
    return [
        p
        for p in tree_to_paths(nodes)
        if p[-1].action == CONCLUSION and p[-1].rating == POSITIVE_RATING and p[-1].thought.strip()
    ]


def paths_to_tree(paths: Sequence[Sequence[Node]]) -> list[Node]:
    """Merges root-to-leaf paths into one tree; shared prefixes (same action, thought and rating
    at the same depth) become one node. Local ids are assigned in depth-first order (root 0), and
    the nodes are returned in that order. The input ids are ignored.
    """
    if not paths or any(len(p) == 0 for p in paths):
        raise ValueError("paths_to_tree needs at least one path, and no empty path")
    key = lambda n: (n.action, n.thought, n.rating)
    root = key(paths[0][0])
    trie: dict = {}
    for i, path in enumerate(paths):
        if key(path[0]) != root:
            raise ValueError(f"paths[{i}] starts at a different root than paths[0]")
        level = trie
        for node in path[1:]:
            level = level.setdefault(key(node), {})
    out = [Node(ROOT_FATHER_ID, 0, root[1], root[2], root[0])]
    stack = [(0, k, sub) for k, sub in reversed(trie.items())]
    while stack:
        father, (action, thought, rating), sub = stack.pop()
        local = len(out)
        out.append(Node(father, local, thought, rating, action))
        stack.extend((local, k, s) for k, s in reversed(sub.items()))
    return out


# ----------------------------------------------------------------------------- journeys
_NUM = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"  # "1,072.5" is one number, not "072.5"
_CLAIM_RE = re.compile(
    rf"(?<![\d,./])(?P<lhs>{_NUM}(?:\s*[-+*/×÷]\s*{_NUM})+)\s*=\s*"
    rf"(?P<rhs>{_NUM}(?:/\d+)?)(?![\d,]\d|\.\d|/\d)"  # "= 3/4" is one result, not "3"
)


def default_critic(wrong: Node) -> str:
    """A `<critic>` thought for a wrong step: "17 + 25 is not 43" when the step's last result
    is an arithmetic claim `a op b = c` (no "=" after it), else a generic remark. The flawed
    result of a journey is a step's last "= N" (`tasks.journey_tree`): an earlier claim, right,
    must not be quoted as the error."""
    claims = list(_CLAIM_RE.finditer(wrong.thought))
    if claims and "=" not in wrong.thought[claims[-1].end() :]:
        return f"{CRITIC}{claims[-1]['lhs']} is not {claims[-1]['rhs']}"
    return f"{CRITIC}The previous step is wrong."


def journey(
    nodes: Sequence[Node],
    critic: Callable[[Node], str] = default_critic,
    max_wrong: int | None = None,
) -> list[Node]:
    """A depth-first walk of a rated tree written as one chain (O1-Journey's long thoughts).

    From the root, at every node: each negative child (at most `max_wrong`) is tried first, its
    wrong branch followed down its first children to a leaf, then a `critic(wrong)` thought and a
    `<refine>` restating the right child; then the walk goes on from the right child (the first
    positive child, else the first unknown one). A right child that is a `<conclusion>` is kept
    as is. The walk ends at a leaf. Returns a chain: node k has father k-1 and local id k; critic
    thoughts are rated positive, a refine takes its right child's rating, other nodes keep theirs.
    """
    kids = _children(nodes)
    steps: list[tuple[str, str]] = []  # (text, rating)
    node = nodes[0]
    while kids[node.local_id]:
        below = kids[node.local_id]
        wrong = [c for c in below if c.rating == NEGATIVE_RATING]
        right = [c for c in below if c.rating == POSITIVE_RATING]
        right += [c for c in below if c.rating == UNKNOWN_RATING]
        if not right:
            raise ValueError(
                f"journey: node {node.local_id} has only negative children, no right path on"
            )
        nxt = right[0]
        tried = wrong if max_wrong is None else wrong[:max_wrong]
        for w in tried:
            branch = w
            steps.append((branch.text, branch.rating))
            while kids[branch.local_id]:
                branch = kids[branch.local_id][0]
                steps.append((branch.text, branch.rating))
            steps.append((critic(w), POSITIVE_RATING))
        if tried and nxt.action != CONCLUSION:
            steps.append((REFINE + nxt.thought, nxt.rating))
        else:
            steps.append((nxt.text, nxt.rating))
        node = nxt
    root = nodes[0]
    texts, ratings = [s[0] for s in steps], [s[1] for s in steps]
    out = chain(root.thought, texts, ratings)
    return [dataclasses.replace(out[0], rating=root.rating, action=root.action), *out[1:]]
