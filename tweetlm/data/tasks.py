"""`tweetlm data tasks`: training conversations for the assistant's platform tasks, made from the corpus itself,
with no outside model.

    tweetlm data tasks work/corpus --out work/tasks.jsonl --tweeteval ../shared/data/tweeteval --split train

Each example is a task's prompt (tweetlm/artifacts/prompts.py, the one place each is written, which `tweetlm
compose` / `reply` / `summarize` send too) with the target appended as the assistant's message.
Targets, from the posts of one corpus split:
- compose: a post that replies to nothing, prompted with a topic (its one or two rarest content words by
  document frequency in the split: the words that set it apart, found without a model), with its own hashtags,
  or both (chosen per post from the seed);
- reply: a real reply, prompted with the post it answers (reply trees as `data threads` builds them; a reply to
  one's own post continues a thread and is left out);
- summarize: a thread (a reply tree's longest root-to-leaf path, at least 3 posts) and an extractive summary:
  its most central posts (summed word-overlap Jaccard with the others), at most a third of them, in thread order,
  clipped to 280 characters at a word boundary;
- tone: a TweetEval post (emotion, sentiment, irony, offensive, hate) and its label's name from mapping.txt.
A target never holds the @user / http placeholders of normalize: leading and trailing ones (a reply's addressees,
a shared link) are removed and counted as cleaned; a post with one inside is skipped and counted.

Line format: that of `data threads` (docs/CONTRACTS.md) plus "task"; the messages open with the system line,
and "post_ids" lists, per message, the posts its text comes from ([] for the system line; TweetEval lines are
"tweeteval/TASK/SPLIT:LINE"). Memory: every post of the split is held, as in `data threads`.
"""

import hashlib
import json
import random
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from tweetlm.artifacts.files import atomic_write
from tweetlm.artifacts.prompts import (HASHTAG, LIMIT, PIECES, check_hashtags, clip, compose_messages, hashtags_in,
                                       reply_messages, strip_placeholders, summarize_messages, tone_messages, unfit)
from tweetlm.artifacts.text import normalize
from tweetlm.data.corpus import SPLITS, shard_paths
from tweetlm.data.threads import Forest, ThreadStats
from tweetlm.errors import UserError, check

TASKS = ("compose", "reply", "summarize", "tone")
CORPUS_TASKS = ("compose", "reply", "summarize")
TONE_TASKS = ("emotion", "sentiment", "irony", "offensive", "hate")  # TweetEval folders with a tone-like label
_WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*")  # letters, with inner apostrophes: don't, l'Italia
_TOPIC_CHARS = (3, 20)  # a topic word's length; longer runs are unsegmented scripts (CJK) or junk
_MAX_THREAD_POSTS = 20  # a longer thread is summarized from its first 20 posts


def _content_words(text: str) -> list[str]:
    """Words of letters, outside placeholders and hashtags, of a topic word's length."""
    text = HASHTAG.sub(" ", " ".join(word for _, word in PIECES.findall(text) if not unfit(word)))
    return [w for w in _WORD.findall(text) if _TOPIC_CHARS[0] <= len(w) <= _TOPIC_CHARS[1]]


# ---------------------------------------------------------------- training data


@dataclass(frozen=True, kw_only=True)
class TasksConfig:
    corpus: Path
    out: Path  # the TASKS.jsonl file
    tweeteval: Path | None = None  # TweetEval's datasets/ folder, for tone
    split: str = "train"
    tasks: tuple[str, ...] | None = None  # None: every task the inputs allow (tone needs tweeteval)
    seed: int = 0

    def __post_init__(self):
        if self.tasks is None:
            object.__setattr__(self, "tasks", TASKS if self.tweeteval is not None else CORPUS_TASKS)
        unknown = sorted(set(self.tasks) - set(TASKS))
        check(bool(self.tasks) and not unknown, "tasks", ",".join(self.tasks),
              f"unknown {','.join(unknown) or '(none given)'}; choose among {','.join(TASKS)}")
        check(self.split in SPLITS, "split", self.split, f"choose one of {', '.join(SPLITS)}")
        check("tone" not in self.tasks or (self.tweeteval is not None and Path(self.tweeteval).is_dir()), "tweeteval",
              None if self.tweeteval is None else str(self.tweeteval), "tone needs TweetEval's datasets/ folder (e.g. "
              "../shared/data/tweeteval): give it, or leave tone out of the tasks")


@dataclass
class TaskStats:
    examples: int = 0
    cleaned: int = 0  # targets whose leading or trailing placeholders were removed
    skipped: Counter = field(default_factory=Counter)  # reason -> posts (or threads)
    kinds: Counter = field(default_factory=Counter)  # compose: prompt kind; summarize: posts; tone: task/label


