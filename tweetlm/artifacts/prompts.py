"""The platform tasks' prompts (the one place each is written) and the rules of a post: what `tweetlm data tasks`
trains on (tweetlm/data/tasks.py) and what `tweetlm compose` / `reply` / `summarize` and their server routes send
(tweetlm/infer/tasks.py, tweetlm/serve/tasks.py), so that the model is asked at inference exactly as it was taught.

A task sends a system line and one user message (`compose_messages`, `reply_messages`, `summarize_messages`,
`tone_messages`); inputs pass through `normalize`. A post (`clip`) is at most LIMIT characters and never holds
the @user / http placeholders of normalize, a mention, a link, a control character or U+FFFD.
"""

import re
from collections.abc import Iterable, Sequence

from tweetlm.artifacts.text import normalize
from tweetlm.errors import UserError

LIMIT = 280  # characters of a post, as X counts them for most text; here Python str characters
SYSTEM = f"You are a social platform's assistant. You write short posts of at most {LIMIT} characters."

# A hashtag as X links it: '#', then letters, digits or '_' with at least one letter, not glued to a word.
HASHTAG = re.compile(r"(?<![\w#&])#(?=\w*[^\W\d_])\w+")
# Words a post must not hold: normalize's placeholders (@user, http), glued to other text too, and the mentions
# and links they replace.
_PLACEHOLDER = re.compile(r"@user|http|(?<![\w@])@\w|\bwww\.")
_BROKEN = re.compile(r"[\x00-\x1f\x7f-\x9f\ufffd]")  # control characters; U+FFFD, bytes that were not UTF-8
PIECES = re.compile(r"(\s*)(\S+)")  # (whitespace before, word)

# ---------------------------------------------------------------- prompts


def check_hashtags(values: Iterable[str]) -> tuple[str, ...]:
    """Requested hashtags as '#tag' ('tag' and '#tag' both accepted), repeats (any case) dropped; UserError if one
    is not a hashtag or together they take over half a post."""
    tags, seen = [], set()
    for value in values:
        tag = value.strip() if value.strip().startswith("#") else "#" + value.strip()
        if not HASHTAG.fullmatch(tag):
            raise UserError(f"hashtag {value!r}: a hashtag is # then letters, digits or _, with at least one letter "
                            "(e.g. #Brexit)")
        if tag.casefold() not in seen:
            seen.add(tag.casefold())
            tags.append(tag)
    if len(" ".join(tags)) > LIMIT // 2:
        raise UserError(f"the hashtags take {len(' '.join(tags))} characters, more than half a post ({LIMIT // 2} of "
                        f"{LIMIT}): ask for fewer or shorter ones")
    return tuple(tags)


def _messages(ask: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ask}]


def compose_messages(topic: str = "", hashtags: Sequence[str] = ()) -> list[dict]:
    """A new post about `topic` and/or with `hashtags` (neither: any post)."""
    topic, tags = normalize(topic), " ".join(check_hashtags(hashtags))
    if topic and tags:
        return _messages(f"Write a post about: {topic}\nHashtags: {tags}")
    if tags:
        return _messages(f"Write a post with the hashtags: {tags}")
    return _messages(f"Write a post about: {topic}" if topic else "Write a post.")


def reply_messages(post: str) -> list[dict]:
    post = normalize(post)
    if not post:
        raise UserError("the post to reply to is empty: give its text")
    return _messages(f"Reply to this post:\n{post}")


def summarize_messages(thread: Sequence[str]) -> list[dict]:
    """The thread's posts in order; posts are normalized (no blank line inside), so a blank line separates them."""
    posts = [p for p in map(normalize, thread) if p]
    if not posts:
        raise UserError("the thread is empty: give its posts, one per line")
    return _messages("Summarize this thread:\n\n" + "\n\n".join(posts))


def tone_messages(post: str, labels: Sequence[str]) -> list[dict]:
    return _messages(f"What is the tone of this post? Answer with one of: {', '.join(labels)}.\n\n{normalize(post)}")


# ---------------------------------------------------------------- posts


def hashtags_in(text: str) -> list[str]:
    return HASHTAG.findall(text)


def unfit(word: str) -> bool:
    """A placeholder, mention or link, or a word holding a control character or a broken one (U+FFFD)."""
    return bool(_PLACEHOLDER.search(word) or _BROKEN.search(word))


def _room(tags: Iterable[str]) -> int:
    return sum(1 + len(t) for t in tags)


def clip(text: str, *, hashtags: Sequence[str] = (), limit: int = LIMIT, final: bool = True) -> tuple[str, bool]:
    """A post from `text`: its words in order, less placeholders (unfit), each whitespace run as one line break
    (if it holds one) or one space, kept while they fit in `limit` characters with room left for each of
    `hashtags` the kept words lack, which then end the post. Cuts only at whitespace, so a word, an emoji ZWJ
    sequence, a flag or a skin tone stays whole or goes whole. final=False: text is still being written and its
    last word (not followed by whitespace) may be incomplete: it is left out.
    Returns (post, full); full: a word did not fit, and nothing after it may be kept (a writer stops there)."""
    assert _room(hashtags) <= limit + 1, f"hashtags {hashtags} cannot fit in {limit} characters"
    post, missing, gap = "", list(hashtags), ""  # gap: whitespace since the last kept word (dropped words' too)
    pieces = PIECES.findall(text)
    tail = pieces.pop()[1] if pieces and not final and not text[-1].isspace() else ""

    def sep(space: str) -> str:
        return ("\n" if "\n" in space else " ") if post else ""

    for space, word in pieces:
        gap += space
        if unfit(word):
            continue
        written = {t.casefold() for t in hashtags_in(word)}
        left = [t for t in missing if t.casefold() not in written]
        if len(post) + len(sep(gap)) + len(word) + _room(left) > limit:
            return " ".join(filter(None, [post, *missing])), True
        post, missing, gap = post + sep(gap) + word, left, ""
    # the word being written cannot fit, whatever comes next (unless it may become a missing hashtag)
    full = (bool(tail) and not unfit(tail) and not ("#" in tail and missing)
            and len(post) + len(sep(" ")) + len(tail) + _room(missing) > limit)
    return " ".join(filter(None, [post, *missing])), full


def strip_placeholders(text: str) -> str | None:
    """text less its leading and trailing placeholder words, or None if one is left between other words."""
    pieces = PIECES.findall(text)
    keep = [not unfit(word) for _, word in pieces]
    if True not in keep:
        return ""
    first, last = keep.index(True), len(keep) - 1 - keep[::-1].index(True)
    if not all(keep[first:last + 1]):
        return None
    return "".join(space + word for space, word in pieces[first:last + 1]).strip()
