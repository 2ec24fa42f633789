"""Tokenizers: the tiny default one built here, any Hugging Face one from a local directory,
the long-CoT tokens, and growing a model's embedding table to match.

The tiny tokenizer is a byte-level BPE (every text round-trips exactly; nothing is unknown) with
digits always split into single tokens and each long-CoT token one id. Ids: `<pad>` 0, `<eos>` 1,
`<bos>` 2, `<unk>` 3, the 16 long-CoT tokens 4..19, then 256 bytes and merges learned from the
default task's own texts, at most 512 in all. Like Hugging Face tokenizers with special tokens,
decode with `skip_special_tokens=False` to keep the long-CoT structure. Encoding adds no `<bos>`:
callers add it (as for Gemma, whose tokenizer adds it unless `add_special_tokens=False`).
"""

from __future__ import annotations

import re
from pathlib import Path

import chex
import jax.numpy as jnp

from o1jax.data.longcot import SPECIAL_TOKENS

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
TINY_VOCAB_SIZE = 512
_CORPUS_PROBLEMS = 256  # default-task problems whose texts train the tiny BPE (fixed seed)
# Files a Hugging Face tokenizer directory holds (at least one of them); without any,
# `AutoTokenizer` falls back to a default tokenizer built from config.json alone.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def _tiny_corpus() -> list[str]:
    """Texts of the default task (SFT chains and journeys, fixed task and seeds) cut at the
    special tokens, which are whole tokens already and must not take up merges."""
    from o1jax.data import tasks

    problems = tasks.generate_problems(tasks.ArithmeticTask(), _CORPUS_PROBLEMS, seed=0)
    cut = re.compile("|".join(map(re.escape, SPECIAL_TOKENS)))
    pieces = []
    for i, p in enumerate(problems):
        for text in (tasks.sft_text(p), tasks.journey_text(p, i)):
            pieces.extend(piece for piece in cut.split(text) if piece)
    return pieces


def build_tiny_tokenizer(out_dir: str | Path | None = None):
    """The project's tokenizer for the default task (deterministic, no network, well under 1 s).

    Returns a `transformers.PreTrainedTokenizerFast`; with `out_dir`, also saves it there in HF
    format (`AutoTokenizer.from_pretrained(out_dir)` loads it).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, EOS, BOS, UNK, *SPECIAL_TOKENS]
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(), trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=BOS,
        unk_token=UNK,
        extra_special_tokens=list(SPECIAL_TOKENS),
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )
    if [hf.convert_tokens_to_ids(t) for t in specials] != list(range(len(specials))):
        raise RuntimeError("tiny tokenizer: special token ids are not 0..19 in order")
    if out_dir is not None:
        hf.save_pretrained(str(out_dir))
    return hf


def load_tokenizer(path: str | Path):
    """Any Hugging Face tokenizer from a LOCAL directory (never the network).

    The directory must hold at least one of `TOKENIZER_FILES` (a model directory written by
    `save_hf` holds none: give the tokenizer's own directory)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {str(path)!r} does not exist")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"could not load a tokenizer from {str(path)!r}: it holds none of the tokenizer "
            f"files {', '.join(TOKENIZER_FILES)}"
        )
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # `tokenizers` raises a bare Exception for a file it cannot parse
        cause = str(e) if isinstance(e, OSError | ValueError) else f"{type(e).__name__}: {e}"
        raise ValueError(f"could not load a tokenizer from {str(path)!r}: {cause}") from e


