"""`tweetlm sft`: loss only on the assistant's tokens, whole conversations packed, sources mixed by weight, a
resumable stream, and a tiny run fine-tuned on real reply threads that predicts held-out replies better."""

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import _config, _one_line_error

from tweetlm.cli import main
from tweetlm.data.prepare import PrepareConfig, prepare
from tweetlm.data.threads import ThreadsConfig, threads
from tweetlm.errors import UserError
from tweetlm.model.llama import IGNORE_INDEX
from tweetlm.model.weights import load_model
from tweetlm.tokenizer.bpe import Tokenizer
from tweetlm.tokenizer.chat import render_chat
from tweetlm.train.batches import ConversationBatches, conversation_val_batches
from tweetlm.train.loop import train
from tweetlm.train.sft import SftConfig, Source, read_conversations, sft

V2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "twitter-api-v2"
SEQ_LEN = 256  # the fine-tuning window: threads of the API v2 files are ~150 tokens with the 1000-token vocabulary
# 4 windows of 256 a step, val over the first 16 windows (all the held-out threads)
SFT = {"model.seq_len": SEQ_LEN, "micro_batch": 4, "batch_tokens": 1024, "eval.tokens": 4096, "eval.every": 20,
       "eval.samples": 1, "checkpoint.every": 20, "log_every": 5}

SYSTEM, USER_1, REPLY_1, USER_2, REPLY_2 = (
    "You answer like a friendly poster.", "anyone up for the game tonight?", "@user count me in 🙌",
    "great, 8pm at the pub", "see you there!")
DIALOGUE = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER_1},
            {"role": "assistant", "content": REPLY_1}, {"role": "user", "content": USER_2},
            {"role": "assistant", "content": REPLY_2}]


def _jsonl(path: Path, conversations: list[list[dict]]) -> Path:
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations))
    return path


@pytest.fixture(scope="module")
def tok(small_tokenizer) -> Tokenizer:
    return Tokenizer.load(small_tokenizer)


@pytest.fixture(scope="module")
def thread_files(tmp_path_factory) -> dict[str, Path]:
    """Reply threads of the real API v2 files: all splits of the corpus, and its test split alone."""
    out = tmp_path_factory.mktemp("sft-data")
    prepare(PrepareConfig(inputs=(str(V2),), out=out / "corpus"))
    for split in ("all", "test"):
        threads(ThreadsConfig(corpus=out / "corpus", out=out / f"{split}.jsonl", split=split))
    return {split: out / f"{split}.jsonl" for split in ("all", "test")}


@pytest.fixture(scope="module")
def base(small_tokens, small_tokenizer, tmp_path_factory) -> Path:
    """A tiny model pretrained a few steps on real posts (the BASE to fine-tune)."""
    run = tmp_path_factory.mktemp("sft-base") / "base"
    train(_config(small_tokens, small_tokenizer, run, steps=30, **{"model.seq_len": 128, "eval.every": 30}))
    return run


