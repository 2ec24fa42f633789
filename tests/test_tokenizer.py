"""The tiny tokenizer (exact round trips, single-token specials and digits, HF save / load),
long-CoT tokens on a foreign tokenizer, and embedding growth."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from o1jax.data import longcot, tasks
from o1jax.data import tokenizer as tk
from o1jax.data.longcot import SPECIAL_TOKENS
from o1jax.model import Gemma2Config


@pytest.fixture(scope="module")
def tok():
    return tk.build_tiny_tokenizer()


def _texts():
    problems = tasks.generate_problems(tasks.ArithmeticTask(), 60, seed=11, split="test")
    hard = tasks.ArithmeticTask(num_ops=(5, 6), max_operand=999, max_value=99999)
    problems += tasks.generate_problems(hard, 20, seed=1)
    for i, p in enumerate(problems):
        yield p.question
        yield tasks.sft_text(p)
        yield tasks.journey_text(p, i)
        yield longcot.render_tree(tasks.journey_tree(p, i))
        yield longcot.step_header(i, i + 1) + p.steps[0]
    yield "Unicode é ∑ 日本 \t tabs  double  spaces\n\n and \\frac{1}{2} <notatoken> <end_of"


def test_ids_and_vocabulary(tok):
    specials = [tk.PAD, tk.EOS, tk.BOS, tk.UNK, *SPECIAL_TOKENS]
    assert [tok.convert_tokens_to_ids(t) for t in specials] == list(range(20))
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    assert len(tok) <= tk.TINY_VOCAB_SIZE
    ids = tk.token_ids(tok)
    assert {k: ids[k] for k in ("pad", "eos", "bos")} == {"pad": 0, "eos": 1, "bos": 2}
    assert set(ids) == {"pad", "eos", "bos"} | {t.strip("<>") for t in SPECIAL_TOKENS}
    assert tok.convert_ids_to_tokens(ids["end_of_thought"]) == "<end_of_thought>"


def test_digits_are_single_tokens(tok):
    vocab = tok.get_vocab()
    assert all(len(t) == 1 for t in vocab if any(c.isdigit() for c in t) and t[0] != "<")
    ids = tok.encode("x = 1234567890", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids)[-10:] == list("1234567890")


def test_round_trip_and_single_specials(tok):
    for text in _texts():
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        assert tok.encode(text) == ids  # no <bos> added
        for s in SPECIAL_TOKENS:  # each special occurrence is exactly one id
            assert ids.count(tok.convert_tokens_to_ids(s)) == text.count(s)
        assert tok.unk_token_id not in ids


def test_pieces_tokenize_like_the_whole(tok):
    # The search assembles prefixes from separately tokenized pieces; SFT tokenizes whole texts.
    enc = lambda s: tok.encode(s, add_special_tokens=False)
    for i, p in enumerate(tasks.generate_problems(tasks.ArithmeticTask(), 10, seed=2)):
        nodes = tasks.journey_solution(p, i)
        pieces = enc(longcot.render_prompt(p.question))
        for k, n in enumerate(nodes[1:], start=1):
            pieces += (
                enc(longcot.step_header(k - 1, k))
                + enc(n.text)
                + enc(longcot.step_suffix(n.rating))
            )
        assert pieces == enc(tasks.journey_text(p, i))


def test_deterministic_save_and_load(tok, tmp_path):
    again = tk.build_tiny_tokenizer(tmp_path / "tiny")
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    from transformers import AutoTokenizer

    for loaded in (
        AutoTokenizer.from_pretrained(tmp_path / "tiny"),
        tk.load_tokenizer(tmp_path / "tiny"),
    ):
        assert loaded.get_vocab() == tok.get_vocab()
        assert tk.token_ids(loaded) == tk.token_ids(tok)
        text = tasks.sft_text(tasks.generate_problems(tasks.ArithmeticTask(), 1, seed=0)[0])
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.decode(loaded.encode(text)) == text
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        tk.load_tokenizer(tmp_path / "no_such_dir")
    with pytest.raises(ValueError, match="could not load a tokenizer"):
        tk.load_tokenizer(tmp_path)


def test_load_tokenizer_refuses_a_directory_without_tokenizer_files(tmp_path):
    # A model directory (as save_hf writes it): transformers would build a 5-token default.
    (tmp_path / "config.json").write_text(json.dumps(Gemma2Config.tiny().to_hf()))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"holds none of the tokenizer files tokenizer\.json"):
        tk.load_tokenizer(tmp_path)


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: {**d, "model": {**d["model"], "type": "BPE2"}},  # a newer library's variant
        lambda d: {k: v for k, v in d.items() if k != "added_tokens"},
    ],
    ids=["unknown model variant", "no added_tokens"],
)
def test_load_tokenizer_names_the_directory_of_a_tokenizer_json_it_cannot_read(tmp_path, damage):
    # The `tokenizers` library raises a bare Exception for a tokenizer.json it cannot parse (e.g.
    # one written by a newer version), transformers a KeyError for a missing section: both are
    # a ValueError naming the directory, which the CLIs print as one line.
    tk.build_tiny_tokenizer(tmp_path)
    saved = json.loads((tmp_path / "tokenizer.json").read_text())
    (tmp_path / "tokenizer.json").write_text(json.dumps(damage(saved)))
    with pytest.raises(ValueError, match=f"could not load a tokenizer from '{tmp_path}'"):
        tk.load_tokenizer(tmp_path)


def _foreign_tokenizer(extra_vocab=()):
    """A character-level tokenizer without the long-CoT tokens (`extra_vocab` entries are in
    its vocabulary but split by its pre-tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    entries = ["<pad>", "<eos>", "<bos>", "<unk>", *"abc<>_", *extra_vocab]
    raw = Tokenizer(models.WordLevel({c: i for i, c in enumerate(entries)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=raw,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
    )


def test_add_longcot_tokens():
    foreign = _foreign_tokenizer()
    with pytest.raises(ValueError, match="add_longcot_tokens"):
        tk.token_ids(foreign)
    before = len(foreign)
    foreign.add_special_tokens({"extra_special_tokens": ["<critic>"]})  # one already there
    assert tk.add_longcot_tokens(foreign) == 15
    assert tk.add_longcot_tokens(foreign) == 0
    assert len(foreign) == before + 16
    ids = tk.token_ids(foreign)
    assert (
        foreign.encode("a<end_of_thought>b", add_special_tokens=False)[1] == ids["end_of_thought"]
    )


def test_add_longcot_tokens_makes_a_split_vocabulary_entry_one_token():
    foreign = _foreign_tokenizer(["<critic>"])  # id 10, but encoded character by character
    before = len(foreign)
    assert tk.add_longcot_tokens(foreign) == 15  # new ids; <critic> keeps its own
    assert len(foreign) == before + 15
    assert tk.token_ids(foreign)["critic"] == 10
    assert foreign.encode("a<critic>b", add_special_tokens=False) == [4, 10, 5]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_resize_embeddings(dtype):
    table = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)), dtype)
    params = {"embedder": {"embedding": table}, "layer_0": {"w": jnp.ones(2)}}
    out = tk.resize_embeddings(params, 8)
    grown = out["embedder"]["embedding"]
    assert grown.shape == (8, 3) and grown.dtype == dtype
    np.testing.assert_array_equal(grown[:5], table)
    mean = jnp.mean(table.astype(jnp.float32), axis=0).astype(dtype)
    np.testing.assert_array_equal(grown[5:], jnp.broadcast_to(mean, (3, 3)))
    assert out["layer_0"] is params["layer_0"]
    assert params["embedder"]["embedding"].shape == (5, 3)  # input untouched
    assert tk.resize_embeddings(params, 5) is params
    with pytest.raises(ValueError, match="cannot shrink the embedding table from 5 to 4"):
        tk.resize_embeddings(params, 4)
    with pytest.raises(KeyError, match=r"\['embedder'\]\['embedding'\]"):
        tk.resize_embeddings({"embed": table}, 8)