def add_longcot_tokens(tokenizer) -> int:
    """Adds the long-CoT tokens that do not encode to one id (absent, or an ordinary vocabulary
    entry the pre-tokenizer splits), as special tokens (never split).

    Returns how many new ids were added; grow the model's embeddings to `len(tokenizer)` after
    (`resize_embeddings`).
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in SPECIAL_TOKENS if not _is_one_token(tokenizer, vocab, t)]
    if not missing:
        return 0
    before = len(tokenizer)
    tokenizer.add_special_tokens(
        {"extra_special_tokens": missing}, replace_extra_special_tokens=False
    )
    return len(tokenizer) - before  # a split vocabulary entry keeps its id


def token_ids(tokenizer) -> dict[str, int]:
    """Ids the search and training need: "pad", "eos", "bos", and every long-CoT token by its
    name without brackets ("end_of_thought", "start_of_rating", "positive_rating",
    "negative_rating", "end_of_rating", "conclusion", ...). Each must be one token."""
    ids: dict[str, int] = {}
    for name in ("pad", "eos", "bos"):
        value = getattr(tokenizer, f"{name}_token_id")
        if value is None:
            raise ValueError(f"tokenizer has no {name} token; set tokenizer.{name}_token first")
        ids[name] = int(value)
    vocab = tokenizer.get_vocab()
    for token in SPECIAL_TOKENS:
        if not _is_one_token(tokenizer, vocab, token):
            encoded = tokenizer.encode(token, add_special_tokens=False)
            raise ValueError(
                f"tokenizer does not hold the long-CoT token {token!r} as one token (encodes to "
                f"{encoded}); call add_longcot_tokens(tokenizer) and resize_embeddings(...)"
            )
        ids[token.strip("<>")] = vocab[token]
    return ids


def _is_one_token(tokenizer, vocab: dict[str, int], token: str) -> bool:
    """Whether `token` is in `vocab` and encodes to exactly its own id."""
    return token in vocab and tokenizer.encode(token, add_special_tokens=False) == [vocab[token]]


def spelling_pieces(tokenizer, first_id: int) -> list[list[int]]:
    """For each id from `first_id` to len(tokenizer) - 1 (tokens added after a model's
    vocabulary, as `add_longcot_tokens` adds them), the ids below `first_id` that its name
    encodes to: the token's text without brackets, underscores read as spaces
    ("<positive_rating>" -> "positive rating"). `resize_embeddings(..., pieces=...)` starts each
    new row at the mean of those rows."""
    pieces = []
    for new_id in range(first_id, len(tokenizer)):
        name = str(tokenizer.convert_ids_to_tokens(new_id)).strip("<>").replace("_", " ")
        ids = tokenizer.encode(name, add_special_tokens=False)
        pieces.append([int(i) for i in ids if 0 <= i < first_id])
    return pieces


def resize_embeddings(params: dict, new_vocab_size: int, pieces=None) -> dict:
    """Grows `params["embedder"]["embedding"]` [V, D] to [new_vocab_size, D]. Other entries are
    shared, not copied. Shrinking is an error; the same size returns `params` unchanged.

    New rows are the mean embedding, or with `pieces` (one list of old ids per new row, from
    `spelling_pieces`) the mean of those rows (the mean embedding where a list is empty);
    averaged in float32, stored in the table's dtype. Give pieces whenever the table stays
    frozen (LoRA): Gemma2 ties its input and output embeddings, so identical new rows would give
    every new token the same logit for good, and `<positive_rating>` could never be told from
    `<negative_rating>`."""
    try:
        table = params["embedder"]["embedding"]
    except (KeyError, TypeError) as e:
        raise KeyError("resize_embeddings: params has no ['embedder']['embedding'] table") from e
    chex.assert_rank(table, 2)
    vocab, dim = table.shape
    if new_vocab_size < vocab:
        raise ValueError(
            f"resize_embeddings: cannot shrink the embedding table from {vocab} to "
            f"{new_vocab_size} rows"
        )
    if new_vocab_size == vocab:
        return params
    wide = table.astype(jnp.float32)
    mean = jnp.mean(wide, axis=0)  # [D]
    if pieces is None:
        rows = jnp.broadcast_to(mean, (new_vocab_size - vocab, dim))
    else:
        if len(pieces) != new_vocab_size - vocab:
            raise ValueError(
                f"resize_embeddings: {len(pieces)} piece lists for {new_vocab_size - vocab} "
                "new rows"
            )
        bad = [i for p in pieces for i in p if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"resize_embeddings: piece id {bad[0]} is not a row of the table")
        rows = _piece_means(wide, pieces)
    grown = jnp.concatenate([table, rows.astype(table.dtype)])
    return {**params, "embedder": {**params["embedder"], "embedding": grown}}  # [V', D]


def fit_embeddings(params: dict, tokenizer, first_added: int) -> dict:
    """The embedding table [V, D] fitted to `tokenizer`, whose ids from `first_added` on were
    added to the model's own vocabulary (`first_added = len(tokenizer)` before
    `add_longcot_tokens`): grown to len(tokenizer) rows where shorter, and the row of every id
    from min(first_added, V) to len(tokenizer) - 1 set to the mean of its name's pieces
    (`spelling_pieces`; the mean of the rows below where it has none). That includes rows the
    table already had: a checkpoint whose table is padded past its tokenizer holds untrained
    rows there (often zeros), which would give every added token one logit for good under LoRA.
    Returns params with a [max(V, len(tokenizer)), D] table; rows past len(tokenizer) stay."""
    try:
        table = params["embedder"]["embedding"]
    except (KeyError, TypeError) as e:
        raise KeyError("fit_embeddings: params has no ['embedder']['embedding'] table") from e
    chex.assert_rank(table, 2)
    vocab, n = table.shape[0], len(tokenizer)
    start = min(first_added, vocab)
    if start >= n:
        return params
    known = table[:start].astype(jnp.float32)  # [start, D]: the model's own tokens
    rows = _piece_means(known, spelling_pieces(tokenizer, start))
    fitted = jnp.concatenate([table[:start], rows.astype(table.dtype), table[n:]])
    return {**params, "embedder": {**params["embedder"], "embedding": fitted}}  # [V', D]


def _piece_means(known, pieces):
    """[len(pieces), D] float32: per list of row ids, the mean of those rows of `known` [V, D]
    (float32), or the mean of all of `known` where a list is empty."""
    mean = jnp.mean(known, axis=0)
    return jnp.stack([jnp.mean(known[jnp.asarray(p)], axis=0) if p else mean for p in pieces])
