"""Self-refine search over whole solutions: MCTSr and LLaMA-Berry's SR-MCTS, batched over problems.

A node is a whole solution in the long-CoT chain format (the steps after the problem's prompt,
up to EOS). The root is the policy's own first answer (greedy by default). One rollout, for all
B trees at once:

1. `select`: among each tree's candidates (MCTSr's `filter_mature_node`: fewer than
   `max_children` children, or no child valued above the node), the node of highest UCT,
   `Q + c sqrt(ln(N(parent) + 1) / (N + eps))`, with Q in MCTSr's units ([-100, 100]) in
   self-reward mode; the root has no parent, so no exploration term (MCTSr: N(parent) = 0).
2. critique (one `generate` call, B rows): the node's solution is cut before its weakest step
   (lowest model rating), that step is rated negative and a `<critic>` thought is sampled.
3. rewrite (one `generate` call, B rows): a `<refine>` thought and the rest of the solution.
   The child is that journey: the parent's steps up to the flaw, the critic, the refine, the rest,
   exactly the shape of the journey data SFT trains on (`o1jax.data.tasks.journey_solution`).
4. value: `step_statistics` reads the model's rating of every step in one forward pass. The
   MCTSr-style self-reward from step ratings scores each effective step of the one solution
   (every step but a critiqued one, which a `<critic>` follows, and that critic; a step the
   model rated negative counts too) `100 (2 P(<positive_rating>) - 1)`, replaces scores >=
   `suppress_at` (95) by `suppressed_score` (50: MCTSr's full-score suppression) and takes
   `(min + mean) / 2`, rescaled to [-1, 1]. A solution has an answer when its last effective
   step is a complete `<conclusion>`, whatever that step's rating, and the host's parse
   (`solution_steps`) reads every rated step the device did (`chain_is_whole`).
   Unlike MCTSr, whose scores R are repeated whole-answer ratings (one more per visit), these R
   are per-step ratings of one pass: deterministic per node. SR-MCTS instead asks the PPRM
   (`o1jax.search.pprm`) to compare the new solution with every other one of its tree (texts
   of its effective steps), turns the preference matrix into a global value by the Enhanced
   Borda Count (`o1jax.search.ebc`) and mixes it with the local value (preference against
   parent and siblings).
5. `backup`: `Q(a) = (V(a) + max_c Q(c)) / 2` bottom-up over the tree (the paper's backup rule,
   re-applied from the nodes' own values every rollout, since EBC values move as the tree grows).

The answer is the solution valued best (SR-MCTS: ranked first by EBC). Steps 1-3 and 5 run
jitted on device; the host decodes solutions for the PPRM's prompts and extracts answers.

Shapes: B trees, N = 1 + rollouts node slots, S tokens per solution (the budget of the first
answer and of every rewrite), P prompt tokens, C critique tokens, W = `RefineFormat.node_length`
tokens per node slot (S + C + the journey's format tokens: a rewrite as long as the part it
replaces fits), M = `RefineFormat.max_steps` (W // 8 + 2) step slots per solution.

A child whose journey (the parent's prefix up to the flaw + critic + refine + rewrite) still does
not fit its W-token slot is stored cut and marked `truncated`: it counts as a solution without an
answer, is never selected for refinement, and `SearchResult.truncated_children` counts it.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from o1jax.data import answers, longcot
from o1jax.model.gemma2 import forward, unembed
from o1jax.model.sampler import generate
from o1jax.parallel.mesh import constrain_rows
from o1jax.search import ebc, pprm
from o1jax.search.format import make_step_format, special_id
from o1jax.search.mcts import StepFormat, check_fields, trim_to_bucket
from o1jax.search.ratings import thought_ratings

NO_NODE = -1
VALUES = ("self_reward", "pprm")


@dataclasses.dataclass(frozen=True)
class RefineConfig:
    """MCTSr / SR-MCTS hyper-parameters (the papers' defaults where they had them)."""

    rollouts: int = 8
    # "self_reward" (MCTSr-style self-reward from step ratings) or "pprm" (SR-MCTS, PPRM + EBC)
    value: str = "self_reward"
    max_children: int = 2  # fully expanded: this many children and one valued above the node
    solution_length: int = 160  # S: token budget of one whole solution
    critique_length: int = 24  # C: token budget of the <critic> thought
    # MCTSr's C, for Q in [-100, 100]: self-reward mode scales Q by 100 in the UCT score only
    # (stored values stay in [-1, 1]); pprm mode uses its [0, 1] values as they are.
    c_uct: float = 1.4
    eps: float = 1e-6  # MCTSr's epsilon in the UCT denominator
    suppress_at: float = 95.0  # self-reward: a step score >= this (full marks; inf: never) ...
    suppressed_score: float = 50.0  # ... is replaced by this (MCTSr: `if score >= 95: score = 50`)
    ebc_weight: float = 0.5  # SR-MCTS: weight of the global (EBC) value against the local one
    root_temperature: float = 0.0  # the first answer: greedy by default
    temperature: float = 1.0  # critiques and rewrites
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.value not in VALUES:
            raise ValueError(f"RefineConfig.value must be one of {VALUES}, got {self.value!r}")
        check_fields(
            self,
            rollouts=(int, 1, None),
            max_children=(int, 1, None),
            solution_length=(int, 8, None),
            critique_length=(int, 1, None),
            top_k=(int, 0, None),
            c_uct=(float, 0.0, None),
            suppressed_score=(float, -100.0, 100.0),
            ebc_weight=(float, 0.0, 1.0),
            root_temperature=(float, 0.0, None),
            temperature=(float, 0.0, None),
        )
        if not self.eps > 0.0 or not np.isfinite(self.eps):  # NaN fails too
            raise ValueError(f"RefineConfig.eps must be a finite number > 0, got {self.eps!r}")
        if not self.suppress_at > -100.0:  # step scores are in [-100, 100]; inf: no suppression
            raise ValueError(f"RefineConfig.suppress_at must be > -100, got {self.suppress_at!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"RefineConfig.top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def capacity(self) -> int:
        return 1 + self.rollouts

    @property
    def max_steps(self) -> int:
        """Step slots of an S-token solution; `RefineFormat.max_steps` covers a W-token node."""
        return self.solution_length // 8 + 2


@struct.dataclass
class RefineFormat:
    """Token pieces of the chain format that self-refinement writes (see `o1jax.search.format`)."""

    step: StepFormat  # headers for steps 0..max_steps + 3, rating suffixes
    critic: int = struct.field(pytree_node=False, default=0)
    refine: int = struct.field(pytree_node=False, default=0)
    start_of_thought: int = struct.field(pytree_node=False, default=0)
    end_of_rating: int = struct.field(pytree_node=False, default=0)
    unknown_rating: int = struct.field(pytree_node=False, default=-1)
    eos: int = struct.field(pytree_node=False, default=0)
    node_length: int = struct.field(pytree_node=False, default=0)  # W: tokens per node slot
    max_steps: int = struct.field(pytree_node=False, default=0)  # M: step slots of a node


def journey_margin(step: StepFormat, config: RefineConfig) -> int:
    """Tokens a journey adds to the solution it refines, beyond the rewrite's S: the flaw's
    negative rating, the critic's header, tag, C tokens and rating, the refine's header and tag."""
    h, w = step.headers.shape[1], step.suffixes.shape[1]
    return config.critique_length + 2 * (h + w) + 2


def make_refine_format(tokenizer, config: RefineConfig) -> RefineFormat:
    if tokenizer.eos_token_id is None:
        raise ValueError("refine: the tokenizer has no EOS token to end a whole solution")
    # W = S + the journey margin; M = W // 8 + 2 step slots, whose header rows (up to M + 3)
    # may in turn be longer (more digits): grow M until it covers W.
    m = config.max_steps
    while True:
        step = make_step_format(tokenizer, m + 2)
        width = config.solution_length + journey_margin(step, config)
        if width // 8 + 2 <= m:
            break
        m = width // 8 + 2
    return RefineFormat(
        step=step,
        critic=special_id(tokenizer, longcot.CRITIC),
        refine=special_id(tokenizer, longcot.REFINE),
        start_of_thought=special_id(tokenizer, longcot.START_OF_THOUGHT),
        end_of_rating=special_id(tokenizer, longcot.END_OF_RATING),
        unknown_rating=special_id(tokenizer, longcot.UNKNOWN_RATING),
        eos=int(tokenizer.eos_token_id),
        node_length=width,
        max_steps=m,
    )


@struct.dataclass
class SolutionTree:
    """B trees of whole solutions; node 0 is the first answer, children are its refinements."""

    tokens: jax.Array  # [B, N, W] int32, the solution after the prompt (EOS included)
    lengths: jax.Array  # [B, N] int32, <= W
    parent: jax.Array  # [B, N] int32, NO_NODE for the root and unused slots
    num_children: jax.Array  # [B, N] int32
    visits: jax.Array  # [B, N] int32
    value: jax.Array  # [B, N] float32, the node's own evaluation V
    q: jax.Array  # [B, N] float32, backed-up value Q
    has_answer: jax.Array  # [B, N] bool, ends in a complete <conclusion>
    flaw_cut: jax.Array  # [B, N] int32, token where the weakest step's rating starts
    flaw_header: jax.Array  # [B, N] int32, header row (step number) of the critic after it
    truncated: jax.Array  # [B, N] bool, a child whose journey did not fit its W tokens (cut)
    num_nodes: jax.Array  # [B] int32

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def capacity(self) -> int:
        return self.tokens.shape[1]

    def valid(self) -> jax.Array:
        """[B, N] bool: slots in use."""
        return jnp.arange(self.capacity)[None, :] < self.num_nodes[:, None]


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def init_tree(batch_size: int, capacity: int, node_length: int) -> SolutionTree:
    """An empty tree of `capacity` node slots of `node_length` (W) tokens (jitted, and under a
    mesh split over the batch axes, as `tree.init_tree`)."""
    b, n, s = batch_size, capacity, node_length
    zeros = lambda dtype: jnp.zeros((b, n), dtype)
    tree = SolutionTree(
        tokens=jnp.zeros((b, n, s), jnp.int32),
        lengths=zeros(jnp.int32),
        parent=jnp.full((b, n), NO_NODE, jnp.int32),
        num_children=zeros(jnp.int32),
        visits=zeros(jnp.int32),
        value=zeros(jnp.float32),
        q=zeros(jnp.float32),
        has_answer=zeros(bool),
        flaw_cut=zeros(jnp.int32),
        flaw_header=jnp.ones((b, n), jnp.int32),
        truncated=zeros(bool),
        num_nodes=jnp.zeros((b,), jnp.int32),
    )
    return jax.tree.map(constrain_rows, tree)


# ----------------------------------------------------------------------------- token plumbing
def _concat(pieces, width: int, pad: int):
    """Concatenates (tokens [w_i], length) pieces of one row into [width] (excess dropped)."""
    out = jnp.full((width,), pad, jnp.int32)
    start = jnp.zeros((), jnp.int32)
    for tokens, length in pieces:
        t = jnp.arange(tokens.shape[0])
        dest = jnp.where(t < length, start + t, width)
        out = out.at[dest].set(tokens.astype(jnp.int32), mode="drop")
        start = start + length
    return out, jnp.minimum(start, width)


def _one(token: int):
    return jnp.asarray([token], jnp.int32)


# ----------------------------------------------------------------------------- step statistics
@struct.dataclass
class StepStats:
    """What one forward pass over (prompt, solution) says about the solution's steps."""

    self_reward: jax.Array  # [R] float32 in [-1, 1], (min + mean) / 2 of step scores / 100
    has_answer: jax.Array  # [R] bool, the last effective step is a complete <conclusion>
    flaw_cut: jax.Array  # [R] int32, where the weakest effective step's rating starts (0: none)
    flaw_header: jax.Array  # [R] int32, header row of the critic that follows it
    positive: jax.Array  # [R, M] float32, P(<positive_rating>) of each step (NaN if none)


def _step_stats_one(tokens, length, positive_at, fmt: RefineFormat, config: RefineConfig):
    """Step statistics of one solution [W] given P(positive) at each position [W]."""
    s, m = tokens.shape[0], fmt.max_steps
    f = fmt.step
    t = jnp.arange(s)
    live = t < length
    is_sor = live & (tokens == f.start_of_rating) & (t + 1 < length)  # its rating token follows
    is_eor = live & (tokens == fmt.end_of_rating)
    step_id = jnp.cumsum(is_eor) - is_eor  # [W], a step's tokens up to its <end_of_rating>
    seg = lambda x: jax.ops.segment_max(x, step_id, num_segments=m)
    sor_pos = seg(jnp.where(is_sor, t, -1))  # [M]
    opened = jnp.concatenate([jnp.zeros((1,), bool), tokens[:-1] == fmt.start_of_thought]) & live
    first = seg(jnp.where(opened, tokens, -1))  # [M] first token of each step's thought
    rating_token = tokens[jnp.clip(sor_pos + 1, 0, s - 1)]
    # A step is complete when a real rating follows its <start_of_rating> (the host's parse,
    # `solution_steps`, reads the same three tokens).
    rated = (
        (rating_token == f.positive_rating)
        | (rating_token == f.negative_rating)
        | (rating_token == fmt.unknown_rating)
    )
    valid = (sor_pos >= 0) & rated
    is_critic = valid & (first == fmt.critic)
    criticised = valid & jnp.concatenate([is_critic[1:], jnp.zeros((1,), bool)])
    # A step counts unless it was critiqued (a <critic> follows it) or is a critic itself,
    # whatever its own rating: a step rated negative is the model's lowest verdict, so it must
    # lower the self-reward and may be picked as the flaw (`effective_steps` on the host).
    effective = valid & ~is_critic & ~criticised
    conclusion = effective & (first == f.conclusion)
    p_pos = positive_at[jnp.clip(sor_pos, 0, s - 1)]  # [M]

    raw = 100.0 * (2.0 * p_pos - 1.0)  # [M] step scores in [-100, 100]
    score = jnp.where(raw >= config.suppress_at, config.suppressed_score, raw)  # MCTSr suppression
    n_eff = jnp.sum(effective)
    lowest = jnp.min(jnp.where(effective, score, jnp.inf))
    mean = jnp.sum(jnp.where(effective, score, 0.0)) / jnp.maximum(n_eff, 1)
    last_effective = jnp.max(jnp.where(effective, jnp.arange(m), -1))
    has_answer = (last_effective >= 0) & conclusion[jnp.maximum(last_effective, 0)]
    self_reward = jnp.where(has_answer, (lowest + mean) / 200.0, -1.0)

    # The weakest effective step that is not the conclusion (else the conclusion) gets critiqued.
    reasoning = effective & ~conclusion
    pick_from = jnp.where(jnp.any(reasoning), reasoning, effective)
    weakest = jnp.argmin(jnp.where(pick_from, p_pos, jnp.inf))
    found = jnp.any(pick_from)
    # Step k (0-based) has header row k + 1; its critic is step k + 2.
    flaw_cut = jnp.where(found, sor_pos[weakest], 0)
    flaw_header = jnp.where(found, weakest + 2, 1)
    return StepStats(
        self_reward=self_reward,
        has_answer=has_answer,
        flaw_cut=flaw_cut.astype(jnp.int32),
        flaw_header=flaw_header.astype(jnp.int32),
        positive=jnp.where(valid, p_pos, jnp.nan),
    )


@functools.partial(jax.jit, static_argnames=("cfg", "config"))
def step_statistics(
    params, cfg, prompts, prompt_lengths, solutions, lengths, fmt: RefineFormat, config, lora=None
) -> StepStats:
    """Reads the model's rating of every step of R solutions in one forward pass.

    prompts: [R, P]; prompt_lengths: [R]; solutions: [R, W]; lengths: [R].
    """
    r, s = solutions.shape
    chex.assert_shape(prompts, (r, None))
    width = prompts.shape[1] + s
    pad = fmt.step.pad

    def join(prompt, plen, sol, slen):
        return _concat([(prompt, plen), (sol, slen)], width, pad)

    seq, total = jax.vmap(join)(prompts, prompt_lengths, solutions, lengths)  # [R, P + W]
    mask = jnp.arange(width)[None, :] < total[:, None]
    hidden = forward(params, cfg, seq, attention_mask=mask, lora=lora, return_hidden=True)
    # The state at the solution's position t (sequence position plen + t) predicts token t + 1.
    at = prompt_lengths[:, None] + jnp.arange(s)[None, :]  # [R, W]
    picked = jnp.take_along_axis(hidden, jnp.minimum(at, width - 1)[:, :, None], axis=1)
    f = fmt.step
    pair = unembed(params, cfg, picked, (f.positive_rating, f.negative_rating))  # [R, W, 2]
    positive_at = jax.nn.sigmoid(pair[..., 0] - pair[..., 1])  # [R, W] float32
    fn = functools.partial(_step_stats_one, fmt=fmt, config=config)
    return jax.vmap(fn)(solutions, lengths, positive_at)


# ----------------------------------------------------------------------------- selection
@functools.partial(jax.jit, static_argnames=("config",))
def select(tree: SolutionTree, config: RefineConfig) -> jax.Array:
    """The node [B] each tree refines next: UCT over MCTSr's candidates.

    MCTSr's `filter_mature_node`: a node is fully expanded when it has `max_children` children
    *and* one of them has a Q above its own; a candidate is any other node that is not a
    truncated child. Should no node qualify (every open node truncated), any node that is not
    truncated may be refined (the root always is one), past `max_children` if need be.
    UCT = Q + c sqrt(ln(N(parent) + 1) / (N + eps)), Q times 100 in self-reward mode (MCTSr's
    units, for which c = 1.4 is set); the root's exploration term is 0 (MCTSr: N(parent) = 0).
    """
    b, n = tree.batch_size, tree.capacity
    valid = tree.valid()
    rows = jnp.arange(b)[:, None]
    parent_safe = jnp.maximum(tree.parent, 0)
    up = jnp.where(valid & (tree.parent >= 0), tree.parent, n)
    child_q = jnp.full((b, n), -jnp.inf).at[rows, up].max(tree.q, mode="drop")  # [B, N]
    whole = valid & ~tree.truncated
    candidate = whole & ((tree.num_children < config.max_children) | (child_q <= tree.q))
    candidate = jnp.where(jnp.any(candidate, axis=1, keepdims=True), candidate, whole)
    parent_visits = jnp.take_along_axis(tree.visits, parent_safe, axis=1)  # [B, N]
    explore = jnp.sqrt(jnp.log(parent_visits + 1.0) / (tree.visits + config.eps))
    explore = jnp.where(tree.parent >= 0, explore, 0.0)  # the root: ln(0 + 1) = 0
    scale = 100.0 if config.value == "self_reward" else 1.0  # Q in MCTSr's [-100, 100]
    uct = scale * tree.q + config.c_uct * explore  # [B, N]
    return jnp.argmax(jnp.where(candidate, uct, -jnp.inf), axis=1).astype(jnp.int32)


# ----------------------------------------------------------------------------- expansion
@jax.jit
def critique_prefixes(tree: SolutionTree, node, prompts, prompt_lengths, fmt: RefineFormat):
    """(tokens [B, W1], lengths [B]): prompts that open a <critic> thought after the weakest
    step of each `node` [B].

    prompt + the solution up to the weakest step's rating + a negative rating + critic header.
    """
    b, s = tree.batch_size, tree.tokens.shape[2]
    f = fmt.step
    h, w = f.headers.shape[1], f.suffixes.shape[1]
    width = prompts.shape[1] + s + w + h + 1
    rows = jnp.arange(b)

    def one(prompt, plen, sol, cut, header):
        rated = jnp.where(cut > 0, f.suffix_lengths[0], 0)  # nothing to rate before step 1
        return _concat(
            [
                (prompt, plen),
                (sol, cut),
                (f.suffixes[0], rated),
                (f.headers[header], f.header_lengths[header]),
                (_one(fmt.critic), 1),
            ],
            width,
            f.pad,
        )

    return jax.vmap(one)(
        prompts,
        prompt_lengths,
        tree.tokens[rows, node],
        tree.flaw_cut[rows, node],
        tree.flaw_header[rows, node],
    )


def _critique_piece(critique, c_len, stopped, eot: int):
    """A critique's tokens [C] and length, closed with <end_of_thought> if it ran out of budget."""
    last = jnp.minimum(c_len, critique.shape[0] - 1)
    closed = jnp.where(stopped, critique, critique.at[last].set(eot))
    return closed, jnp.where(stopped, c_len, last + 1)


@jax.jit
def rewrite_prefixes(prefix, prefix_lengths, tree: SolutionTree, node, critique, fmt):
    """(tokens [B, W2], lengths [B]): prompts that open the <refine> thought: the critique
    prefix + the critique (`SampleOutput` of B rows) + a positive rating + the next header +
    <refine>."""
    f = fmt.step
    h = f.headers.shape[1]
    width = prefix.shape[1] + critique.tokens.shape[1] + f.suffixes.shape[1] + h + 1
    header = tree.flaw_header[jnp.arange(tree.batch_size), node] + 1

    def one(pre, plen, c_tok, c_len, stopped, hrow):
        c_tok, c_len = _critique_piece(c_tok, c_len, stopped, f.end_of_thought)
        return _concat(
            [
                (pre, plen),
                (c_tok, c_len),
                (f.suffixes[1], f.suffix_lengths[1]),
                (f.headers[hrow], f.header_lengths[hrow]),
                (_one(fmt.refine), 1),
            ],
            width,
            f.pad,
        )

    return jax.vmap(one)(
        prefix,
        prefix_lengths,
        critique.tokens,
        critique.lengths,
        critique.stopped,
        header,
    )


@jax.jit
def child_solutions(rewrite_prefix, rewrite_lengths, prompt_lengths, rewrite, fmt):
    """(children [B, W], lengths [B], truncated [B]): the rewrite prefix without its prompt,
    then the rewrite, in W = `fmt.node_length` tokens. truncated: the journey was longer than
    W and is cut (its end, EOS included, is lost)."""
    w = fmt.node_length
    pad = fmt.step.pad

    def one(pre, plen, total, tok, length):
        shifted = jnp.roll(pre, -plen)  # the part after the prompt first
        child, child_len = _concat([(shifted, total - plen), (tok, length)], w, pad)
        return child, child_len, (total - plen) + length > w

    return jax.vmap(one)(
        rewrite_prefix, prompt_lengths, rewrite_lengths, rewrite.tokens, rewrite.lengths
    )


@functools.partial(jax.jit, donate_argnums=(0,))
def add_children(
    tree: SolutionTree, node, tokens, lengths, stats: StepStats, truncated=None
) -> SolutionTree:
    """Writes one child per tree under `node` [B] and counts the visit along its path.

    tokens: [B, W]; truncated: [B] bool or None, a cut journey (`child_solutions`): recorded,
    and the child has no answer.
    """
    b, n = tree.batch_size, tree.capacity
    rows = jnp.arange(b)
    slot = tree.num_nodes  # [B]
    chex.assert_shape(tokens, (b, tree.tokens.shape[2]))
    truncated = jnp.zeros((b,), bool) if truncated is None else truncated
    visits = tree.visits
    cur = node
    for _ in range(n):  # the path from `node` to the root (at most N nodes)
        visits = visits.at[rows, jnp.where(cur >= 0, cur, n)].add(1, mode="drop")
        cur = jnp.where(cur >= 0, tree.parent[rows, jnp.maximum(cur, 0)], NO_NODE)
    return tree.replace(
        tokens=tree.tokens.at[rows, slot].set(tokens, mode="drop"),
        lengths=tree.lengths.at[rows, slot].set(lengths, mode="drop"),
        parent=tree.parent.at[rows, slot].set(node, mode="drop"),
        num_children=tree.num_children.at[rows, jnp.where(node >= 0, node, n)].add(1, mode="drop"),
        visits=visits.at[rows, slot].set(1, mode="drop"),
        has_answer=tree.has_answer.at[rows, slot].set(stats.has_answer & ~truncated, mode="drop"),
        flaw_cut=tree.flaw_cut.at[rows, slot].set(stats.flaw_cut, mode="drop"),
        flaw_header=tree.flaw_header.at[rows, slot].set(stats.flaw_header, mode="drop"),
        truncated=tree.truncated.at[rows, slot].set(truncated, mode="drop"),
        num_nodes=tree.num_nodes + 1,
    )


# ----------------------------------------------------------------------------- values + backup
@jax.jit
def backup(tree: SolutionTree, value: jax.Array) -> SolutionTree:
    """Sets the nodes' values V [B, N] and Q(a) = (V(a) + max_c Q(c)) / 2 bottom-up.

    Children always sit in later slots than their parents, so one reverse sweep suffices.
    """
    b, n = tree.batch_size, tree.capacity
    rows = jnp.arange(b)
    valid = tree.valid()
    value = jnp.where(valid, value, 0.0)

    def sweep(i, carry):
        q, best_child = carry
        node = n - 1 - i
        has_kids = best_child[:, node] > -jnp.inf
        q_node = jnp.where(has_kids, 0.5 * (value[:, node] + best_child[:, node]), value[:, node])
        q = q.at[:, node].set(q_node)
        up = jnp.where(valid[:, node] & (tree.parent[:, node] >= 0), tree.parent[:, node], n)
        best_child = best_child.at[rows, up].max(q_node, mode="drop")
        return q, best_child

    q, _ = jax.lax.fori_loop(0, n, sweep, (value, jnp.full((b, n), -jnp.inf)))
    return tree.replace(value=value, q=jnp.where(valid, q, 0.0))


# ----------------------------------------------------------------------------- host side
# One whole step as `longcot.render_chain` writes it: step_header(father, local) + thought +
# step_suffix(rating), whose "\n" may be missing at the end (`render_tree` has none there).
_STEP_RE = re.compile(
    re.escape(longcot.START_OF_FATHER_ID)
    + r"-?[0-9]+"
    + re.escape(longcot.END_OF_FATHER_ID + longcot.START_OF_LOCAL_ID)
    + r"-?[0-9]+"
    + re.escape(longcot.END_OF_LOCAL_ID + longcot.START_OF_THOUGHT)
    + r"((?:(?!"
    + re.escape(longcot.END_OF_THOUGHT)
    + r").)*)"
    + re.escape(longcot.END_OF_THOUGHT + longcot.START_OF_RATING)
    + "("
    + "|".join(map(re.escape, longcot.RATINGS))
    + ")"
    + re.escape(longcot.END_OF_RATING)
    + r"\n?",
    re.S,
)


def _read_steps(text: str) -> tuple[list[tuple[str, str]], int]:
    """(`solution_steps(text)`, the offset where reading stopped)."""
    steps, pos = [], 0
    while (m := _STEP_RE.match(text, pos)) is not None:
        try:
            longcot.check_thought(m.group(1))
        except ValueError:
            break
        steps.append((m.group(1), m.group(2)))
        pos = m.end()
    return steps, pos


def solution_steps(text: str) -> list[tuple[str, str]]:
    """(thought text with its action tag, rating) of the complete steps of a decoded solution,
    read back to back from its start up to the first malformed one (text that is not a whole
    step, a rating that is not one of `longcot.RATINGS`, a thought holding a format token): the
    chain breaks there, and whatever follows (EOS, a cut step) is not read."""
    return _read_steps(text)[0]


# A rating as `step_statistics` reads one: <start_of_rating> and a rating token right after it.
_RATING_RE = re.compile(
    re.escape(longcot.START_OF_RATING) + "(?:" + "|".join(map(re.escape, longcot.RATINGS)) + ")"
)


def chain_is_whole(text: str) -> bool:
    """Whether `solution_steps` reads every rated step of a decoded solution: no rating follows
    where it stops (the device's `step_statistics`, which reads every rated step, would value
    steps past a break; search gives such a node no answer, and mining skips it the same way)."""
    return _RATING_RE.search(text, _read_steps(text)[1]) is None


def effective_steps(steps: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The solution a journey amounts to: criticised steps (those a `<critic>` follows) and
    critics dropped, a `<refine>` read as the `<expansion>` it replaces (what `step_statistics`
    calls effective). Every other step stays, whatever its rating: one the model rated negative
    without critiquing it is still part of the solution."""
    out = []
    for k, (thought, rating) in enumerate(steps):
        if thought.startswith(longcot.CRITIC):
            continue
        if k + 1 < len(steps) and steps[k + 1][0].startswith(longcot.CRITIC):
            continue
        if thought.startswith(longcot.REFINE):
            thought = longcot.EXPANSION + thought[len(longcot.REFINE) :]
        out.append((thought, rating))
    return out


def effective_thoughts(steps: list[tuple[str, str]]) -> list[str]:
    """The thought texts of `effective_steps(steps)`: what the PPRM reads of a solution."""
    return [thought for thought, _ in effective_steps(steps)]


def decode(tokenizer, tokens: np.ndarray, length: int) -> str:
    return tokenizer.decode(tokens[:length].tolist(), skip_special_tokens=False)


def solution_answer(steps: list[tuple[str, str]]) -> str | None:
    """The final answer of a solution's effective steps: its last step, if a conclusion."""
    eff = effective_steps(steps)
    if not eff or not eff[-1][0].startswith(longcot.CONCLUSION):
        return None
    return answers.extract_answer(eff[-1][0])


@dataclasses.dataclass
class PPRMJudge:
    """The PPRM's adapter on the policy's base, and the tokenizer that writes its prompts.
    rated: the PPRM was trained on texts with the SFT'd model's verdict beside each thought
    (`PPRMSection.rated`); search then writes its solutions the same way, rated by `params`
    (the PPRM's base, that model) without the adapter."""

    params: object
    cfg: object
    lora: object
    tokenizer: object
    rated: bool = False
    width_multiple: int = 64  # pair prompts are padded to a multiple of this (fewer shapes)


@dataclasses.dataclass
class SearchResult:
    tree: SolutionTree  # numpy arrays (the search's final tree, copied to the host)
    steps: list[list[list[tuple[str, str]]]]  # [B][node] the decoded (thought, rating) steps
    answers: list[list[str | None]]  # [B][node] final answers (None: no conclusion)
    preferences: np.ndarray | None  # [B, N, N] symmetrised P(i better than j) (SR-MCTS)
    global_value: np.ndarray | None  # [B, N] EBC value (SR-MCTS)

    @property
    def truncated_children(self) -> np.ndarray:
        """[B] int: children per tree whose journey did not fit a node slot and was cut."""
        return np.asarray(self.tree.truncated).sum(axis=1)

    def best_node(self, b: int) -> int:
        """The chosen solution of tree b: best global value (SR-MCTS) or own value (MCTSr)."""
        n = int(self.tree.num_nodes[b])
        has = np.asarray(self.tree.has_answer[b, :n])
        value = np.asarray(self.tree.value[b, :n])
        score = value if self.global_value is None else self.global_value[b, :n] + 1e-3 * value
        return int(np.argmax(np.where(has, score, -np.inf))) if has.any() else 0

    def answer(self, b: int) -> str | None:
        return self.answers[b][self.best_node(b)]


def _pprm_update(judge: PPRMJudge, questions, texts, has, pref, new: int, b_count: int):
    """Compares node `new` of every tree with its earlier nodes (both orders, one forward)."""
    rows, where = [], []
    for b in range(b_count):
        if not has[b, new]:
            continue
        for i in range(new):
            if not has[b, i]:
                continue
            a, c = texts[b][new], texts[b][i]
            rows.append(pprm.encode_pair(judge.tokenizer, questions[b], a, c))
            rows.append(pprm.encode_pair(judge.tokenizer, questions[b], c, a))
            where.append((b, i))
    if not rows:
        return
    m = -(-len(rows) // 64) * 64  # rows padded to a multiple of 64 (few shapes); repeat row 0
    width = -(-max(len(r) for r in rows) // judge.width_multiple) * judge.width_multiple
    pad = judge.tokenizer.pad_token_id if judge.tokenizer.pad_token_id is not None else 0
    tokens = np.full((m, width), pad, np.int32)
    lengths = np.full((m,), len(rows[0]), np.int32)
    tokens[:] = np.pad(rows[0], (0, width - len(rows[0])), constant_values=pad)
    for r, ids in enumerate(rows):
        tokens[r] = pad
        tokens[r, : len(ids)] = ids
        lengths[r] = len(ids)
    logit = pprm.first_better_logit(
        judge.params,
        judge.cfg,
        jnp.asarray(tokens),
        jnp.asarray(lengths),
        judge.lora,
        pprm.answer_format(judge.tokenizer)[0],
    )
    first = np.asarray(jax.nn.sigmoid(logit))
    k = len(where)
    new_better, old_better = pprm.symmetrise(first[0 : 2 * k : 2], first[1 : 2 * k : 2])
    for (b, i), p, q in zip(where, new_better, old_better, strict=True):
        pref[b, new, i], pref[b, i, new] = p, q


def pprm_values(tree_parent: np.ndarray, has_answer: np.ndarray, pref: np.ndarray, weight: float):
    """(node values [B, N], global values [B, N]): EBC's global value mixed with the local one.

    The local value of a node is its mean preference over its parent and siblings (0.5 when it
    has none to compare with); nodes without an answer are left out of the ranking (value 0).
    """
    n = has_answer.shape[1]
    _, global_value = ebc.enhanced_borda_count(jnp.asarray(pref), jnp.asarray(has_answer))
    global_value = np.asarray(global_value)
    p = tree_parent[:, :, None]  # [B, N, 1] parent of node i
    near = (tree_parent[:, None, :] == p) & (p >= 0)  # [B, i, j]: j is a sibling of i
    near |= np.arange(n)[None, None, :] == p  # or its parent
    near &= ~np.eye(n, dtype=bool)[None] & ~np.isnan(pref)
    count = near.sum(-1)
    local = np.where(count > 0, np.where(near, pref, 0.0).sum(-1) / np.maximum(count, 1), 0.5)
    value = ebc.mix_values(global_value, local, weight)
    return np.where(has_answer, value, 0.0).astype(np.float32), global_value


def run(
    params,
    cfg,
    tokenizer,
    questions: list[str],
    prompts: jax.Array,
    prompt_lengths: jax.Array,
    config: RefineConfig,
    key: jax.Array,
    lora=None,
    judge: PPRMJudge | None = None,
    live: int | None = None,
) -> SearchResult:
    """Grows B = len(questions) solution trees for `config.rollouts` rollouts.

    prompts: [B, P] right-padded problem prompts (`encode_prompts`); prompt_lengths: [B].
    judge: the PPRM, required when `config.value == "pprm"`.
    live: the first `live` trees are real problems (None: all B); the rest only pad a batch to
      its compiled shape. They grow on device like the others, but the host neither decodes
      nor judges them: they hold no steps and no answers, and the PPRM compares none of them.
    """
    b = len(questions)
    chex.assert_shape(prompts, (b, None))
    live = b if live is None else live
    if not 0 < live <= b:
        raise ValueError(f"refine.run: live must be in [1, {b}] (the batch), got {live}")
    if config.value == "pprm" and judge is None:
        raise ValueError("refine.run: value 'pprm' (SR-MCTS) needs a PPRMJudge")
    fmt = make_refine_format(tokenizer, config)
    n, s, w = config.capacity, config.solution_length, fmt.node_length
    sample = functools.partial(
        generate, params, cfg, lora=lora, top_k=config.top_k, top_p=config.top_p
    )
    stats_fn = functools.partial(step_statistics, params, cfg, fmt=fmt, config=config, lora=lora)

    key, k_root = jax.random.split(key)
    root = sample(
        prompts,
        prompt_lengths,
        key=k_root,
        max_new_tokens=s,
        temperature=config.root_temperature,
        stop_tokens=(fmt.eos,),
    )
    tree = init_tree(b, n, w)
    root_node = jnp.full((b,), NO_NODE, jnp.int32)
    root_tokens = jnp.pad(
        root.tokens, ((0, 0), (0, w - root.tokens.shape[1])), constant_values=fmt.step.pad
    )  # [B, W]
    stats = stats_fn(prompts, prompt_lengths, root_tokens, root.lengths)
    tree = add_children(tree, root_node, root_tokens, root.lengths, stats)

    steps: list[list[list[tuple[str, str]]]] = [[] for _ in range(b)]
    texts: list[list[str]] = [[] for _ in range(b)]  # what the PPRM reads
    found: list[list[str | None]] = [[] for _ in range(b)]
    pref = np.full((b, n, n), np.nan, np.float32) if config.value == "pprm" else None
    self_reward = np.zeros((b, n), np.float32)
    global_value = None

    def evaluate_new(tree, stats, new: int):
        nonlocal global_value
        tokens, lengths = np.asarray(tree.tokens[:, new]), np.asarray(tree.lengths[:, new])
        cut = np.asarray(tree.truncated[:, new])
        for t in range(b):
            if t >= live:  # a padding tree: nothing to read or judge
                steps[t].append([])
                found[t].append(None)
                continue
            text = decode(tokenizer, tokens[t], int(lengths[t]))
            steps[t].append(solution_steps(text))
            # The device valued every rated step; an answer read before a break in the chain
            # is not this node's: no answer then, nor for a cut child.
            whole = chain_is_whole(text) and not cut[t]
            found[t].append(solution_answer(steps[t][-1]) if whole else None)
        if pref is not None:
            new_texts = pprm_texts(judge, questions[:live], [steps[t][-1] for t in range(live)])
            for t in range(b):
                texts[t].append(new_texts[t] if t < live else "")
        # An answer needs a well-formed chain too (the host's parse is the stricter one).
        parsed = jnp.asarray([found[t][new] is not None for t in range(b)])
        tree = tree.replace(
            has_answer=tree.has_answer.at[:, new].set(tree.has_answer[:, new] & parsed)
        )
        has = np.asarray(tree.has_answer)
        self_reward[:, new] = np.where(has[:, new], np.asarray(stats.self_reward), -1.0)
        if pref is None:
            return backup(tree, jnp.asarray(self_reward))
        _pprm_update(judge, questions, texts, has, pref, new, b)
        value, global_value = pprm_values(np.asarray(tree.parent), has, pref, config.ebc_weight)
        return backup(tree, jnp.asarray(value))

    tree = evaluate_new(tree, stats, 0)
    for rollout in range(config.rollouts):
        k_critic, k_rewrite = jax.random.split(jax.random.fold_in(key, rollout))
        node = select(tree, config)
        prefix, prefix_len = critique_prefixes(tree, node, prompts, prompt_lengths, fmt)
        prefix = trim_to_bucket(prefix, prefix_len)
        critique = sample(
            prefix,
            prefix_len,
            key=k_critic,
            max_new_tokens=config.critique_length,
            temperature=config.temperature,
            stop_tokens=(fmt.step.end_of_thought,),
        )
        prefix2, prefix2_len = rewrite_prefixes(prefix, prefix_len, tree, node, critique, fmt)
        prefix2 = trim_to_bucket(prefix2, prefix2_len)
        rewrite = sample(
            prefix2,
            prefix2_len,
            key=k_rewrite,
            max_new_tokens=s,
            temperature=config.temperature,
            stop_tokens=(fmt.eos,),
        )
        child, child_len, cut = child_solutions(prefix2, prefix2_len, prompt_lengths, rewrite, fmt)
        stats = stats_fn(prompts, prompt_lengths, child, child_len)
        tree = add_children(tree, node, child, child_len, stats, cut)
        tree = evaluate_new(tree, stats, rollout + 1)
    # The search is done: its reader indexes one tree at a time, which on device arrays is an
    # eager gather per field and problem (as `export._host` says).
    return SearchResult(jax.device_get(tree), steps, found, pref, global_value)


def pprm_texts(judge: PPRMJudge, questions: list[str], solutions: list[list[tuple[str, str]]]):
    """What the PPRM reads of each solution's (thought, rating) steps: its effective thoughts
    (`pprm.solution_text`), with the verdicts of the judge's base model when it is `rated`."""
    thoughts = [effective_thoughts(steps) for steps in solutions]
    verdicts = [None] * len(solutions)
    if judge.rated:  # the SFT'd model's verdicts, as the PPRM was trained to read them
        pairs = list(zip(questions, thoughts, strict=True))
        verdicts = thought_ratings(judge.params, judge.cfg, judge.tokenizer, pairs)
    return [pprm.solution_text(t, v) for t, v in zip(thoughts, verdicts, strict=True)]


# ----------------------------------------------------------------------------- export
def tree_to_longcot(result: SearchResult, b: int, question: str, truth: str | None = None):
    """Tree b as OpenLongCoT nodes: every solution (a journey after refinement) is a path from
    the problem; shared prefixes merge, so a child branches off its parent at the step it
    criticised. With `truth`, each conclusion is rated by the answer check, bar one that the
    next step criticises: it keeps the search's (negative) rating, so the journey's copy of a
    parent's conclusion stays apart from the parent's own."""
    paths = []
    for raw in result.steps[b]:
        if not raw:
            continue
        thoughts, ratings = [], []
        for k, (thought, rating) in enumerate(raw):
            criticised = k + 1 < len(raw) and raw[k + 1][0].startswith(longcot.CRITIC)
            if truth is not None and thought.startswith(longcot.CONCLUSION) and not criticised:
                got = answers.extract_answer(thought)
                good = got is not None and answers.is_equivalent(got, truth)
                rating = longcot.POSITIVE_RATING if good else longcot.NEGATIVE_RATING
            thoughts.append(thought)
            ratings.append(rating)
        paths.append(longcot.chain(question, thoughts, ratings))
    return longcot.paths_to_tree(paths) if paths else longcot.chain(question, [])