def test_new_rows_start_at_their_names_pieces_so_no_two_long_cot_tokens_share_a_row():
    """A frozen, tied table (LoRA) keeps whatever the new rows start as: identical mean rows
    would give <positive_rating> and <negative_rating> the same logit for good."""
    letters = [*"abcdefghijklmnopqrstuvwxyz", " "]
    foreign = _foreign_tokenizer(letters)
    first = len(foreign)
    tk.add_longcot_tokens(foreign)
    pieces = tk.spelling_pieces(foreign, first)
    assert len(pieces) == len(foreign) - first == 16
    ids = tk.token_ids(foreign)
    positive = pieces[ids["positive_rating"] - first]
    assert foreign.decode(positive).replace(" ", "") == "positiverating"
    assert all(0 <= i < first for p in pieces for i in p)

    table = jnp.asarray(np.random.default_rng(0).normal(size=(first, 4)), jnp.float32)
    grown = tk.resize_embeddings({"embedder": {"embedding": table}}, len(foreign), pieces)
    rows = np.asarray(grown["embedder"]["embedding"])
    np.testing.assert_allclose(
        rows[ids["positive_rating"]], np.asarray(table)[positive].mean(0), rtol=1e-6
    )
    new = rows[first:]
    assert len({tuple(r) for r in new}) == 16  # every new token has its own row
    with pytest.raises(ValueError, match="2 piece lists for 16 new rows"):
        tk.resize_embeddings({"embedder": {"embedding": table}}, len(foreign), pieces[:2])
    with pytest.raises(ValueError, match=f"piece id {first} is not a row"):
        tk.resize_embeddings({"embedder": {"embedding": table}}, len(foreign), [[first]] * 16)


@pytest.mark.parametrize("padding", [0, 24])
def test_added_tokens_start_at_their_names_pieces_over_a_padded_tables_rows(padding):
    """A checkpoint whose table is padded past its tokenizer (`padding` spare rows, zeros as
    such checkpoints often hold) gives the long-CoT tokens ids inside the table: their rows must
    be set from their names' pieces too, not left at zero (one logit for every tag, for good
    under LoRA). Rows past the tokenizer stay as they were."""
    letters = [*"abcdefghijklmnopqrstuvwxyz", " "]
    foreign = _foreign_tokenizer(letters)
    first = len(foreign)
    tk.add_longcot_tokens(foreign)
    own = np.random.default_rng(0).normal(size=(first, 4)).astype(np.float32)
    table = jnp.asarray(np.concatenate([own, np.zeros((padding, 4), np.float32)]))
    fitted = tk.fit_embeddings({"embedder": {"embedding": table}}, foreign, first)
    rows = np.asarray(fitted["embedder"]["embedding"])
    assert rows.shape == (max(first + padding, len(foreign)), 4)
    np.testing.assert_array_equal(rows[:first], own)
    pieces = tk.spelling_pieces(foreign, first)
    for new_id, piece in zip(range(first, len(foreign)), pieces, strict=True):
        np.testing.assert_allclose(rows[new_id], own[piece].mean(0), rtol=1e-6)
    np.testing.assert_array_equal(rows[len(foreign) :], 0.0)  # spare rows past the tokenizer
    ids = tk.token_ids(foreign)
    assert not np.array_equal(rows[ids["positive_rating"]], rows[ids["negative_rating"]])
    if padding >= len(foreign) - first:  # nothing added, and the table holds every id
        same = {"embedder": {"embedding": table}}
        assert tk.fit_embeddings(same, foreign, len(foreign)) is same
