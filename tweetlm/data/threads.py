"""`tweetlm data threads`: reply threads of a corpus -> multi-turn conversations for chat fine-tuning.

    tweetlm data threads work/corpus --out work/conversations.jsonl --split train

A thread is a tree: its root is a post that replies to nothing, or whose parent (`in_reply_to_id`) is not in
the posts read (deleted, filtered out by `data prepare`, or in another split); every reply hangs under its
parent. Posts quoted or replied to that the API gave as referenced posts (`includes.tweets`) are posts of the
corpus too (readers.py), so they link threads. `data prepare` splits by conversation id, so a thread stays in
one split; without conversation ids (API v1.1, archives) a thread may straddle splits and is cut there.

Each root-to-leaf path is one conversation in OpenAI's `messages` format:
- consecutive posts by the same author (a self-reply: a thread of tweets) are one turn, their texts joined
  by a line break; posts without an author id are each a turn of their own;
- turns alternate by position: the root's turn is "user", the next "assistant", and so on, so with three
  people A, B, C replying in turn, C is the "user" again: the model learns to answer the post before;
- a final "user" turn is dropped (nothing answers it), and a path left with fewer than 2 turns is not
  written; two paths that end the same way after that are written once;
- content is `clean_text` (@user, http), the text the tokenizer and the model see.
Broken links do not loop: a post replying to itself starts a thread, and in a cycle (A replies to B, B to
A: possible in edited or merged dumps) the post with the earliest created_at (then id) becomes the root.

Line format (docs/CONTRACTS.md): {"messages": [{"role": "user", "content": ...}, ...], "thread_id": root
post id, "conversation_id": the root's, or null, "post_ids": [[ids of turn 0], [ids of turn 1], ...]}.
Memory: every post of the split is held (~200 bytes plus its text); the output streams.
"""

import json
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

import pyarrow.parquet as pq

from tweetlm.artifacts.files import atomic_write
from tweetlm.data.corpus import SPLITS, shard_paths
from tweetlm.errors import UserError, check

_COLUMNS = ["id", "author_id", "created_at", "conversation_id", "in_reply_to_id", "clean_text"]


@dataclass(frozen=True, kw_only=True)
class ThreadsConfig:
    corpus: Path
    out: Path  # the CONVERSATIONS.jsonl file
    split: str = "train"  # train, val, test, or all

    def __post_init__(self):
        check(self.split in (*SPLITS, "all"), "split", self.split, f"choose one of {', '.join(SPLITS)} or all")


@dataclass
class ThreadStats:
    posts: int = 0
    threads: int = 0
    conversations: int = 0
    turns: int = 0
    self_replies: int = 0  # posts replying to their own author's post (merged into one turn)
    missing_parent: int = 0  # replies whose parent is not in the posts read: roots
    cycles_broken: int = 0
    replies_to_itself: int = 0  # roots too
    without_id: int = 0  # plain text: nothing can reply to them
    duplicate_id: int = 0  # the first post with an id is kept
    depth_histogram: Counter = field(default_factory=Counter)  # posts on a thread's longest path -> threads
    turns_histogram: Counter = field(default_factory=Counter)  # turns -> conversations


