"""`tweetlm data fetch`: the public TweetEval text files, downloaded or copied from a local folder.

TweetEval (Barbieri et al., Findings of EMNLP 2020) is the default corpus of the demo for a user
without ../shared/data; its files are plain text, one tweet per line, which `data prepare` reads.
"""

import shutil
import urllib.error
import urllib.request
from pathlib import Path

from tweetlm.errors import UserError

TWEETEVAL_URL = "https://raw.githubusercontent.com/cardiffnlp/tweeteval/main/datasets"
STANCE_TARGETS = ("abortion", "atheism", "climate", "feminist", "hillary")
TASKS = ("emoji", "emotion", "hate", "irony", "offensive", "sentiment", *(f"stance/{t}" for t in STANCE_TARGETS))


def tweeteval_files() -> list[str]:
    """Relative paths of the TweetEval files, as laid out in its repository's datasets/ folder."""
    files = [f"{task}/{split}_{kind}.txt" for task in TASKS for split in ("train", "val", "test") for kind in ("text", "labels")]
    return files + [f"{task}/mapping.txt" for task in TASKS if not task.startswith("stance/")] + ["stance/mapping.txt"]


def fetch_tweeteval(*, out: Path, local: Path | None = None, timeout: float = 30.0) -> list[Path]:
    """Copies (from `local`) or downloads TweetEval into `out`; returns the files written.
    From a local copy, files it lacks (such as held-back test splits) are listed and skipped."""
    written, missing = [], []
    for rel in tweeteval_files():
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if local is not None:
            if not (local / rel).is_file():
                missing.append(rel)
                continue
            shutil.copyfile(local / rel, dest)
        else:
            try:
                with urllib.request.urlopen(f"{TWEETEVAL_URL}/{rel}", timeout=timeout) as r:
                    dest.write_bytes(r.read())
            except (urllib.error.URLError, OSError) as e:
                raise UserError(f"could not download {TWEETEVAL_URL}/{rel} ({e}); without network, copy TweetEval "
                                f"from a local folder with `tweetlm data fetch --from DIR --out {out}`") from None
        written.append(dest)
    if local is not None and not written:
        raise UserError(f"{local} holds no TweetEval files (expected for example {local}/emoji/train_text.txt): "
                        "point --from at the datasets/ folder of a TweetEval checkout")
    print(f"TweetEval: {len(written)} files in {out}" + (f" ({len(missing)} not in {local}: {', '.join(missing[:4])}...)" if missing else ""))
    return written
