"""`data fetch` takes TweetEval from a local copy (no network in tests)."""

from pathlib import Path

from tweetlm.cli import main
from tweetlm.data.fetch import fetch_tweeteval

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "tweeteval"


def test_fetch_from_local_copy_copies_every_file_present(tmp_path):
    written = fetch_tweeteval(out=tmp_path / "te", local=SHARED)
    present = [p for p in SHARED.rglob("*.txt")]
    assert len(written) == len(present)
    assert (tmp_path / "te/emoji/train_text.txt").read_bytes() == (SHARED / "emoji/train_text.txt").read_bytes()
    assert (tmp_path / "te/stance/hillary/val_labels.txt").is_file()


def test_fetch_from_a_folder_without_tweeteval_is_a_clear_error(tmp_path, capsys):
    assert main(["data", "fetch", "--from", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "holds no TweetEval files" in err and len(err.strip().splitlines()) == 1
