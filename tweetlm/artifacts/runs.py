"""A run folder's own files, beside its checkpoints (checkpoint.py): metrics.jsonl, loss.png and env.json.

    metrics.jsonl   one JSON record a line, appended as training goes (a kill cuts at most the last line, which
                    readers skip): per log step {step, loss, lr, grad_norm, tokens, tok_per_s, mfu, time}, per
                    evaluation {step, tokens, val_loss, val_bpb}
    loss.png        train and val loss by step, redrawn at each evaluation
    env.json        git commit, package versions, device, command line
"""

import json
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from tweetlm.artifacts.files import atomic_write, write_text


def _version(package: str) -> str | None:
    """None for a package that is importable but not installed (tweetlm run from a source tree, as bench/gpu.sh does)."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(device: str, processes: int, resumed_from: Path | None) -> dict:
    """env.json: what made the run (git commit, versions, device, command line)."""
    repo = Path(__file__).resolve().parents[2]

    def git(*args):
        try:
            return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None

    return {
        "git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "python": platform.python_version(), "platform": platform.platform(), "device": device,
        "processes": processes,
        "packages": {p: _version(p) for p in ("tweetlm", "torch", "numpy", "tokenizers", "safetensors")},
        "argv": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "resumed_from": str(resumed_from) if resumed_from else None,
    }


def read_metrics(run: Path) -> list[dict]:
    """metrics.jsonl's records; a last line cut short by a kill is skipped."""
    records = []
    if (run / "metrics.jsonl").is_file():
        for line in (run / "metrics.jsonl").read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return records


def trim_metrics(run: Path, checkpoint_step: int) -> None:
    """Keep the records up to the checkpoint a resumed run restarts from: the steps after it are run again."""
    kept = [r for r in read_metrics(run) if r["step"] <= checkpoint_step]
    write_text(run / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))


def log_metrics(run: Path, record: dict) -> None:
    with open(run / "metrics.jsonl", "a") as f:  # a line at a time: a kill cuts at most the last line
        f.write(json.dumps(record) + "\n")


def plot_losses(run: Path) -> None:
    """RUN/loss.png: train loss and val loss by step."""
    from matplotlib.figure import Figure  # here, not at import: matplotlib takes ~0.5 s to load

    records = read_metrics(run)
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    for key, style, label in (("loss", "-", "train loss"), ("val_loss", "o-", "val loss")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), style, label=label, markersize=3)
    ax.set(xlabel="step", ylabel="loss (nats per token)", title=run.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_write(run / "loss.png", "wb") as f:
        fig.savefig(f, format="png")