def threads(cfg: ThreadsConfig) -> dict:
    """Writes the conversations of a corpus split to cfg.out (one JSON object a line); prints and returns
    the stats: threads, the depth histogram (posts on a thread's longest path), conversations and turns."""
    start = time.perf_counter()
    out = Path(cfg.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; pass a file name such as {out / 'conversations.jsonl'}")
    stats = ThreadStats()
    splits = SPLITS if cfg.split == "all" else (cfg.split,)
    rows = (row for split in splits for path in shard_paths(cfg.corpus, split)
            for batch in pq.ParquetFile(path).iter_batches(batch_size=8192, columns=_COLUMNS)
            for row in batch.to_pylist())
    with atomic_write(out) as f:
        for conversation in conversations(rows, stats):
            f.write(json.dumps(conversation, ensure_ascii=False) + "\n")
    report = {"split": cfg.split, **{f.name: getattr(stats, f.name) for f in fields(stats)},
              "seconds": round(time.perf_counter() - start, 3)}
    for name in ("depth_histogram", "turns_histogram"):
        report[name] = dict(sorted(report[name].items()))
    print(_summary(report, out))
    return report


def conversations(rows: Iterable[dict], stats: ThreadStats) -> Iterator[dict]:
    """The conversations of all threads in `rows` (dicts with the corpus columns id, author_id, created_at,
    conversation_id, in_reply_to_id, clean_text); `stats` is filled in as they go (module docstring)."""
    forest = Forest(rows, stats)
    written = set()  # last post of each written conversation: paths that end the same way are one
    for root in forest.roots:
        depth = 0
        for path in forest.paths(root):
            depth = max(depth, len(path))
            turns = _turns(path, forest.author)
            if len(turns) % 2:
                turns.pop()  # a final user turn: nothing answers it
            if len(turns) < 2 or turns[-1][-1] in written:
                continue
            written.add(turns[-1][-1])
            stats.conversations += 1
            stats.turns += len(turns)
            stats.turns_histogram[len(turns)] += 1
            yield {"messages": [{"role": "assistant" if i % 2 else "user",
                                 "content": "\n".join(forest.text[n] for n in turn)} for i, turn in enumerate(turns)],
                   "thread_id": forest.id[root], "conversation_id": forest.conversation[root],
                   "post_ids": [[forest.id[n] for n in turn] for turn in turns]}
        stats.depth_histogram[depth] += 1
        stats.threads += 1


def _turns(path: list[int], author: list) -> list[list[int]]:
    """A path's posts grouped into turns: consecutive posts by one (known) author are one turn."""
    turns = []
    for node in path:
        if turns and author[node] is not None and author[node] == author[turns[-1][-1]]:
            turns[-1].append(node)
        else:
            turns.append([node])
    return turns


class Forest:
    """The reply trees of a set of posts, as parallel lists indexed by node number (input order)."""

    def __init__(self, rows: Iterable[dict], stats: ThreadStats):
        self.id, self.author, self.text, self.conversation, order, reply_to = [], [], [], [], [], []
        node_of = {}
        for row in rows:
            stats.posts += 1
            if row["id"] is None:
                stats.without_id += 1
                continue
            if row["id"] in node_of:
                stats.duplicate_id += 1
                continue
            node_of[row["id"]] = len(self.id)
            self.id.append(row["id"])
            self.author.append(row["author_id"])
            self.text.append(row["clean_text"])
            self.conversation.append(row["conversation_id"])
            order.append((row["created_at"] or "", row["id"]))
            reply_to.append(row["in_reply_to_id"])
        n = len(self.id)
        self.order = order
        self.parent = [-1] * n
        self.children: list[list[int]] = [[] for _ in range(n)]
        for node, target in enumerate(reply_to):
            parent = node_of.get(target, -1) if target is not None else -1
            if target is not None and parent == -1:
                stats.missing_parent += 1
            if parent == node:
                stats.replies_to_itself += 1
                parent = -1
            if parent != -1:
                self.parent[node] = parent
                self.children[parent].append(node)
                if self.author[node] is not None and self.author[node] == self.author[parent]:
                    stats.self_replies += 1
        for kids in self.children:
            kids.sort(key=order.__getitem__)
        self.roots = [node for node in range(n) if self.parent[node] == -1]
        self._break_cycles(stats)

    def _reach(self, root: int, seen: bytearray) -> None:
        stack = [root]
        while stack:
            node = stack.pop()
            seen[node] = 1
            stack.extend(self.children[node])

    def _break_cycles(self, stats: ThreadStats) -> None:
        """Nodes no root reaches hang under a cycle of parent links; each cycle is cut above its earliest post."""
        seen = bytearray(len(self.id))
        for root in self.roots:
            self._reach(root, seen)
        for start in range(len(self.id)):
            if seen[start]:
                continue
            walk, node = {}, start
            while node not in walk:  # up the parent links: no root above, so they come back round
                walk[node] = len(walk)
                node = self.parent[node]
            cycle = list(walk)[walk[node]:]
            root = min(cycle, key=self.order.__getitem__)
            self.children[self.parent[root]].remove(root)
            self.parent[root] = -1
            self.roots.append(root)
            self._reach(root, seen)
            stats.cycles_broken += 1

    def paths(self, root: int) -> Iterator[list[int]]:
        """Each root-to-leaf path of the tree, depth first (the list is reused: copy it to keep it)."""
        path, stack = [], [(root, 0)]
        while stack:
            node, depth = stack.pop()
            del path[depth:]
            path.append(node)
            kids = self.children[node]
            if not kids:
                yield path
            stack.extend((kid, depth + 1) for kid in reversed(kids))


def _histogram(counts: dict) -> str:
    return "  ".join(f"{k}:{v:,}" for k, v in counts.items()) or "-"


def _summary(report: dict, out: Path) -> str:
    return "\n".join([
        f"data threads ({report['split']}): {report['posts']:,} posts -> {report['threads']:,} threads -> "
        f"{report['conversations']:,} conversations, {report['turns']:,} turns in {report['seconds']:.1f} s",
        f"  thread depth (posts)  {_histogram(report['depth_histogram'])}",
        f"  conversation turns    {_histogram(report['turns_histogram'])}",
        f"  links  self-replies merged {report['self_replies']:,}  parent missing {report['missing_parent']:,}  "
        f"cycles broken {report['cycles_broken']:,}  replies to itself {report['replies_to_itself']:,}",
        f"  posts without id {report['without_id']:,}  duplicate ids {report['duplicate_id']:,}",
        f"  -> {out}",
    ])
