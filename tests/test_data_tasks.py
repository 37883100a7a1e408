"""`tweetlm data tasks`: compose, reply and summarize conversations from the real API v2 files, tone from TweetEval;
the prompts that tweetlm compose / reply / summarize send."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tweetlm.artifacts.prompts import (LIMIT, SYSTEM, check_hashtags, compose_messages, hashtags_in, reply_messages,
                                       strip_placeholders, summarize_messages)
from tweetlm.cli import main
from tweetlm.data.prepare import PrepareConfig, prepare
from tweetlm.data.tasks import TONE_TASKS, TasksConfig, tasks
from tweetlm.errors import UserError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TWEETEVAL = SHARED / "tweeteval"
# withheld.jsonl: a garage leak; the second post answers the first (test_data_threads.py)
GARAGE = ["1253788283760492544", "1253792843128283136"]
PLACEHOLDERS = ("@user", "http")
# the same post in media_policy_violation_{on,off}.jsonl, with two texts: the first read is kept
DUPLICATE_IDS = {"1392220189706657804"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tasks") / "corpus"
    prepare(PrepareConfig(inputs=(str(SHARED / "twitter-api-v2"),), out=out))
    return out


@pytest.fixture(scope="module")
def made(corpus, tmp_path_factory) -> tuple[dict[str, list[dict]], dict, dict]:
    """(examples by task, the returned stats, every train row by id)."""
    out = tmp_path_factory.mktemp("tasks-out") / "tasks.jsonl"
    stats = tasks(TasksConfig(corpus=corpus, out=out, tweeteval=TWEETEVAL, tasks=("compose", "reply", "summarize", "tone")))
    by_task = {}
    for line in out.read_text(encoding="utf-8").splitlines():
        example = json.loads(line)
        by_task.setdefault(example["task"], []).append(example)
    rows = {r["id"]: r for f in sorted((corpus / "train").glob("*.parquet")) for r in pq.read_table(f).to_pylist()}
    return by_task, stats, rows


def test_every_task_yields_conversations_in_the_threads_format(made):
    by_task, stats, _ = made
    assert {t: len(e) for t, e in by_task.items()} == {t: s["examples"] for t, s in stats["tasks"].items()}
    assert all(len(by_task[t]) >= 5 for t in ("compose", "reply", "summarize")) and len(by_task["tone"]) > 20_000
    for examples in by_task.values():
        for e in examples:
            assert [m["role"] for m in e["messages"]] == ["system", "user", "assistant"]
            assert e["messages"][0]["content"] == SYSTEM and len(e["post_ids"]) == 3 and e["post_ids"][0] == []
            assert isinstance(e["thread_id"], str)
            target = e["messages"][2]["content"]
            assert target and len(target) <= LIMIT, target
            assert not any(p in target for p in PLACEHOLDERS), target  # placeholders never in a target
    skipped = stats["tasks"]["compose"]["skipped"]
    assert skipped["placeholder_inside"] > 0 and stats["tasks"]["compose"]["cleaned"] > 0  # counted, not lost


def test_compose_prompts_a_posts_own_topic_and_hashtags(made):
    by_task, stats, rows = made
    kinds = stats["tasks"]["compose"]["kinds"]
    assert set(kinds) == {"topic", "hashtags", "both"} and sum(kinds.values()) == len(by_task["compose"])
    for e in by_task["compose"]:
        ask, target = e["messages"][1]["content"], e["messages"][2]["content"]
        row = rows[e["post_ids"][2][0]]
        assert row["in_reply_to_id"] is None
        assert target in row["clean_text"] or e["post_ids"][2][0] in DUPLICATE_IDS
        if "about: " in ask:  # the topic: words of the post itself
            topic = ask.split("about: ")[1].split("\n")[0]
            assert all(word in target for word in topic.split(", ")), (topic, target)
        tags = hashtags_in(ask)
        assert tags == list(check_hashtags(hashtags_in(target))) or "Hashtags" not in ask and "hashtags" not in ask
        assert {t.casefold() for t in tags} <= {t.casefold() for t in hashtags_in(target)}  # compose keeps them


def test_reply_pairs_are_real_replies_without_addressees(made):
    by_task, stats, rows = made
    pair = next(e for e in by_task["reply"] if e["post_ids"][1:] == [[GARAGE[0]], [GARAGE[1]]])
    assert pair["messages"][1]["content"] == reply_messages(rows[GARAGE[0]]["clean_text"])[1]["content"]
    assert rows[GARAGE[1]]["clean_text"] == "@user Yep. You need new Male & female fittings"
    assert pair["messages"][2]["content"] == "Yep. You need new Male & female fittings"
    assert pair["thread_id"] == GARAGE[0]
    for e in by_task["reply"]:
        parent, child = (rows[ids[0]] for ids in e["post_ids"][1:])
        assert child["in_reply_to_id"] == parent["id"] and child["author_id"] != parent["author_id"]
    assert stats["tasks"]["reply"]["skipped"]["self_reply"] > 0


def test_summaries_are_central_posts_of_the_thread(made):
    by_task, _, rows = made
    for e in by_task["summarize"]:
        thread, chosen = e["post_ids"][1], e["post_ids"][2]
        assert len(thread) >= 3 and chosen and set(chosen) <= set(thread) and len(chosen) <= max(1, len(thread) // 3)
        for a, b in zip(thread, thread[1:]):
            assert rows[b]["in_reply_to_id"] == a  # a path down one reply tree
        assert e["messages"][1]["content"] == summarize_messages([rows[i]["clean_text"] for i in thread])[1]["content"]
        words = {w for i in chosen for w in rows[i]["clean_text"].split()}
        assert set(e["messages"][2]["content"].split()) <= words  # extractive: the chosen posts' words


def test_tone_labels_are_tweeteval_mapping_names(made):
    by_task, stats, _ = made
    first = {}
    for e in by_task["tone"]:
        task, line = e["thread_id"].removeprefix("tweeteval/").split("/train:")
        first.setdefault(task, (int(line), e))
    assert set(first) == set(TONE_TASKS) - {"sentiment"} and stats["tweeteval_missing"] == ["sentiment"]
    for task, (line, e) in first.items():
        names = [row.split("\t")[1] for row in (TWEETEVAL / task / "mapping.txt").read_text().splitlines() if row.strip()]
        label = int((TWEETEVAL / task / "train_labels.txt").read_text().splitlines()[line - 1])
        assert e["messages"][2]["content"] == names[label]
        ask = e["messages"][1]["content"]
        assert ask.startswith(f"What is the tone of this post? Answer with one of: {', '.join(names)}.")
    counts = stats["tasks"]["tone"]["kinds"]
    assert counts["emotion/anger"] == (TWEETEVAL / "emotion" / "train_labels.txt").read_text().split().count("0")


def test_same_seed_same_file_and_the_verb(corpus, tmp_path, capsys):
    argv = ["data", "tasks", str(corpus), "--tasks", "compose,summarize", "--seed", "3"]
    assert main([*argv, "--out", str(tmp_path / "a.jsonl")]) == 0
    assert "compose" in capsys.readouterr().out
    assert main([*argv, "--out", str(tmp_path / "b.jsonl")]) == 0
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert main([*argv[:-1], "4", "--out", str(tmp_path / "c.jsonl")]) == 0
    assert (tmp_path / "a.jsonl").read_bytes() != (tmp_path / "c.jsonl").read_bytes()
    assert main(["data", "tasks", str(corpus), "--out", str(tmp_path / "d.jsonl")]) == 0  # no --tweeteval: no tone
    assert {json.loads(line)["task"] for line in (tmp_path / "d.jsonl").open()} == {"compose", "reply", "summarize"}
    for extra, says in ((["--tasks", "tone"], "--tweeteval None: tone needs TweetEval's datasets/ folder"), (["--tasks", "poems"], "unknown poems"),
                        (["--split", "all"], "invalid choice")):
        assert main(["data", "tasks", str(corpus), "--out", str(tmp_path / "e.jsonl"), *extra]) == 2
        assert says in capsys.readouterr().err
    with pytest.raises(UserError, match="is a folder"):
        tasks(TasksConfig(corpus=corpus, out=tmp_path))


def test_prompts_and_hashtag_rules():
    assert check_hashtags(["ai", "#AI", " #Brexit ", "x_1"]) == ("#ai", "#Brexit", "#x_1")
    for bad in ("#", "#1", "#a b", "a-b", ""):
        with pytest.raises(UserError, match="a hashtag is #"):
            check_hashtags([bad])
    assert hashtags_in("#ai, #AI #1 a#b &#39; ##x #x_1") == ["#ai", "#AI", "#x_1"]
    assert (compose_messages("Monday  mornings", ["coffee"])[1]["content"]
            == "Write a post about: Monday mornings\nHashtags: #coffee")
    assert compose_messages("", ["coffee"])[1]["content"] == "Write a post with the hashtags: #coffee"
    assert compose_messages()[1]["content"] == "Write a post."
    assert reply_messages("hi @bob https://x.co")[1]["content"] == "Reply to this post:\nhi @user http"  # as the corpus
    assert summarize_messages(["a", "", "b\n\nc"])[1]["content"] == "Summarize this thread:\n\na\n\nb\nc"
    assert strip_placeholders("@user @user so true http") == "so true"
    assert strip_placeholders("thanks @user for this") is None
