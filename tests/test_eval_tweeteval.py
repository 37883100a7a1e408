"""`tweetlm eval tweeteval`: the official metrics (hand-computed cases, scikit-learn as the benchmark's script
calls it), the real TweetEval files read with clear errors, prediction files the official script can score,
the table, a predictor plugged in, and the TF-IDF baseline on real posts (sampled down to seconds)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import classification_report

from tweetlm.cli import main
from tweetlm.errors import UserError
from tweetlm.eval.metrics import f1, irony_f1, macro_f1, stance_f1
from tweetlm.eval.tweeteval import (PUBLISHED, STANCE_TARGETS, TweetEvalConfig, evaluate, format_table, load_task,
                                    tweeteval)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tweeteval"


# ---------------------------------------------------------------- metrics


def test_macro_f1_by_hand_with_its_edge_cases():
    # class 0: tp 1, fp 1, fn 1 -> 0.5; class 1: tp 2, fp 1 -> 0.8; class 2 never predicted -> 0, and it counts
    assert macro_f1([0, 0, 1, 1, 2], [0, 1, 1, 1, 0]) == pytest.approx((0.5 + 0.8 + 0) / 3)
    # class 2 predicted but absent from gold: F1 0, and it counts
    assert macro_f1([0, 0, 1], [0, 2, 1]) == pytest.approx((2 / 3 + 1 + 0) / 3)
    # a class in neither list (emotion's 3, say) does not count
    assert macro_f1([0, 1], [0, 1]) == 1.0
    assert macro_f1([1, 1, 1], [1, 1, 1]) == 1.0 and macro_f1([0, 0], [1, 1]) == 0.0
    assert f1([0, 1, 1], [0, 1, 0], 1) == pytest.approx(2 / 3)  # tp 1, fn 1


def test_irony_and_stance_by_hand():
    assert irony_f1([1, 1, 0, 0], [1, 0, 1, 0]) == pytest.approx(0.5)  # tp 1, fp 1, fn 1
    assert irony_f1([0, 0], [0, 0]) == 0.0  # no ironic post anywhere: no true positive
    # against (1): tp 1, fp 1 -> 2/3; favor (2): tp 1, fn 1 -> 2/3; none (0) is not averaged
    assert stance_f1([0, 1, 2, 2], [1, 1, 2, 0]) == pytest.approx(2 / 3)
    assert stance_f1([0, 0, 2], [0, 0, 2]) == pytest.approx(0.5)  # against absent from both: F1 0, still averaged


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 6).flatmap(lambda k: st.lists(st.tuples(st.integers(0, k - 1), st.integers(0, k - 1)),
                                                    min_size=1, max_size=40)))
def test_metrics_match_the_official_scripts_sklearn_call(pairs):
    gold, pred = map(list, zip(*pairs))
    # the benchmark's script: classification_report over the label files' strings
    report = classification_report([str(g) for g in gold], [str(p) for p in pred], output_dict=True, zero_division=0)
    assert macro_f1(gold, pred) == pytest.approx(report["macro avg"]["f1-score"])
    for label in ("1", "2"):
        expected = report[label]["f1-score"] if label in report else 0.0  # the script fails there; 0 is our answer
        assert f1(gold, pred, int(label)) == pytest.approx(expected)


# ---------------------------------------------------------------- the files


def test_real_splits_load_as_the_benchmark_counts_them():
    (emotion,) = load_task(DATA, "emotion", "val")
    assert emotion.labels == ("anger", "joy", "optimism", "sadness")
    assert (len(emotion.train.texts), len(emotion.val.texts)) == (3257, 374) and emotion.eval is emotion.val
    assert len(emotion.train.labels) == 3257 and set(emotion.val.labels) == {0, 1, 2, 3}
    stance = load_task(DATA, "stance", "val", max_train_examples=100, seed=3)
    assert [d.name for d in stance] == [f"stance/{t}" for t in STANCE_TARGETS]
    assert stance[0].labels == ("none", "against", "favor") and [len(d.val.texts) for d in stance] == [66, 52, 40, 67, 69]
    assert all(len(d.train.texts) == len(d.train.labels) == 100 for d in stance)
    again = load_task(DATA, "stance", "val", max_train_examples=100, seed=3)
    assert again[0].train.texts == stance[0].train.texts  # the sample is seeded


def _copy(task: str, tmp_path: Path) -> Path:
    shutil.copytree(DATA / task, tmp_path / task)
    return tmp_path


def test_bad_files_are_one_clear_error(tmp_path):
    data = _copy("irony", tmp_path)
    labels = data / "irony" / "val_labels.txt"
    labels.write_text("".join(labels.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(UserError, match=r"val_text.txt has 955 lines but .*val_labels.txt has 954"):
        load_task(data, "irony", "val")
    labels.write_text("0\n" * 954 + "7\n")
    with pytest.raises(UserError, match=r"val_labels.txt:955: '7' is not a label id of irony \(0..1"):
        load_task(data, "irony", "val")
    with pytest.raises(UserError, match="test split is held back"):
        load_task(DATA, "irony", "test")
    with pytest.raises(UserError, match="no hate/ in .* laid out as TweetEval's datasets/"):
        load_task(data, "hate", "val")
    for fields, says in (({"split": "dev"}, "choose val or test"), ({"tasks": ("irony", "sarcasm")}, "unknown sarcasm"),
                         ({"model": None}, "a RUN folder or --model tfidf"), ({"run": Path("r")}, "not both"),
                         ({"max_train_examples": 0}, "at least 1"), ({"epochs": 0}, "epochs = 0: must be at least 1"),
                         ({"batch_size": 0}, "must be at least 1"), ({"lr": 0.0}, "lr = 0.0: must be positive"),
                         ({"pooling": "max"}, "choose last or mean"), ({"layer_decay": 0.0}, r"must be in \(0, 1\]"),
                         ({"layer_decay": 1.5}, r"must be in \(0, 1\]"), ({"tapt_steps": -1}, "at least 0"),
                         ({"save": tmp_path / "kept"}, "keeps a fine-tuned run's classifiers: give a RUN")):
        with pytest.raises(UserError, match=says):
            TweetEvalConfig(**({"data": data, "out": tmp_path, "model": "tfidf"} | fields))


def test_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(UserError, match="holds no checkpoint"):  # before any data is read or model trained
        tweeteval(TweetEvalConfig(data=tmp_path, out=tmp_path, run=tmp_path))
    assert main(["eval", "tweeteval", str(tmp_path / "nothing"), "--data", str(DATA)]) == 2
    assert main(["eval", "tweeteval", "--model", "tfidf", "--data", str(tmp_path)]) == 2
    assert main(["eval", "tweeteval", "--model", "tfidf", "--data", str(DATA), "--epochs", "0"]) == 2
    assert main(["eval", "tweeteval", "--model", "tfidf", "--data", str(DATA), "--pooling", "max"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4 and "holds no checkpoint" in err[0] and "no emoji/ in" in err[1], err
    assert "--epochs 0: must be at least 1" in err[2]  # the library names the field, the CLI its flag
    assert "--pooling 'max': choose last or mean" in err[3]


# ---------------------------------------------------------------- predictions, scores, table


def _official_lines(path: Path) -> list[str]:
    return path.read_text().split("\n")[:-1]  # as the benchmark's script reads a file


def test_a_plugged_in_predictor_gets_files_scores_and_table(tmp_path, capsys):
    """The interface a fine-tuned language model will use: here, the train split's majority class."""
    seen = []

    def majority(ds, *, seed, progress):
        seen.append((ds.name, seed, len(ds.train.texts)))
        progress.reset(total=1)
        progress.update()
        return np.full(len(ds.eval.texts), np.bincount(ds.train.labels).argmax())

    cfg = TweetEvalConfig(data=DATA, out=tmp_path / "out", model="tfidf", tasks=("emotion", "stance"), seed=5)
    result = evaluate(cfg, {"majority": majority})
    assert seen[0] == ("emotion", 5, 3257) and [s[0] for s in seen[1:]] == [f"stance/{t}" for t in STANCE_TARGETS]
    (emotion,) = load_task(DATA, "emotion", "val")
    assert result["scores"]["majority"]["emotion"] == pytest.approx(macro_f1(emotion.val.labels, np.zeros(374, int)))
    for target, n in zip(STANCE_TARGETS, (66, 52, 40, 67, 69)):  # one file per target, its split's line count
        assert len(_official_lines(tmp_path / "out" / "majority" / "stance" / f"{target}.txt")) == n
    assert json.loads((tmp_path / "out" / "scores.json").read_text()) == result
    table = capsys.readouterr().out
    assert "majority" in table and "BERTweet" in table and "test split" in table

    def out_of_range(ds, *, seed, progress):
        return np.full(len(ds.eval.texts), 9)

    with pytest.raises(AssertionError, match="predicted ids outside 0..3"):
        evaluate(cfg, {"broken": out_of_range})


