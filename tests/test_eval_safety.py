"""`tweetlm safety train` and `data prepare --drop-toxic`: a toxicity classifier trained on TweetEval's offensive
and hate posts that beats the majority class on val, saved without pickle and loaded to the same scores, and
the corpus filter that drops (and counts) what it flags, the same for any number of workers."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tweetlm.artifacts.safety import SafetyClassifier, parse_spec
from tweetlm.cli import main
from tweetlm.data.corpus import SPLITS
from tweetlm.data.prepare import PrepareConfig, prepare
from tweetlm.errors import UserError
from tweetlm.eval.safety import best_threshold
from tweetlm.eval.tweeteval import load_task

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tweeteval"


def _val() -> tuple[list[str], np.ndarray]:
    parts = [load_task(DATA, task, "val")[0].val for task in ("offensive", "hate")]
    return [t for p in parts for t in p.texts], np.concatenate([p.labels for p in parts])


def test_it_beats_the_majority_class_on_val(safety_model, capsys):
    _, result = safety_model
    val, majority = result["val"], result["val"]["majority"]
    assert val["posts"] == 1324 + 1000 and majority["f1"] == 0.0  # the majority class is "not toxic"
    assert val["accuracy"] > majority["accuracy"] and val["macro_f1"] > majority["macro_f1"] + 0.2, val
    assert val["f1"] > 0.5 and 0 < result["threshold"] < 1


def test_saved_without_pickle_and_loaded_to_the_same_scores(safety_model):
    path, result = safety_model
    assert sorted(p.name for p in path.iterdir()) == ["safety.json", "weights.safetensors"]
    info = json.loads((path / "safety.json").read_text())
    assert info["format"] == 1 and info["threshold"] == result["threshold"] and len(info["vocabulary"]["char"]) > 1000
    texts, gold = _val()
    classifier = SafetyClassifier.load(path)
    scores = classifier.score(texts)
    assert scores.shape == (len(texts),) and ((0 <= scores) & (scores <= 1)).all()
    # the metrics computed at training, from the in-memory model, come back from the loaded one
    flagged = scores >= classifier.threshold
    tp = int(np.sum(flagged & (gold == 1)))
    assert 2 * tp / (flagged.sum() + gold.sum()) == pytest.approx(result["val"]["f1"])
    assert np.array_equal(SafetyClassifier.load(path).score(texts[:50]), scores[:50])  # and again, the same bits
    assert np.array_equal(classifier.score(texts[:7]), scores[:7])  # a post's score does not depend on its batch
    assert SafetyClassifier.load(path, 0.9).threshold == 0.9


def test_threshold_of_best_f1_by_hand():
    # flag the top 3 of 4: tp 2, fp 1, fn 0 -> F1 0.8, the best; the threshold sits between 0.7 and 0.1
    assert best_threshold(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.7, 0.1])) == pytest.approx((0.4, 0.8))
    # tied scores are flagged together: no cut between the two 0.5s
    assert best_threshold(np.array([1, 0, 0]), np.array([0.5, 0.5, 0.2])) == pytest.approx((0.35, 2 / 3))


def test_spec_and_errors(tmp_path, capsys):
    assert parse_spec("work/safety") == (Path("work/safety"), None)
    assert parse_spec("work/safety:0.7") == (Path("work/safety"), 0.7)
    assert parse_spec("a:b/safety") == (Path("a:b/safety"), None)
    with pytest.raises(UserError, match=r"must be in \(0, 1\]"):
        parse_spec("work/safety:1.5")
    with pytest.raises(UserError, match="no safety classifier at .*nope.*tweetlm safety train"):
        SafetyClassifier.load(tmp_path / "nope")
    assert main(["safety", "train", "--data", str(tmp_path), "--out", str(tmp_path / "s")]) == 2
    assert main(["data", "prepare", str(DATA / "hate" / "val_text.txt"), "--out", str(tmp_path / "c"),
                 "--drop-toxic", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "no offensive/ in" in err[0] and "no safety classifier at" in err[1], err


# ---------------------------------------------------------------- data prepare --drop-toxic


def _corpus_texts(corpus: Path) -> list[str]:
    files = [f for s in SPLITS for f in sorted((corpus / s).glob("*.parquet"))]
    return [t for f in files for t in pq.read_table(f)["clean_text"].to_pylist()]


def test_prepare_drops_and_counts_toxic_posts(safety_model, tmp_path):
    path, _ = safety_model
    inputs = (str(DATA / "offensive" / "val_text.txt"), str(DATA / "hate" / "val_text.txt"))
    base = dict(inputs=inputs, near_dup_threshold=0.0)
    plain = prepare(PrepareConfig(out=tmp_path / "plain", **base))
    one = prepare(PrepareConfig(out=tmp_path / "one", drop_toxic=path, **base))
    assert one["invariant_ok"] and one["dropped"]["toxic"] > 200
    assert list(one["dropped"]) == [r for r in ("too_short", "spam", "toxic", "duplicate") if r in one["dropped"]]
    # the per-post filters before it drop the same; what reaches dedup is what it did not flag
    assert all(one["dropped"][r] == plain["dropped"][r] for r in ("too_short", "spam"))
    passed_the_others = [r["kept"] + r["dropped"].get("toxic", 0) + r["dropped"].get("duplicate", 0) for r in (one, plain)]
    assert passed_the_others[0] == passed_the_others[1]
    kept = _corpus_texts(tmp_path / "one")
    classifier = SafetyClassifier.load(path)
    assert (classifier.score(kept) < classifier.threshold).all()
    dropped = set(_corpus_texts(tmp_path / "plain")) - set(kept)
    assert (classifier.score(sorted(dropped)) >= classifier.threshold).all()
    # a stricter threshold drops fewer; two workers give the same corpus as one
    strict = prepare(PrepareConfig(out=tmp_path / "strict", drop_toxic=path, toxic_threshold=0.9, **base))
    assert 0 < strict["dropped"]["toxic"] < one["dropped"]["toxic"]
    two = prepare(PrepareConfig(out=tmp_path / "two", drop_toxic=path, workers=2, **base))
    assert two["dropped"] == one["dropped"] and _corpus_texts(tmp_path / "two") == kept
