"""`tweetlm data threads`: reply trees of the real API v2 files -> alternating user/assistant conversations."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tweetlm.cli import main
from tweetlm.data.prepare import PrepareConfig, prepare
from tweetlm.data.threads import ThreadsConfig, ThreadStats, conversations, threads

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
V2 = SHARED / "twitter-api-v2"

# withheld.jsonl: a garage leak, two people answering each other (conversation id = the root's id)
GARAGE = ["1253788283760492544", "1253792843128283136", "1253796041020919809", "1253796880888279046"]
GARAGE_AUTHORS = {"1154498013626327041": "user", "2351222345": "assistant"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("threads") / "corpus"
    prepare(PrepareConfig(inputs=(str(V2),), out=out))
    return out


@pytest.fixture(scope="module")
def everything(corpus, tmp_path_factory) -> tuple[list[dict], dict, dict]:
    """(conversations of all splits, the returned stats, every corpus row by id)."""
    out = tmp_path_factory.mktemp("conv") / "all.jsonl"
    stats = threads(ThreadsConfig(corpus=corpus, out=out, split="all"))
    rows = {r["id"]: r for f in sorted(corpus.rglob("*.parquet")) for r in pq.read_table(f).to_pylist()}
    return [json.loads(line) for line in out.read_text().splitlines()], stats, rows


def _row(id, author, reply_to=None, created=None, text=None) -> dict:
    return {"id": id, "author_id": author, "in_reply_to_id": reply_to, "created_at": created, "conversation_id": None,
            "clean_text": text or f"post {id}"}


def test_a_real_thread_becomes_its_root_to_leaf_paths(everything):
    convs, _, rows = everything
    garage = [c for c in convs if c["thread_id"] == GARAGE[0]]
    paths = {tuple(i for turn in c["post_ids"] for i in turn) for c in garage}
    assert paths == {tuple(GARAGE), (GARAGE[0], "1253792955133026304")}
    longest = next(c for c in garage if len(c["messages"]) == 4)
    assert [m["role"] for m in longest["messages"]] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in longest["messages"]] == [rows[i]["clean_text"] for i in GARAGE]
    assert longest["messages"][1]["content"] == "@user Yep. You need new Male & female fittings"
    assert [GARAGE_AUTHORS[rows[i]["author_id"]] for i in GARAGE] == [m["role"] for m in longest["messages"]]
    assert longest["conversation_id"] == GARAGE[0]


def test_a_reply_whose_parent_is_missing_starts_a_thread(everything):
    convs, stats, rows = everything
    chain = ["1574183151387254784", "1574184048515219456", "1574185002266689537", "1574186742730588160"]
    assert rows[chain[0]]["in_reply_to_id"] not in rows  # its parent is not in the files
    conv = next(c for c in convs if c["thread_id"] == chain[0])
    assert conv["post_ids"] == [[i] for i in chain]
    assert stats["missing_parent"] >= 1 and stats["threads"] == sum(stats["depth_histogram"].values())
    assert stats["conversations"] == len(convs) == sum(stats["turns_histogram"].values())
    assert stats["turns"] == sum(len(c["messages"]) for c in convs)
    assert all(len(c["messages"]) % 2 == 0 and c["messages"][-1]["role"] == "assistant" for c in convs)


def test_a_split_holds_whole_conversations_and_output_is_deterministic(corpus, everything, tmp_path):
    out = tmp_path / "train.jsonl"
    stats = threads(ThreadsConfig(corpus=corpus, out=out, split="train"))
    train_ids = {r["id"] for f in (corpus / "train").glob("*.parquet") for r in pq.read_table(f, columns=["id"]).to_pylist()}
    convs = [json.loads(line) for line in out.read_text().splitlines()]
    assert convs and stats["posts"] == len(train_ids) + stats["duplicate_id"]
    assert all(i in train_ids for c in convs for turn in c["post_ids"] for i in turn)
    garage_in_train = GARAGE[0] in train_ids
    assert all((i in train_ids) == garage_in_train for i in GARAGE), "a conversation id stays in one split"
    threads(ThreadsConfig(corpus=corpus, out=tmp_path / "again.jsonl", split="train"))
    assert (tmp_path / "again.jsonl").read_bytes() == out.read_bytes()


def test_self_replies_are_merged_into_one_turn_and_a_final_user_turn_dropped():
    rows = [_row("1", "x", text="first"), _row("2", "x", "1", text="second"), _row("3", "y", "2", text="answer"),
            _row("4", "y", "3", text="more"), _row("5", "x", "4", text="unanswered")]
    stats = ThreadStats()
    (conv,) = conversations(rows, stats)
    assert conv["messages"] == [{"role": "user", "content": "first\nsecond"},
                                {"role": "assistant", "content": "answer\nmore"}]
    assert conv["post_ids"] == [["1", "2"], ["3", "4"]]
    assert stats.self_replies == 2 and stats.depth_histogram == {5: 1}
    monologue = [_row("1", "x"), _row("2", "x", "1"), _row("3", "x", "2")]
    assert list(conversations(monologue, ThreadStats())) == [], "one author alone is no conversation"


def test_cycles_and_replies_to_itself_do_not_loop():
    rows = [_row("a", "p", "c", "2024-01-02"), _row("b", "q", "a", "2024-01-03"), _row("c", "r", "b", "2024-01-01"),
            _row("d", "s", "b", "2024-01-04"), _row("e", "t", "e")]
    stats = ThreadStats()
    convs = list(conversations(rows, stats))
    assert stats.cycles_broken == 1 and stats.replies_to_itself == 1 and stats.threads == 2
    # the earliest post of the cycle (c) becomes the root: c <- a <- b <- d
    assert [c["post_ids"] for c in convs] == [[["c"], ["a"], ["b"], ["d"]]]
    assert stats.posts == 5 and stats.depth_histogram == {4: 1, 1: 1}


def test_a_long_chain_is_one_conversation_without_recursion():
    rows = [_row(str(i), "xy"[i % 2], str(i - 1) if i else None) for i in range(5000)]
    (conv,) = conversations(reversed(rows), ThreadStats())  # children before parents: order does not matter
    assert len(conv["messages"]) == 5000 and conv["post_ids"][-1] == ["4999"]


def test_cli_writes_conversations_and_fails_in_one_line(corpus, tmp_path, capsys):
    out = tmp_path / "sub" / "conv.jsonl"
    assert main(["data", "threads", str(corpus), "--out", str(out), "--split", "all"]) == 0
    assert "conversations" in capsys.readouterr().out and out.read_text().count("\n") > 100
    assert main(["data", "threads", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a corpus" in err
    assert main(["data", "threads", str(corpus), "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["data", "threads", str(corpus), "--out", str(out), "--split", "dev"]) == 2
    assert "invalid choice" in capsys.readouterr().err