def _rows(batches: ConversationBatches, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [batches.next() for _ in range(n)]


def _windows(inputs: torch.Tensor, targets: torch.Tensor, pad_id: int) -> list[list[int]]:
    """The windows of seq_len + 1 tokens back from a batch (a window's last token is a target: every
    conversation ends with an assistant's <|end|>), padding dropped."""
    last = torch.where(targets[:, -1:] == IGNORE_INDEX, pad_id, targets[:, -1:])
    return [[t for t in row if t != pad_id] for row in torch.cat([inputs, last], dim=1).tolist()]


def _split_at(window: list[int], boundary: int) -> list[tuple[int, ...]]:
    starts = [i for i, t in enumerate(window) if t == boundary] + [len(window)]
    assert starts[0] == 0, "a window starts with a conversation"
    return [tuple(window[a:b]) for a, b in zip(starts, starts[1:])]


def test_labels_are_the_assistant_tokens_and_ignored_everywhere_else(tok, tmp_path):
    train_set, _, counts = read_conversations(_jsonl(tmp_path / "one.jsonl", [DIALOGUE]), tok, window=SEQ_LEN + 1, held_out=0.0)
    assert counts == {"read": 1, "train": 1, "val": 0, "truncated": 0, "no_assistant_tokens": 0}
    inputs, targets = ConversationBatches([train_set], [1.0], seq_len=SEQ_LEN, batch_size=1, pad_id=tok.pad_id, seed=0).next()
    assert inputs.shape == targets.shape == (1, SEQ_LEN) and targets.dtype == torch.int64

    ids = render_chat(tok, DIALOGUE, add_generation_prompt=False)  # what serving renders, token for token
    # by hand: the targets are each assistant message's content tokens and its <|end|>, from the role token on
    assistant, end = tok.token_id("<|assistant|>"), tok.token_id("<|end|>")
    learn = [False] * len(ids)
    for i, t in enumerate(ids):
        if t == assistant:
            j = ids.index(end, i)
            learn[i + 1 : j + 1] = [True] * (j - i)
    copies = (SEQ_LEN + 1) // len(ids)  # the one conversation, epoch after epoch, then padding
    window = ids * copies + [tok.pad_id] * (SEQ_LEN + 1 - copies * len(ids))
    learn = learn * copies + [False] * (SEQ_LEN + 1 - copies * len(ids))
    assert copies >= 2 and inputs[0].tolist() == window[:-1]
    assert targets[0].tolist() == [window[t + 1] if learn[t + 1] else IGNORE_INDEX for t in range(SEQ_LEN)]
    learned = targets[0, : len(ids)][targets[0, : len(ids)] != IGNORE_INDEX].tolist()
    assert tok.decode([t for t in learned if t != end]) == REPLY_1 + REPLY_2 and learned.count(end) == 2


def test_packing_keeps_every_conversation_whole(tok, thread_files):
    window = 513  # longer than every thread here: none is cut (test_a_conversation_longer_than_the_window_...)
    train_set, _, counts = read_conversations(thread_files["all"], tok, window=window, held_out=0.0)
    rendered = [tuple(render_chat(tok, json.loads(line)["messages"], add_generation_prompt=False))
                for line in thread_files["all"].read_text().splitlines()]
    assert counts["read"] == counts["train"] == len(rendered) > 100 and counts["truncated"] == 0
    batches = ConversationBatches([train_set], [1.0], seq_len=window - 1, batch_size=8, pad_id=tok.pad_id, seed=0)
    placed, used = [], 0
    for inputs, targets in _rows(batches, 8):
        for tokens in _windows(inputs, targets, tok.pad_id):
            placed += _split_at(tokens, tok.boundary_id)
            used += len(tokens)
    assert set(placed) <= set(rendered)  # never cut, never joined
    assert Counter(placed[: len(rendered)]) == Counter(rendered)  # an epoch: each conversation once, in a new order
    assert placed[: len(rendered)] != rendered and len(placed) == batches.state_dict()["drawn"]
    assert used / (64 * window) > 0.8, "windows are mostly conversation, not padding"

    # the val set is packed the same way, in file order, and scores every held-out conversation
    _, val_set, counts = read_conversations(thread_files["all"], tok, window=window, held_out=0.2)
    val, scored = conversation_val_batches(val_set, seq_len=window - 1, batch_size=4, pad_id=tok.pad_id, max_windows=100)
    pieces = [p for inputs, targets in val for w in _windows(inputs, targets, tok.pad_id) if w for p in _split_at(w, tok.boundary_id)]
    assert scored == counts["val"] == len(pieces) > 10 and pieces == [tuple(ids) for ids, _ in val_set]


def test_a_conversation_longer_than_the_window_is_cut_and_counted(tok, tmp_path):
    long = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "la " * 200}]
    no_reply = [{"role": "user", "content": "la " * 200}, {"role": "assistant", "content": "ok"}]
    path = _jsonl(tmp_path / "long.jsonl", [long, no_reply, DIALOGUE])
    train_set, _, counts = read_conversations(path, tok, window=65, held_out=0.0)
    assert counts == {"read": 3, "train": 2, "val": 0, "truncated": 2, "no_assistant_tokens": 1}
    ids, mask = train_set[0]
    assert len(ids) == 65 and mask[-1] and list(ids) == render_chat(tok, long, add_generation_prompt=False)[:65]


