"""Deterministic train / val / test assignment by a hash of the conversation id.

All posts of a thread share a conversation id (API v2 `conversation_id`), so a thread never
straddles two splits. Posts without one (API v1.1, archives, CSV without the column) fall back
to their own id, and posts without an id (plain text) to their normalized text, so the split
of every post is a pure function of the post and the seed: the same for any run, input order
or worker count.
"""

import hashlib

from tweetlm.data.post import Post


def split_key(post: Post, clean_text: str) -> str:
    return post.conversation_id or post.id or clean_text


def assign_split(key: str, *, seed: int, val_ratio: float, test_ratio: float) -> str:
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8, salt=seed.to_bytes(8, "little", signed=True))
    u = int.from_bytes(digest.digest(), "little") / 2**64  # uniform in [0, 1)
    if u < test_ratio:
        return "test"
    return "val" if u < test_ratio + val_ratio else "train"
