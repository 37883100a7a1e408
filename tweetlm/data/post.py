"""Post: the canonical record every reader yields, whatever the source format."""

from dataclasses import dataclass
from typing import Literal

Kind = Literal["post", "reply", "quote", "repost"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Post:
    """One post as read. Missing fields are None, never invented."""

    id: str | None
    text: str  # full, untruncated (note_tweet / extended_tweet / full_text where present)
    created_at: str | None  # ISO 8601, as the source gives it
    author_id: str | None
    lang: str | None  # the source's own language tag (py3langid decides filtering)
    conversation_id: str | None
    in_reply_to_id: str | None
    kind: Kind
    source: str  # "path:line" of the input line (or record) it came from


POST_FIELDS = tuple(Post.__slots__)
_CHECKED = tuple(name for name in POST_FIELDS if name != "source")  # source is ours: "path:line"


def invalid_field(post: Post) -> str | None:
    """Why a post read cannot be kept, or None: a string field holds a NUL (no post holds one; it marks a corrupt
    record or binary bytes) or a lone surrogate (a JSON "\\ud83d" escape without its other half: no UTF-8 file, so
    neither Parquet nor SQLite, can hold it)."""
    for name in _CHECKED:
        value = getattr(post, name)
        if value is None:
            continue
        if "\x00" in value:
            return f"a NUL byte in {name} (character {value.index(chr(0))})"
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                return f"a lone surrogate {value[e.start]!r} in {name} (character {e.start}), which UTF-8 cannot hold"
    return None