def tasks(cfg: TasksConfig) -> dict:
    """Writes the examples of cfg.tasks to cfg.out (one conversation a line); prints and returns stats per task."""
    start = time.perf_counter()
    out = Path(cfg.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; pass a file name such as {out / 'tasks.jsonl'}")
    stats = {name: TaskStats() for name in cfg.tasks}
    missing: list[str] = []  # TweetEval tasks without this split
    rows = _rows(cfg.corpus, cfg.split) if set(cfg.tasks) & set(CORPUS_TASKS) else []
    if rows:
        print(f"data tasks: {len(rows):,} posts of {cfg.split} read from {cfg.corpus}", flush=True)
    forest = Forest(rows, ThreadStats()) if {"reply", "summarize"} & set(cfg.tasks) else None
    makers = {"compose": lambda s: _compose(rows, cfg.seed, s), "reply": lambda s: _reply(forest, s),
              "summarize": lambda s: _summarize(forest, s),
              "tone": lambda s: _tone(Path(cfg.tweeteval or ""), cfg.split, s, missing)}
    with atomic_write(out) as f:
        for name in cfg.tasks:
            for example in makers[name](stats[name]):
                stats[name].examples += 1
                f.write(json.dumps(example | {"task": name}, ensure_ascii=False) + "\n")
    report = {"split": cfg.split, "examples": sum(s.examples for s in stats.values()),
              "tasks": {name: {"examples": s.examples, "cleaned": s.cleaned, "skipped": dict(s.skipped.most_common()),
                               "kinds": dict(sorted(s.kinds.items()))} for name, s in stats.items()},
              "tweeteval_missing": missing, "seconds": round(time.perf_counter() - start, 3)}
    print(_summary(report, out, cfg))
    return report


def _rows(corpus: Path, split: str) -> list[dict]:
    columns = ["id", "author_id", "created_at", "conversation_id", "in_reply_to_id", "clean_text"]
    return [row for path in shard_paths(corpus, split) for batch in pq.ParquetFile(path).iter_batches(columns=columns)
            for row in batch.to_pylist()]


def _example(asks: list[dict], target: str, ids: list, *, thread_id: str, conversation_id: str | None) -> dict:
    return {"messages": [*asks, {"role": "assistant", "content": target}], "thread_id": thread_id,
            "conversation_id": conversation_id, "post_ids": [[], *ids]}


def _target(text: str, stats: TaskStats) -> str | None:
    """The text as a target (placeholders stripped at its ends), or None with the reason counted."""
    target = strip_placeholders(text)
    reason = ("placeholder_inside" if target is None else "empty" if not target
              else "too_long" if len(target) > LIMIT else None)
    if reason:
        stats.skipped[reason] += 1
        return None
    stats.cleaned += target != text
    return target


def _compose(rows: list[dict], seed: int, stats: TaskStats) -> Iterator[dict]:
    df = Counter(w for row in rows for w in {w.casefold() for w in _content_words(row["clean_text"])})
    seen = set()
    for row in rows:
        if row["in_reply_to_id"] is not None or (row["id"] is not None and row["id"] in seen):
            continue  # a reply answers another post: not a post about a topic
        seen.add(row["id"])
        if (target := _target(row["clean_text"], stats)) is None:
            continue
        # a post without an id (plain text) is named by its text, as `index add` names such posts
        post_id = row["id"] or "text:" + hashlib.blake2b(row["clean_text"].encode(), digest_size=8).hexdigest()
        rng = random.Random(f"{seed}:{post_id}")
        try:
            tags = check_hashtags(hashtags_in(target))
        except UserError:  # its hashtags fill over half of it: ask for a topic only
            tags = ()
        words = {}
        for position, word in enumerate(_content_words(target)):
            words.setdefault(word.casefold(), (df[word.casefold()], -len(word), position, word))
        rarest = sorted(sorted(words.values())[:rng.choice((1, 2))], key=lambda w: w[2])
        topic = ", ".join(w[3] for w in rarest)
        if not topic and not tags:
            stats.skipped["no_topic"] += 1
            continue
        kind = rng.choice(("topic", "hashtags", "both")) if tags and topic else "hashtags" if tags else "topic"
        stats.kinds[kind] += 1
        asks = compose_messages(topic if kind != "hashtags" else "", tags if kind != "topic" else ())
        yield _example(asks, target, [[post_id], [post_id]], thread_id=post_id,
                       conversation_id=row["conversation_id"])


def _roots(forest: Forest) -> list[int]:
    """Each node's thread root."""
    root = list(range(len(forest.id)))
    for r in forest.roots:
        stack = [r]
        while stack:
            node = stack.pop()
            root[node] = r
            stack.extend(forest.children[node])
    return root


def _reply(forest: Forest, stats: TaskStats) -> Iterator[dict]:
    root = _roots(forest)
    for node, parent in enumerate(forest.parent):
        if parent == -1:
            continue
        if forest.author[node] is not None and forest.author[node] == forest.author[parent]:
            stats.skipped["self_reply"] += 1
            continue
        if (target := _target(forest.text[node], stats)) is None:
            continue
        yield _example(reply_messages(forest.text[parent]), target, [[forest.id[parent]], [forest.id[node]]],
                       thread_id=forest.id[root[node]], conversation_id=forest.conversation[root[node]])


def _summarize(forest: Forest, stats: TaskStats) -> Iterator[dict]:
    for r in forest.roots:
        longest = []
        for path in forest.paths(r):
            if len(path) > len(longest):
                longest = list(path)  # paths() reuses its list
        if len(longest) < 3:
            stats.skipped["under_3_posts"] += 1
            continue
        nodes = longest[:_MAX_THREAD_POSTS]
        chosen = _central([forest.text[n] for n in nodes])
        summary, _ = clip("\n".join(forest.text[nodes[i]] for i in chosen))
        if not summary:
            stats.skipped["empty"] += 1
            continue
        stats.kinds[len(nodes)] += 1
        yield _example(summarize_messages([forest.text[n] for n in nodes]), summary,
                       [[forest.id[n] for n in nodes], [forest.id[nodes[i]] for i in chosen]],
                       thread_id=forest.id[r], conversation_id=forest.conversation[r])


def _central(posts: list[str]) -> list[int]:
    """Indices (in order) of the most central posts: by summed Jaccard overlap of their words with the other
    posts' (ties: the earlier), at most a third of the posts, while their text fits in one post."""
    words = [{w.casefold() for w in _content_words(p)} for p in posts]
    score = [sum(len(a & b) / len(a | b) for j, b in enumerate(words) if j != i and a | b) for i, a in enumerate(words)]
    ranked = sorted(range(len(posts)), key=lambda i: (-score[i], i))
    chosen = ranked[:1]
    for i in ranked[1:max(1, len(posts) // 3)]:
        if clip("\n".join(posts[j] for j in sorted([*chosen, i])))[1]:
            break
        chosen.append(i)
    return sorted(chosen)


def _tone(data: Path, split: str, stats: TaskStats, missing: list[str]) -> Iterator[dict]:
    for task in TONE_TASKS:
        folder = data / task
        text_path, label_path = folder / f"{split}_text.txt", folder / f"{split}_labels.txt"
        if not text_path.exists():
            missing.append(task)
            continue
        labels = [line.split("\t")[1] for line in _lines(folder / "mapping.txt") if line.strip()]
        texts, ids = _lines(text_path), _lines(label_path)
        if len(texts) != len(ids):
            raise UserError(f"{text_path} has {len(texts)} lines but {label_path} has {len(ids)}: each post needs "
                            "its label id on the same line")
        for number, (text, value) in enumerate(zip(texts, ids), 1):
            if not value.strip().isdigit() or int(value) >= len(labels):
                raise UserError(f"{label_path}:{number}: {value!r} is not a label id of {task} (0..{len(labels) - 1}, "
                                "see mapping.txt)")
            if not normalize(text):
                stats.skipped["empty"] += 1
                continue
            label = labels[int(value)]
            stats.kinds[f"{task}/{label}"] += 1
            source = f"tweeteval/{task}/{split}:{number}"
            yield _example(tone_messages(text, labels), label, [[source], []], thread_id=source, conversation_id=None)


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


def _summary(report: dict, out: Path, cfg: TasksConfig) -> str:
    lines = [f"data tasks ({report['split']}): {report['examples']:,} examples in {report['seconds']:.1f} s"]
    for name, s in report["tasks"].items():
        kinds = Counter()
        for kind, n in s["kinds"].items():  # tone's task/label counts, by task here (all of them in the report)
            kinds[f"{kind} posts" if name == "summarize" else kind.split("/")[0]] += n
        lines.append(f"  {name:<10}{s['examples']:>8,}   " + "  ".join(f"{k} {v:,}" for k, v in kinds.items())
                     + f"   skipped {', '.join(f'{k} {v:,}' for k, v in s['skipped'].items()) or '0'}"
                     + (f"   cleaned {s['cleaned']:,}" if name in ("compose", "reply") else ""))
    if report["tweeteval_missing"]:
        lines.append(f"  tone: no {cfg.split} split in {cfg.tweeteval} for {', '.join(report['tweeteval_missing'])}")
    lines.append(f"  -> {out}")
    return "\n".join(lines)
