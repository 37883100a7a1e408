"""Normalization of post text, and the per-post filters (each returns a drop reason or None).

Normalization (defaults follow TweetEval's and XLM-T's preprocessing, so a model trained on
our corpus sees text as those benchmarks give it; BERTweet's convention is the same idea with
other placeholders, "@USER" and "HTTPURL"):
- HTML entities unescaped (the API sends "&amp;", "&lt;", "&gt;");
- URLs -> "http" and user mentions -> "@user" (switch off with `links=False`, `mentions=False`);
- runs of spaces and tabs -> one space, runs of whitespace holding a line break -> one "\\n"
  (posts keep their line breaks: a generative model should be able to write them), ends stripped;
- emoji and hashtags are kept as they are.
"""

import html
import re

from py3langid.langid import MODEL_FILE, LanguageIdentifier

from tweetlm.errors import UserError

_LINK = re.compile(r"\bhttps?://\S+|\bwww\.\S+")
# Twitter handles are 1-15 of [A-Za-z0-9_]; not after a word character, so "a@b.com" stays.
_MENTION = re.compile(r"(?<![\w@])@[A-Za-z0-9_]+")
_BREAKS = re.compile(r"\s*\n\s*")
_SPACES = re.compile(r"[^\S\n]+")
_ENTITY = re.compile(r"@\w+|\bhttp\S*|#")  # what language id should not see


def normalize(text: str, *, mentions: bool = True, links: bool = True) -> str:
    """The text the tokenizer and the model see (module docstring)."""
    if "&" in text:
        text = html.unescape(text)
    if links:
        text = _LINK.sub("http", text)
    if mentions:
        text = _MENTION.sub("@user", text)
    if "\n" in text or "\r" in text:
        text = _BREAKS.sub("\n", text.replace("\r\n", "\n").replace("\r", "\n"))
    return _SPACES.sub(" ", text).strip()


def length_reason(clean: str, *, min_chars: int, max_chars: int) -> str | None:
    if not clean:
        return "empty"
    if len(clean) < min_chars:
        return "too_short"
    if len(clean) > max_chars:
        return "too_long"
    return None


def is_spam(clean: str) -> bool:
    """Mostly hashtags, mentions or links: after the leading mentions (a reply's addressees),
    more entity tokens than words, or no words at all ("@user @user", "#a #b #c http")."""
    tokens = clean.split()
    start = 0
    while start < len(tokens) and tokens[start].startswith("@"):
        start += 1
    entities = sum(1 for t in tokens[start:] if t[0] in "#@" or t.startswith("http"))
    words = len(tokens) - start - entities
    return words == 0 or entities > words


class LanguageId:
    """py3langid over the normalized text, without mentions, links and '#' (they read as English)."""

    def __init__(self, keep: tuple[str, ...]):
        self._identifier = LanguageIdentifier.from_model_file(MODEL_FILE)  # ~0.6 s, once per process
        unknown = sorted(set(keep) - set(self._identifier.labels))
        if unknown:
            raise UserError(f"--lang: unknown language code(s) {','.join(unknown)}; py3langid knows "
                            f"{','.join(sorted(self._identifier.labels))}")
        self.keep = frozenset(keep)

    def __call__(self, clean: str) -> str:
        return self._identifier.classify(_ENTITY.sub(" ", clean))[0]
