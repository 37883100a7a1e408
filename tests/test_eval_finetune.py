"""`tweetlm eval tweeteval RUN`: a tiny pretrained run fine-tuned with a classification head per task, end to end
on a subsample of real TweetEval posts (files the official script reads, scores, the table beside the floor);
the head learning a separable task; padding that changes nothing; the same seed, the same predictions."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from tweetlm.cli import main
from tweetlm.eval.finetune import Classifier, _encode, _pad, finetuner
from tweetlm.eval.tweeteval import STANCE_TARGETS, Dataset, Split, load_task
from tweetlm.model.weights import load_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tweeteval"


class _Bar:
    """What a predictor may call on its tqdm bar."""

    def __init__(self):
        self.total, self.n, self.postfix = None, 0, ""

    def reset(self, total=None):
        self.total, self.n = total, 0

    def update(self, n=1):
        self.n += n

    def set_postfix_str(self, s="", refresh=True):
        self.postfix = s


def test_run_end_to_end_on_a_subsample(served_run, tmp_path, capsys):
    args = ["eval", "tweeteval", str(served_run), "--data", str(DATA), "--tasks", "irony,stance",
            "--max-train-examples", "40", "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--seed", "3"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    table = capsys.readouterr().out
    for row in ("tiny-chat", "tfidf", "FastText", "-- this run, val split"):
        assert row in table, table
    scores = json.loads((tmp_path / "a" / "scores.json").read_text())
    assert set(scores["scores"]) == {"tiny-chat", "tfidf"} and scores["config"]["epochs"] == 1
    run_preds = tmp_path / "a" / "tiny-chat"
    lines = (run_preds / "irony.txt").read_text().split("\n")
    assert len(lines) == 955 + 1 and lines[-1] == "" and set(lines[:-1]) <= {"0", "1"}  # the official reading
    for target, n in zip(STANCE_TARGETS, (66, 52, 40, 67, 69)):
        assert len((run_preds / "stance" / f"{target}.txt").read_text().split("\n")[:-1]) == n
    assert 0 <= scores["scores"]["tiny-chat"]["stance"] <= 1
    # the same seed gives the same predictions, file for file
    assert main([*args, "--tasks", "stance", "--out", str(tmp_path / "b")]) == 0
    for target in STANCE_TARGETS:
        path = Path("stance") / f"{target}.txt"
        assert (run_preds / path).read_bytes() == (tmp_path / "b" / "tiny-chat" / path).read_bytes(), target


def test_the_head_learns_a_separable_task(served_run):
    """Real posts, labelled by whether a marker word was put in them: the tiny run must learn to read it."""
    posts = [p.strip() for p in (DATA / "emotion" / "train_text.txt").read_text(encoding="utf-8").splitlines()[:300]]
    labels = np.arange(len(posts)) % 2
    texts = [f"zebra {p}" if y else p for p, y in zip(posts, labels)]
    train, val = Split(texts[:240], labels[:240]), Split(texts[240:], labels[240:])
    ds = Dataset("irony", None, ("not", "marked"), train, val, val)
    bar = _Bar()
    predict = finetuner(served_run, epochs=4, lr=1e-3, batch_size=16, device="cpu")
    pred = predict(ds, seed=0, progress=bar)
    assert (pred == val.labels).mean() >= 0.9, pred
    assert bar.n == bar.total == 4 * 15 and "best" in bar.postfix, bar.postfix
    # another split (test, say) is predicted by the state chosen on val: here the same posts, the same answers
    unlabelled = Split(list(val.texts), None)
    np.testing.assert_array_equal(predict(replace(ds, eval=unlabelled), seed=0, progress=_Bar()), pred)


def test_padding_changes_no_prediction(served_run):
    """The model is causal, so a post's logits are the same alone or right-padded beside a longer one."""
    trunk, tokenizer = load_model(served_run)
    model = Classifier(trunk, 3)
    torch.nn.init.normal_(model.head.weight, generator=torch.Generator().manual_seed(0))
    (irony,) = load_task(DATA, "irony", "val")
    posts = _encode(tokenizer, irony.val.texts[:6], trunk.config.max_seq_len)
    assert len({len(p) for p in posts}) > 1
    with torch.no_grad():
        together = model(*_pad(posts, list(range(6)), torch.device("cpu")))
        alone = torch.cat([model(*_pad(posts, [i], torch.device("cpu"))) for i in range(6)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)

