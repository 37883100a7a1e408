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