def test_table_averages_the_tasks_run():
    table = format_table({"m": {"irony": 0.5, "stance": None}}, ("irony", "stance"), "test")
    lines = table.splitlines()
    assert lines[1].split() == ["model", "irony", "stance", "avg"]
    assert lines[3].split() == ["m", "50.0", "-", "-"]  # no labels for stance: no score, no mean
    bertweet = next(line for line in lines if line.startswith("BERTweet")).split()
    assert bertweet == ["BERTweet", "82.1", "71.2", f"{(PUBLISHED['BERTweet']['irony'] + 71.2) / 2:.1f}"]


def test_tfidf_baseline_end_to_end_is_deterministic(tmp_path, capsys):
    args = ["eval", "tweeteval", "--model", "tfidf", "--data", str(DATA), "--split", "val", "--tasks", "irony,stance",
            "--max-train-examples", "300", "--seed", "1"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "tfidf" in out and "RoBERTa-base" in out and "-- this run, val split" in out
    scores = json.loads((tmp_path / "a" / "scores.json").read_text())
    (irony,) = load_task(DATA, "irony", "val")
    pred = np.array(_official_lines(tmp_path / "a" / "tfidf" / "irony.txt"), dtype=int)
    assert len(pred) == 955 and scores["scores"]["tfidf"]["irony"] == pytest.approx(irony_f1(irony.val.labels, pred))
    assert 0.3 < scores["scores"]["tfidf"]["stance"] < 1 and scores["config"]["max_train_examples"] == 300
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    for a in sorted((tmp_path / "a" / "tfidf").rglob("*.txt")):
        assert a.read_bytes() == (tmp_path / "b" / a.relative_to(tmp_path / "a")).read_bytes(), a
