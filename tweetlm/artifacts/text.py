"""Normalization of post text: the `clean_text` of a corpus, the text the tokenizer and the model see, and what
every later stage applies to new text (search, the task prompts, the safety classifier) so that it reads alike.

The defaults follow TweetEval's and XLM-T's preprocessing, so a model trained on our corpus sees text as those
benchmarks give it (BERTweet's convention is the same idea with other placeholders, "@USER" and "HTTPURL"):
- HTML entities unescaped (the API sends "&amp;", "&lt;", "&gt;");
- URLs -> "http" and user mentions -> "@user" (switch off with `links=False`, `mentions=False`);
- runs of spaces and tabs -> one space, runs of whitespace holding a line break -> one "\\n"
  (posts keep their line breaks: a generative model should be able to write them), ends stripped;
- emoji and hashtags are kept as they are.
"""

import html
import re

_LINK = re.compile(r"\bhttps?://\S+|\bwww\.\S+")
# Twitter handles are 1-15 of [A-Za-z0-9_]; not after a word character, so "a@b.com" stays.
_MENTION = re.compile(r"(?<![\w@])@[A-Za-z0-9_]+")
_BREAKS = re.compile(r"\s*\n\s*")
_SPACES = re.compile(r"[^\S\n]+")


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
