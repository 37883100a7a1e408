"""`tweetlm demo`, the README's first command, end to end on a slice of real tweets."""

from pathlib import Path

from tweetlm.cli import main

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_demo_runs_every_stage_and_writes_posts(tmp_path, capsys):
    data = [str(SHARED / "tweeteval/emotion/train_text.txt"), str(SHARED / "twitter-api-v2/flat.jsonl")]
    assert main(["demo", "--data", *data, "--out", str(tmp_path), "--minutes", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "val bits-per-byte:" in out and "tweetlm generate" in out
    assert out.count("  > ") == 4  # one generated post per prompt
    run = tmp_path / "run"
    assert (run / "metrics.jsonl").is_file() and any((run / "checkpoints").iterdir())
    # the printed next step works on that run, and stop strings end a post before them
    assert main(["generate", str(run), "--prompt", "I", "--seed", "1", "--temperature", "0", "--max-new-tokens", "20"]) == 0
    greedy = capsys.readouterr().out
    stop = greedy.strip()[2:4]
    assert main(["generate", str(run), "--prompt", "I", "--seed", "1", "--temperature", "0", "--max-new-tokens", "20", "--stop", stop]) == 0
    stopped = capsys.readouterr().out
    assert stop not in stopped[1:] and greedy.startswith(stopped.rstrip("\n"))


def test_generate_without_a_run_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1

