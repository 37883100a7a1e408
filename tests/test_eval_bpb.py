"""`tweetlm eval bpb`: bits per byte of a run on real posts, equal to the plain computation over the whole token
stream, every token a target once whatever the window, the same from a text file as from a corpus split."""

import math

import pytest
import torch

from tweetlm.cli import main
from tweetlm.data.corpus import iter_texts
from tweetlm.errors import UserError
from tweetlm.eval.bpb import BpbConfig, _windows, bpb
from tweetlm.model.weights import load_model


def test_windows_start_at_documents_and_target_every_token_once():
    docs = [[0, 5, 6], [0, 7], [0, 8, 9, 10, 11]]  # 0 is the boundary
    windows = list(_windows(iter(docs), 0, window=4))
    assert windows == [[0, 5, 6, 0], [0, 7, 0], [0, 8, 9, 10, 11], [11, 0]]  # a post longer than 4 goes on
    assert sum(len(w) - 1 for w in windows) == len([t for d in docs for t in d])  # the stream + 1 closing boundary - 1
    assert list(_windows(iter([[0, 5]]), 0, window=512)) == [[0, 5, 0]]


def test_bpb_is_the_plain_stream_computation(served_run, small_corpus, tmp_path):
    posts = [t for batch in iter_texts(small_corpus, "val") for t in batch][:12]
    assert all("\n" not in p and p.strip() for p in posts)
    text = tmp_path / "posts.txt"
    text.write_text("\n".join(posts) + "\n\n", encoding="utf-8")  # a blank line is not a post
    model, tokenizer = load_model(served_run)
    stream = [t for p in posts for t in (tokenizer.boundary_id, *tokenizer.encode(p))] + [tokenizer.boundary_id]
    assert len(stream) <= 512  # one window: the plain computation is a single forward over the whole stream
    with torch.no_grad():
        nats = model(torch.tensor([stream[:-1]]), torch.tensor([stream[1:]]), reduction="none").double().sum().item()
    n_bytes = sum(len(p.encode()) for p in posts)

    whole = bpb(BpbConfig(run=served_run, text=text))
    assert (whole["posts"], whole["tokens"], whole["bytes"], whole["window"]) == (12, len(stream) - 1, n_bytes, 512)
    assert whole["bpb"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-6)
    assert whole["loss"] == pytest.approx(nats / (len(stream) - 1), rel=1e-6)

    short = bpb(BpbConfig(run=served_run, text=text, window=16, batch_size=3))  # posts cut across windows
    assert (short["tokens"], short["bytes"]) == (whole["tokens"], whole["bytes"]) and short["bpb"] > 0


def test_corpus_split_matches_the_same_posts_as_text(served_run, small_corpus, tmp_path, capsys):
    posts = [t for batch in iter_texts(small_corpus, "val") for t in batch]
    (tmp_path / "val.txt").write_text("".join(p + "\n" for p in posts), encoding="utf-8")
    assert main(["eval", "bpb", str(served_run), "--corpus", str(small_corpus), "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert f"{len(posts):,} posts" in out and "bits per byte" in out
    from_text = bpb(BpbConfig(run=served_run, text=tmp_path / "val.txt"))
    from_corpus = bpb(BpbConfig(run=served_run, corpus=small_corpus, split="val"))
    assert from_text == from_corpus


def test_errors_are_one_line(served_run, tmp_path, capsys):
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(UserError, match="no posts in"):
        bpb(BpbConfig(run=served_run, text=tmp_path / "blank.txt"))
    with pytest.raises(UserError, match="longer than the model's context, 512"):
        bpb(BpbConfig(run=served_run, text=tmp_path / "blank.txt", window=513))
    with pytest.raises(UserError, match="one of the two"):
        BpbConfig(run=served_run)
    assert main(["eval", "bpb", str(served_run), "--text", str(tmp_path / "nope.txt")]) == 2
    assert main(["eval", "bpb", str(tmp_path), "--text", str(tmp_path / "blank.txt")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "nope.txt: no such file" in err[0] and "holds no checkpoint" in err[1], err