def test_sources_are_mixed_by_their_weights(tok, thread_files, tmp_path):
    threads_set, _, _ = read_conversations(thread_files["all"], tok, window=SEQ_LEN + 1, held_out=0.0)
    small_set, _, _ = read_conversations(_jsonl(tmp_path / "dialogue.jsonl", [DIALOGUE]), tok, window=SEQ_LEN + 1, held_out=0.0)
    for weights in ([3.0, 1.0], [1.0, 4.0]):
        batches = ConversationBatches([threads_set, small_set], weights, seq_len=SEQ_LEN, batch_size=8, pad_id=tok.pad_id, seed=1)
        _rows(batches, 100)
        taken = batches.state_dict()["taken"]
        assert sum(taken) > 1000  # a proportion's standard deviation is then at most 0.016
        assert taken[0] / sum(taken) == pytest.approx(weights[0] / sum(weights), abs=0.04), taken


def test_the_stream_resumes_and_splits_over_ranks(tok, thread_files, tmp_path):
    sources = [read_conversations(thread_files["all"], tok, window=SEQ_LEN + 1, held_out=0.0)[0],
               read_conversations(_jsonl(tmp_path / "d.jsonl", [DIALOGUE]), tok, window=SEQ_LEN + 1, held_out=0.0)[0]]

    def stream(**kw):
        return ConversationBatches(sources, [2.0, 1.0], seq_len=SEQ_LEN, batch_size=2, pad_id=tok.pad_id, seed=7, **kw)

    straight = stream()
    expected = _rows(straight, 12)
    first = stream()
    _rows(first, 5)
    state = json.loads(json.dumps(first.state_dict()))  # JSON, as a checkpoint keeps it
    resumed = stream()
    resumed.load_state_dict(state)
    for (a, b), (c, d) in zip(_rows(resumed, 7), expected[5:]):
        assert torch.equal(a, c) and torch.equal(b, d)
    ranks = [stream(rank=r, world=2) for r in range(2)]
    for k in range(6):
        for r in range(2):
            assert all(torch.equal(x, y) for x, y in zip(ranks[r].next(), expected[2 * k + r]))
    assert ranks[0].state_dict() == straight.state_dict()


def test_held_out_threads_are_whole_and_those_of_the_corpus_test_split(tok, thread_files):
    """Every path of a thread lands on one side; at the defaults a thread that carries a conversation id is held
    out exactly when the corpus put it in its test split (the same hash of the same key), which pretraining never
    sees. (A post without one, from a flattened file, was split by its own id: its thread may straddle splits.)"""
    _, val_set, counts = read_conversations(thread_files["all"], tok, window=SEQ_LEN + 1, held_out=0.05)
    records = [json.loads(line) for line in thread_files["all"].read_text().splitlines()]
    by_ids = {tuple(render_chat(tok, r["messages"], add_generation_prompt=False)[: SEQ_LEN + 1]): r for r in records}
    held = [by_ids[tuple(ids)] for ids, _ in val_set]
    assert len(held) == counts["val"] and {r["thread_id"] for r in held} == {r["thread_id"] for r in records if r in held}
    assert sum(r["thread_id"] in {h["thread_id"] for h in held} for r in records) == len(held)  # no path left in train
    test = [json.loads(line) for line in thread_files["test"].read_text().splitlines()]

    def with_id(conversations: list[dict]) -> list[str]:
        return sorted(json.dumps(c["messages"]) for c in conversations if c["conversation_id"])

    assert with_id(held) == with_id(test) and len(with_id(test)) >= 2


