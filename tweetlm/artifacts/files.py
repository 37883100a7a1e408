"""Files in and out: the input files a list of paths, folders and globs names, and atomic writes.

A file written with `atomic_write` appears whole or not at all: it is written to NAME.tmp beside it and
renamed over NAME in one step (a rename within a folder is atomic on POSIX), so a reader, or a run resumed after
a kill, never finds half a file.
"""

import contextlib
import glob
import os
from pathlib import Path

from tweetlm.errors import UserError


def find_inputs(inputs: tuple[str, ...]) -> list[Path]:
    """Files of the inputs, each once, in the order given (a folder's, recursively, and a glob's sorted; files and
    folders whose name starts with "." inside a folder are left out)."""
    files = []
    for arg in inputs:
        path = Path(arg)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not any(
                part.startswith(".") for part in p.relative_to(path).parts))
        elif path.is_file():
            found = [path]
        elif any(c in arg for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(arg, recursive=True) if Path(p).is_file())
        else:
            raise UserError(f"{arg}: no such file or folder; check the path")
        if not found:
            raise UserError(f"{arg}: no files there; check the path or the glob (quote it so the shell does not expand it)")
        files += found
    return list(dict.fromkeys(files))


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "w"):
    """Open `path` for writing ("w" text in UTF-8, or "wb"; its folder made if missing), through PATH.tmp renamed
    over it when the block ends without an error; on an error the temporary file is removed and `path` is left as
    it was. An OSError of the file system (read-only, full disk) becomes a UserError naming the path."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {e.strerror or e}; check that its folder is writable and has free space") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    """`path` holds `text`, written atomically."""
    with atomic_write(path) as f:
        f.write(text)
