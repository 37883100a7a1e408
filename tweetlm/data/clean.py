"""The per-post filters of `data prepare` (each returns a drop reason or None) and language identification;
normalization itself is tweetlm/artifacts/text.py.
"""

import re

from py3langid.langid import MODEL_FILE, LanguageIdentifier

from tweetlm.errors import UserError

_ENTITY = re.compile(r"@\w+|\bhttp\S*|#")  # what language id should not see


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
