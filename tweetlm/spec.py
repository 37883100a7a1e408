"""Flags that take a path with an optional number after a colon: `--drop-toxic SAFETY:0.7`, `--data FILE:0.5`."""

from pathlib import Path


def path_and_number(spec: str) -> tuple[Path, float | None]:
    """"PATH" or "PATH:NUMBER" -> (path, number or None). A tail that is not a number belongs to the path, so a
    path with a colon in its last part needs the number spelled out ("a:b.jsonl:1")."""
    path, _, tail = spec.rpartition(":")
    try:
        number = float(tail) if path else None
    except ValueError:
        number = None
    return (Path(spec), None) if number is None else (Path(path), number)
