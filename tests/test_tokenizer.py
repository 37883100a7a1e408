"""`tweetlm tokenizer train`: byte-level BPE trained on real posts, exact round trip, transformers interop."""

import functools
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import EMOJI
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer

from tweetlm.data.corpus import SPLITS, iter_texts
from tweetlm.errors import UserError
from tweetlm.tokenizer.bpe import SPECIAL_TOKENS, Tokenizer
from tweetlm.tokenizer.trainer import TokenizerConfig, sample, train_tokenizer


def _texts(corpus: Path, split: str) -> list[str]:
    return [t for batch in iter_texts(corpus, split) for t in batch]


def test_round_trip_and_byte_counts_on_real_posts(small_corpus, small_tokenizer):
    tok = Tokenizer.load(small_tokenizer)
    sizes = tok.token_bytes()
    for split in SPLITS:
        texts = _texts(small_corpus, split)
        assert texts
        for text, ids in zip(texts, tok.encode_batch(texts)):
            assert ids == tok.encode(text)
            assert tok.decode(ids) == text
            assert sum(sizes[i] for i in ids) == len(text.encode())


_pieces = st.one_of(
    st.text(),  # any code point but surrogates
    st.sampled_from(EMOJI),
    st.sampled_from([" ", "  ", "\n", "\r\n", "\t", "\u00a0", "\u3000", "\u200d", "\ufe0f", "🏽"]),
    st.sampled_from(["@user", "#tag_1", "'s", "’ll", "12345", "नमस्ते", "مَرْحَبًا"]),
    st.sampled_from(["e\u0301", "\u212b", "ﬁ", "Ａ", "①"]),  # what a Unicode normalizer would change
    st.sampled_from(SPECIAL_TOKENS),
)


@functools.cache
def _tokenizer_and_sizes(folder: Path) -> tuple[Tokenizer, list[int]]:
    """Loaded once for all hypothesis examples."""
    tok = Tokenizer.load(folder)
    return tok, tok.token_bytes()


@settings(max_examples=400, deadline=None)
@given(st.lists(_pieces, max_size=12).map("".join))
def test_round_trip_any_unicode(small_tokenizer, text):
    tok, sizes = _tokenizer_and_sizes(small_tokenizer)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert sum(sizes[i] for i in ids) == len(text.encode())
    assert min(ids, default=len(SPECIAL_TOKENS)) >= len(SPECIAL_TOKENS), "a special id came out of plain text"


def test_special_tokens_have_fixed_ids_and_never_come_from_text(small_tokenizer):
    tok = Tokenizer.load(small_tokenizer)
    assert [tok.token_id(name) for name in SPECIAL_TOKENS] == list(range(6))
    assert (tok.boundary_id, tok.pad_id) == (0, 1)
    assert tok.decode([tok.token_id("<|user|>")]) == "<|user|>"
    assert tok.token_bytes()[:6] == [0] * 6
    post = "a post quoting <|endoftext|> and <|user|>"
    ids = tok.encode(post)
    assert min(ids) >= 6 and tok.decode(ids) == post


def test_pre_tokenizer_keeps_post_units_whole(small_tokenizer):
    """BPE never merges across these pieces, so the saved split pattern decides what a token can be."""
    pre = HFTokenizer.from_file(str(small_tokenizer / "tokenizer.json")).pre_tokenizer
    text = "@user it’s 12345 #covid_19 👩\u200d💻👍🏽 🇫🇷❤\ufe0fyes नमस्ते"
    pieces = [text[start:end] for _, (start, end) in pre.pre_tokenize_str(text)]
    assert pieces == ["@user", " it", "’s", " ", "12", "34", "5", " #covid_19", " 👩\u200d💻👍🏽", " 🇫🇷❤\ufe0f", "yes", " नमस्ते"]


def test_loads_in_transformers_with_same_ids(small_corpus, small_tokenizer):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer.load(small_tokenizer)
    fast = PreTrainedTokenizerFast(tokenizer_file=str(small_tokenizer / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(small_tokenizer)
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (tok.boundary_id, tok.boundary_id, tok.pad_id)
    assert len(auto) == tok.vocab_size
    for text in _texts(small_corpus, "val") + EMOJI:
        ids = tok.encode(text)
        assert fast.encode(text, add_special_tokens=False) == ids
        assert auto.encode(text, add_special_tokens=False) == ids
        assert auto.decode(ids) == text


def test_hash_is_sha256_of_file_and_survives_save(small_tokenizer, tmp_path):
    tok = Tokenizer.load(small_tokenizer / "tokenizer.json")
    assert tok.hash == hashlib.sha256((small_tokenizer / "tokenizer.json").read_bytes()).hexdigest()
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.hash == tok.hash
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|endoftext|>" and config["pad_token"] == "<|pad|>"


def test_train_prints_val_bytes_per_token(small_corpus, tmp_path, capsys):
    tok = train_tokenizer(TokenizerConfig(corpus=small_corpus, out=tmp_path, vocab_size=600))
    assert tok.vocab_size == 600
    val = _texts(small_corpus, "val")
    ratio = sum(len(t.encode()) for t in val) / sum(map(len, tok.encode_batch(val)))
    assert f"{ratio:.2f} bytes per token" in capsys.readouterr().out



def test_sample_is_seeded_uniform_and_streamed(small_corpus, tmp_path):
    """--sample N: N posts drawn uniformly from batches that stream by (algorithm R), kept in corpus order."""
    texts = [str(i) for i in range(1000)]
    batches = [texts[i:i + 37] for i in range(0, len(texts), 37)]
    picks = [sample(iter(batches), 100, seed=seed) for seed in range(200)]
    assert picks[0] == sample(iter(batches), 100, seed=0) != picks[1]
    assert all(len(p) == len(set(p)) == 100 and p == sorted(p, key=int) for p in picks)
    share = np.zeros(len(texts))
    for p in picks:
        share[[int(t) for t in p]] += 1 / len(picks)
    # each post's chance is 100/1000, at the start, the middle and the end of the stream alike (binomial sd 0.007)
    assert all(abs(share[i:i + 250].mean() - 0.1) < 0.01 for i in range(0, 1000, 250))
    assert sample(iter(batches), 5000, seed=0) == texts
    # a sample as large as the corpus is the corpus: the same tokenizer as without --sample
    whole = train_tokenizer(TokenizerConfig(corpus=small_corpus, out=tmp_path / "a", vocab_size=400))
    assert train_tokenizer(TokenizerConfig(corpus=small_corpus, out=tmp_path / "b", vocab_size=400, sample=10**6)).hash == whole.hash
    assert train_tokenizer(TokenizerConfig(corpus=small_corpus, out=tmp_path / "c", vocab_size=400, sample=50)).hash != whole.hash


def test_user_errors(small_corpus, tmp_path):
    with pytest.raises(UserError, match="not a corpus"):
        train_tokenizer(TokenizerConfig(corpus=tmp_path, out=tmp_path / "tok", vocab_size=1000))
    with pytest.raises(UserError, match="vocab_size = 200: too small"):
        TokenizerConfig(corpus=small_corpus, out=tmp_path / "tok", vocab_size=200)
    with pytest.raises(UserError, match="no tokenizer"):
        Tokenizer.load(tmp_path / "missing")
