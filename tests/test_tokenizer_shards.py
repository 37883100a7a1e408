"""`tweetlm data tokenize`: token shards that decode back to the corpus, whatever the worker count."""

import json
from pathlib import Path

import numpy as np
import pytest

from tweetlm.data.corpus import SPLITS, iter_texts
from tweetlm.errors import UserError
from tweetlm.tokenizer.bpe import Tokenizer
from tweetlm.tokenizer.shards import TokenizeConfig, check_tokenizer, open_split, read_index, tokenize
from tweetlm.tokenizer.trainer import TokenizerConfig, train_tokenizer


def _tokenize(corpus: Path, tokenizer: Path, out: Path, **kw) -> dict:
    return tokenize(TokenizeConfig(corpus=corpus, tokenizer=tokenizer, out=out, **kw))


def _documents(shards: list[np.ndarray], boundary_id: int) -> list[np.ndarray]:
    """Split the concatenated shards at each boundary token (which starts every document)."""
    tokens = np.concatenate(shards)
    starts = np.flatnonzero(tokens == boundary_id)
    return np.split(tokens, starts)[1:]


def test_shards_decode_back_to_the_corpus(small_corpus, small_tokenizer, tmp_path):
    index = _tokenize(small_corpus, small_tokenizer, tmp_path, shard_tokens=5000)
    tok = Tokenizer.load(small_tokenizer)
    assert read_index(tmp_path) == index
    assert (index["tokenizer_hash"], index["vocab_size"], index["dtype"]) == (tok.hash, tok.vocab_size, "uint16")
    assert len(index["splits"]["train"]) > 1, "5000-token shards should split the train split"
    for split in SPLITS:
        texts = [t for batch in iter_texts(small_corpus, split) for t in batch]
        shards = open_split(tmp_path, split)
        assert all(shard[0] == tok.boundary_id and shard.dtype == np.dtype("<u2") for shard in shards)
        docs = _documents(shards, tok.boundary_id)
        assert [tok.decode(doc[1:].tolist()) for doc in docs] == texts
        entries = index["splits"][split]
        assert [e["tokens"] for e in entries] == [len(s) for s in shards]
        assert sum(e["docs"] for e in entries) == len(texts)
        assert sum(e["bytes"] for e in entries) == sum(len(t.encode()) for t in texts)
        # a shard closes at the first document past shard_tokens
        assert all(e["tokens"] - len(doc) < 5000 for e, doc in zip(entries, _last_docs(shards, tok.boundary_id)))


def _last_docs(shards, boundary_id):
    return [_documents([shard], boundary_id)[-1] for shard in shards]


def test_two_workers_write_the_same_bytes(small_corpus, small_tokenizer, tmp_path):
    one = _tokenize(small_corpus, small_tokenizer, tmp_path / "one", workers=1, shard_tokens=5000)
    two = _tokenize(small_corpus, small_tokenizer, tmp_path / "two", workers=2, shard_tokens=5000)
    assert one == two
    for split in SPLITS:
        for entry in one["splits"][split]:
            assert (tmp_path / "one" / entry["file"]).read_bytes() == (tmp_path / "two" / entry["file"]).read_bytes()


def test_uint32_when_the_vocabulary_passes_65536(small_corpus, small_tokenizer, tmp_path):
    """Pad the BPE vocabulary with tokens no merge can reach: ids stay small, but the file format must switch."""
    spec = json.loads((small_tokenizer / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab |= {f"zz{i}": len(vocab) + i for i in range(2**16 + 1 - len(vocab))}
    (tmp_path / "big.json").write_text(json.dumps(spec))
    index = _tokenize(small_corpus, tmp_path / "big.json", tmp_path / "tokens")
    assert (index["vocab_size"], index["dtype"]) == (2**16 + 1, "uint32")
    tok = Tokenizer.load(tmp_path / "big.json")
    texts = [t for batch in iter_texts(small_corpus, "val") for t in batch]
    shards = open_split(tmp_path / "tokens", "val")
    assert shards[0].dtype == np.dtype("<u4")
    assert [tok.decode(doc[1:].tolist()) for doc in _documents(shards, tok.boundary_id)] == texts


def test_check_tokenizer_refuses_another_tokenizer(small_corpus, small_tokenizer, tmp_path):
    index = _tokenize(small_corpus, small_tokenizer, tmp_path / "tokens")
    check_tokenizer(index, Tokenizer.load(small_tokenizer))
    other = train_tokenizer(TokenizerConfig(corpus=small_corpus, out=tmp_path / "other", vocab_size=700))
    with pytest.raises(UserError, match="made with tokenizer"):
        check_tokenizer(index, other)


def test_rerun_replaces_old_shards_and_damage_is_reported(small_corpus, small_tokenizer, tmp_path):
    _tokenize(small_corpus, small_tokenizer, tmp_path, shard_tokens=5000)
    index = _tokenize(small_corpus, small_tokenizer, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.bin")) == sorted(e["file"] for s in index["splits"].values() for e in s)
    with open(tmp_path / "train-00000.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(UserError, match="damaged"):
        open_split(tmp_path, "train")
    (tmp_path / "index.json").unlink()
    with pytest.raises(UserError, match="no index.json"):
        open_split(tmp_path, "train")
    with pytest.raises(UserError, match="not a corpus"):
        _tokenize(tmp_path, small_tokenizer, tmp_path / "tokens")