def test_sft_lowers_the_held_out_assistant_bpb_and_leaves_an_ordinary_run(base, thread_files, tmp_path, capsys):
    out = tmp_path / "chat"
    sets = [f"--set={k}={v}" for k, v in SFT.items()]
    args = ["sft", str(base), "--data", str(thread_files["all"]), "--out", str(out), "--val-ratio", "0.2", *sets]
    assert main([*args, "--steps", "40"]) == 0
    record = json.loads((out / "sft.json").read_text())
    before, after = record["before"]["val_bpb"], record["after"]["val_bpb"]
    assert after < before - 0.3, (before, after)
    assert record["data"][0]["val"] > 10 and record["after"]["step"] == 40
    assert record["best"]["val_bpb"] <= after and record["best"]["step"] in (20, 40)
    printed = capsys.readouterr().out
    assert f"held-out assistant bits per byte: {before:.4f}" in printed and f"{after:.4f}" in printed

    model, tokenizer = load_model(out)  # what generate, chat, serve and eval load
    assert tokenizer.hash == load_model(base)[1].hash and model.config.max_seq_len == SEQ_LEN
    assert (out / "config.toml").is_file() and (out / "tokenizer.json").is_file()
    prompt = torch.tensor([render_chat(tokenizer, [{"role": "user", "content": "what a game last night"}])])
    assert model(prompt).shape == (1, prompt.shape[1], model.config.vocab_size)

    assert main([*args, "--steps", "50", "--resume"]) == 0
    record = json.loads((out / "sft.json").read_text())
    assert record["after"]["step"] == 50 and record["before"]["val_bpb"] == before
    assert "--resume needs the data" in _one_line_error([*args, "--val-ratio", "0.3", "--resume"], capsys)


def test_bad_input_is_one_clear_line(base, tok, tmp_path, capsys):
    good = _jsonl(tmp_path / "good.jsonl", [DIALOGUE] * 3)

    def run(base_dir=base, data=str(good), *extra):
        return ["sft", str(base_dir), "--data", data, "--out", str(tmp_path / "out"), "--steps", "1", *extra]

    assert "no such run" in _one_line_error(run(tmp_path / "nope"), capsys)
    assert "not a run folder (no tokenizer.json)" in _one_line_error(run(tmp_path), capsys)
    assert "no such file" in _one_line_error(run(data=str(tmp_path / "missing.jsonl")), capsys)
    (tmp_path / "empty.jsonl").write_text("\n")
    assert "empty.jsonl holds no conversations" in _one_line_error(run(data=str(tmp_path / "empty.jsonl")), capsys)
    bad = tmp_path / "bad.jsonl"
    for lines, message in (([json.dumps({"messages": DIALOGUE}), '{"messages": [}'], "bad.jsonl:2: not JSON"),
                           (['{"text": "a post"}'], 'bad.jsonl:1: expected {"messages"'),
                           ([json.dumps({"messages": [{"role": "tool", "content": "{}"}]})], "bad.jsonl:1: messages[0].role is 'tool'")):
        bad.write_text("\n".join(lines) + "\n")
        assert message in _one_line_error(run(data=str(bad)), capsys)
    assert "weight after ':' must be a positive number" in _one_line_error(run(data=f"{good}:-1"), capsys)
    assert "not both" in _one_line_error(run(base, str(good), "--val", str(good), "--val-ratio", "0.1"), capsys)
    with pytest.raises(UserError, match="no held-out conversation"):  # 3 copies of one thread: all on one side
        sft(SftConfig(base=base, data=(Source(good),), out=tmp_path / "x", overrides={"steps": 1}))
    assert Source.parse("a:b.jsonl") == Source(Path("a:b.jsonl")) and Source.parse("t.jsonl:0.5") == Source(Path("t.jsonl"), 0.5)
    assert not (tmp_path / "out").exists()  # nothing was started
