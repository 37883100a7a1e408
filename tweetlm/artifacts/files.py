"""Files in and out: the input files a list of paths, folders and globs names, and atomic writes.

A file written with `atomic_write` appears whole or not at all: it is written to NAME.tmp beside it and
renamed over NAME in one step (a rename within a folder is atomic on POSIX), so a reader, or a run resumed after
a kill, never finds half a file.
"""

import contextlib
import glob
import os
import stat
from pathlib import Path

from tweetlm.errors import UserError


def find_inputs(inputs: tuple[str, ...]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The files of the inputs, each once, in the order given (a folder's, recursively, and a glob's sorted; files
    and folders whose name starts with "." inside a folder are left out), and the other entries a folder or a glob
    holds (a named pipe, a socket, a device, a broken link, a link to a folder, which is not followed), each with
    what it is. An input that is not a file, a folder or a glob is a UserError: a named pipe given is refused, since
    its bytes can be read only once and the readers read a file's head to detect its format, then read it again."""
    files, others = [], []
    for arg in inputs:
        path = Path(arg)
        if path.is_file():
            files.append(path)
            continue
        if path.is_dir():
            entries = [p for p in path.rglob("*") if not any(part.startswith(".") for part in p.relative_to(path).parts)]
        elif os.path.lexists(path):
            what = _what(path)
            fix = (f"save what it gives to a file first (cat {arg} > posts.jsonl): a pipe can be read only once"
                   if what.startswith("a named pipe") else "give a file or a folder")
            raise UserError(f"{arg}: {what}, not a file; {fix}")
        elif any(c in arg for c in "*?["):
            entries = [Path(p) for p in glob.glob(arg, recursive=True)]
        else:
            raise UserError(f"{arg}: no such file or folder; check the path")
        found = sorted(p for p in entries if p.is_file())
        if not found:
            raise UserError(f"{arg}: no files there; check the path or the glob (quote it so the shell does not expand it)")
        files += found
        others += sorted((p, _what(p)) for p in entries if not p.is_file() and (p.is_symlink() or not p.is_dir()))
    return list(dict.fromkeys(files)), list(dict.fromkeys(others))


def _what(path: Path) -> str:
    """What an entry that is neither a file nor a folder is, for a message."""
    try:
        if path.is_symlink():
            if path.is_dir():
                return "a link to a folder (not followed inside a folder; give the folder itself)"
            if not path.exists():
                return f"a broken link (to {os.readlink(path)}, which does not exist)"
        mode = path.stat().st_mode
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


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
